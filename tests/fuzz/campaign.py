"""A bounded fuzzing run of one target in a child process, and what it found.

``start`` writes the seed corpus and dictionary into a work directory and
starts ``tests.fuzz.runner`` there; ``finish`` waits for it (bounded) and
reads libFuzzer's report: executions, speed, coverage, and the files of any
crash.  The repository is never written to: new corpus units and crash
files stay in the work directory.
"""

from __future__ import annotations

import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from tests.fuzz import seeds
from tests.fuzz.targets import TARGETS

ROOT = Path(__file__).resolve().parent.parent.parent
# The longest input per target, above every seed (the longest RFC 4475
# message is 3.5 kB, the framed conversation 3.5 kB).  A datagram may be
# longer than Python's limit on int() of a digit string (4300 digits);
# a stream is fed twice, so longer ones only slow the fuzzer down;
# authentication values are short.
MAX_LEN = {"message": 8192, "stream": 4096, "digest": 1024}
# One input taking this long is reported as a hang (a "timeout-" crash file).
INPUT_TIMEOUT_SECONDS = 10
# Beyond its time budget the child may take this long to start and report.
GRACE_SECONDS = 60

_STATUS_LINE = re.compile(r"^#(\d+)\s+\w+\s+cov: (\d+) ft: (\d+) corp: (\d+)", re.MULTILINE)
_STAT = re.compile(r"^stat::(\w+):\s*(\d+)", re.MULTILINE)
_ARTIFACT = re.compile(r"Test unit written to (\S+)")


@dataclass(frozen=True)
class Run:
    """A started fuzzing run."""

    target: str
    seconds: float
    workdir: Path
    process: subprocess.Popen[str]


@dataclass(frozen=True)
class Report:
    """What a fuzzing run did and found, as libFuzzer told it."""

    target: str
    returncode: int
    executions: int
    executions_per_second: int
    coverage: int
    features: int
    corpus_units: int
    new_units: int
    crashes: tuple[Path, ...]
    output: str

    def describe(self) -> str:
        lines = [
            f"{self.target}: {self.executions} executions ({self.executions_per_second}/s), "
            f"cov {self.coverage}, ft {self.features}, corpus {self.corpus_units} "
            f"({self.new_units} new), "
            f"exit {self.returncode}, {len(self.crashes)} crash file(s)"
        ]
        for crash in self.crashes:
            lines.append(f"reproducer {crash} ({crash.stat().st_size} bytes):")
            lines.append(f"  {crash.read_bytes()!r}")
            lines.append(f"  replay: python -m tests.fuzz.runner {self.target} {crash}")
        lines.append("--- end of the fuzzer's output ---")
        lines.append(self.output[-6000:])
        return "\n".join(lines)


def command(target: str, seconds: float, workdir: Path) -> list[str]:
    """The runner's command line for a run of ``seconds`` with its files in ``workdir``."""
    return [
        sys.executable,
        "-m",
        "tests.fuzz.runner",
        target,
        f"-max_total_time={max(1, round(seconds))}",
        f"-dict={workdir / 'dictionary'}",
        f"-max_len={MAX_LEN[target]}",
        f"-timeout={INPUT_TIMEOUT_SECONDS}",
        f"-artifact_prefix={workdir / 'artifacts'}/",
        "-print_final_stats=1",
        str(workdir / "corpus"),
    ]


def start(target: str, seconds: float, workdir: Path, *, corpus: Path | None = None) -> Run:
    """Start fuzzing ``target`` for ``seconds``.

    The work directory gets the seed corpus (plus the units of ``corpus``,
    a corpus kept from earlier runs) and the dictionary.
    """
    if target not in TARGETS:
        raise ValueError(f"no fuzz target {target!r}; there are {', '.join(TARGETS)}")
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "artifacts").mkdir(exist_ok=True)
    seeds.write(target, workdir / "corpus", workdir / "dictionary")
    if corpus is not None:
        for unit in sorted(corpus.iterdir()):
            if unit.is_file():
                (workdir / "corpus" / unit.name).write_bytes(unit.read_bytes())
    process = subprocess.Popen(
        command(target, seconds, workdir),
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
    )
    return Run(target, seconds, workdir, process)


def finish(run: Run) -> Report:
    """Wait for ``run`` (at most its time budget plus a grace period) and read its report."""
    try:
        output, _ = run.process.communicate(timeout=run.seconds + GRACE_SECONDS)
    except subprocess.TimeoutExpired:
        run.process.kill()
        output, _ = run.process.communicate()
        output += f"\n(killed: still running {GRACE_SECONDS} s past its time budget)"
    return read_report(run.target, run.process.returncode, output, run.workdir)


def stop(run: Run) -> None:
    """End ``run`` if it is still going (a test that stopped waiting for it)."""
    if run.process.poll() is None:
        run.process.kill()
        run.process.communicate()


def read_report(target: str, returncode: int, output: str, workdir: Path) -> Report:
    stats = {name: int(value) for name, value in _STAT.findall(output)}
    status = _STATUS_LINE.findall(output)
    _, coverage, features, corpus_units = (int(v) for v in status[-1]) if status else (0,) * 4
    written = {Path(path) for path in _ARTIFACT.findall(output)}
    found = {path for path in (workdir / "artifacts").iterdir() if path.is_file()}
    return Report(
        target=target,
        returncode=returncode,
        executions=stats.get("number_of_executed_units", 0),
        executions_per_second=stats.get("average_exec_per_sec", 0),
        coverage=coverage,
        features=features,
        corpus_units=corpus_units,
        new_units=stats.get("new_units_added", 0),
        crashes=tuple(sorted(written | found)),
        output=output,
    )
