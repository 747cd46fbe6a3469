"""Timed rounds for the benchmarks: alternatives timed side by side (``time_side_by_side``), interleaved round order,
medians and their confidence intervals."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable


def median(xs) -> float:
    xs = list(xs)
    return statistics.median(xs) if xs else float("nan")


def round_order(items: list, r: int) -> list:
    """Round ``r``'s order of interleaved configurations: reversed every other round, so that a drift in the
    machine's load falls on all of them alike."""
    return list(items) if r % 2 == 0 else list(items)[::-1]


def median_ci(xs, level: float = 0.95) -> tuple[float, float]:
    """Distribution-free confidence interval of the median: the order statistics x(k), x(n+1-k) with the largest
    k whose coverage 1 - 2 P(Binomial(n, 1/2) < k) is at least ``level``. It narrows as rounds are added, unlike the
    rounds' own spread. Below 6 values no k reaches 95%: then (min, max)."""
    from math import comb

    xs = sorted(xs)
    n, k = len(xs), 1
    if not n:
        return float("nan"), float("nan")
    while k < (n + 1) // 2 and 1 - 2 * sum(comb(n, i) for i in range(k + 1)) / 2 ** n >= level:
        k += 1
    return xs[k - 1], xs[n - k]


def summary(xs) -> tuple[float, float, float]:
    """(median, and the ends of its distribution-free 95% confidence interval) of per-round values."""
    xs = list(xs)
    return (median(xs), *median_ci(xs))


@dataclass
class SideBySide:
    """Seconds each alternative took in each measured round, aligned by round (warm-up rounds left out)."""

    samples: dict[str, list[float]]

    def median(self, name: str) -> float:
        return median(self.samples[name])

    def per_round(self, f: Callable[[dict[str, float]], float]) -> list[float]:
        """``f`` of each round's times (name -> seconds): a quantity computed within a round, whose alternatives saw
        the same machine state, before any summary across rounds."""
        names = list(self.samples)
        return [f(dict(zip(names, times))) for times in zip(*self.samples.values())]

    def ratios(self, a: str, b: str) -> list[float]:
        """Each round's time of ``a`` over that round's time of ``b``."""
        return self.per_round(lambda t: t[a] / t[b])


def time_side_by_side(alternatives: dict[str, Callable[[], object]], rounds: int, warmup: int = 1, *,
                      prepare: dict[str, Callable[[], object]] | None = None,
                      before_round: Callable[[int], object] | None = None,
                      label: str | None = None) -> SideBySide:
    """Times the alternatives against each other in one process: every round runs each of them once, back to back,
    in ``round_order`` (reversed every other round, so no alternative always runs first or after the same one);
    the first ``warmup`` rounds are run and dropped. A drift in a shared machine's load then falls on all
    alternatives alike, and a ratio taken within a round (``SideBySide.ratios``) cancels it; summarise those with
    ``summary`` (median and its confidence interval), never against a figure from another run.

    ``before_round(r)`` runs untimed before round ``r`` (warm-up rounds count from 0), e.g. to pick the round's
    input; ``prepare[name]()`` runs untimed right before ``name``, e.g. to put a random stream where the other
    alternatives find it. With ``label``, a progress line goes to standard error every tenth of the rounds."""
    from .reporting import progress

    names, prepare = list(alternatives), prepare or {}
    samples: dict[str, list[float]] = {name: [] for name in names}
    for r in range(warmup + rounds):
        if before_round is not None:
            before_round(r)
        for name in round_order(names, r):
            if name in prepare:
                prepare[name]()
            t0 = time.perf_counter()
            alternatives[name]()
            if r >= warmup:
                samples[name].append(time.perf_counter() - t0)
        done = r + 1 - warmup
        if label and done > 0 and (done % max(1, rounds // 10) == 0 or done == rounds):
            progress(f"{label}: round {done}/{rounds}, medians "
                     + ", ".join(f"{n} {1e3 * median(samples[n]):.1f} ms" for n in names))
    return SideBySide(samples)
