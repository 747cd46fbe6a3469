"""The gradient-analysis monitor against independent numpy computations on a tiny MLP, on 1 and 2 ranks."""

from __future__ import annotations

import copy
import os

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from harness.launching import free_port
from trainer.analysis import (AnalysisConfig, GradientAnalysis, average_over_ranks, capture_batches, flat_grad,
                              make_grad_fn, preserved_stream_state)
from trainer.batching import plan_batch
from trainer.distributed import DistContext
from trainer.errors import ConfigError
from trainer.recipe import MicroResult, TrainData, TrainStep

CPU = torch.device("cpu")
ONE = DistContext(rank=0, world=1, local_rank=0, device=CPU)
K, S, MICRO, ACC = 3, 4, 4, 2  # mini-batch = ACC micro-batches of MICRO samples


class Net(nn.Module):
    """A tiny MLP; ``mask`` (scaled, per sample) is a dropout whose mask travels with the data, so ranks agree."""

    def __init__(self, p: float = 0.5, bn: bool = False):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(6, 16), nn.Linear(16, 3)
        self.drop = nn.Dropout(p)
        self.bn = nn.BatchNorm1d(16) if bn else None
        self.unused = nn.Linear(2, 2)  # never in the graph: its gradient is zero

    def forward(self, x, mask=None):
        h = torch.tanh(self.fc1(x))
        if self.bn is not None:
            h = self.bn(h)
        if mask is None:
            h = self.drop(h)
        elif self.training:
            h = h * mask
        return self.fc2(h)


PLAN = plan_batch(1, 1, 0)  # the loss reports no sizes: every micro-batch weighs the same


class TinyStream(TrainData):
    """A training stream with state like a data-order generator and a carried hidden state."""

    def __init__(self, batches):
        super().__init__(PLAN)
        self.batches = batches
        self.order = np.random.Generator(np.random.PCG64(0))
        self.carried = 0

    def steps_per_epoch(self):
        return len(self.batches)

    def steps(self, epoch):
        self.carried = 0
        for b in self.batches:
            self.order.random()
            yield TrainStep(b, units=1, position=None)

    def state_dict(self):
        return {"order": self.order.bit_generator.state}

    def load_state_dict(self, state):
        self.order.bit_generator.state = state["order"]

    def rank_state_dict(self):
        return {"carried": self.carried}

    def load_rank_state_dict(self, state):
        self.carried = state["carried"]


class TinyRecipe:
    """Just what the analysis' grad_fn needs from a recipe: the loss (which counts its calls in the stream, as a
    carried hidden state would change there)."""

    def __init__(self, batches):
        self.stream = TinyStream(batches)

    def loss(self, model, micro, step):
        x, y, *mask = micro
        self.stream.carried += 1
        return MicroResult(F.cross_entropy(model(x, *mask), y))


def grad_fn_of(recipe: TinyRecipe, model: Net):
    return make_grad_fn(recipe, model, PLAN)


