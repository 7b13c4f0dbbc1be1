"""Fuzz one SIP parser target for as long as asked, and report what it found.

    python bench/fuzz.py --target message --seconds 600 [--corpus DIR] [--workdir DIR]

Targets (tests/fuzz/targets.py): "message" (a datagram: parse, read every
header, write back out), "stream" (the TCP framer fed in cuts), "digest"
(WWW-Authenticate and Authorization values).  Prints executions per second,
coverage (edges and features), the corpus size and the crashes found, each
with its reproducer file and the command that replays it.  libFuzzer stops
at the first crash; exit status 1 then.  ``--corpus`` keeps the corpus
grown by a run for the next one.  The CI test (tests/unit/test_fuzz_coverage.py)
runs the same targets for a few seconds each.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.fuzz import campaign
from tests.fuzz.targets import TARGETS


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", choices=sorted(TARGETS), default="message")
    parser.add_argument("--seconds", type=float, default=600.0)
    parser.add_argument("--corpus", type=Path, help="corpus kept between runs (read, then grown)")
    parser.add_argument(
        "--workdir", type=Path, help="where the run's files go (default: temporary)"
    )
    args = parser.parse_args()

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix=f"sipis-fuzz-{args.target}-"))
    if args.corpus is not None:
        args.corpus.mkdir(parents=True, exist_ok=True)
    print(f"fuzzing {args.target} for {args.seconds:.0f} s in {workdir}", flush=True)
    run = campaign.start(args.target, args.seconds, workdir, corpus=args.corpus)
    try:
        report = campaign.finish(run)
    finally:
        campaign.stop(run)
    if args.corpus is not None:
        for unit in (workdir / "corpus").iterdir():
            if not (args.corpus / unit.name).exists():
                shutil.copyfile(unit, args.corpus / unit.name)

    print(f"executions:      {report.executions} ({report.executions_per_second}/s)")
    print(f"coverage:        {report.coverage} edges, {report.features} features")
    print(f"corpus:          {report.corpus_units} units")
    print(f"crashes found:   {len(report.crashes)}")
    for crash in report.crashes:
        print(f"  {crash} ({crash.stat().st_size} bytes): {crash.read_bytes()[:200]!r}")
        print(f"  replay: python -m tests.fuzz.runner {args.target} {crash}")
    if report.crashes or report.returncode != 0:
        print(report.output[-4000:])
        return 1
    if args.workdir is None:
        shutil.rmtree(workdir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
