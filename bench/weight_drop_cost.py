#!/usr/bin/env python
"""What weight drop (DropConnect on weight_hh) costs in AWD-LSTM's recurrent stack, on CPU.

Forward+backward of the paper's 3-layer stack (400->1150, 1150->1150, 1150->400; T=70) in train
mode, for batch 10 (per rank at 2 ranks) and 20 (1 rank):

  wdrop      WeightDropLSTM, weight_drop=0.5 (what training runs: DropConnectMask, 16-bit draws
             thresholded into a reused buffer)
  no-wdrop   the same modules with weight_drop=0 (same parameters, same fused op, no mask)
  nn.LSTM    torch.nn.LSTM layers holding copies of the same weights
  F.dropout  the same layers with weight_hh masked by F.dropout (per-element bernoulli_, a fresh
             mask each step: the usual way, and this project's first implementation)

Variants run interleaved in rounds (A, B, C, D, then the next round in reverse order) after warm-up
rounds, so slow drift in the shared machine's load falls on all of them. One profiled wdrop step per
batch shows where time goes.

  X ms                median over rounds of variant X's forward+backward
  X/Y                 median over rounds of the per-round ratio X / Y
  wdrop cost          wdrop/no-wdrop - 1, with the distribution-free 95% confidence interval of that
                      median (order statistics; it narrows with more rounds)
  budget              weight drop costs at most 5% over no-wdrop (the issue's): PASS when the upper end
                      of the CI is within it, INCONCLUSIVE when the CI is wider than the budget, else FAIL

    python bench/weight_drop_cost.py [--threads 1] [--rounds 16] [--batches 10,20] [--budget 0.05]
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

from harness.reporting import header, judge, legend, markdown_table, pct, pct_range, progress, verdict
from harness.timing import median, median_ci, round_order
from recipes.awd_lstm.regularizers import weight_drop as wd
from recipes.awd_lstm.regularizers.weight_drop import WeightDropLSTM

SIZES = [(400, 1150), (1150, 1150), (1150, 400)]
T = 70
RATE = 0.5
BUDGET = 0.05


def f_dropout_forward(layer: WeightDropLSTM, x: torch.Tensor, rate: float):
    """The layer's forward with the mask from F.dropout instead of DropConnectMask."""
    zeros = x.new_zeros(1, x.size(1), layer.hidden_size)
    w_hh = F.dropout(layer.weight_hh, p=rate, training=True)
    out, _, _ = wd._lstm(x, (zeros, zeros), [layer.weight_ih, w_hh, layer.bias_ih, layer.bias_hh],
                         True, 1, 0.0, True, False, False)
    return out


class Stacks:
    def __init__(self):
        torch.manual_seed(0)
        self.wdl = nn.ModuleList(WeightDropLSTM(i, o, weight_drop=RATE) for i, o in SIZES).train()
        self.ref = nn.ModuleList(nn.LSTM(i, o) for i, o in SIZES).train()
        with torch.no_grad():
            for a, b in zip(self.wdl, self.ref):
                for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
                    getattr(b, f"{name}_l0").copy_(getattr(a, name))
        self.params = list(self.wdl.parameters()) + list(self.ref.parameters())

    def forward(self, variant: str, x: torch.Tensor) -> torch.Tensor:
        for wdl, ref in zip(self.wdl, self.ref):
            if variant == "wdrop":
                x, _ = wdl(x)
            elif variant == "no-wdrop":
                x, _ = wdl(x, weight_drop=0.0)
            elif variant == "nn.LSTM":
                x, _ = ref(x)
            else:
                x = f_dropout_forward(wdl, x, RATE)
        return x

    def step(self, variant: str, x: torch.Tensor, grad: torch.Tensor) -> float:
        for p in self.params:
            p.grad = None
        x.grad = None
        t0 = time.perf_counter()
        self.forward(variant, x).backward(grad)
        return time.perf_counter() - t0

    def check_same_math(self) -> None:
        """no-wdrop and nn.LSTM must compute the same function, or the comparison means nothing."""
        x = torch.randn(5, 2, SIZES[0][0])
        with torch.no_grad():
            a, b = self.forward("no-wdrop", x), self.forward("nn.LSTM", x)
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def profile_step(stacks: Stacks, x, grad, top: int = 6) -> str:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        stacks.step("wdrop", x, grad)
    ev = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in ev)
    return ", ".join(f"{e.key} {e.self_cpu_time_total / 1e3:.0f} ms ({100 * e.self_cpu_time_total / total:.0f}%)"
                     for e in ev[:top])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1,
                    help="torch.set_num_threads for every variant (1 = what each rank gets at 2 ranks on 2 cores)")
    ap.add_argument("--batches", default="10,20")
    ap.add_argument("--rounds", type=int, default=16)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--no-f-dropout", action="store_true", help="skip the F.dropout variant")
    ap.add_argument("--budget", type=float, default=BUDGET, help="largest cost of weight drop over no-wdrop")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    variants = ["wdrop", "no-wdrop", "nn.LSTM"] + ([] if args.no_f_dropout else ["F.dropout"])
    header(f"torch.set_num_threads({args.threads})", f"T={T} rate={RATE}",
           f"{args.rounds} rounds after {args.warmup} warm-up")
    stacks = Stacks()
    stacks.check_same_math()

    rows, results, profiles = [], [], []
    for batch in (int(b) for b in args.batches.split(",")):
        x = torch.randn(T, batch, SIZES[0][0], requires_grad=True)
        grad = torch.randn(T, batch, SIZES[-1][1])
        times: dict[str, list[float]] = {v: [] for v in variants}
        for r in range(args.warmup + args.rounds):
            for v in round_order(variants, r):
                dt = stacks.step(v, x, grad)
                if r >= args.warmup:
                    times[v].append(dt)
        profiles.append(f"batch {batch}, one wdrop step: {profile_step(stacks, x, grad)}")
        progress(profiles[-1])

        def paired(a: str, b: str) -> list[float]:
            return [x / y for x, y in zip(times[a], times[b])]

        costs = [q - 1 for q in paired("wdrop", "no-wdrop")]
        lo, hi = median_ci(costs)
        results.append(judge(lo, hi, args.budget))
        row = [batch, *(1e3 * median(times[v]) for v in variants), median(paired("wdrop", "no-wdrop")),
               median(paired("wdrop", "nn.LSTM"))]
        if "F.dropout" in times:
            row.append(median(paired("F.dropout", "no-wdrop")))
        rows.append(row + [pct(median(costs)), pct_range(lo, hi), results[-1]])

    headers = ["batch", *(f"{v} ms" for v in variants), "wdrop/no-wdrop", "wdrop/nn.LSTM"]
    if not args.no_f_dropout:
        headers.append("F.dropout/no-wdrop")
    legend(__doc__)
    print("\ntorch profiler, self CPU time:\n" + "\n".join(f"  {p}" for p in profiles) + "\n")
    print(markdown_table(headers + ["wdrop cost", "wdrop cost, 95% CI", "verdict"], rows))
    return verdict(f"weight drop over no-wdrop, upper end of the 95% CI within {args.budget:.0%}", results)


if __name__ == "__main__":
    sys.exit(main())
