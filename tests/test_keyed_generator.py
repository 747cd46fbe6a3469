"""The generator AWD-LSTM's masks come from: its numbers are a function of (seed, key) alone, so every rank draws the
same ones for a step and a resumed run draws what the uninterrupted one would have, with no saved state."""

import torch

from trainer.rng import KeyedGenerator


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
