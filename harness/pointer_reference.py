"""The paper's pointer.py, token by token: the oracle the batched cache pointer is checked against (a unit test,
and bench/pointer_eval.py on real PTB)."""

import math

import torch
import torch.nn.functional as F

from recipes.awd_lstm.corpus import get_batch


def reference_nll(model, source, bptt, window, theta, lambdah):
    """pointer.py's loop, one column at a time: history truncated to `window` after each chunk and the
    pointer used where (retained history + offset in the chunk) > window."""
    total = 0.0
    for col in range(source.size(1)):
        data = source[:, col:col + 1]
        hidden = model.init_hidden(1)
        next_words, history = None, None
        for i in range(0, data.size(0) - 1, bptt):
            inputs, targets = get_batch(data, i, bptt)
            out = model(inputs, hidden)
            hidden = out.hidden
            rnn_out = out.raw_output.squeeze(1)
            probs = F.softmax(model.decoder(out.output).squeeze(1), -1)
            start = 0 if next_words is None else next_words.size(0)
            onehot = F.one_hot(targets.squeeze(1), probs.size(-1)).float()
            next_words = onehot if next_words is None else torch.cat([next_words, onehot])
            history = rnn_out if history is None else torch.cat([history, rnn_out])
            for idx in range(probs.size(0)):
                p = probs[idx]
                if start + idx > window:
                    keys = history[start + idx - window:start + idx]
                    vals = next_words[start + idx - window:start + idx]
                    attn = F.softmax(theta * keys @ rnn_out[idx], 0)
                    p = lambdah * (attn.unsqueeze(1) * vals).sum(0) + (1 - lambdah) * p
                total -= math.log(p[targets[idx, 0]].item())
            next_words, history = next_words[-window:], history[-window:]
    return total
