#!/usr/bin/env python
"""Run benchmarks and write what they print into BENCHMARKS.md, verbatim.

BENCHMARKS.md holds nothing but benchmark output: each section is the command, the commit it ran at, its exit status
and its standard output, between markers this script owns. Re-running one benchmark replaces its section only, so
the file never mixes a figure with a hand-written note. Progress goes to standard error and is not recorded.

    python bench/report.py faults decision_costs  # run these two and replace their sections
    python bench/report.py --list                # the sections and their commands
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
REPORT = REPO / "BENCHMARKS.md"

# (name, heading, command run from the repository root); the order is the file's
SECTIONS = [
    ("awd_throughput", "AWD-LSTM training throughput (issue 2)", "python bench/awd_throughput.py"),
    ("awd_one_epoch", "AWD-LSTM: one epoch, seeds 1-3 on 1 rank and seed 1 on 2 ranks (issues 12, 21)",
     "python bench/awd_one_epoch.py"),
    ("awd_learning_curve", "AWD-LSTM: five epochs on 2 ranks, a healthy learning curve (issue 21)",
     "python bench/awd_learning_curve.py"),
    ("pointer_eval", "Cache-pointer evaluation (issue 3)", "python bench/pointer_eval.py"),
    ("imagenet_throughput", "ImageNet: engine against a plain loop (issue 4)",
     "python bench/imagenet_throughput.py"),
    ("decision_costs", "Design decisions: what each costs, side by side (issues 2, 3, 6, 12)",
     "python bench/decision_costs.py"),
    ("faults", "Faults (issue 6)", "python bench/faults.py"),
    ("bad_inputs", "Bad input (issue 6)", "python bench/bad_inputs.py"),
    ("cluster", "Clusters: two hosts over ssh, a Slurm cluster (issue 11)",
     "python bench/cluster.py --rounds 2 --steps 240 --requeues 2"),
    ("gpu_rehearsal", "GPU check rehearsal: the GPU machine's Python and torch, on CPU (issue 20)",
     "bash bench/gpu_rehearsal.sh"),
    ("gpu_check", "GPU check (issue 20)", "bash bench/gpu_check.sh runs/gpu_check"),
]

PREAMBLE = """# Benchmarks

Every section below is written by `python bench/report.py NAME`: the command, the commit whose code ran, the exit
status and the command's standard output, verbatim (progress goes to standard error and is left out). Nothing here
is typed by hand. Run from the repository root with `.venv` active and the data in `../shared/data`.
"""


def marker(name: str, end: bool = False) -> str:
    return f"<!-- {'/' if end else ''}bench:{name} -->"


def commit() -> str:
    """The commit that ran, marked when the working tree differs from it (then the figures are not reproducible).
    BENCHMARKS.md itself does not count: this script rewrites it after every benchmark of a run."""
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                          text=True).stdout.strip() or "unknown"
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".", ":!BENCHMARKS.md"],
                           cwd=REPO, capture_output=True, text=True).stdout.strip()
    return f"{head} plus uncommitted changes" if dirty else head


def section(name: str, heading: str, command: str, status: int, stdout: str, started: str, seconds: float,
            code: str) -> str:
    """The section, stdout verbatim in a code block; a printed markdown image line (``![what](path)``, a figure
    the benchmark drew) is also shown as the image below it."""
    images = "".join(f"\n{line}\n" for line in stdout.splitlines() if re.match(r"^!\[[^\]]*\]\([^)]+\)$", line))
    return (f"{marker(name)}\n## {heading}\n\n`{command}` at commit `{code}`, started {started}, "
            f"{seconds / 60:.1f} min, exit status {status}. It printed:\n\n```\n{stdout.rstrip()}\n```\n{images}"
            f"{marker(name, end=True)}\n")


def existing() -> dict[str, str]:
    text = REPORT.read_text() if REPORT.exists() else ""
    return {m.group(1): m.group(0) + "\n" for m in
            re.finditer(r"<!-- bench:(\w+) -->\n.*?<!-- /bench:\1 -->", text, re.DOTALL)}


def write(sections: dict[str, str]) -> None:
    REPORT.write_text(PREAMBLE + "".join("\n" + sections[name] for name, _, _ in SECTIONS if name in sections))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="sections to run (default: none; see --list)")
    parser.add_argument("--list", action="store_true")
    args = parser.parse_args(argv)
    known = {name: (heading, command) for name, heading, command in SECTIONS}
    if args.list or not args.names:
        for name, _, command in SECTIONS:
            print(f"{name:22} {command}")
        return 0
    unknown = [n for n in args.names if n not in known]
    if unknown:
        print(f"error: unknown section(s) {', '.join(unknown)}; see --list", file=sys.stderr)
        return 2
    failed = []
    for name in args.names:
        heading, command = known[name]
        code = commit()  # read before the run: the code that ran, whatever is committed meanwhile
        started, t0 = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), time.monotonic()
        print(f"== {command}", file=sys.stderr, flush=True)
        argv = command.split()
        argv[0] = sys.executable if argv[0] == "python" else argv[0]  # this interpreter (the venv's) for python
        proc = subprocess.run(argv, cwd=REPO, stdout=subprocess.PIPE, text=True)
        sys.stderr.write(proc.stdout)
        sections = existing()
        sections[name] = section(name, heading, command, proc.returncode, proc.stdout, started,
                                 time.monotonic() - t0, code)
        write(sections)  # after each run, so a later failure keeps what was measured
        if proc.returncode:
            failed.append(f"{name} (exit {proc.returncode})")
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
