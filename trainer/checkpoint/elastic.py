"""Restoring on another world size: the world a checkpoint was written by, every old rank's own state, and
DeepSpeed's partitioned (ZeRO 1/2, bf16) optimizer state re-cut for this world. It loads nothing into the
engine but that optimizer state (the checkpointer loads the rest) and writes nothing."""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import CheckpointError
from .layout import rank_file


def load_rank_state(tag_dir: Path, rank: int) -> dict:
    return torch.load(rank_file(tag_dir, rank), map_location="cpu", weights_only=False)


def saved_world(tag_dir: Path, default: int) -> int:
    """The world size a checkpoint was written by, from rank 0's small file (``default`` if it has none)."""
    return load_rank_state(tag_dir, 0)["world"] if rank_file(tag_dir, 0).is_file() else default


def partitions_optimizer(optimizer) -> bool:
    """Whether DeepSpeed cut the optimizer state over the ranks (ZeRO 1/2, its bf16 optimizer): such state is
    saved per rank and DeepSpeed refuses it at another world size. Unpartitioned state is saved whole."""
    return hasattr(optimizer, "_param_slice_mappings")


def load_repartitioned_optimizer(opt, tag_dir: Path, tag: str, saved_world: int) -> None:
    """Into DeepSpeed's partitioned optimizer ``opt``: the fp32 master weights and optimizer state of checkpoint
    ``tag``, written by ``saved_world`` ranks (another world size), re-cut for this world.

    DeepSpeed has loaded the module, scheduler and counters (and refused only the optimizer state, whose
    partitions follow the world size); the fp32 master weights and optimizer state are rebuilt here, parameter by
    parameter: every rank's file maps parameter names to slices of its partition (the mapping DeepSpeed's
    universal checkpoints are made from), so each parameter's whole state is the concatenation of its slices,
    and this rank copies out the slices its own partition holds. Like DeepSpeed's own elastic load, every rank
    reads every old rank's file: the whole optimizer state passes through host memory once.
    """
    whole, alike, groups = _whole_optimizer_state(_zero_files(tag_dir, saved_world))
    lp_groups = getattr(opt, "bit16_groups", None) or opt.bf16_groups
    hp_groups = getattr(opt, "single_partition_of_fp32_groups", None) or opt.fp32_groups_flat_partition
    states = {}
    for g, (lps, flat) in enumerate(zip(lp_groups, hp_groups)):
        keys = {key for lp in lps for key in whole[g].get(opt.param_names[lp], {})} - {"fp32"}
        state = {key: torch.zeros_like(flat) for key in keys}
        for lp in lps:
            if lp._hp_mapping is None:  # no slice of this parameter in this rank's partition
                continue
            name = opt.param_names[lp]
            saved = whole[g].get(name)
            if saved is None or saved["fp32"].numel() != lp.numel():
                raise CheckpointError(f"checkpoint {tag} has no optimizer state of parameter {name} with "
                                      f"{lp.numel()} values; resume with the model it was written with")
            src, dst = lp._hp_mapping.lp_fragment_address, lp._hp_mapping.hp_fragment_address
            for key, value in saved.items():
                target = flat.data if key == "fp32" else state[key]
                target.narrow(0, dst.start, dst.numel).copy_(value.narrow(0, src.start, src.numel))
        states[g] = {**alike[g], **state}
    # torch's own load: one flat partition per group, as saved; it puts each value where the optimizer wants it
    groups = groups or opt.optimizer.state_dict()["param_groups"]
    opt.optimizer.load_state_dict({"state": states, "param_groups": groups})
    opt._hp_optimizer_states_linked = False  # DeepSpeed re-links its per-parameter views at the next step


def _zero_files(tag_dir: Path, world: int) -> list[Path]:
    """The partitioned optimizer files of the ``world`` ranks that wrote a checkpoint, in rank order."""
    files = [next(tag_dir.glob(f"*zero_pp_rank_{r}_mp_rank_*optim_states.pt"), None) for r in range(world)]
    missing = [r for r, f in enumerate(files) if f is None]
    if missing:
        raise CheckpointError(f"checkpoint {tag_dir} lacks the optimizer files of ranks {missing}; "
                              "resume from an earlier tag")
    return files


def _whole_optimizer_state(files: list[Path]) -> tuple[list[dict[str, dict[str, torch.Tensor]]], list[dict], list]:
    """Per group, {parameter name: {"fp32": master weights, state key: values}} over the whole flattened parameter
    and the state all ranks hold alike (e.g. Adam's step); and the saved param_groups (None if not saved)."""
    pieces: list[dict[str, dict[str, list[torch.Tensor]]]] = []
    alike: list[dict] = []
    groups = None
    for path in files:
        sd = torch.load(path, map_location="cpu", weights_only=False)["optimizer_state_dict"]
        base = sd["base_optimizer_state"]  # torch's state_dict; DeepSpeed's elastic layout is a list per group
        states = base["state"] if isinstance(base, dict) else dict(enumerate(base))
        if groups is None and isinstance(base, dict):
            groups = base["param_groups"]
        for g, mapping in enumerate(sd["param_slice_mappings"]):
            fp32 = sd["single_partition_of_fp32_groups"][g]
            sizes = {fp32.numel(), fp32.numel() + sd["group_paddings"][g]}  # with or without the last rank's padding
            flat = {"fp32": fp32}
            if len(pieces) <= g:
                pieces.append({})
                alike.append({})
            for key, value in states.get(g, {}).items():
                if torch.is_tensor(value) and value.dim() == 1 and value.numel() in sizes:
                    flat[key] = value
                else:
                    alike[g].setdefault(key, value)
            for name, at in mapping.items():
                slices = pieces[g].setdefault(name, {})
                for key, value in flat.items():
                    slices.setdefault(key, []).append(value.narrow(0, at.start, at.numel))
    whole = [{name: {key: torch.cat(parts) for key, parts in slices.items()} for name, slices in group.items()}
             for group in pieces]
    return whole, alike, groups
