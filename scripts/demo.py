"""A real call through a running sipis, on this machine: the quick start's last step.

    scripts/demo [--api https://127.0.0.1:8443] [--data-dir data]

It starts a Kamailio registrar on loopback (users alice and bob), hands
alice's account to the running sipis over its HTTPS API, waits until sipis
has registered her, then calls her as bob with sipp through Kamailio.
sipis holds the call and pushes (its log says so: without APNs or FCM
credentials pushes are logged); the "app", sipp again, registers on the
device port with the instance's id and secret, takes the call, and bob
hangs up.  Finally the instance is deleted, and its purge-log entry shown.
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import ssl
import sys
import tempfile
from pathlib import Path
from typing import Any

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.peers.kamailio import Kamailio
from tests.peers.sipp import SippResult, run_sipp_client, scenario_path

USERS = {"alice": "wonderland", "bob": "builder"}


def step(text: str) -> None:
    print(f"\n== {text}", flush=True)


async def demo(api: str, data_dir: Path) -> int:
    context = ssl.create_default_context(cafile=str(data_dir / "tls" / "dev-certificate.pem"))
    with tempfile.TemporaryDirectory(prefix="sipis-demo-") as tmp:
        workdir = Path(tmp)
        step("Kamailio, the provider's SIP server, with users alice and bob")
        async with (
            Kamailio(USERS, min_expires=60, workdir=workdir / "kamailio") as kamailio,
            aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=context)) as http,
        ):
            print(f"registrar {kamailio.uri('udp')}")
            step(f"sipis at {api}")
            async with http.get(f"{api}/v1/info") as answer:
                info = await answer.json()
            device = next(uri for uri in info["sip"] if uri.endswith("transport=udp"))
            print(f"sipis {info['version']}, device port {device}")

            step("the app hands alice's account to sipis (POST /v1/instances)")
            body = _instance(kamailio.uri("udp"))
            async with http.post(f"{api}/v1/instances", json=body) as answer:
                created = await answer.json()
                if answer.status != 201:
                    print(f"refused: {answer.status} {created}")
                    if "loopback" in str(created.get("detail")):
                        print("this demo's Kamailio runs on loopback: start sipis with "
                              "./scripts/serve --allow-network 127.0.0.0/8")  # fmt: skip
                    return 1
            instance_id, secret = created["id"], created["secret"]
            print(f"instance {instance_id} (its secret is shown once, to the app)")
            await kamailio.wait_for_contacts("alice", bool, timeout=10)
            contact = (await kamailio.contacts("alice"))[0]
            print(f"Kamailio has alice registered by sipis: {contact['uri']}")

            step("bob calls alice through Kamailio; sipis pushes the app and holds the call")
            caller = asyncio.create_task(
                run_sipp_client(
                    "uac_call_answered_hang_up.xml",
                    kamailio.address("udp"),
                    service="alice",
                    timeout=20,
                    workdir=workdir / "bob",
                )
            )
            await asyncio.sleep(1.0)
            step("the woken app registers on the device port and takes the call")
            app = await _app(workdir, device, instance_id, secret)
            called = await caller
            _show("bob", called)
            _show("the app", app)

            step("the app disables push: sipis un-REGISTERs and erases the instance")
            headers = {"Authorization": f"Bearer {secret}"}
            async with http.delete(f"{api}/v1/instances/{instance_id}", headers=headers) as answer:
                print(f"DELETE: {answer.status}")
            await kamailio.wait_for_contacts("alice", lambda contacts: not contacts, timeout=10)
            print("Kamailio has no binding for alice any more")
            print(f"the purge log has the erasure: sipis audit show {instance_id}")
            ok = called.returncode == 0 and app.returncode == 0
            print("\ndemo " + ("complete: a call went through sipis" if ok else "FAILED"))
            return 0 if ok else 1


def _instance(registrar: str) -> dict[str, Any]:
    return {
        "app_id": "com.example.phone",
        "platform": "ios",
        "push": {"call_token": "ab" * 32, "other_token": "cd" * 32, "environment": "sandbox"},
        "accounts": [
            {
                "id": "home",
                "aor": "sip:alice@example.test",
                "password": USERS["alice"],
                "registrar": registrar,
                "expires": 600,
            }
        ],
    }


async def _app(workdir: Path, device: str, instance_id: str, secret: str) -> SippResult:
    host, _, rest = device.removeprefix("sip:").partition(":")
    port = int(rest.split(";", 1)[0])
    credentials = workdir / "app.csv"
    credentials.write_text(
        f'SEQUENTIAL\n{instance_id};[authentication username="{instance_id}" '
        f'password="{secret}"];\n'
    )
    arguments = [
        "-inf", str(credentials),
        "-oocsf", str(scenario_path("app_answer_caller_hangs_up.xml")),
        "-d", "3000",
    ]  # fmt: skip
    return await run_sipp_client(
        "app_register.xml",
        (socket.gethostbyname(host), port),
        arguments=arguments,
        timeout=15,
        workdir=workdir / "app",
    )


def _show(who: str, result: SippResult) -> None:
    print(f"{who}:")
    for message in dict.fromkeys(result.messages):  # retransmissions once
        arrow = "->" if message.direction == "sent" else "<-"
        print(f"  {arrow} {message.start_line}")
    if result.returncode != 0:
        print(result.errors)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--api", default="https://127.0.0.1:8443", help="the running sipis API")
    parser.add_argument("--data-dir", type=Path, default=Path("data"), help="its data.dir")
    args = parser.parse_args()
    sys.exit(asyncio.run(demo(args.api.rstrip("/"), args.data_dir)))


if __name__ == "__main__":
    main()
