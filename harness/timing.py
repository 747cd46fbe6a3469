"""Statistics of timed rounds for the benchmarks: medians, their confidence intervals, interleaved round order."""

from __future__ import annotations

import statistics


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
