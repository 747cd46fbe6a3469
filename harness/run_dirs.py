"""Run directories as a test needs them: a copy cut back to an earlier checkpoint, to resume from there."""

import json
import shutil


def cut(run_dir, dest, step):
    """A copy of ``run_dir`` as it was right after its checkpoint at ``step``."""
    shutil.copytree(run_dir, dest)
    tag = f"step_{step:08d}"
    for d in (dest / "checkpoints").iterdir():
        if d.name.startswith("step_") and d.name > tag:
            shutil.rmtree(d)
    (dest / "checkpoints" / "latest").write_text(tag)
    kept = [line for line in (dest / "metrics.jsonl").read_text().splitlines() if json.loads(line)["step"] <= step]
    (dest / "metrics.jsonl").write_text("".join(line + "\n" for line in kept))
    return dest
