"""The generator AWD-LSTM's masks come from: its numbers are a function of (seed, key) alone, so every rank draws the
same ones for a step and a resumed run draws what the uninterrupted one would have, with no saved state."""

import itertools

import torch

from trainer.rng import KeyedGenerator, mix_seeds


def draws(gen: KeyedGenerator, *key: int) -> torch.Tensor:
    return torch.rand(64, generator=gen.at(*key))


def test_draws_depend_on_the_seed_and_key_and_on_nothing_drawn_before():
    a, b = KeyedGenerator(141, torch.device("cpu")), KeyedGenerator(141, torch.device("cpu"))
    first = draws(a, 7)
    for step in range(3):  # another history of draws on the other generator
        draws(b, step)
    assert torch.equal(draws(b, 7), first)
    assert torch.equal(draws(a, 7), first)  # and again on the same one, after drawing from it
    assert not torch.equal(draws(a, 8), first)
    assert not torch.equal(draws(KeyedGenerator(142, torch.device("cpu")), 7), first)


def test_mixed_seeds_are_63_bit_and_distinct_for_every_small_key():
    """Every stream (data order, augmentation, masks) is seeded by mix_seeds of a few small ints: no two such keys
    may share a seed, whatever their order or length (``seed + epoch`` would collide; so would a symmetric mix)."""
    keys = [k for n in (1, 2, 3) for k in itertools.product(range(40 if n < 3 else 16), repeat=n)]
    keys += [(141, epoch, index, 4) for epoch in range(8) for index in range(300)]  # augmentation seeds
    seeds = [mix_seeds(*k) for k in keys]
    assert len(set(seeds)) == len(keys)
    assert all(0 <= s < 2**63 for s in seeds)
    assert mix_seeds(1, 2) != mix_seeds(2, 1) and mix_seeds(0) != mix_seeds(0, 0)
    assert mix_seeds(2**70 + 3) == mix_seeds(3)  # parts are taken modulo 2**64
