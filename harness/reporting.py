"""What every benchmark prints: stdout is the report (BENCHMARKS.md holds it verbatim: bench/report.py), progress
goes to stderr. A header naming the machine and the command, tables, legends, verdicts."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import time

from .paths import REPO


def markdown_table(headers: list[str], rows: list[list]) -> str:
    def cell(v) -> str:
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 10 else f"{v:,.0f}"
        return str(v)

    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    out += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(out)


def machine_line() -> str:
    model = platform.processor() or "?"
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    except OSError:
        pass
    from importlib.metadata import version

    return (f"{os.cpu_count()} CPUs ({model}), torch {version('torch')}, deepspeed {version('deepspeed')}, "
            f"python {platform.python_version()}, {time.strftime('%Y-%m-%d %H:%M %Z')}")


def progress(*parts) -> None:
    """A progress line: to stderr, so that it stays out of the recorded report."""
    print(*parts, file=sys.stderr, flush=True)


def header(*notes: str) -> None:
    """The report's first lines: machine, versions, date and the benchmark's settings, then its own command."""
    print(" | ".join([machine_line(), *notes]))
    script = os.path.relpath(os.path.abspath(sys.argv[0]), REPO)
    print("command: python", " ".join([script, *sys.argv[1:]]), flush=True)


def legend(doc: str) -> None:
    """A benchmark's docstring up to its usage lines (``python bench/...``): what its configurations and columns
    mean, printed beside its tables so that the output reads on its own."""
    lines = []
    for line in doc.strip("\n").splitlines():
        if line.lstrip().startswith("python bench/"):
            break
        lines.append(line)
    print("\n" + "\n".join(lines).rstrip(), flush=True)


def judge(lo: float, hi: float, budget: float) -> str:
    """A cost against its budget from its spread: PASS when the upper end is within it; INCONCLUSIVE when it is not
    but the spread is wider than the budget (the noise hides the answer: more rounds or a quieter machine); FAIL
    otherwise."""
    if hi <= budget:
        return "PASS"
    return "INCONCLUSIVE" if hi - lo > budget else "FAIL"


def verdict(what: str, results: list[str]) -> int:
    """Prints ``verdict: WHAT: PASS|FAIL|INCONCLUSIVE`` (all rows must pass) and returns the exit status, 0 on PASS."""
    overall = "PASS" if all(r == "PASS" for r in results) else "FAIL" if "FAIL" in results else "INCONCLUSIVE"
    print(f"\nverdict: {what}: {overall}", flush=True)
    return 0 if overall == "PASS" else 1


def pct(x: float) -> str:
    return f"{x:+.2%}"


def pct_range(lo: float, hi: float) -> str:
    return f"{pct(lo)} .. {pct(hi)}"


def ratio_span(xs) -> str:
    """Ratios' min .. max (e.g. of per-round ratios)."""
    xs = list(xs)
    return f"{min(xs):.3f} .. {max(xs):.3f}"
