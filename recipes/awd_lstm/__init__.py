"""AWD-LSTM language models (Merity et al., "Regularizing and Optimizing LSTM Language Models")."""

from pathlib import Path

CONFIGS = Path(__file__).parent / "configs"


def recipe_specs():
    from trainer.registry import RecipeSpec

    from .recipe import AWDLSTMRecipe

    def spec(name, description, requires_init=False):
        return RecipeSpec(name, AWDLSTMRecipe, CONFIGS / f"{name}.yaml", description, requires_init)

    return [
        spec("awd_ptb", "AWD-LSTM on Penn Treebank with NT-ASGD, the paper's PTB command (24M params)"),
        spec("awd_ptb_finetune", "fine-tune an awd_ptb run: averaging from the first step, stop when it stalls "
             "(60.0/57.3 val/test ppl)", requires_init=True),
        spec("awd_ptb_early_dropout", "awd_ptb with early dropout: every rate falls linearly to 0 by epoch 50"),
        spec("awd_ptb_late_dropout", "awd_ptb with late dropout: no dropout until epoch 50, then the paper's rates"),
        spec("awd_wt2", "AWD-LSTM on WikiText-2 with NT-ASGD, the paper's WT2 command (33M params)"),
        spec("awd_wt2_finetune", "fine-tune an awd_wt2 run (68.6/65.8 val/test ppl)", requires_init=True),
    ]
