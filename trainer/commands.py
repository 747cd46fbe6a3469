"""What ``launch/train.py`` and ``launch/evaluate.py`` do once their arguments are parsed.

Arguments and config are checked before torch and DeepSpeed are imported (seconds per process), so a mistake
there is a one-line error at once.
"""

from __future__ import annotations

import argparse
import logging
import math
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from .cli import require
from .config import read_yaml, to_yaml
from .errors import ConfigError
from .registry import all_recipes, get_recipe
from .rundir import RunDir

if TYPE_CHECKING:  # torch and DeepSpeed are imported once the arguments and config are checked
    from .faults.watchdog import PeerWatchdog

log = logging.getLogger("trainer")


def _saved_recipe(run: RunDir) -> str:
    require(run.config.is_file(), f"{run.path} has no config.yaml; point --run-dir at a training run's directory")
    name = read_yaml(run.config).get("recipe")
    require(bool(name), f"{run.config} names no recipe; it was not written by launch/train.py")
    return name


def _check_init_from(spec, source: str) -> None:
    """Weights of another recipe family have other parameter names: refuse them in one line, before any rank starts."""
    run = RunDir(source)
    require(run.config.is_file(), f"train.init_from {source} has no config.yaml; point it at a training run's directory")
    name = read_yaml(run.config).get("recipe")
    theirs = all_recipes().get(name)
    if theirs is None or theirs.factory is not spec.factory:
        kin = [n for n, s in all_recipes().items() if s.factory is spec.factory and not s.requires_init]
        raise ConfigError(f"train.init_from {source} is a '{name}' run, whose weights do not fit recipe {spec.name}; "
                          f"point it at a run of {', '.join(kin) or spec.name}")


def train(args: argparse.Namespace) -> int:
    if args.list_recipes:
        for name, spec in all_recipes().items():
            print(f"{name:28s} {spec.description}")
        return 0
    layers = list(args.config)
    if args.resume:
        require(bool(args.run_dir), "--resume needs --run-dir DIR naming the run to continue")
        saved = _saved_recipe(RunDir(args.run_dir))
        require(args.recipe in (None, saved), f"{args.run_dir} is a '{saved}' run, not '{args.recipe}'; drop --recipe or fix it")
        args.recipe = saved
        layers = [RunDir(args.run_dir).config, *layers]
    require(bool(args.recipe), "name a recipe with --recipe NAME (see --list-recipes)")
    require(not args.run_dir or not Path(args.run_dir).exists() or Path(args.run_dir).is_dir(),
            f"--run-dir {args.run_dir} is a file, not a directory; choose another --run-dir")
    spec = get_recipe(args.recipe)
    cfg = spec.load_config(layers, args.overrides)
    if args.resume:
        cfg.check_resume(spec.load_config([RunDir(args.run_dir).config]), args.run_dir)
    if args.print_config:
        print(to_yaml(cfg), end="")
        return 0
    if cfg.train.init_from and not args.resume:
        _check_init_from(spec, cfg.train.init_from)

    from .engine import Trainer
    from .monitor import setup_console_logging
    from .multihost import check_shared_run_dir
    from .rundir import resolve_run_dir
    from .startup import start_rank

    started = start_rank(lost_rank_timeout_s=cfg.train.lost_rank_timeout_s, on_watchdog=_keep_for_guarded(args))
    ctx = started.ctx
    setup_console_logging(ctx)
    run = resolve_run_dir(args.run_dir, spec.name, args.resume, ctx)
    check_shared_run_dir(run.path, ctx)
    args.run_dir = str(run.path)  # crash logs go to the run
    log.info("run %s: recipe %s on %d rank(s)", run.path, spec.name, ctx.world)
    trainer = Trainer(spec, cfg, ctx, run, resume=args.resume)
    _hint_resume(started.watchdog, run)
    state = trainer.fit()
    if trainer.preempted is not None:
        return 0  # a clean stop: the checkpoint is written and the log says how to continue
    best = "none" if state.best is None else f"{state.best:.4f}"
    log.info("done: %d steps, best valid %s %s; run directory %s", state.step, spec.factory.best_metric, best,
             run.path)
    return 0


