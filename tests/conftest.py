import os
import random
import json
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from trainer.launch_env import (free_port as any_free_port, interpreter_path, launcher_env,  # noqa: E402
                                use_own_extensions_dir)

# DeepSpeed builds its CPU communication op with the first ninja on PATH and rebuilds it (minutes, under load long
# enough for a rank's peers to give it up) whenever another ninja built it last: the processes tests start in-process
# (mp.spawn) must find the same one as those launched through launcher_env.
os.environ["PATH"] = interpreter_path(os.environ.get("PATH"))
# ... and in this environment's own extensions folder (not torch's default, shared by every environment of this Python
# version, which another checkout's jobs would make it rebuild): set here for in-process DeepSpeed and mp.spawn ranks,
# as launcher_env sets it for launched ones.
use_own_extensions_dir()

# Under `pytest -n N` (pytest-xdist) N workers run test files side by side on the machine's cores: every process
# a test starts gets one thread (a rank with two threads collapses when another process takes a core), and each
# worker draws master ports from its own residue class, so two tests never race for the same port.
WORKER = os.environ.get("PYTEST_XDIST_WORKER")
if WORKER:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)


def free_port() -> int:
    """A free port; under xdist, from this worker's own block of 3000 below the kernel's ephemeral range
    (bind(0) hands out even ports only, so its choice cannot be split between workers by residue)."""
    if not WORKER:
        return any_free_port()
    lo = 20000 + 3000 * int(WORKER.removeprefix("gw"))
    while True:
        port = random.randrange(lo, lo + 3000)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port))
                return port
            except OSError:
                continue

SHARED_DATA = ROOT.parent / "shared" / "data"
BIN = Path(sys.executable).parent

# A small AWD-LSTM that still learns PTB in a few hundred CPU steps.
SMALL_AWD = ["data.root=" + str(SHARED_DATA), "model.emsize=100", "model.nhid=200", "data.bptt=35",
             "train.test_at_end=false", "train.progress=false"]
# The smallest shapes of each family that still train: a training step takes milliseconds.
TINY = [*SMALL_AWD, "model.emsize=32", "model.nhid=48", "data.bptt=20", "train.log_every=1", "train.epochs=1"]
TINY_VIT = ["data.format=synthetic", "data.train_size=100000", "model.num_classes=4", "data.image_size=32",
            "data.batch_size=8", "data.workers=1",
            "model.kwargs={patch_size: 8, embed_dim: 48, depth: 3, num_heads: 3}",
            "train.log_every=1", "train.progress=false", "train.test_at_end=false"]


def launch(script: str, args: list[str], ranks: int = 1, timeout: float = 900, env: dict | None = None,
           port: int | None = None) -> subprocess.CompletedProcess:
    """Run a launch/ script on ``ranks`` CPU ranks: plain python for 1, the deepspeed launcher for more."""
    return subprocess.run(launch_command(script, args, ranks, port), cwd=ROOT, env=launcher_env(env),
                          capture_output=True, text=True, timeout=timeout)


def launch_command(script: str, args: list[str], ranks: int = 1, port: int | None = None) -> list[str]:
    path = str(ROOT / "launch" / script)
    if ranks == 1:
        return [sys.executable, path, *args]
    return [str(BIN / "deepspeed"), "--num_gpus", str(ranks), "--master_port", str(port or free_port()), path, *args]


def output(proc: subprocess.CompletedProcess) -> str:
    return proc.stdout + proc.stderr


def check(proc: subprocess.CompletedProcess) -> str:
    out = output(proc)
    assert proc.returncode == 0, out[-4000:]
    return out


def error_lines(proc: subprocess.CompletedProcess) -> list[str]:
    return [line for line in output(proc).splitlines() if line.startswith("error: ")]


def metric_value(text: str, name: str) -> float:
    m = re.search(rf"\b{name} ([0-9.eE+-]+)", text)
    assert m, f"no '{name} <value>' in output:\n{text[-2000:]}"
    return float(m.group(1))


WALL_CLOCK = ("tokens_per_s", "samples_per_s", "time")  # the only logged values a resume may change


