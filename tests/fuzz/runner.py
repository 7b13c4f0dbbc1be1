"""Run one fuzz target under atheris (libFuzzer).

    python -m tests.fuzz.runner TARGET [libFuzzer options] [corpus dirs or input files]

TARGET is a name in ``tests.fuzz.targets.TARGETS``.  The sipis package and
the targets are imported under atheris instrumentation, so their branches
guide the fuzzer.  (atheris's ``RegEx`` hook stays off: it cannot read the
possessive quantifiers the grammar uses, and its pattern proxy refuses the
``pos`` argument of ``Pattern.match``.)  Given files instead of directories,
libFuzzer runs each once: that is how a crash file is replayed.  This
module needs its own process: libFuzzer owns the signal handlers and
ends it with ``sys.exit``.
"""

from __future__ import annotations

import sys

import atheris


def main(argv: list[str]) -> None:
    if len(argv) < 2 or argv[1].startswith("-"):
        sys.exit(f"usage: python -m {__spec__.name if __spec__ else 'runner'} TARGET [args]")
    with atheris.instrument_imports(include=["sipis", "tests.fuzz"]):
        from tests.fuzz.targets import TARGETS
    if argv[1] not in TARGETS:
        sys.exit(f"no fuzz target {argv[1]!r}; there are {', '.join(TARGETS)}")
    target = TARGETS[argv[1]]

    def test_one_input(data: bytes) -> None:
        target(data)

    atheris.Setup([argv[0], *argv[2:]], test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main(sys.argv)
