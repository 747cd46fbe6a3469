"""Whether a point's run finished, from what its run directory already holds.

The engine writes no explicit end marker, so a run counts as finished when its last validation record
(``metrics.jsonl``, evaluate.py's records aside) is the loop's final one under the run's own saved
config: at ``train.epochs``, at ``train.max_steps``, or an early stop; the latest checkpoint has reached
that step (the engine saves right after the final validation), and the test record follows where the
config asks for one. A run that crashed between those writes is therefore resumed, never skipped.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..checkpoint import STEP_TAG, read_latest_tag
from ..config import read_yaml
from ..errors import ConfigError
from ..rundir import RunDir

FINISHED, PARTIAL, MISSING = "finished", "partial", "missing"


def read_records(run_dir: Path) -> list[dict]:
    """The training's own records, a step logged again after a resume keeping only its latest line."""
    path = RunDir(run_dir).metrics
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # a line cut short by a kill
            continue
        if isinstance(row, dict) and "source" not in row and "split" in row:
            rows.append(row)
    last = {(r["split"], r.get("step")): i for i, r in enumerate(rows)}
    return [r for i, r in enumerate(rows) if last[(r["split"], r.get("step"))] == i]


def _latest_step(run: RunDir) -> int | None:
    tag = read_latest_tag(run.checkpoints) if run.has_checkpoint() else None
    m = STEP_TAG.match(tag or "")
    return int(m.group(1)) if m else None


def point_status(run_dir: Path, records: list[dict] | None = None) -> str:
    run = RunDir(run_dir)
    records = read_records(run_dir) if records is None else records
    if not records and not run.has_checkpoint():
        return MISSING
    try:
        train = read_yaml(run.config).get("train", {}) if run.config.is_file() else {}
    except ConfigError:
        train = {}
    valid = [r for r in records if r["split"] == "valid"]
    if not train or not valid:
        return PARTIAL
    last = valid[-1]
    step, epochs, max_steps = last.get("step", 0), train.get("epochs", 1), train.get("max_steps", 0)
    ended = "stop" in last or (max_steps and step >= max_steps) or last.get("epoch", 0) >= epochs - 1e-6
    saved = _latest_step(run)
    if saved is not None and saved < step:
        return PARTIAL
    if train.get("test_at_end") and not any(r["split"] == "test" and r.get("step", -1) >= step for r in records):
        return PARTIAL
    return FINISHED if ended else PARTIAL


def point_state(run_dir: Path, job, changed: str = "") -> tuple[str, str]:
    """(state, detail) for ``--status``: pending, queued, running, done, failed or changed. ``job`` is what is
    known of the point's job (a ``jobs.JobState``: from its scheduler or its sweep process), None if it never had
    one; ``changed`` the keys by which the sweep file's config of the point differs from its run's, if it does."""
    if changed:
        live = f"; job still {job.state} with the old config ({job.detail})" if job is not None and job.state in (
            "queued", "running") else ""
        return "changed", f"{changed}: its run had another config{live}; --restart-changed starts it afresh"
    status = point_status(run_dir)
    if status == FINISHED:
        return "done", ""
    at = _latest_step(RunDir(run_dir))
    where = f"checkpoint at step {at}" if at is not None else "no checkpoint"
    if job is None:
        return ("pending", "not started") if status == MISSING else ("failed", f"stopped, {where}; rerun the sweep to resume")
    if job.state in ("queued", "running"):
        return job.state, f"{job.detail}, {where}"
    if job.state == "unknown":
        return ("pending" if status == MISSING else "failed"), job.detail
    return "failed", f"{job.detail}, {where}; rerun the sweep to resume"
