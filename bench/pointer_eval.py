#!/usr/bin/env python
"""Tokens/s of the continuous cache pointer evaluation against plain evaluation, side by side.

On PTB's validation split, in one process (as ``launch/evaluate.py`` runs on 1 rank), with the
recipe's own ``evaluate``: plain at batch 10 (what training's validation uses), plain at batch 1
and the pointer at batch 1 with the paper's window 2000 (the paper evaluates the pointer on one
stream). Then the batched pointer against the one-token-at-a-time loop of the reference code
(``tests/unit/test_pointer.py``'s oracle) on the first ``--ref-tokens`` tokens, where both must give the
same NLL. Speed does not depend on the weights, so the model is freshly initialised; the
perplexities printed are those of an untrained model. The three evaluations run interleaved in rounds
(reversed every other round).

  s                   seconds to evaluate the split, median of rounds
  tokens/s            tokens / that median
  vs plain batch 1    per round: this evaluation's tokens/s / plain batch 1's of the same round; the
                      median of the rounds and min .. max over them
  speed-up            the reference loop's time / the batched pointer's (one run each)
  budget              the batched pointer's NLL sum equals the reference loop's within 1e-5 relative
                      (speed is reported, not budgeted)

    python bench/pointer_eval.py [--shape paper|small] [--rounds 2] [--ref-tokens 3000]
"""

from __future__ import annotations

import argparse
import math
import sys
import time

import torch

from harness.paths import DATA_ROOT
from harness.pointer_reference import reference_nll
from harness.reporting import header, legend, markdown_table, progress, ratio_span, verdict
from harness.runs import PAPER, SMALL, overrides
from harness.timing import median, round_order
from recipes.awd_lstm.corpus import batchify
from recipes.awd_lstm.pointer import pointer_nll_sum
from trainer.distributed import DistContext
from trainer.registry import get_recipe


def build(shape: dict, eval_batch: int):
    spec = get_recipe("awd_ptb")
    cfg = spec.load_config([], overrides({"data.root": DATA_ROOT, "data.eval_batch_size": eval_batch}, shape))
    recipe = spec.factory(cfg, DistContext(0, 1, 0, torch.device("cpu")))
    recipe.setup()
    return recipe


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=["paper", "small"], default="paper")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--ref-tokens", type=int, default=3000)
    ap.add_argument("--ref-window", type=int, default=500)
    args = ap.parse_args()
    header(f"torch threads {torch.get_num_threads()}", f"shape {args.shape}", f"{args.rounds} rounds")
    shape = PAPER if args.shape == "paper" else SMALL

    recipes = {"plain, batch 10": (build(shape, 10), "standard"), "plain, batch 1": (build(shape, 1), "standard"),
               "pointer, batch 1, window 2000": (build(shape, 10), "pointer")}
    torch.manual_seed(0)
    model = next(iter(recipes.values()))[0].build_model().eval()
    times: dict[str, list[float]] = {k: [] for k in recipes}
    ppl: dict[str, float] = {}
    ntok: dict[str, float] = {}
    with torch.no_grad():
        for r in range(args.rounds):
            for label in round_order(list(recipes), r):
                recipe, mode = recipes[label]
                t0 = time.perf_counter()
                sums = recipe.evaluate(model, "valid", mode)
                times[label].append(time.perf_counter() - t0)
                ppl[label] = math.exp(sums["nll"] / sums["tokens"])
                ntok[label] = sums["tokens"]
                progress(f"round {r + 1} {label:30s} {times[label][-1]:7.1f} s  "
                         f"{ntok[label] / times[label][-1]:8.0f} tokens/s")
    rows = []
    for label, t in times.items():
        ratio = [(ntok[label] / a) / (ntok["plain, batch 1"] / b) for a, b in zip(t, times["plain, batch 1"])]
        rows.append([label, f"{ntok[label]:,.0f}", median(t), ntok[label] / median(t), median(ratio),
                     ratio_span(ratio), ppl[label]])
    legend(__doc__)
    print()
    print(markdown_table(["valid split", "tokens", "s (median)", "tokens/s", "vs plain batch 1 (median of rounds)",
                          "vs plain batch 1, rounds min .. max", "ppl (untrained)"], rows))

    # the batched pointer against the reference's per-token loop, same slice, same settings
    recipe = recipes["plain, batch 1"][0]
    source = batchify(recipe.corpus.valid, 1)[: args.ref_tokens + 1]
    p = recipe.cfg.pointer
    w = args.ref_window
    with torch.no_grad():
        t0 = time.perf_counter()
        fast, n = pointer_nll_sum(model, source, p.chunk, w, p.theta, p.lambdah)
        t_fast = time.perf_counter() - t0
        t0 = time.perf_counter()
        slow = reference_nll(model, source, p.chunk, w, p.theta, p.lambdah)  # the paper's pointer.py: bptt 5000
        t_slow = time.perf_counter() - t0
    print()
    print(markdown_table(
        [f"first {n:,} valid tokens, window {w}", "s", "tokens/s", "speed-up", "NLL sum"],
        [[f"reference loop (chunk {p.chunk}, per-token Python)", t_slow, n / t_slow, 1.0, slow],
         [f"batched (chunk {p.chunk})", t_fast, n / t_fast, t_slow / t_fast, fast]]))
    same = math.isclose(fast, slow, rel_tol=1e-5)
    return verdict(f"batched pointer NLL equals the reference loop's within 1e-5 relative (difference "
                   f"{abs(fast - slow) / abs(slow):.1e})", ["PASS" if same else "FAIL"])


if __name__ == "__main__":
    sys.exit(main())
