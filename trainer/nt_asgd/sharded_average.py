"""A running average of the parameters, partitioned over data-parallel ranks.

The parameters are laid end to end in the module's canonical (named_parameters) order and that flat
vector is cut into ``world`` contiguous shards, as ZeRO cuts its flat groups. Each rank keeps and updates
only its own shard (1/N of the memory); the whole average exists only transiently, when it is gathered to
evaluate or to save. Since the flat order depends on the module alone, the saved average is independent of
the world size and of the ZeRO stage, and loads on any number of ranks.

Under bf16 the iterates averaged are the fp32 master weights, not their bf16 copies in the module. Each rank
then averages the masters it holds itself (DeepSpeed's partition of them, see trainer/precision.py): reading
them costs no communication, and the shard is those pieces instead of one contiguous slice.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn

from ..distributed import DistContext
from ..flat_params import copy_flat_into_params
from ..precision import master_pieces, master_values, uses_masters


class ShardedAverage:
    def __init__(self, module: nn.Module, ctx: DistContext):
        self.ctx = ctx
        self.params = [p for _, p in module.named_parameters()]
        self.names = [n for n, _ in module.named_parameters()]
        self.total = sum(p.numel() for p in self.params)
        self.shard = math.ceil(self.total / ctx.world)
        self.lo = min(self.total, ctx.rank * self.shard)
        self.hi = min(self.total, self.lo + self.shard)
        self.masters = uses_masters(self.params)
        starts = [0]
        for p in self.params:
            starts.append(starts[-1] + p.numel())
        # (param, its values [a, b), their place in the module's flat order, in this rank's buffer)
        self._pieces: list[tuple[nn.Parameter, int, int, int, int]] = []
        at = 0
        if self.masters:
            for i, a, b in master_pieces(self.params, ctx.rank):
                self._pieces.append((self.params[i], a, b, starts[i] + a, at))
                at += b - a
        else:
            for p, offset in zip(self.params, starts):
                a, b = max(self.lo, offset), min(self.hi, offset + p.numel())
                if a < b:
                    self._pieces.append((p, a - offset, b - offset, a, a - self.lo))
            at = self.hi - self.lo
        self.buffer = torch.zeros(at, dtype=torch.float32, device=self.params[0].device)

    def _values(self, p: nn.Parameter, a: int, b: int) -> torch.Tensor:
        """The iterate's values [a, b) of ``p``: its fp32 master under bf16, else the parameter itself."""
        return master_values(p, a, b) if self.masters else p.detach().reshape(-1)[a:b]

    def _slices(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        mine, theirs = [], []
        for p, a, b, _, at in self._pieces:
            mine.append(self.buffer[at:at + (b - a)])
            theirs.append(self._values(p, a, b))
        return mine, theirs

    @torch.no_grad()
    def update(self, weight: float) -> None:
        """buffer <- buffer + weight * (params - buffer); weight 1/n keeps the uniform mean of n iterates."""
        mine, theirs = self._slices()
        if not mine:
            return
        theirs = [t.float() for t in theirs]
        if weight >= 1.0:
            torch._foreach_copy_(mine, theirs)
        else:
            torch._foreach_lerp_(mine, theirs, weight)

    @torch.no_grad()
    def gather(self) -> torch.Tensor:
        """The whole average as one flat fp32 vector on every rank (a collective: all ranks call it)."""
        if self.masters:  # pieces anywhere in the flat order, each held by one rank: a sum puts them together
            out = torch.zeros(self.total, dtype=torch.float32, device=self.buffer.device)
            for _, a, b, flat_at, at in self._pieces:
                out[flat_at:flat_at + (b - a)] = self.buffer[at:at + (b - a)]
            if self.ctx.world > 1:
                dist.all_reduce(out)
            return out
        padded = torch.zeros(self.shard, dtype=torch.float32, device=self.buffer.device)
        padded[: self.buffer.numel()] = self.buffer
        if self.ctx.world == 1:
            return padded[: self.total]
        out = torch.empty(self.shard * self.ctx.world, dtype=torch.float32, device=self.buffer.device)
        if dist.get_backend() == "nccl":
            dist.all_gather_into_tensor(out, padded)
        else:  # the list form works on every backend
            dist.all_gather(list(out.chunk(self.ctx.world)), padded)
        return out[: self.total]

    @torch.no_grad()
    def load_flat(self, flat: torch.Tensor) -> None:
        if flat.numel() != self.total:
            raise ValueError(f"averaged state has {flat.numel()} values, the model {self.total}")
        if not self.masters:
            self.buffer.copy_(flat[self.lo:self.hi].to(self.buffer.device))
            return
        for _, a, b, flat_at, at in self._pieces:
            self.buffer[at:at + (b - a)] = flat[flat_at:flat_at + (b - a)].to(self.buffer.device)

    def targets(self) -> list[torch.Tensor]:
        """What :meth:`copy_into_params` overwrites: the parameters, and under bf16 this rank's masters too."""
        return self.params + ([self._values(p, a, b) for p, a, b, _, _ in self._pieces] if self.masters else [])

    @torch.no_grad()
    def copy_into_params(self, flat: torch.Tensor) -> None:
        """``flat`` into the module; under bf16 into the masters as well, so that what is evaluated, saved (its
        fp32 copy included) and stepped from is one set of weights."""
        copy_flat_into_params(self.params, flat)
        for p, a, b, flat_at, _ in self._pieces if self.masters else ():
            self._values(p, a, b).copy_(flat[flat_at:flat_at + (b - a)])
