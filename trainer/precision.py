"""What ``train.precision`` means, in one place: the TF32 switches, DeepSpeed's mixed-precision section, and
where the fp32 master weights live under bf16.

* ``fp32``: IEEE fp32 on every device. TF32 is switched off explicitly for matmuls and cuDNN: PyTorch's own
  defaults differ (cuDNN convolutions and RNNs use TF32 unless told otherwise).
* ``tf32``: fp32 weights, activations and optimizer; TF32 tensor cores allowed for matmuls and cuDNN.
* ``bf16``: DeepSpeed's bf16 mode: the module's weights (hence activations) are bf16, the optimizer updates fp32
  master weights. Gradients are accumulated over micro-batches and all-reduced in fp32 (``data_types.
  grad_accum_dtype``, ``communication_data_type``): bf16 sums of many gradients lose the small ones. DeepSpeed
  0.19.8 accumulates in fp32 only under ZeRO 1/2 (stage 0 would sum in bf16), so ``train.zero_stage=0`` runs
  as stage 1, DeepSpeed's BF16 optimizer: the same update, with the masters and optimizer state split over the
  ranks. The fp32 parts that remain (losses, master updates) keep IEEE fp32, TF32 off.

Under fp32 and tf32 the parameters are the masters (ZeRO's fp32 partitions are bit-equal copies), so everything
that reads "the weights" (the NT-ASGD average, the gradient analysis, checkpoints' fp32 copy) reads them as
before; only under bf16 does it go to the masters, through :func:`master_pieces` and :func:`master_values`.
"""

from __future__ import annotations

import torch
from torch import nn


def apply_precision(precision: str) -> None:
    """Set the TF32 switches of this process (every rank, before its model is built); harmless on CPU."""
    tf32 = precision == "tf32"
    torch.backends.cuda.matmul.allow_tf32 = tf32  # the same switch as torch.set_float32_matmul_precision
    torch.backends.cudnn.allow_tf32 = tf32


def deepspeed_precision(precision: str, zero_stage: int) -> dict:
    """DeepSpeed's config keys for ``precision`` (merged over the engine's base config)."""
    section = {"bf16": {"enabled": precision == "bf16"}, "communication_data_type": "fp32",
               "data_types": {"grad_accum_dtype": "fp32"}}
    if precision == "bf16":
        section["zero_optimization"] = {"stage": max(zero_stage, 1)}  # fp32 accumulation exists from stage 1
    return section


def initialize(model: nn.Module, config: dict, **kwargs):
    """``deepspeed.initialize``, with bf16's fp32 masters set from the module's fp32 weights: DeepSpeed copies
    them from the bf16-cast module, which would round a fresh initialization or a ``train.init_from`` start."""
    import deepspeed  # here, not at the top: reading configs and checkpoints should not pay for its import
    from deepspeed.utils import safe_set_full_fp32_param

    fp32 = None
    if config.get("bf16", {}).get("enabled"):
        fp32 = {n: p.detach().clone() for n, p in model.named_parameters() if p.dtype == torch.float32}
    out = deepspeed.initialize(model=model, config=config, **kwargs)
    if fp32:
        for name, p in out[0].module.named_parameters():
            if name in fp32 and has_master(p):
                safe_set_full_fp32_param(p, fp32[name].to(p.device))  # this rank's slice: no communication
    return out


def has_master(p: torch.Tensor) -> bool:
    """Whether DeepSpeed keeps an fp32 master of ``p`` apart from it (bf16 optimizer, ZeRO 1/2 under bf16)."""
    return p.dtype != torch.float32 and hasattr(p, "_hp_mapping")


def uses_masters(params: list[torch.Tensor]) -> bool:
    return any(has_master(p) for p in params)


def master_pieces(params: list[torch.Tensor], rank: int) -> list[tuple[int, int, int]]:
    """(parameter index, start, end) of the flat values whose fp32 master this rank holds. Every value is held by
    exactly one rank; a parameter without a master (not optimized) counts as rank 0's, whole."""
    pieces = []
    for i, p in enumerate(params):
        if not has_master(p):
            if rank == 0:
                pieces.append((i, 0, p.numel()))
        elif p._hp_mapping is not None:
            at = p._hp_mapping.lp_fragment_address
            pieces.append((i, at.start, at.start + at.numel))
    return pieces


def master_values(p: torch.Tensor, start: int, end: int) -> torch.Tensor:
    """Values [start, end) of ``p``'s master as a 1-D view (writing it writes the master; ``p`` itself when it
    has none). The fragment is looked up on every call: DeepSpeed may relink it when it loads a checkpoint."""
    if not has_master(p):
        return p.detach().reshape(-1)[start:end]
    fragment = p._hp_mapping.hp_fragment
    assert p._hp_mapping.lp_fragment_address.start == start and fragment.numel() == end - start
    return fragment


def fp32_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter's fp32 value (its master under bf16) on the host, by name. A collective under bf16: every
    rank calls it and every rank gets the whole."""
    from deepspeed.utils import safe_get_full_fp32_param

    return {name: (safe_get_full_fp32_param(p) if has_master(p) else p.detach().float()).cpu()
            for name, p in module.named_parameters()}
