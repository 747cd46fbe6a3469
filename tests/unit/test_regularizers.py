import numpy as np
import pytest
import torch
from torch import nn

from recipes.awd_lstm.regularizers import (
    LockedDropout,
    WeightDropLSTM,
    activation_regularization,
    embedding_dropout,
    temporal_activation_regularization,
)
from recipes.awd_lstm.regularizers.dropconnect import DropConnectMask, quantized_keep


def _reference_lstm(m: WeightDropLSTM) -> nn.LSTM:
    ref = nn.LSTM(m.input_size, m.hidden_size)
    with torch.no_grad():
        ref.weight_ih_l0.copy_(m.weight_ih)
        ref.weight_hh_l0.copy_(m.weight_hh)
        ref.bias_ih_l0.copy_(m.bias_ih)
        ref.bias_hh_l0.copy_(m.bias_hh)
    return ref


def _zeros(b, h):
    return (torch.zeros(1, b, h), torch.zeros(1, b, h))


def _manual_lstm(x, hx, w_ih, w_hh, b_ih, b_hh):
    h, c = hx[0][0], hx[1][0]
    outs = []
    for t in range(x.size(0)):
        gates = x[t] @ w_ih.t() + b_ih + h @ w_hh.t() + b_hh
        i, f, g, o = gates.chunk(4, dim=1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
        outs.append(h)
    return torch.stack(outs), (h[None], c[None])


# ---------------------------------------------------------------- WeightDropLSTM


def test_weight_drop_lstm_init_and_parameters():
    torch.manual_seed(0)
    m = WeightDropLSTM(5, 7, weight_drop=0.3)
    shapes = {n: tuple(p.shape) for n, p in m.named_parameters()}
    assert shapes == {
        "weight_ih": (28, 5),
        "weight_hh": (28, 7),
        "bias_ih": (28,),
        "bias_hh": (28,),
    }
    bound = 1 / np.sqrt(7)
    for p in m.parameters():
        assert p.abs().max() <= bound
    # forward must not re-register or replace parameters
    before = {n: p for n, p in m.named_parameters()}
    m.train()
    m(torch.randn(3, 2, 5), _zeros(2, 7))
    after = {n: p for n, p in m.named_parameters()}
    assert before.keys() == after.keys()
    assert all(before[n] is after[n] for n in before)


@pytest.mark.parametrize("training", [True, False])
def test_weight_drop_rate_zero_matches_nn_lstm(training):
    torch.manual_seed(0)
    m = WeightDropLSTM(4, 6, weight_drop=0.0).train(training)
    ref = _reference_lstm(m).train(training)
    x = torch.randn(9, 3, 4)
    hx = (torch.randn(1, 3, 6), torch.randn(1, 3, 6))
    out, (h, c) = m(x, hx)
    rout, (rh, rc) = ref(x, hx)
    torch.testing.assert_close(out, rout)
    torch.testing.assert_close(h, rh)
    torch.testing.assert_close(c, rc)


def test_weight_drop_eval_mode_ignores_rate():
    torch.manual_seed(0)
    m = WeightDropLSTM(4, 6, weight_drop=0.9).eval()
    ref = _reference_lstm(m)
    x = torch.randn(5, 2, 4)
    torch.testing.assert_close(m(x, _zeros(2, 6))[0], ref(x, _zeros(2, 6))[0])


def test_weight_drop_affects_only_steps_after_the_first():
    torch.manual_seed(0)
    m = WeightDropLSTM(4, 16, weight_drop=0.5).train()
    x = torch.randn(6, 3, 4)
    torch.manual_seed(1)
    out1, _ = m(x, _zeros(3, 16))
    torch.manual_seed(2)
    out2, _ = m(x, _zeros(3, 16))
    # h0 = 0, so W_hh (dropped or not) cannot influence step 0.
    torch.testing.assert_close(out1[0], out2[0])
    for t in range(1, 6):
        assert not torch.allclose(out1[t], out2[t])


def test_weight_drop_single_mask_for_all_steps():
    torch.manual_seed(0)
    p = 0.4
    m = WeightDropLSTM(3, 5, weight_drop=p).train()
    x = torch.randn(7, 2, 3)
    hx = (torch.randn(1, 2, 5), torch.randn(1, 2, 5))
    torch.manual_seed(123)
    out, (h, c) = m(x, hx)
    # Recover the mask by replaying the RNG; forward draws nothing else.
    torch.manual_seed(123)
    w_hh = m.weight_hh.detach() * DropConnectMask().mask(m.weight_hh, p)
    assert (w_hh == 0).any() and (w_hh != 0).any()
    with torch.no_grad():
        mout, (mh, mc) = _manual_lstm(x, hx, m.weight_ih, w_hh, m.bias_ih, m.bias_hh)
    torch.testing.assert_close(out, mout, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(h, mh, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(c, mc, rtol=1e-5, atol=1e-6)


def test_weight_drop_gradients_reach_weight_hh_through_mask():
    torch.manual_seed(0)
    p = 0.5
    m = WeightDropLSTM(3, 5, weight_drop=p).train()
    x = torch.randn(4, 2, 3)
    torch.manual_seed(7)
    out, _ = m(x, _zeros(2, 5))
    out.pow(2).sum().backward()
    torch.manual_seed(7)
    mask = DropConnectMask().mask(m.weight_hh, p)
    g = m.weight_hh.grad
    assert g is not None
    assert g[mask != 0].abs().sum() > 0
    assert torch.all(g[mask == 0] == 0)
    for name in ("weight_ih", "bias_ih", "bias_hh"):
        assert getattr(m, name).grad.abs().sum() > 0


def test_weight_drop_forward_override_and_attribute():
    torch.manual_seed(0)
    m = WeightDropLSTM(3, 8, weight_drop=0.0).train()
    ref = _reference_lstm(m)
    x = torch.randn(5, 2, 3)
    expected, _ = ref(x, _zeros(2, 8))
    # attribute 0 -> exact; explicit override > 0 -> different
    torch.testing.assert_close(m(x, _zeros(2, 8))[0], expected)
    assert not torch.allclose(m(x, _zeros(2, 8), weight_drop=0.7)[0], expected)
    # attribute changed by caller is honoured, explicit 0 overrides it
    m.weight_drop = 0.7
    assert not torch.allclose(m(x, _zeros(2, 8))[0], expected)
    torch.testing.assert_close(m(x, _zeros(2, 8), weight_drop=0.0)[0], expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("rate", [0.5, 0.3, 0.9])
def test_dropconnect_mask_drops_at_the_rate_and_is_unbiased(dtype, rate):
    torch.manual_seed(0)
    w = torch.empty(700, 1001, dtype=dtype)  # odd size: the 16-bit draws do not fill the last 64-bit word
    mask = DropConnectMask().mask(w, rate)
    _, keep = quantized_keep(rate)
    scale32 = torch.tensor(1 / keep, dtype=torch.float32).item()
    holds_scale = dtype.itemsize >= 4 or torch.tensor(1 / keep, dtype=dtype).item() == scale32
    assert mask.dtype == (dtype if holds_scale else torch.float32) and mask.shape == w.shape
    assert set(mask.unique().tolist()) == {0.0, torch.tensor(1 / keep, dtype=mask.dtype).item()}
    n = w.numel()
    dropped = (mask == 0).sum().item() / n
    sigma = (rate * (1 - rate) / n) ** 0.5
    assert abs(dropped - rate) < 5 * sigma, (dropped, rate)
    assert abs(mask.double().mean().item() - 1) < 5 * sigma / keep  # unbiased up to sampling noise


@pytest.mark.parametrize("rate", [0.5, 0.3])
def test_a_bf16_weight_is_scaled_exactly_and_rounded_once(rate):
    torch.manual_seed(0)
    w = torch.randn(64, 48, dtype=torch.bfloat16, requires_grad=True)
    torch.manual_seed(1)
    masked = DropConnectMask()(w, rate)
    torch.manual_seed(1)
    mask32 = DropConnectMask().mask(w.detach().float(), rate)
    assert masked.dtype == torch.bfloat16
    assert torch.equal(masked, (w.detach().float() * mask32).bfloat16())
    upstream = torch.randn(64, 48, dtype=torch.bfloat16)
    (masked * upstream).sum().backward()
    assert w.grad.dtype == torch.bfloat16 and torch.equal(w.grad, (upstream.float() * mask32).bfloat16())


def test_dropconnect_mask_is_fresh_each_call_and_follows_the_torch_seed():
    w = torch.empty(64, 64)
    gen = DropConnectMask()
    torch.manual_seed(3)
    a = gen.mask(w, 0.5).clone()
    b = gen.mask(w, 0.5).clone()
    assert not torch.equal(a, b)
    torch.manual_seed(3)
    torch.testing.assert_close(DropConnectMask().mask(w, 0.5), a)
    rows = (a == 0).float()
    assert not torch.equal(rows[0], rows[1])  # elementwise, not row-wise


def test_dropconnect_mask_rates_at_the_edges():
    w = torch.empty(10, 10)
    assert DropConnectMask().mask(w, 0.0) is None
    assert DropConnectMask()(w, 1e-7) is w  # below 2**-17 rounds to dropping nothing
    with pytest.raises(ValueError, match="below 1"):
        DropConnectMask()(w, 1.0)
    assert quantized_keep(0.25) == (16384, 0.75)


def test_masked_weight_and_its_gradient_over_repeated_steps():
    torch.manual_seed(0)
    w = torch.randn(33, 17, requires_grad=True)
    upstream = torch.randn(33, 17)
    drop = DropConnectMask()
    for _ in range(3):  # the buffers are reused: each step must stand on its own
        w.grad = None
        state = torch.get_rng_state()
        masked = drop(w, 0.4)
        torch.set_rng_state(state)
        mask = DropConnectMask().mask(w, 0.4)
        torch.testing.assert_close(masked, w.detach() * mask)
        (masked * upstream).sum().backward()
        torch.testing.assert_close(w.grad, upstream * mask)

    def seeded(x):
        torch.manual_seed(5)
        return drop(x, 0.5)

    assert torch.autograd.gradcheck(seeded, (torch.randn(4, 5, dtype=torch.float64, requires_grad=True),))


def test_backward_through_a_redrawn_mask_raises_instead_of_using_the_new_one():
    m = WeightDropLSTM(3, 5, weight_drop=0.5).train()
    x = torch.randn(4, 2, 3)
    out1, _ = m(x)
    m(x)  # a second forward redraws the shared mask before the first backward
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out1.sum().backward()


# ---------------------------------------------------------------- LockedDropout


def test_locked_dropout_mask_shared_over_time():
    torch.manual_seed(0)
    p = 0.5
    ld = LockedDropout().train()
    x = torch.rand(10, 8, 16) + 0.5  # strictly positive, so zeros come from the mask
    y = ld(x, p)
    zero = y == 0
    assert torch.equal(zero, zero[:1].expand_as(zero))
    # mask varies over batch and feature
    assert zero[0].any() and (~zero[0]).any()
    assert (zero[0] != zero[0, :1]).any()  # differs across batch
    assert (zero[0] != zero[0, :, :1]).any()  # differs across features
    torch.testing.assert_close(y[~zero], x[~zero] / (1 - p))


def test_locked_dropout_identity_cases():
    x = torch.randn(4, 3, 5)
    ld = LockedDropout()
    assert torch.equal(ld.eval()(x, 0.5), x)
    assert torch.equal(ld.train()(x, 0.0), x)
    with pytest.raises(ValueError):
        ld(x, 1.5)


def test_locked_dropout_gradient_uses_same_mask():
    torch.manual_seed(0)
    x = torch.randn(6, 4, 5, requires_grad=True)
    y = LockedDropout().train()(x, 0.3)
    y.sum().backward()
    kept = (y != 0).float()
    torch.testing.assert_close(x.grad, kept / 0.7)


# ---------------------------------------------------------------- embedding_dropout


def test_embedding_dropout_drops_whole_words():
    torch.manual_seed(0)
    p = 0.5
    emb = nn.Embedding(30, 6)
    words = torch.randint(0, 12, (25, 4))
    out = embedding_dropout(emb, words, p, training=True)
    assert out.shape == (25, 4, 6)
    dropped, kept = 0, 0
    for w in words.unique().tolist():
        rows = out[words == w]
        if torch.all(rows == 0):
            dropped += 1
        else:
            kept += 1
            torch.testing.assert_close(rows, (emb.weight[w] / (1 - p)).expand_as(rows))
    assert dropped > 0 and kept > 0


def test_embedding_dropout_gradient_by_row():
    torch.manual_seed(1)
    p = 0.25
    emb = nn.Embedding(20, 3)
    words = torch.randint(0, 20, (30, 2))
    out = embedding_dropout(emb, words, p, training=True)
    out.sum().backward()
    counts = torch.bincount(words.flatten(), minlength=20).float()
    kept_rows = torch.zeros(20, dtype=torch.bool)
    for w in words.unique().tolist():
        kept_rows[w] = bool((out[words == w] != 0).any())
    expected = (counts * kept_rows.float() / (1 - p))[:, None].expand(20, 3)
    torch.testing.assert_close(emb.weight.grad, expected)
    assert kept_rows.any() and (~kept_rows[words.unique()]).any()


def test_embedding_dropout_identity_and_padding_idx():
    torch.manual_seed(0)
    emb = nn.Embedding(15, 4, padding_idx=0)
    words = torch.randint(0, 15, (8, 3))
    words[0, 0] = 0
    torch.testing.assert_close(embedding_dropout(emb, words, 0.5, training=False), emb(words))
    torch.testing.assert_close(embedding_dropout(emb, words, 0.0, training=True), emb(words))
    out = embedding_dropout(emb, words, 0.1, training=True)
    out.sum().backward()
    assert torch.all(emb.weight.grad[0] == 0)
    assert emb.weight.grad.abs().sum() > 0


# ---------------------------------------------------------------- AR / TAR


def test_activation_regularization_matches_numpy():
    torch.manual_seed(0)
    x = torch.randn(7, 3, 5)
    a = 2.0
    got = activation_regularization(x, a)
    assert got.dim() == 0
    expected = a * np.mean(x.numpy().astype(np.float64) ** 2)
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_temporal_activation_regularization_matches_numpy():
    torch.manual_seed(0)
    x = torch.randn(7, 3, 5)
    b = 1.5
    got = temporal_activation_regularization(x, b)
    assert got.dim() == 0
    xn = x.numpy().astype(np.float64)
    expected = b * np.mean((xn[1:] - xn[:-1]) ** 2)
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_ar_tar_zero_coefficients_and_grad():
    x = torch.randn(4, 2, 3, requires_grad=True)
    for fn in (activation_regularization, temporal_activation_regularization):
        z = fn(x, 0.0)
        assert isinstance(z, torch.Tensor) and z.dim() == 0 and z.item() == 0
    assert temporal_activation_regularization(x[:1], 1.0).item() == 0  # T=1: nothing to compare
    (activation_regularization(x, 1.0) + temporal_activation_regularization(x, 1.0)).backward()
    assert x.grad.abs().sum() > 0


def test_ar_low_precision_accumulates_in_float32():
    x = torch.randn(5, 2, 3).to(torch.bfloat16)
    assert activation_regularization(x, 1.0).dtype == torch.float32
    assert temporal_activation_regularization(x, 1.0).dtype == torch.float32


def test_the_flat_cudnn_buffer_gives_the_separate_weights_outputs_and_gradients():
    """cuDNN's flat buffer cannot be built here; a sequential layout exercises the same write and its gradient."""
    from recipes.awd_lstm.regularizers.weight_drop import _CudnnWeights, _lstm

    torch.manual_seed(0)
    m = WeightDropLSTM(8, 6, weight_drop=0.5)
    x, zeros = torch.randn(5, 3, 8), torch.zeros(1, 3, 6)
    mask = m.draw_mask().clone()
    want, _ = m(x, (zeros, zeros), mask=mask)
    want_grads = torch.autograd.grad(want.square().sum(), list(m.parameters()))
    ends = np.cumsum([0, 24 * 8, 24 * 6, 24, 24])
    layout = [(int(a), s) for a, s in zip(ends, [(24, 8), (24, 6), (24,), (24,)])]
    flat = _CudnnWeights(m.weight_ih, m.weight_hh, layout)
    for _ in range(2):  # the buffer is rewritten each forward; the second must stand on its own
        weights = flat.write([m.weight_ih, m.weight_hh, m.bias_ih, m.bias_hh], mask)
        assert all(w.untyped_storage().data_ptr() == flat.flat.untyped_storage().data_ptr() for w in weights)
        got = _lstm(x, (zeros, zeros), weights, True, 1, 0.0, True, False, False)[0]
        assert torch.equal(got, want)
        for a, b in zip(torch.autograd.grad(got.square().sum(), list(m.parameters())), want_grads):
            assert torch.equal(a, b)


def test_the_kernel_keeps_what_backward_needs_in_eval_mode_with_gradients():
    """cuDNN refuses an RNN backward after an inference-mode forward: eval mode with gradients (the gradient
    analysis' dropout-free reference) must still run the kernel in training mode, dropping nothing."""
    m = WeightDropLSTM(4, 3, weight_drop=0.5).eval()
    assert m._kernel_training()
    with torch.no_grad():
        assert not m._kernel_training()
    x = torch.randn(2, 1, 4)
    torch.testing.assert_close(m(x)[0], m(x)[0])  # eval: no mask drawn, deterministic
