"""Choosing a tag (``latest``, ``best``, a step; on resume the newest that verifies) and reading what it holds
without an engine: client state, weights (a callback's evaluation weights swapped in), the signature check. It
never writes, repairs or deletes a checkpoint."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from ..errors import CheckpointError
from ..flat_params import copy_flat_into
from .layout import (CALLBACK_FILE, FP32_WEIGHTS, LATEST, LEGACY_CALLBACK_FILES, MODEL_STATES, read_latest_tag,
                     step_tags)
from .writing import verify

log = logging.getLogger("trainer")


def resolve_tag(ckpt_dir: Path, which: str) -> str:
    """``best``, ``latest`` or an explicit tag, checked to exist and to match its manifest."""
    tag = read_latest_tag(ckpt_dir) if which == "latest" else which
    if tag is None or not (ckpt_dir / tag / MODEL_STATES).is_file():
        raise CheckpointError(f"no '{which}' checkpoint in {ckpt_dir}; train the run further or pick another --checkpoint")
    problem = verify(ckpt_dir, tag)
    if problem:
        raise CheckpointError(f"checkpoint {ckpt_dir / tag} is damaged: {problem}; pick another --checkpoint "
                              f"(step tags: {', '.join(step_tags(ckpt_dir)) or 'none'})")
    return tag


def choose_resume_tag(ckpt_dir: Path) -> str:
    """``latest`` if it verifies, else the newest step checkpoint that does, each rejection logged; a ``latest``
    that is missing or holds no tag name is one such rejection."""
    latest = read_latest_tag(ckpt_dir)
    candidates = ([latest] if latest else []) + [t for t in reversed(step_tags(ckpt_dir)) if t != latest]
    rejected = [] if latest else [f"{ckpt_dir / LATEST} is {'damaged' if (ckpt_dir / LATEST).exists() else 'missing'}"]
    for tag in candidates:
        problem = verify(ckpt_dir, tag)
        if problem is None:
            if rejected:
                log.warning("resuming from %s, the newest checkpoint that verifies: %s", tag, "; ".join(rejected))
            return tag
        rejected.append(f"checkpoint {tag} is unusable ({problem})")
    raise CheckpointError(f"no usable checkpoint in {ckpt_dir}: {'; '.join(rejected) or 'none written'}; "
                          "start a new run in another --run-dir")


def _load_file(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 - any unreadable file is the same user-facing problem
        raise CheckpointError(f"checkpoint file {path} cannot be read ({type(e).__name__}); it is corrupt or truncated: "
                              "use an earlier checkpoint or start a new run") from None


def read_client_state(ckpt_dir: Path, tag: str) -> dict:
    """The client state saved by DeepSpeed, read without an engine (to validate before loading)."""
    state = _load_file(ckpt_dir / tag / MODEL_STATES)
    return {k: v for k, v in state.items() if k in ("trainer", "recipe", "signature")}


def load_weights(module: torch.nn.Module, ckpt_dir: Path, tag: str) -> None:
    """The weights a checkpoint stands for, into a bare module (before DeepSpeed wraps it, so any ZeRO
    stage starts from them): its saved module, with the fp32 masters over its bf16 copies when a bf16 run wrote
    it, and a callback's ``eval_weights`` swapped in when one kept them (NT-ASGD's average)."""
    module.load_state_dict(_load_file(ckpt_dir / tag / MODEL_STATES)["module"])
    fp32 = ckpt_dir / tag / FP32_WEIGHTS
    if fp32.is_file():  # by parameter, after the module: a tied weight's second name must not bring bf16 back
        params = dict(module.named_parameters())
        with torch.no_grad():
            for name, value in _load_file(fp32).items():
                params[name].copy_(value)
    for state in read_callback_states(ckpt_dir, tag).values():
        if state.get("eval_weights") is not None:
            copy_flat_into(module, state["eval_weights"])


def read_callback_states(ckpt_dir: Path, tag: str) -> dict[str, dict]:
    """Every loop callback's saved state in ``tag``, by the callback's name (an older checkpoint's files too)."""
    tag_dir = ckpt_dir / tag
    found = {}
    for path in sorted(tag_dir.iterdir()) if tag_dir.is_dir() else []:
        m = CALLBACK_FILE.match(path.name)
        name = m[1] if m else LEGACY_CALLBACK_FILES.get(path.name)
        if name is not None:
            found[name] = _load_file(path)
    return found


def check_signature(mine: dict, saved: dict, tag: str) -> None:
    """Refuse a checkpoint of another vocabulary or model shape with a message instead of a shape error."""
    theirs = saved.get("signature", {})
    if theirs and not set(mine) & set(theirs):
        raise CheckpointError(f"checkpoint {tag} is of another recipe family ({', '.join(sorted(theirs))}); "
                              "use a checkpoint of this recipe's own runs")
    for key in sorted(set(mine) & set(theirs)):
        if mine[key] != theirs[key]:
            raise CheckpointError(
                f"checkpoint {tag} has {key} {theirs[key]!r} but this run has {mine[key]!r}; "
                "use the run's own config and data"
            )
