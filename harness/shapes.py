"""The small model shapes the tests train: each still learns, in milliseconds a step on a CPU."""

from .paths import SHARED_DATA

# A small AWD-LSTM that still learns PTB in a few hundred CPU steps.
SMALL_AWD = ["data.root=" + str(SHARED_DATA), "model.emsize=100", "model.nhid=200", "data.bptt=35",
             "train.test_at_end=false", "train.progress=false"]
# The smallest shapes of each family that still train: a training step takes milliseconds.
TINY = [*SMALL_AWD, "model.emsize=32", "model.nhid=48", "data.bptt=20", "train.log_every=1", "train.epochs=1"]
TINY_VIT = ["data.format=synthetic", "data.train_size=100000", "model.num_classes=4", "data.image_size=32",
            "data.batch_size=8", "data.workers=1",
            "model.kwargs={patch_size: 8, embed_dim: 48, depth: 3, num_heads: 3}",
            "train.log_every=1", "train.progress=false", "train.test_at_end=false"]
