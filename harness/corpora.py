"""Cut-down corpora: real PTB with short valid/test splits, for runs that should not spend minutes evaluating."""

from __future__ import annotations

from pathlib import Path

from .paths import PTB_DIR, scratch_dir


def short_eval_data(lines: int = 100) -> Path:
    """Real PTB train.txt with the first ``lines`` of valid/test, so short throughput runs do not spend
    minutes in the end-of-run evaluation. The vocabulary must come out identical to real PTB's (PTB's
    valid/test words all occur in train), which is checked, so the model shape is unchanged.
    """
    from recipes.awd_lstm.corpus import Corpus

    d = scratch_dir("ptb-short-eval-") / "ptb"
    d.mkdir()
    (d / "train.txt").symlink_to(PTB_DIR / "train.txt")
    for split in ("valid", "test"):
        with (PTB_DIR / f"{split}.txt").open() as src:
            (d / f"{split}.txt").write_text("".join(line for _, line in zip(range(lines), src)))
    full, short = Corpus.from_dir(PTB_DIR), Corpus.from_dir(d)
    if full.vocab_digest() != short.vocab_digest():
        raise RuntimeError("trimmed valid/test changed the vocabulary; the model shape would differ")
    return d