def make_batches(n: int, with_mask: bool, seed: int = 1) -> list[list[tuple]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        micros = []
        for _ in range(ACC):
            x = torch.randn(MICRO, 6, generator=g)
            y = torch.randint(0, 3, (MICRO,), generator=g)
            mask = (torch.rand(MICRO, 16, generator=g) > 0.5).float() * 2.0
            micros.append((x, y, mask) if with_mask else (x, y))
        out.append(micros)
    return out


def make_model(seed: int = 0, **kw) -> Net:
    torch.manual_seed(seed)
    return Net(**kw)


# ------------------------------------------------------------------ independent reference (numpy, .backward)
def manual_grad(model: Net, micro_batches, train: bool) -> np.ndarray:
    model.train(train)
    model.zero_grad(set_to_none=True)
    for x, y, *mask in micro_batches:
        (F.cross_entropy(model(x, *mask), y) / len(micro_batches)).backward()
    g = np.concatenate([(p.grad if p.grad is not None else torch.zeros_like(p)).numpy().ravel().astype(np.float64)
                        for p in model.parameters()])
    model.zero_grad(set_to_none=True)
    model.train()
    return g


def cos(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def manual_metrics(model: Net, batches, initial: list[np.ndarray]) -> dict[str, float]:
    train = [manual_grad(model, b, True) for b in batches[:K]]
    ref = np.mean([manual_grad(model, b, False) for b in batches[:S]], axis=0)
    pairs = [1 - cos(train[i], train[j]) for i in range(K) for j in range(K) if i != j]
    params = np.concatenate([p.detach().numpy().ravel() for p in model.parameters()]).astype(np.float64)
    return {
        "analysis/grad_norm": float(np.mean([np.linalg.norm(g) for g in train])),
        "analysis/distance_from_init": float(np.linalg.norm(params - np.concatenate(initial))),
        "analysis/grad_direction_variance": float(np.mean(pairs)),
        "analysis/grad_direction_error": float(np.mean([1 - cos(g, ref) for g in train])),
        "analysis/reference_grad_norm": float(np.linalg.norm(ref)),
    }


def sgd_steps(model: Net, batches, n: int = 3, lr: float = 0.5) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    for b in batches[:n]:
        opt.zero_grad()
        for x, y, *mask in b:
            (F.cross_entropy(model(x, *mask), y) / len(b)).backward()
        opt.step()
    opt.zero_grad(set_to_none=True)


def config(**kw) -> AnalysisConfig:
    return AnalysisConfig(enabled=True, every=5, batches=K, reference_batches=S, **kw)


# ------------------------------------------------------------------ tests
def test_config_validates():
    assert not AnalysisConfig().enabled and AnalysisConfig().needed_batches == 16
    with pytest.raises(Exception):
        AnalysisConfig(batches=1)
    with pytest.raises(Exception):
        AnalysisConfig(every=0)
    analysis = GradientAnalysis(config(), Net(), ONE)
    assert [analysis.due(s) for s in (0, 4, 5, 10)] == [True, False, True, True]
    assert not GradientAnalysis(AnalysisConfig(every=5), Net(), ONE).due(5)


def test_flat_grad_matches_backward_and_leaves_grad_alone():
    model = make_model()
    x, y, mask = make_batches(1, True)[0][0]
    model.fc1.weight.grad = torch.full_like(model.fc1.weight, 7.0)
    g = flat_grad(model, F.cross_entropy(model(x, mask), y))
    assert g.dtype == torch.float32 and g.numel() == sum(p.numel() for p in model.parameters())
    assert torch.all(model.fc1.weight.grad == 7.0) and model.fc2.weight.grad is None
    assert average_over_ranks(g.clone(), ONE).equal(g)
    expected = manual_grad(model, [(x, y, mask)], True)
    np.testing.assert_allclose(g.numpy(), expected, rtol=1e-6, atol=1e-7)
    assert not g[-6:].any()  # the unused layer's slots are zeros


@pytest.mark.parametrize("init_on_cpu", [True, False])
def test_metrics_match_independent_computation(init_on_cpu):
    batches = make_batches(S, with_mask=True)
    model = make_model()
    initial = [p.detach().numpy().ravel().astype(np.float64).copy() for p in model.parameters()]
    analysis = GradientAnalysis(config(init_on_cpu=init_on_cpu), model, ONE)
    assert all(t.device.type == "cpu" and t.dtype == torch.float32 for t in analysis.initial)
    sgd_steps(model, batches)
    recipe = TinyRecipe(batches)
    got = analysis.run(5, grad_fn_of(recipe, model), batches)
    want = manual_metrics(model, batches, initial)
    assert want["analysis/distance_from_init"] > 0.1
    assert 0.01 < want["analysis/grad_direction_error"] and 0.01 < want["analysis/grad_direction_variance"]
    assert set(got) == set(want)
    for key in want:
        assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-6), key
    # TrainStep objects work as well as lists, and the same step gives the same numbers
    steps = [TrainStep(b, units=1, position=None) for b in batches]
    assert analysis.run(5, grad_fn_of(recipe, model), steps) == pytest.approx(got, rel=1e-6)


def test_eval_reference_has_dropout_off_and_train_batches_use_it():
    batches = make_batches(S, with_mask=False)
    model = make_model(p=0.5)
    analysis = GradientAnalysis(config(), model, ONE)
    inner = grad_fn_of(TinyRecipe(batches), model)
    calls = []

    def recording(micro, train_mode):
        g = inner(micro, train_mode)
        calls.append((train_mode, model.drop.training, g.clone()))
        return g

    first = analysis.run(5, recording, batches)
    second = analysis.run(10, recording, batches)  # another step: other dropout masks
    n = (K + S) * ACC
    assert len(calls) == 2 * n
    assert all(drop_on == train_mode for train_mode, drop_on, _ in calls)
    evals = [[g for t, _, g in calls[r * n:(r + 1) * n] if not t] for r in range(2)]
    trains = [[g for t, _, g in calls[r * n:(r + 1) * n] if t] for r in range(2)]
    assert len(evals[0]) == S * ACC and len(trains[0]) == K * ACC
    assert all(torch.equal(a, b) for a, b in zip(*evals))  # deterministic: dropout off
    assert not any(torch.allclose(a, b) for a, b in zip(*trains))  # fresh masks
    assert not torch.allclose(trains[0][0], evals[0][0])
    ref = np.mean([manual_grad(model, b, False) for b in batches[:S]], axis=0)
    assert first["analysis/reference_grad_norm"] == pytest.approx(np.linalg.norm(ref), rel=1e-5)
    assert second["analysis/reference_grad_norm"] == pytest.approx(first["analysis/reference_grad_norm"], rel=1e-6)
    assert second["analysis/grad_direction_error"] != first["analysis/grad_direction_error"]
    assert analysis.run(5, recording, batches) == first  # reproducible at a step


def train_step(model: Net, opt, batch) -> None:
    opt.zero_grad()
    for x, y in batch:
        (F.cross_entropy(model(x), y) / len(batch)).backward()


def test_training_state_is_not_disturbed():
    batches = make_batches(S + 2, with_mask=False)
    plain = make_model(p=0.3, bn=True)
    probed = copy.deepcopy(plain)
    probed.fc2.eval()  # a module deliberately left in eval mode keeps its flag
    plain.fc2.eval()
    analysis = GradientAnalysis(config(), probed, ONE)
    grad_fn = grad_fn_of(TinyRecipe(batches), probed)
    runs = []
    for model in (plain, probed):
        torch.manual_seed(123)
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        train_step(model, opt, batches[S])
        opt.step()
        train_step(model, opt, batches[S + 1])
        if model is probed:
            grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
            params = [p.detach().clone() for p in model.parameters()]
            buffers = [b.clone() for b in model.buffers()]
            rng = torch.get_rng_state()
            analysis.run(5, grad_fn, batches)
            assert torch.equal(torch.get_rng_state(), rng)
            assert all(torch.equal(a, p.grad) for a, p in zip(grads, [p for p in model.parameters()
                                                                      if p.grad is not None]))
            assert all(torch.equal(a, p) for a, p in zip(params, model.parameters()))
            assert all(torch.equal(a, b) for a, b in zip(buffers, model.buffers()))
            assert model.training and model.drop.training and not model.fc2.training
        opt.step()
        train_step(model, opt, batches[0])
        opt.step()
        runs.append(([p.detach().clone() for p in model.parameters()], [b.clone() for b in model.buffers()],
                     torch.rand(3)))
    (p_a, b_a, r_a), (p_b, b_b, r_b) = runs
    assert all(torch.equal(a, b) for a, b in zip(p_a, p_b))
    assert all(torch.equal(a, b) for a, b in zip(b_a, b_b))
    assert torch.equal(r_a, r_b)


def test_capture_batches_leaves_stream_and_rng_alone():
    batches = make_batches(S, with_mask=False)
    recipe = TinyRecipe(batches)
    stream = recipe.stream
    stream.carried = 9
    before = stream.state_dict()["order"]
    torch.manual_seed(5)
    rng = torch.get_rng_state()
    got = capture_batches(stream, 3)
    assert len(got) == 3 and all(torch.equal(a[0][0], b[0][0]) for a, b in zip(got, batches))
    assert stream.carried == 9 and stream.state_dict()["order"] == before
    assert torch.equal(torch.get_rng_state(), rng)
    with pytest.raises(ConfigError, match="needs 9 training steps"):
        capture_batches(stream, 9)
    with preserved_stream_state(stream):
        recipe.loss(make_model(), batches[0][0], None)
        assert stream.carried == 10
    assert stream.carried == 9


# ------------------------------------------------------------------ two ranks
def _shard(batches, rank: int, world: int):
    half = MICRO // world
    return [[tuple(t[rank * half:(rank + 1) * half] for t in micro) for micro in b] for b in batches]


def _perturb(model: Net) -> None:
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))


def _analyse(batches, ctx):
    """The analysis at step 5 of a perturbed model, and the first two train-mode mini-batch gradients."""
    model = make_model()
    analysis = GradientAnalysis(config(), model, ctx)
    _perturb(model)
    grad_fn = grad_fn_of(TinyRecipe(batches), model)
    metrics = analysis.run(5, grad_fn, batches)
    return metrics, [analysis.minibatch_grad(grad_fn, b, train_mode=True) for b in batches[:2]]


def _rank_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        ctx = DistContext(rank=rank, world=world, local_rank=rank, device=CPU)
        metrics, grads = _analyse(_shard(make_batches(S, with_mask=True), rank, world), ctx)
        torch.save({"metrics": metrics, "grads": grads}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_ranks_match_single_process(tmp_path):
    mp.spawn(_rank_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    want, want_grads = _analyse(make_batches(S, with_mask=True), ONE)
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        for a, b in zip(got["grads"], want_grads):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
        for key, value in want.items():
            assert abs(got["metrics"][key] - value) < 1e-5, (rank, key, got["metrics"][key], value)
