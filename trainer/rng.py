"""Every random stream a rank draws from, captured and restored for exact resume."""

from __future__ import annotations

import random
from contextlib import contextmanager
from typing import Iterator

import numpy as np
import torch


def _own_device() -> torch.device | None:
    """This rank's accelerator (the current one once the rank chose it), None on CPU."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.device("cuda", torch.cuda.current_device())
    return None


def capture_rng() -> dict:
    """The host streams and this rank's own device stream, not every visible device's: a resume on a node whose
    tasks see fewer GPUs must find a state for its device and none for devices it does not have."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    device = _own_device()
    if device is not None:
        state["cuda"] = {"index": device.index, "state": torch.cuda.get_rng_state(device)}
    return state


def device_state_for(saved: dict, device: torch.device | None) -> torch.Tensor | None:
    """The saved generator state to restore on ``device``: the rank's own from a checkpoint of this layout; from
    an older one (every visible device's, by index) the one at this device's index if it had that many; None on
    CPU or when there is nothing for this device (its stream then starts as seeded)."""
    cuda = saved.get("cuda")
    if cuda is None or device is None or device.type != "cuda":
        return None
    if isinstance(cuda, dict):
        return cuda["state"]
    index = device.index or 0
    return cuda[index] if index < len(cuda) else None


def restore_rng(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    device = _own_device()
    own = device_state_for(state, device)
    if own is not None:
        torch.cuda.set_rng_state(own, device)


_U64 = 2**64 - 1


def mix_seeds(*parts: int) -> int:
    """One 63-bit seed from several ints, so (seed, epoch) pairs cannot collide the way ``seed + epoch`` does.

    A chain of SplitMix64's output function (a bijection of 64-bit ints whose every output bit depends on every
    input bit), each part XORed into the state before a round, in plain integer arithmetic, not
    ``np.random.SeedSequence``: every training image's augmentation is seeded with it inside a loader worker, where
    SeedSequence, run cold between two images, was most of what seeding cost (bench/decision_costs.py --case
    augment_seeding).
    """
    h = 0x6A09E667F3BCC909 ^ len(parts)
    for p in parts:
        h = (h ^ (int(p) & _U64)) + 0x9E3779B97F4A7C15 & _U64
        h = (h ^ (h >> 30)) * 0xBF58476D1CE4E5B9 & _U64
        h = (h ^ (h >> 27)) * 0x94D049BB133111EB & _U64
        h ^= h >> 31
    return h >> 1


class KeyedGenerator:
    """A generator on ``device`` whose stream is a function of a key (e.g. the optimizer step), not of what was drawn
    before: every rank draws the same numbers for the same key, and a resumed run needs no saved state for it."""

    def __init__(self, seed: int, device: torch.device):
        self.seed = seed
        self._gen = torch.Generator(device=device)

    def at(self, *key: int) -> torch.Generator:
        return self._gen.manual_seed(mix_seeds(self.seed, *key))


def seed_host_rng(seed: int) -> None:
    """Python's, numpy's and torch's CPU streams only; a GPU's (its dropout) is left alone."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.default_generator.manual_seed(seed)


def seed_everything(seed: int) -> None:
    seed_host_rng(seed)
    torch.manual_seed(seed)  # and every device's generator


@contextmanager
def preserved_host_rng() -> Iterator[None]:
    """Python's, numpy's and torch's CPU streams left as the block found them, whatever it draws or seeds."""
    py_state, np_state, torch_state = random.getstate(), np.random.get_state(), torch.get_rng_state()
    try:
        yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
        torch.set_rng_state(torch_state)
