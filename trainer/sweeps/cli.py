"""``launch/sweep.py``: check the sweep file, then run, submit or summarize its points."""

from __future__ import annotations

import argparse

from ..errors import ConfigError
from .points import expand
from .spec import check_points, load_spec


def sweep_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="launch/sweep.py", description="Run a grid of one recipe's hyperparameters.")
    p.add_argument("sweep", metavar="SWEEP.yaml")
    p.add_argument("--backend", choices=["local", "slurm", "hostfile"],
                   help="local: one point after another here; hostfile: the same over the deepspeed hostfile; "
                        "slurm: one submitit job per point")
    p.add_argument("--dry-run", action="store_true", help="print what would run or be submitted; start nothing")
    p.add_argument("--summarize", action="store_true",
                   help="write summary.csv/.md/.png and TensorBoard hparams (after the run, with --backend)")
    p.add_argument("--debug", action="store_true", help="show full tracebacks")
    return p


def sweep(args: argparse.Namespace) -> int:
    if not args.backend and not args.summarize:
        raise ConfigError("choose --backend local|slurm|hostfile, or --summarize to only summarize")
    spec = load_spec(args.sweep)
    points = expand(spec)
    check_points(spec, points)
    print(f"sweep {args.sweep}: recipe {spec.recipe}, {len(points)} point(s) in {spec.sweep_dir}", flush=True)
    failed: list[str] = []
    if args.backend:
        from .backends import plan, run_sequential, submit_slurm

        steps = plan(points)
        if args.backend == "slurm":
            submit_slurm(spec, steps, args.dry_run)
        else:
            failed = run_sequential(spec, steps, args.backend, args.dry_run)
    if not args.dry_run and (args.summarize or args.backend in ("local", "hostfile")):
        from .summary import summarize

        summarize(spec, points)
    if failed:
        raise ConfigError(f"{len(failed)} of {len(points)} point(s) failed: {', '.join(failed)}; "
                          "their errors are above, rerun the sweep to resume them")
    return 0
