import numpy as np
import pytest
import torch
import torch.nn.functional as F

from recipes.awd_lstm.model import AWDLSTM, AWDOutput
from recipes.awd_lstm.regularizers import WeightDropLSTM

V, E, H, L = 40, 8, 12, 3


def _small(**kw):
    torch.manual_seed(0)
    return AWDLSTM(V, emsize=E, nhid=H, nlayers=L, **kw)


def _tokens(t=6, b=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, V, (t, b), generator=g)


def test_structure_and_shapes():
    m = _small()
    sizes = [(r.input_size, r.hidden_size) for r in m.rnns]
    assert sizes == [(E, H), (H, H), (H, E)]
    assert all(isinstance(r, WeightDropLSTM) for r in m.rnns)
    assert m.encoder.weight.abs().max() <= 0.1
    assert torch.all(m.decoder.bias == 0)
    tok = _tokens()
    out = m(tok, m.init_hidden(3))
    assert isinstance(out, AWDOutput)
    assert out.output.shape == (6, 3, E)
    assert out.raw_output.shape == (6, 3, E)
    assert [tuple(h.shape) for h, _ in out.hidden] == [(1, 3, H), (1, 3, H), (1, 3, E)]
    assert [tuple(c.shape) for _, c in out.hidden] == [(1, 3, H), (1, 3, H), (1, 3, E)]


def test_tied_and_untied():
    m = _small()
    assert m.encoder.weight is m.decoder.weight
    u = _small(tie_weights=False)
    assert u.encoder.weight is not u.decoder.weight
    assert u.rnns[-1].hidden_size == H and u.decoder.in_features == H
    out = u(_tokens(), u.init_hidden(3))
    assert out.output.shape == (6, 3, H)


def test_paper_ptb_parameter_count():
    m = AWDLSTM(10000)
    n = sum(p.numel() for p in m.parameters())
    assert 23.5e6 <= n <= 24.5e6


def test_eval_deterministic_train_stochastic():
    m = _small()
    tok = _tokens()
    m.eval()
    a = m(tok, m.init_hidden(3))
    b = m(tok, m.init_hidden(3))
    torch.testing.assert_close(a.output, b.output)
    torch.testing.assert_close(a.output, a.raw_output)  # no output dropout in eval
    m.train()
    c = m(tok, m.init_hidden(3))
    d = m(tok, m.init_hidden(3))
    assert not torch.allclose(c.output, d.output)


def test_rates_are_read_at_forward():
    m = _small()
    tok = _tokens()
    expected = m.eval()(tok, m.init_hidden(3)).output
    m.train()
    m.dropout = m.dropouth = m.dropouti = m.dropoute = 0.0
    m.wdrop = 0.0
    assert all(r.weight_drop == 0.0 for r in m.rnns)
    torch.testing.assert_close(m(tok, m.init_hidden(3)).output, expected)
    # weight drop alone switched back on makes training stochastic again
    m.wdrop = 0.6
    assert m.wdrop == 0.6 and all(r.weight_drop == 0.6 for r in m.rnns)
    assert not torch.allclose(m(tok, m.init_hidden(3)).output, expected)


def test_hidden_helpers():
    m = _small().double()
    hid = m.init_hidden(5)
    assert len(hid) == L
    for h, c in hid:
        assert h.dtype == torch.float64 and c.dtype == torch.float64
        assert torch.all(h == 0) and torch.all(c == 0)
    out = m(_tokens(b=5), hid)
    assert out.hidden[0][0].requires_grad
    det = AWDLSTM.detach_hidden(out.hidden)
    assert len(det) == L
    for (h, c), (dh, dc) in zip(out.hidden, det):
        assert not dh.requires_grad and not dc.requires_grad
        assert torch.equal(h, dh) and torch.equal(c, dc)
    # carrying state changes the result (truncated BPTT continuation)
    m.eval()
    tok = _tokens(b=5, seed=3)
    s1 = m(tok, m.init_hidden(5)).output
    s2 = m(tok, AWDLSTM.detach_hidden(out.hidden)).output
    assert not torch.allclose(s1, s2)


def test_loss_matches_manual_computation():
    m = _small()
    m.train()
    tok, tgt = _tokens(seed=1), _tokens(seed=2)
    torch.manual_seed(5)
    out = m(tok, m.init_hidden(3))
    alpha, beta = 2.0, 1.0
    total, ce = m.loss(out, tgt, alpha, beta)
    assert total.dim() == 0 and ce.dim() == 0
    logits = (out.output @ m.decoder.weight.t() + m.decoder.bias).detach().numpy().astype(np.float64)
    logits = logits.reshape(-1, V)
    lse = np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1)) + logits.max(1)
    ce_np = np.mean(lse - logits[np.arange(len(logits)), tgt.numpy().reshape(-1)])
    o = out.output.detach().numpy().astype(np.float64)
    r = out.raw_output.detach().numpy().astype(np.float64)
    ar = alpha * np.mean(o**2)
    tar = beta * np.mean((r[1:] - r[:-1]) ** 2)
    assert ce.item() == pytest.approx(ce_np, rel=1e-5)
    assert total.item() == pytest.approx(ce_np + ar + tar, rel=1e-5)
    total.backward()
    assert m.rnns[0].weight_hh.grad.abs().sum() > 0
    assert m.encoder.weight.grad.abs().sum() > 0