def fit_in_process(recipe: str, overrides: list[str], run_dir: str | Path):
    """Train ``recipe`` in this process on the rank its environment describes (one rank when none): what a
    benchmark or a test that watches the engine from inside runs. Returns the finished Trainer."""
    from .engine import Trainer
    from .startup import start_rank

    spec = get_recipe(recipe)
    started, run = start_rank(), RunDir(run_dir)
    trainer = Trainer(spec, spec.load_config([], overrides), started.ctx, run, resume=False)
    _hint_resume(started.watchdog, run)
    trainer.fit()
    return trainer


def _keep_for_guarded(args: argparse.Namespace) -> Callable[["PeerWatchdog"], None]:
    """Where start-up hands the job's watchdog: ``args.watchdog``, which ``trainer.cli.guarded`` reports an error
    through and closes at the end, start-up's own errors included."""
    def keep(dog: "PeerWatchdog") -> None:
        args.watchdog = dog
    return keep


def _hint_resume(dog: "PeerWatchdog | None", run: RunDir) -> None:
    """Once the run exists (its Trainer built): a lost rank's message says how to continue it."""
    if dog is not None:
        dog.hint = f"; --resume --run-dir {run.path} continues from its last checkpoint"


def evaluate(args: argparse.Namespace) -> int:
    run = RunDir(args.run_dir)
    spec = get_recipe(_saved_recipe(run))
    cfg = spec.load_config([run.config], args.overrides)
    mode = "pointer" if args.pointer else "standard"
    split = args.split or spec.factory.report_split
    require(mode in spec.factory.eval_modes, f"recipe {spec.name} has no {mode} evaluation; drop --{mode}")
    from .checkpoint import check_signature, load_weights, read_client_state, resolve_tag

    tag = resolve_tag(run.checkpoints, args.checkpoint)
    saved = read_client_state(run.checkpoints, tag)

    from .evaluation import evaluate_split
    from .monitor import Monitor, setup_console_logging
    from .rng import seed_everything
    from .startup import start_rank

    from .precision import apply_precision

    ctx = start_rank(on_watchdog=_keep_for_guarded(args)).ctx
    setup_console_logging(ctx)
    apply_precision("tf32" if cfg.train.precision == "tf32" else "fp32")  # the fp32 weights, in IEEE fp32 unless asked
    recipe = spec.factory(cfg, ctx)
    recipe.setup()
    check_signature(recipe.checkpoint_signature(), saved, tag)
    seed_everything(cfg.seed)
    model = recipe.build_model()
    load_weights(model, run.checkpoints, tag)  # averaged weights where the run was averaging
    broken = next((name for name, p in model.named_parameters() if not p.detach().isfinite().all()), None)
    require(broken is None, f"checkpoint {run.checkpoints / tag} holds nan or inf weights ({broken}): it was saved "
                            "from a diverged run; evaluate an earlier --checkpoint")
    model.to(ctx.device)
    metrics = evaluate_split(recipe, model, split, ctx, mode)
    diverged = sorted(k for k, v in metrics.items() if not math.isfinite(v))
    require(not diverged, f"evaluating {tag} on {split} gave {' and '.join(diverged)} nan or inf: these weights "
                          "have diverged; evaluate an earlier --checkpoint")
    trainer = saved.get("trainer", {})
    step = trainer.get("step", 0)
    if ctx.is_main:
        values = " ".join(f"{k} {v:.6f}" for k, v in metrics.items())
        print(f"{split} [{tag}, step {step}, {mode}, {ctx.world} rank(s)] {values}", flush=True)
    Monitor(run, ctx).record(split, step, float(trainer.get("epoch", 0)), metrics,
                             {"checkpoint": tag, "world": ctx.world, "mode": mode, "source": "evaluate"},
                             tensorboard=False)
    return 0
