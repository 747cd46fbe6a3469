"""The batched cache pointer equals a token-by-token implementation of the paper's pointer.py."""

import pytest
import torch
import torch.nn.functional as F

from harness.pointer_reference import reference_nll
from recipes.awd_lstm.model import AWDLSTM
from recipes.awd_lstm.pointer import pointer_nll_sum


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
