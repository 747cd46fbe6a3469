"""``launch/sweep.py``: check the sweep file, then run, submit or summarize its points."""

from __future__ import annotations

import argparse

from ..errors import ConfigError
from .changes import FLAG, describe, find_changes, keys_text
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
    p.add_argument("--status", action="store_true",
                   help="one line per point: state (pending, queued, running, done, failed, changed), requeues, "
                        "run directory")
    p.add_argument(FLAG, dest="restart_changed", action="store_true",
                   help="points whose config changed since they ran (base or grid edited): move their run "
                        "directories aside (<point>.replaced-<UTC time>) and start them afresh")
    p.add_argument("--debug", action="store_true", help="show full tracebacks")
    return p


def sweep(args: argparse.Namespace) -> int:
    if not args.backend and not args.summarize and not args.status:
        raise ConfigError("choose --backend local|slurm|hostfile, or --summarize or --status")
    spec = load_spec(args.sweep)
    points = expand(spec)
    configs = check_points(spec, points)
    changes = find_changes(points, configs)  # before anything runs or is written: a run of another config
    print(f"sweep {args.sweep}: recipe {spec.recipe}, {len(points)} point(s) in {spec.sweep_dir}", flush=True)
    if args.status:
        print_status(spec, points, changes)
        if not args.backend and not args.summarize:
            return 0
    changed = [changes[p.name] for p in points if p.name in changes]
    stop = bool(changed) and not (args.restart_changed and args.backend)
    if stop and not args.dry_run:
        raise ConfigError(describe(changed, args.sweep))
    failed: list[str] = []
    if args.backend:
        from .backends import plan, run_sequential, submit_slurm

        steps = plan(points, spec, changes, args.restart_changed)
        if args.backend == "slurm":
            submit_slurm(spec, steps, args.dry_run)
        else:
            failed = run_sequential(spec, steps, args.backend, args.dry_run)
    if stop:  # a dry run has shown what it can; the sweep itself would stop here, before running anything
        raise ConfigError(describe(changed, args.sweep))
    if not args.dry_run and (args.summarize or args.backend in ("local", "hostfile")):
        from .summary import summarize

        summarize(spec, points)
    if failed:
        raise ConfigError(f"{len(failed)} of {len(points)} point(s) failed: {', '.join(failed)}; "
                          "their errors are above, rerun the sweep to resume them")
    return 0


def print_status(spec, points, changes=None) -> None:
    """Each point's state from its run directory, its jobs.json record and what the scheduler says of that job;
    ``changed`` where the sweep file's config of the point is not the one its run was trained with."""
    from . import jobs
    from .status import point_state

    records = jobs.load(spec)
    slurm = jobs.slurm_states([r["job"] for r in records.values() if r.get("backend") == "slurm"])
    width = max(len(p.name) for p in points)
    for p in points:
        entry = records.get(p.name)
        job = None
        if entry is not None:
            job = slurm.get(entry["job"]) if entry.get("backend") == "slurm" else jobs.local_state(entry)
        change = (changes or {}).get(p.name)
        state, detail = point_state(p.run_dir, job, keys_text(change) if change else "")
        requeues = job.requeues if job is not None else 0
        label = f"job {entry['job']}" if entry and entry.get("backend") == "slurm" else "local"
        print(f"{p.name:<{width}}  {state:<7}  requeued {requeues}  {p.run_dir}  ({label}"
              f"{': ' + detail if detail else ''})", flush=True)
