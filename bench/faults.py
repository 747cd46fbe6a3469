#!/usr/bin/env python
"""Faults injected into real 2-rank ``awd_ptb`` runs, each followed by ``--resume``: what was lost, what was
shown, how long the job took to end. Every cell is measured from the runs; the legend the script prints says how.

For every scenario: start a small run (checkpoint every 5 steps, a log line every step), snapshot its data
(``metrics.jsonl`` lines, every file of every checkpoint that verifies, with its SHA-256), inject the fault, wait
for every process of the job to exit, resume it for two more steps and compare the data with the snapshot.
Progress goes to standard error; standard output is the report (header, table, notes, legend, verdict), and the
exit status is 1 when the verdict fails.

    python bench/faults.py [--only NAME,...] [--lost-rank-timeout 60]
"""

from __future__ import annotations

import argparse
import os
import sys

from harness.corpora import short_eval_data
from harness.faults import SCENARIOS, run_lost_node, run_scenario
from harness.paths import cleanup, scratch_dir
from harness.reporting import machine_line, markdown_table, verdict

LEGEND = """\
exit s: from the fault (the signal or kill sent; a fault the run injects itself: its first "error:" line seen) to
  the job's last process gone; "-": no job was running at the fault, or it went on past it
exit code: of the process the user started for the run the fault struck (the deepspeed runner; lost_node: node 0's)
steps lost: last step the run logged minus the step its resume started from; a run that went on: steps up to its
  last that trained nothing (no loss logged)
tracebacks: "Traceback" in the output of the run and of its resume
data lost: metrics.jsonl lines and checkpoints (every file, size and SHA-256) that existed before the fault and are
  gone or changed at the end (after the resume; "best" counts only if gone or failing verification: a better
  validation replaces it); a checkpoint the fault itself damaged is noted, not counted
resumed: the resume exited 0, started at its checkpoint's step and logged every step from there to its end"""


def main() -> int:
    names = [*SCENARIOS, "lost_node"]
    ap = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    ap.add_argument("--only", default="", help=f"comma-separated scenario names (default: all of {','.join(names)})")
    ap.add_argument("--lost-rank-timeout", type=float, default=60.0, help="train.lost_rank_timeout_s")
    args = ap.parse_args()
    chosen = [n for n in args.only.split(",") if n] or names
    if unknown := [n for n in chosen if n not in names]:
        ap.error(f"unknown scenario(s) {', '.join(unknown)}; choose from {', '.join(names)}")
    print(machine_line(), f"| awd_ptb 32/48, 2 ranks, lost_rank_timeout_s={args.lost_rank_timeout:g}", flush=True)
    root = scratch_dir("faults-")
    data_root = short_eval_data()
    results = []
    try:
        for name in chosen:
            results.append(run_lost_node(root, data_root, args.lost_rank_timeout) if name == "lost_node"
                           else run_scenario(name, root, data_root, args.lost_rank_timeout))
            print(" | ".join(str(c) for c in results[-1][0]), file=sys.stderr, flush=True)
    finally:
        if os.environ.get("KEEP"):
            print("kept", root, file=sys.stderr)
        else:
            cleanup(root)
        cleanup(data_root.parent)
    rows = [row for row, _, _ in results]
    print()
    print(markdown_table(["scenario", "fault", "exit s", "exit code", "steps lost", "tracebacks", "data lost",
                          "resumed"], rows))
    print("\nNotes (derived from the runs):")
    print("\n".join(f"- {note}" for _, note, _ in results))
    print("\nColumns:\n" + LEGEND)
    tracebacks, lost = sum(r[5] for r in rows), sum(r[6] for r in rows)
    passed = sum(ok for _, _, ok in results)
    good = tracebacks == 0 and lost == 0 and passed == len(results)
    return verdict(f"tracebacks {tracebacks}, data lost {lost}, {passed} of {len(results)} scenarios resumed or "
                   f"went on as they should", ["PASS" if good else "FAIL"])


if __name__ == "__main__":
    sys.exit(main())
