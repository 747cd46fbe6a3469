"""Fixtures for the cluster tests: two hosts reached over ssh (``hosts``), and the user's side of them (a hostfile,
a home directory for ``.deepspeed_env``, the way to run a command on the first host)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from harness.hosts import Hosts, HostsUnavailable
from harness.jobs import StreamedJob
from harness.paths import REPO as ROOT
from harness.shapes import SMALL_AWD
from trainer.launch_env import launcher_env

DEEPSPEED = str(Path(sys.executable).parent / "deepspeed")
TRAIN = "launch/train.py"
# A small AWD-LSTM: a step takes a few milliseconds, so a test's time goes to start-up, not training.
TINY_AWD = [*SMALL_AWD, "model.emsize=32", "model.nhid=48", "data.bptt=20", "train.log_every=1", "train.epochs=1"]
# The shipped ViT-T early-dropout sweep, made small: a tiny ViT on generated images, 6 steps a point.
SHIPPED = ROOT / "recipes" / "imagenet" / "sweeps" / "vit_t_early_dropout.yaml"
TINY_VIT = {"data.batch_size": 32, "data.image_size": 32, "data.workers": 0, "train.epochs": 2,
            "train.progress": False, "train.log_every": 1, "optim.lr_batch": 32, "optim.warmup_epochs": 1,
            "drop.cutoff_epoch": 1, "model.kwargs": {"patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2}}


@pytest.fixture(scope="module")
def hosts(tmp_path_factory):
    """Two hosts, node1 and node2, each in network namespaces of its own with sshd; stopped after the module."""
    h = Hosts(tmp_path_factory.mktemp("hosts"))
    try:
        h.up()
    except HostsUnavailable as e:
        pytest.fail(f"cannot bring up the test hosts: {e}")
    assert h.mode == "netns" and [x.name for x in h] == ["node1", "node2"]
    yield h
    h.down()


@pytest.fixture(scope="module")
def hostfile(hosts) -> Path:
    path = hosts.work / "hostfile"
    path.write_text("node1 slots=1\nnode2 slots=1\n")
    return path


@pytest.fixture
def home(tmp_path) -> Path:
    """The launching user's home: the deepspeed launcher reads ``~/.deepspeed_env`` from here."""
    d = tmp_path / "home"
    d.mkdir()
    return d


def on_node1(hosts, argv: list[str], log: Path, home: Path | None = None) -> StreamedJob:
    """``argv`` typed on node1 in the checkout, as a user would; ``home`` (for its ``.deepspeed_env``) stands in
    for the user's home directory. (A Slurm job inherits its submitter's HOME, and with it torch's build cache
    of DeepSpeed's C++ op: the tests that submit keep this machine's, so their jobs need not rebuild it.)"""
    job = StreamedJob(hosts["node1"].cmd(argv, ROOT), log, ROOT, launcher_env({"HOME": str(home)} if home else {}))
    hosts["node1"].track(job.proc)  # stopped with the hosts if the test leaves it running
    return job


def hostfile_train(hostfile: Path, args: list[str]) -> list[str]:
    """The user's command: ``deepspeed --hostfile H --master_addr node1 launch/train.py ...``."""
    return [DEEPSPEED, "--hostfile", str(hostfile), "--master_addr", "node1", TRAIN, *args]