def test_token_nll_sum():
    m = _small().eval()
    tok, tgt = _tokens(seed=1), _tokens(seed=2)
    out = m(tok, m.init_hidden(3))
    s = m.token_nll_sum(out, tgt)
    assert s.dtype == torch.float64 and s.dim() == 0
    _, ce = m.loss(out, tgt, 0.0, 0.0)
    assert s.item() == pytest.approx(ce.item() * tgt.numel(), rel=1e-5)


def test_bf16_loss_is_float32():
    m = _small().to(torch.bfloat16).eval()
    tok, tgt = _tokens(), _tokens(seed=2)
    out = m(tok, m.init_hidden(3))
    assert out.output.dtype == torch.bfloat16
    total, ce = m.loss(out, tgt, 2.0, 1.0)
    assert total.dtype == torch.float32 and ce.dtype == torch.float32
    assert torch.isfinite(total)


def test_model_learns_tiny_sequence():
    torch.manual_seed(0)
    m = AWDLSTM(20, emsize=16, nhid=32, nlayers=2, dropout=0.1, dropouth=0.1,
                dropouti=0.1, dropoute=0.05, wdrop=0.1)
    # Random 8-token cycle, each batch column at a different phase: next token
    # is predictable from context, so loss can fall well below log(V).
    g = torch.Generator().manual_seed(0)
    cycle = torch.randperm(20, generator=g)[:8].repeat(3)
    data = torch.stack([torch.roll(cycle, -k)[:21] for k in range(4)], dim=1)
    inp, tgt = data[:-1], data[1:]

    def eval_loss():
        m.eval()
        with torch.no_grad():
            return m.loss(m(inp, m.init_hidden(4)), tgt, 0.0, 0.0)[1].item()

    before = eval_loss()
    opt = torch.optim.SGD(m.parameters(), lr=5.0)
    for _ in range(30):
        m.train()
        opt.zero_grad()
        total, _ = m.loss(m(inp, m.init_hidden(4)), tgt, 2.0, 1.0)
        total.backward()
        torch.nn.utils.clip_grad_norm_(m.parameters(), 0.25)
        opt.step()
    after = eval_loss()
    assert after < before - 0.5, (before, after)


def _split_forward(m, tok, masks, parts):
    """Outputs, and the column-weighted loss gradient, of the batch run as ``parts`` column slices (each forward
    followed by its backward, as training's micro-batches are: the masked weights live in reused buffers)."""
    outs, grads = [], None
    for cols in parts:
        out = m(tok[:, cols], None, masks.columns(cols))
        outs.append(out.output.detach())
        loss = (cols.stop - cols.start) / tok.size(1) * m.decoder(out.output).square().mean()
        g = torch.autograd.grad(loss, list(m.parameters()))
        grads = g if grads is None else [a + b for a, b in zip(grads, g)]
    return torch.cat(outs, dim=1), grads


def test_masks_drawn_for_the_batch_make_any_column_split_the_whole_batch():
    """What lets N ranks train as one: a batch cut into column slices, each with its columns of masks drawn once for
    the whole batch, gives the whole batch's outputs and (column-weighted) gradient."""
    m = _small(dropout=0.4, dropouth=0.3, dropouti=0.5, dropoute=0.2, wdrop=0.5)
    m.train()
    tok = _tokens(t=5, b=7)
    gen = torch.Generator()
    masks = m.draw_masks(7, gen.manual_seed(11))
    assert masks.embedding.shape == (V, 1) and [x.shape for x in masks.layer_inputs] == [(1, 7, E), (1, 7, H),
                                                                                          (1, 7, H)]
    assert masks.output.shape == (1, 7, E) and all(w.shape == (4 * r.hidden_size, r.hidden_size)
                                                   for w, r in zip(masks.weight_hh, m.rnns))
    whole, whole_grads = _split_forward(m, tok, masks, [slice(0, 7)])
    split, split_grads = _split_forward(m, tok, masks, [slice(0, 3), slice(3, 5), slice(5, 7)])
    torch.testing.assert_close(split, whole, rtol=1e-6, atol=1e-7)
    for a, b in zip(split_grads, whole_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    # the masks are a function of the generator's seed alone, and they do drop
    again = m.draw_masks(7, gen.manual_seed(11))
    assert all(torch.equal(a, b) for a, b in zip(again.layer_inputs, masks.layer_inputs))
    assert torch.equal(again.embedding, masks.embedding) and (masks.embedding == 0).any()
    other = m.draw_masks(7, gen.manual_seed(12))
    assert not torch.equal(other.layer_inputs[0], masks.layer_inputs[0])


def test_masks_follow_the_rates_and_are_ignored_in_eval_mode():
    m = _small(dropout=0.4, dropouth=0.0, dropouti=0.5, dropoute=0.0, wdrop=0.0)
    masks = m.draw_masks(3, torch.Generator().manual_seed(0))
    assert masks.embedding is None and masks.weight_hh == [None, None, None]
    assert masks.layer_inputs[0] is not None and masks.layer_inputs[1:] == [None, None]
    m.eval()
    tok = _tokens()
    torch.testing.assert_close(m(tok, None, masks).output, m(tok).output)