def rows(run_dir: Path) -> list[dict]:
    """A run's metrics.jsonl without its wall-clock values: what two runs of the same training log alike."""
    return [{k: v for k, v in json.loads(line).items() if k not in WALL_CLOCK}
            for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def scalars(run_dir: Path, tag: str) -> dict[int, float]:
    """A TensorBoard scalar of the run, by step."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    return {e.step: e.value for e in acc.Scalars(tag)}


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


IMAGE_COLOURS = [(220, 40, 40), (40, 200, 40), (40, 40, 220), (220, 220, 40)]  # one class per colour


def make_image_folder(root: Path, size: int = 40, per_class: tuple[int, int] = (24, 8), corrupt: bool = False) -> Path:
    """Four classes of noisy solid colours under train/ and val/ (24 + 8 per class: 3 steps per epoch at global
    batch 32 on 1 or 2 ranks, learnable in an epoch or two); ``corrupt`` makes one of class_0's training images an
    undecodable train/class_0/broken.JPEG, in place of a good one: the count still divides into whole batches, so
    every epoch reads it, whatever the seeded order (an extra 97th image would be the one left out, now and then)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in zip(("train", "val"), per_class):
        for c, colour in enumerate(IMAGE_COLOURS):
            d = root / split / f"class_{c}"
            d.mkdir(parents=True)
            for i in range(n):
                pixels = np.clip(np.array(colour) + rng.integers(-50, 50, (size, size, 3)), 0, 255)
                Image.fromarray(pixels.astype(np.uint8)).save(d / f"{i:03d}.JPEG", quality=90)
    if corrupt:
        (root / "train" / "class_0" / f"{per_class[0] - 1:03d}.JPEG").unlink()
        (root / "train" / "class_0" / "broken.JPEG").write_bytes(rng.bytes(2000))
    return root


@pytest.fixture(scope="session")
def shared_data() -> Path:
    assert (SHARED_DATA / "ptb" / "train.txt").is_file(), f"tests need the shared data at {SHARED_DATA}"
    return SHARED_DATA


@pytest.fixture(scope="module")
def ptb_slice(tmp_path_factory):
    """The first lines of real PTB: an epoch is a few steps and evaluation is short. Not the md5-checked files,
    so runs on it set data.verify=false."""
    root = tmp_path_factory.mktemp("ptbslice") / "ptb"
    root.mkdir()
    for split, lines in (("train", 400), ("valid", 40), ("test", 40)):
        with (SHARED_DATA / "ptb" / f"{split}.txt").open() as src:
            (root / f"{split}.txt").write_text("".join(line for _, line in zip(range(lines), src)))
    return root


# Which kind of test a file is follows from its folder (README, "Tests"): unit/ starts no process and no daemon,
# e2e/ starts real training processes, cluster/ brings up hosts (sshd, Slurm) in network namespaces, gpu/ needs
# CUDA. The folder's name is the file's marker, so `-m unit` (or `-m "not cluster"`) chooses by kind.
KINDS = ("unit", "e2e", "cluster", "gpu")
TESTS = Path(__file__).resolve().parent

# With `pytest -n 3 --dist loadfile --no-loadscope-reorder` xdist hands the files to its workers in collection order,
# so the files are collected longest first, by the seconds recorded in DURATIONS (per file, relative to tests/:
# setup + call + teardown of all its tests). A file not in it is collected first, in its alphabetical place: a new
# file may be long, and a short file started early costs the schedule little, a long one started last a lot.
# `pytest --store-durations ...` rewrites the figures of the files that run (the others are kept).
DURATIONS = TESTS / "durations.json"


def pytest_addoption(parser):
    parser.addoption("--store-durations", action="store_true",
                     help=f"after the run, record each test file's total seconds in {DURATIONS.name} "
                          "(the order the files are collected in)")


def _file_key(path: Path) -> str:
    return path.resolve().relative_to(TESTS).as_posix()


def load_durations() -> dict[str, float]:
    if not DURATIONS.is_file():
        return {}
    return {k: float(v) for k, v in json.loads(DURATIONS.read_text()).items() if not k.startswith("_")}


@pytest.hookimpl(tryfirst=True)  # before -m deselects by marker
def pytest_collection_modifyitems(items):
    for item in items:
        kind = Path(_file_key(item.path)).parts[0]
        if kind in KINDS:
            item.add_marker(kind)
    seconds = load_durations()
    # stable: order within a file is kept, and so is the alphabetical order among the files not measured
    items.sort(key=lambda item: -seconds.get(_file_key(item.path), float("inf")))


_measured: dict[str, float] = {}


def pytest_runtest_logreport(report):
    """Seconds per file, summed on the controller (xdist forwards every worker's reports to it)."""
    path = TESTS.parent / report.nodeid.split("::")[0]
    try:
        key = _file_key(path)
    except ValueError:
        return
    _measured[key] = _measured.get(key, 0.0) + report.duration


def pytest_sessionfinish(session):
    config = session.config
    if not config.getoption("store_durations") or hasattr(config, "workerinput") or not _measured:
        return
    old = json.loads(DURATIONS.read_text()) if DURATIONS.is_file() else {}
    notes = {k: v for k, v in old.items() if k.startswith("_")}
    merged = {**{k: v for k, v in old.items() if not k.startswith("_")},
              **{k: round(v, 2) for k, v in _measured.items()}}
    ordered = dict(sorted(merged.items(), key=lambda kv: (-kv[1], kv[0])))
    DURATIONS.write_text(json.dumps({**notes, **ordered}, indent=1) + "\n")
