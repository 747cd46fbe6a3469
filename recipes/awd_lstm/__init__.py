"""AWD-LSTM language models (Merity et al., "Regularizing and Optimizing LSTM Language Models")."""

from pathlib import Path

CONFIGS = Path(__file__).parent / "configs"


def recipe_specs():
    from trainer.registry import RecipeSpec

    from .recipe import AWDLSTMRecipe

    return [
        RecipeSpec("awd_ptb", AWDLSTMRecipe, CONFIGS / "awd_ptb.yaml",
                   "AWD-LSTM on Penn Treebank, the paper's PTB command (24M params; 60.0/57.3 val/test ppl)"),
    ]
