"""The ``sipis`` command: serve, check-config, status, push test, keys, audit, version."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

from sipis import __version__, logs
from sipis.app import open_keys, open_store, push_providers, serve
from sipis.audit import AuditKeys, export_lines, verify
from sipis.config import Config, ConfigError, load_config, with_allowed_networks
from sipis.crypto import MasterKeyring
from sipis.instances import stored_routing
from sipis.progress import Progress
from sipis.push.base import Delivered, Kind
from sipis.push.compose import compose
from sipis.status import StatusError, fetch, render
from sipis.store import StoreError

# How long a rotation waits before retiring old master keys, so that a running
# server that wrapped a key just before it noticed the rotation is seen too.
SETTLE = 2.0


def main(argv: list[str] | None = None) -> int:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", type=Path, help="TOML configuration file")
    parser = argparse.ArgumentParser(
        prog="sipis", description="VoIP push-notification registration relay."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    serve_command = commands.add_parser("serve", parents=[common], help="run the relay")
    serve_command.add_argument(
        "--allow-network",
        action="append",
        default=[],
        metavar="CIDR",
        help="also allow registrars in this loopback or private network "
        "(adds to sip.allowed_networks; e.g. 127.0.0.0/8 for a registrar on this machine)",
    )
    commands.add_parser(
        "check-config", parents=[common], help="check every key of a configuration, then exit"
    )
    status = commands.add_parser(
        "status", parents=[common], help="a running node's numbers at a glance"
    )
    status.add_argument("--url", help="the node's stats URL (default: from the configuration)")
    status.add_argument("--json", action="store_true", help="the numbers as JSON")
    push = commands.add_parser("push", help="push notifications").add_subparsers(
        dest="action", required=True
    )
    test_push = push.add_parser(
        "test", parents=[common], help="send a test push to an instance's app"
    )
    test_push.add_argument("instance_id", help="the instance whose app gets the push")
    commands.add_parser("version", help="print the version")
    keys = commands.add_parser("keys", help="key management").add_subparsers(
        dest="action", required=True
    )
    keys.add_parser(
        "rotate", parents=[common], help="new master and HPKE keys; re-wrap every data key"
    )
    audit = commands.add_parser("audit", help="check the purge log").add_subparsers(
        dest="action", required=True
    )
    verify_cmd = audit.add_parser(
        "verify", parents=[common], help="verify the chain and every signature"
    )
    verify_cmd.add_argument("--public-key", help="the audit public key (base64) to verify with")
    show = audit.add_parser("show", parents=[common], help="the purge-log entry of an instance")
    show.add_argument("instance_id")
    audit.add_parser("overdue", parents=[common], help="instances held past their lifetime")
    export = audit.add_parser(
        "export", parents=[common], help="the purge log as JSON lines, with the public key"
    )
    export.add_argument("--output", type=Path, help="file to write (default: standard output)")
    args = parser.parse_args(argv)

    if args.command == "version":
        print(f"sipis {__version__}")
        return 0
    try:
        config = load_config(args.config)
        if getattr(args, "allow_network", None):
            config = with_allowed_networks(config, args.allow_network)
    except ConfigError as exc:
        print(f"sipis: configuration error: {exc}", file=sys.stderr)
        return 2
    if args.command == "check-config":
        return check_config(config, args.config)
    if args.command == "status":
        return show_status(config, args)
    logs.configure(config.log.level, config.log.format, config.log.debug_instance)
    try:
        if args.command == "serve":
            asyncio.run(serve(config))
            return 0
        if args.command == "keys":
            return asyncio.run(rotate_keys(config))
        if args.command == "push":
            return asyncio.run(push_test(config, args.instance_id))
        return asyncio.run(AUDIT[args.action](config, args))
    except StoreError as exc:
        print(f"sipis: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"sipis: cannot start: {exc}", file=sys.stderr)
        return 1


def check_config(config: Config, path: Path | None) -> int:
    """Every key was checked while loading; say so, with the warnings."""
    for warning in config.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    print(f"configuration OK: {path or 'embedded defaults'}")
    return 0


def show_status(config: Config, args: argparse.Namespace) -> int:
    try:
        stats = fetch(config, args.url)
    except StatusError as exc:
        print(f"sipis: {exc}", file=sys.stderr)
        return 1
    sys.stdout.write(json.dumps(stats, indent=2) + "\n" if args.json else render(stats))
    return 0


async def push_test(config: Config, instance_id: str) -> int:
    """Send a test push to the app of an instance, through the configured providers."""
    keys = open_keys(config)
    store = open_store(config)
    await store.open()
    try:
        routing = await stored_routing(store, keys.master, instance_id)
    finally:
        await store.close()
    if routing is None:
        print(f"sipis: no instance {instance_id}", file=sys.stderr)
        return 1
    push = compose(Kind.TEST, routing)
    if push is None:
        print("sipis: the instance has no token for a test push (an iOS app needs other_token: "
              "VoIP pushes are for calls only)", file=sys.stderr)  # fmt: skip
        return 1
    providers = push_providers(config)
    provider = providers[routing.platform]
    try:
        outcome = await provider.send(push)
    finally:
        for each in providers.values():
            await each.close()
    print(f"{provider.name}: {outcome}")
    return 0 if isinstance(outcome, Delivered) else 1


async def rotate_keys(config: Config) -> int:
    """A new master key with every data key re-wrapped under it; new HPKE keys."""
    keys = open_keys(config)
    master = keys.master
    new_id = master.rotate()
    store = open_store(config)
    await store.open()
    try:
        moved = 0
        for attempt in range(2):
            pending = [(i, w) for i, w in await store.wrapped_keys()
                       if MasterKeyring.key_id_of(w) != new_id]  # fmt: skip
            progress = Progress("data keys re-wrapped", len(pending))
            for instance_id, wrapped in progress.over(pending):
                data_key = master.unwrap(instance_id, wrapped)
                try:
                    if await store.rewrap(instance_id, wrapped, master.wrap(instance_id, data_key)):
                        moved += 1
                finally:
                    data_key.destroy()
            if attempt == 0:
                await asyncio.sleep(SETTLE)
        in_use = {MasterKeyring.key_id_of(w) for _, w in await store.wrapped_keys()}
        retired = [k for k in master.key_ids() if k != new_id and k not in in_use]
        if retired:
            master.retire(retired)
    finally:
        await store.close()
    hpke = keys.hpke.rotate()
    print(f"master key {new_id}: {moved} data key(s) re-wrapped, {len(retired)} old key(s) retired")
    print("hpke keys: " + ", ".join(f"{suite} {key_id}" for suite, key_id in hpke.items()))
    return 0


def _audit_keys(config: Config) -> AuditKeys:
    return AuditKeys.load_or_create(config.keys_dir / "audit.json")


async def audit_verify(config: Config, args: argparse.Namespace) -> int:
    public_key = args.public_key or _audit_keys(config).public_key_b64
    store = open_store(config)
    await store.open()
    try:
        entries = await store.purge_log()
        checkpoints = await store.checkpoints()
    finally:
        await store.close()
    progress = Progress("entries verified", len(entries))
    report = verify(progress.over(entries), checkpoints, public_key)
    for finding in report.findings:
        print(finding)
    verdict = "intact" if report.ok else "NOT intact"
    print(f"purge log {verdict}: {report.entries} entries, {report.checkpoints} checkpoints")
    return 0 if report.ok else 1


async def audit_show(config: Config, args: argparse.Namespace) -> int:
    subject = _audit_keys(config).subject(args.instance_id)
    store = open_store(config)
    await store.open()
    try:
        entries = [e for e in await store.purge_log() if e.subject == subject]
    finally:
        await store.close()
    for entry in entries:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(entry.at))
        print(f"entry {entry.seq}: erased {when} UTC, reason {entry.reason}, "
              f"erased {json.dumps(entry.erased, sort_keys=True)}")  # fmt: skip
    if not entries:
        print("no purge-log entry for that instance")
        return 1
    return 0


async def audit_overdue(config: Config, args: argparse.Namespace) -> int:
    grace = 2 * config.lifecycle.sweep_interval
    store = open_store(config)
    await store.open()
    try:
        overdue = [r for r in await store.all() if r.expires_at + grace < time.time()]
    finally:
        await store.close()
    for row in overdue:
        print(f"{row.id}: lifetime ended {time.time() - row.expires_at:.0f} s ago")
    print(f"{len(overdue)} instance(s) held past their lifetime")
    return 1 if overdue else 0


async def audit_export(config: Config, args: argparse.Namespace) -> int:
    keys = _audit_keys(config)
    store = open_store(config)
    await store.open()
    try:
        lines = list(export_lines(await store.purge_log(), await store.checkpoints(),
                                  keys.public_key_b64))  # fmt: skip
    finally:
        await store.close()
    text = "".join(lines)
    if args.output is None:
        sys.stdout.write(text)
    else:
        args.output.write_text(text)
    return 0


AUDIT = {
    "verify": audit_verify,
    "show": audit_show,
    "overdue": audit_overdue,
    "export": audit_export,
}

if __name__ == "__main__":
    sys.exit(main())
