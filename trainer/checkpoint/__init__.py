"""Checkpoints: what a run saves and how it continues from one. This package root only gathers the names other
modules import from its rooms (layout, writing, tags, elastic, checkpointer); it holds no code of its own."""

from .checkpointer import Checkpointer, agree_on_resume_tag, param_digest
from .layout import (BEST, FP32_WEIGHTS, LATEST, MANIFEST, MODEL_STATES, PARTIAL, REPLACED, STEP_TAG,
                     callback_file, rank_file, read_latest_tag, step_tag, step_tags)
from .tags import (check_signature, choose_resume_tag, load_weights, read_callback_states, read_client_state,
                   resolve_tag)
from .writing import recover_interrupted, verify, write_manifest

__all__ = [
    "BEST", "FP32_WEIGHTS", "LATEST", "MANIFEST", "MODEL_STATES", "PARTIAL", "REPLACED", "STEP_TAG",
    "Checkpointer",
    "agree_on_resume_tag", "callback_file", "check_signature", "choose_resume_tag", "load_weights", "param_digest",
    "rank_file", "read_callback_states", "read_client_state", "read_latest_tag", "recover_interrupted", "resolve_tag",
    "step_tag", "step_tags", "verify", "write_manifest",
]
