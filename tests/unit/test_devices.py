"""What a rank picks for itself at start-up, tested without a GPU: its device among those its task sees, its CPU
threads, the RNG states a resume gives back to it, and the address gloo would advertise for it."""

import socket

import pytest
import torch

from trainer import distributed, launch_env, multihost
from trainer.errors import ConfigError
from trainer.rng import device_state_for


@pytest.mark.parametrize("local_rank, visible, expect", [
    (0, 1, 0), (3, 1, 0),  # a task bound to one GPU (--gpus-per-task=1): it is device 0 whatever LOCAL_RANK says
    (0, 8, 0), (5, 8, 5),  # a task that sees its node's GPUs (deepspeed launcher, torchrun): the local rank's
])
def test_device_index_stays_within_what_the_task_sees(local_rank, visible, expect):
    assert launch_env.device_index(local_rank, visible) == expect


@pytest.mark.parametrize("local_rank, visible, expect", [(2, 2, "sees only 2 GPUs"), (0, 0, "sees no GPU")])
def test_device_index_past_the_visible_count_is_a_one_line_error(monkeypatch, local_rank, visible, expect):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5")
    with pytest.raises(ConfigError, match=expect):
        launch_env.device_index(local_rank, visible)


def test_deepspeed_is_given_the_device_the_rank_chose_not_its_local_rank():
    """deepspeed.initialize sets the device to ``args.device_rank``, else to LOCAL_RANK: a task bound to one GPU
    with LOCAL_RANK 1 must hand it device 0 (tests/gpu/test_gpu.py checks the engine's device on a GPU)."""
    bound = distributed.DistContext(rank=1, world=2, local_rank=1, device=torch.device("cuda", 0))
    assert distributed.deepspeed_args(bound).device_rank == 0
    sees_all = distributed.DistContext(rank=5, world=8, local_rank=5, device=torch.device("cuda", 5))
    assert distributed.deepspeed_args(sees_all).device_rank == 5


def test_cpu_threads_follow_slurm_and_the_affinity_mask(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(launch_env.os, "sched_getaffinity", lambda _pid: {0, 1, 2, 3, 4, 5})
    seen = []
    monkeypatch.setattr(launch_env.torch, "set_num_threads", seen.append)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.delenv("SLURM_CPUS_PER_TASK", raising=False)
    launch_env._share_cpu_threads()  # two ranks on a host whose mask allows 6 CPUs
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "1")
    launch_env._share_cpu_threads()  # a Slurm task keeps its own allocation
    assert seen == [3, 1]


def test_a_resume_restores_only_the_rank_s_own_device_stream():
    own = torch.arange(8, dtype=torch.uint8)
    saved = {"cuda": {"index": 0, "state": own}}
    assert device_state_for(saved, torch.device("cuda", 0)) is own
    assert device_state_for(saved, None) is None  # resumed on CPU: nothing to restore
    assert device_state_for({}, torch.device("cuda", 0)) is None
    # an older checkpoint held every visible device's stream: a node whose task sees fewer finds none for it
    old = {"cuda": [torch.full((8,), i, dtype=torch.uint8) for i in range(2)]}
    assert torch.equal(device_state_for(old, torch.device("cuda", 1)), old["cuda"][1])
    assert device_state_for(old, torch.device("cuda", 3)) is None


def test_gloo_address_follows_the_hostname_and_gloo_socket_ifname(monkeypatch):
    monkeypatch.delenv("GLOO_SOCKET_IFNAME", raising=False)
    monkeypatch.setattr(socket, "gethostname", lambda: "localhost")
    addr, source = multihost.gloo_address()
    assert multihost._is_loopback(addr) and "localhost" in source
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")
    assert multihost.gloo_address() == ("127.0.0.1", "interface lo (GLOO_SOCKET_IFNAME)")
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "nosuch0")
    with pytest.raises(ConfigError, match="GLOO_SOCKET_IFNAME=nosuch0 names no interface.*deepspeed_env"):
        multihost.gloo_address()
