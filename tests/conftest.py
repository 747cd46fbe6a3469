"""What every test shares: the environment of the processes tests start, the shared data fixtures, each file's
kind marker (from its folder) and the longest-first order of the files. The helpers tests call (launching jobs,
reading metrics, generated data, hosts, fault scenarios) are in harness/, shared with bench/."""

import json
import os
from pathlib import Path

import pytest

from harness.launching import WORKER
from harness.paths import SHARED_DATA
from trainer.launch_env import interpreter_path, use_own_extensions_dir

# DeepSpeed builds its CPU communication op with the first ninja on PATH and rebuilds it (minutes, under load long
# enough for a rank's peers to give it up) whenever another ninja built it last: the processes tests start in-process
# (mp.spawn) must find the same one as those launched through launcher_env.
os.environ["PATH"] = interpreter_path(os.environ.get("PATH"))
# ... and in this environment's own extensions folder (not torch's default, shared by every environment of this Python
# version, which another checkout's jobs would make it rebuild): set here for in-process DeepSpeed and mp.spawn ranks,
# as launcher_env sets it for launched ones.
use_own_extensions_dir()

# Under `pytest -n N` (pytest-xdist) N workers run test files side by side on the machine's cores: every process
# a test starts gets one thread (a rank with two threads collapses when another process takes a core); each worker
# draws master ports from its own block (harness.launching.free_port), so two tests never race for the same port.
if WORKER:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)


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
