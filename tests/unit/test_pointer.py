"""The batched cache pointer equals a token-by-token implementation of the paper's pointer.py."""

import math

import pytest
import torch
import torch.nn.functional as F

from recipes.awd_lstm.corpus import get_batch
from recipes.awd_lstm.model import AWDLSTM
from recipes.awd_lstm.pointer import pointer_nll_sum


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


@pytest.mark.parametrize("chunk, window", [(6, 4), (5, 7), (9, 3)])
def test_batched_pointer_matches_the_reference_loop(chunk, window):
    torch.manual_seed(0)
    model = AWDLSTM(30, emsize=8, nhid=12, nlayers=2).eval()
    source = torch.randint(0, 30, (41, 3))
    with torch.no_grad():
        got, tokens = pointer_nll_sum(model, source, chunk, window, theta=0.7, lambdah=0.3)
        want = reference_nll(model, source, chunk, window, theta=0.7, lambdah=0.3)
    assert tokens == 40 * 3
    assert got == pytest.approx(want, rel=1e-5)


def test_pointer_off_equals_plain_evaluation_and_helps_on_repetitive_text():
    torch.manual_seed(0)
    model = AWDLSTM(50, emsize=8, nhid=12, nlayers=2).eval()
    phrase = torch.randint(0, 50, (23,))
    source = phrase.repeat(8).unsqueeze(1)  # the same phrase again and again: a cache's best case
    with torch.no_grad():
        plain = -sum(
            F.log_softmax(model.decoder(model(source[:-1]).output), -1).squeeze(1)
            .gather(1, source[1:]).squeeze(1).tolist())
        off, _ = pointer_nll_sum(model, source, 40, 10, theta=1.0, lambdah=0.0)
        on, _ = pointer_nll_sum(model, source, 40, 30, theta=1.0, lambdah=0.5)
    assert off == pytest.approx(plain, rel=1e-5)
    assert on < 0.9 * off
