"""Bad input, tried case by case: each must give one ``error:`` line naming the problem and the fix, a
non-zero exit, no traceback, and leave every file an earlier run wrote as it was.

The cases and their runner: ``bench/bad_inputs.py`` runs every case and prints the table of the RELIABILITY
report; ``tests/e2e/test_bad_input.py`` and ``tests/e2e/test_run_safety.py`` assert them one by one. Commands go
through ``launch/`` as users type them: plain ``python`` for 1 rank, the ``deepspeed`` launcher for 2.
"""

from __future__ import annotations

import hashlib
import shutil
import socket
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .images import make_image_folder
from .launching import launch_command, launcher_env, run_command
from .paths import PTB_DIR, REPO

DATA_ROOT = str(PTB_DIR.parent)
# A tiny AWD-LSTM: seconds per step on a CPU, checkpoints of a few hundred kB.
TINY_AWD = [f"data.root={DATA_ROOT}", "model.emsize=32", "model.nhid=48", "data.bptt=35",
            "train.test_at_end=false", "train.progress=false"]
TINY_VIT = ["data.batch_size=32", "data.image_size=32", "data.workers=0", "optim.lr=2e-3", "train.epochs=1", "train.progress=false",
            "train.test_at_end=false", "optim.lr_batch=32", "optim.warmup_epochs=1",
            "model.kwargs={patch_size: 8, embed_dim: 32, depth: 2, num_heads: 2}"]


def snapshot(paths: list[Path]) -> dict[str, str]:
    """md5 of every file under ``paths``: what a refused command must leave exactly as it was (no file changed,
    removed or added)."""
    out = {}
    for root in paths:
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        for f in files:
            out[str(f)] = hashlib.md5(f.read_bytes()).hexdigest()
    return out


# ------------------------------------------------------------------ the shared trained runs
@dataclass(frozen=True)
class Shared:
    """Runs that several cases start from; a case copies one into its scratch directory before using it."""

    awd_run: Path  # a tiny awd_ptb run with step and best checkpoints (emsize 32, nhid 48)
    image_run: Path  # a tiny vit_t run (another recipe family)


def train_shared(root: Path) -> Shared:
    awd, vit = root / "awd_run", root / "vit_run"
    procs = [
        run_command(launch_command("train.py", ["--recipe", "awd_ptb", "--run-dir", str(awd), "--set", *TINY_AWD,
                                         "train.max_steps=2", "train.eval_every=2", "train.checkpoint_every=2"])),
        run_command(launch_command("train.py", ["--recipe", "vit_t", "--run-dir", str(vit), "--set",
                                         f"data.root={make_image_folder(root / 'images')}", *TINY_VIT])),
    ]
    for proc in procs:
        if proc.returncode != 0:
            raise RuntimeError(f"training a shared run failed:\n{(proc.stdout + proc.stderr)[-3000:]}")
    return Shared(awd, vit)


# ------------------------------------------------------------------ the cases
@dataclass
class Prepared:
    """What a case's setup made: the arguments, what the command must leave alone (``guard``: files and directories
    that must stay exactly as they are; ``absent``: paths that must not appear), a socket to hold, the command's
    extra environment, and what to undo afterwards."""

    args: list[str]
    guard: list[Path] = field(default_factory=list)
    absent: list[Path] = field(default_factory=list)
    port: int | None = None
    hold: socket.socket | None = None
    env: dict[str, str] = field(default_factory=dict)  # extra environment of the command
    cleanup: Callable[[], None] | None = None  # undoes what the setup made outside its scratch (a mount, a process)


@dataclass(frozen=True)
class Case:
    name: str
    script: str  # train.py | evaluate.py | sweep.py
    setup: Callable[[Path, Shared], Prepared]
    expect: tuple[str, ...]  # fragments of the one error line (or warning line, when it succeeds): problem and fix
    ranks: int = 1
    succeeds: bool = False  # bad data the run survives: exit 0 and one warning line naming it
    needs_shared: bool = False


def copy_run(src: Path, scratch: Path, name: str = "run") -> Path:
    dst = scratch / name
    shutil.copytree(src, dst)
    return dst


def ptb_copy(scratch: Path, train: bytes | None = None) -> Path:
    """A copy of real PTB (valid and test linked) whose train.txt is replaced by ``train`` when given."""
    d = scratch / "data" / "ptb"
    d.mkdir(parents=True)
    for split in ("train", "valid", "test"):
        (d / f"{split}.txt").symlink_to(PTB_DIR / f"{split}.txt")
    if train is not None:
        (d / "train.txt").unlink()
        (d / "train.txt").write_bytes(train)
    return d.parent


GARBLED = b"the cat \xff\xfe\x00\x81 sat on\n" * 50  # invalid UTF-8


def _new(*sets: str, recipe: str = "awd_ptb"):
    def setup(scratch: Path, shared: Shared) -> Prepared:
        return Prepared(["--recipe", recipe, "--run-dir", str(scratch / "run"), "--set", *TINY_AWD, *sets],
                        absent=[scratch / "run"])
    return setup


def _missing_data(scratch: Path, shared: Shared) -> Prepared:
    return Prepared(["--recipe", "awd_ptb", "--run-dir", str(scratch / "run"), "--set", *TINY_AWD,
                     f"data.root={scratch / 'nowhere'}", "data.download=false"],
                    absent=[scratch / "run", scratch / "nowhere"])


def _empty_data(scratch: Path, shared: Shared) -> Prepared:
    (scratch / "empty" / "ptb").mkdir(parents=True)
    return Prepared(["--recipe", "awd_ptb", "--run-dir", str(scratch / "run"), "--set", *TINY_AWD,
                     f"data.root={scratch / 'empty'}", "data.download=false"],
                    guard=[scratch / "empty"], absent=[scratch / "run"])


def _garbled(verify: bool, content: bytes = GARBLED):
    def setup(scratch: Path, shared: Shared) -> Prepared:
        root = ptb_copy(scratch, content)
        return Prepared(["--recipe", "awd_ptb", "--run-dir", str(scratch / "run"), "--set", *TINY_AWD,
                         f"data.root={root}", f"data.verify={str(verify).lower()}", "data.download=false"],
                        guard=[root], absent=[scratch / "run"])
    return setup


def _resume(*sets: str, recipe: str | None = None, data: bytes | None = None):
    def setup(scratch: Path, shared: Shared) -> Prepared:
        run = copy_run(shared.awd_run, scratch)
        extra = list(sets)
        if data is not None:
            extra += [f"data.root={ptb_copy(scratch, data)}", "data.verify=false"]
        args = ["--run-dir", str(run), "--resume", *(["--recipe", recipe] if recipe else [])]
        return Prepared(args + (["--set", *extra] if extra else []), guard=[run])
    return setup


def _finetune_from(which: str, *sets: str):
    def setup(scratch: Path, shared: Shared) -> Prepared:
        source = copy_run(shared.awd_run if which == "awd" else shared.image_run, scratch, "source")
        return Prepared(["--recipe", "awd_ptb_finetune", "--run-dir", str(scratch / "run"), "--set", *TINY_AWD,
                         f"train.init_from={source}", *sets], guard=[source], absent=[scratch / "run"])
    return setup


def _truncated_checkpoint(tag: str, script: str):
    def setup(scratch: Path, shared: Shared) -> Prepared:
        run = copy_run(shared.awd_run, scratch)
        if tag == "latest":
            real = (run / "checkpoints" / "latest").read_text().strip()
        else:
            real = tag
        states = run / "checkpoints" / real / "mp_rank_00_model_states.pt"
        states.write_bytes(states.read_bytes()[:1000])
        args = ["--run-dir", str(run), "--resume"] if script == "train.py" else ["--run-dir", str(run)]
        return Prepared(args, guard=[run])
    return setup


def _bad_yaml(scratch: Path, shared: Shared) -> Prepared:
    bad = scratch / "bad.yaml"
    bad.write_text("model:\n  nhid: [48\n")
    return Prepared(["--recipe", "awd_ptb", "--config", str(bad), "--run-dir", str(scratch / "run")], guard=[bad],
                    absent=[scratch / "run"])


def _resume_without_checkpoint(scratch: Path, shared: Shared) -> Prepared:
    run = copy_run(shared.awd_run, scratch)
    shutil.rmtree(run / "checkpoints")
    return Prepared(["--run-dir", str(run), "--resume"], guard=[run])


def _evaluate_missing_tag(scratch: Path, shared: Shared) -> Prepared:
    run = copy_run(shared.awd_run, scratch)
    return Prepared(["--run-dir", str(run), "--checkpoint", "step_00000099"], guard=[run])


def _into_existing_run(scratch: Path, shared: Shared) -> Prepared:
    run = copy_run(shared.awd_run, scratch)
    return Prepared(["--recipe", "awd_ptb", "--run-dir", str(run), "--set", *TINY_AWD], guard=[run])


def _run_dir_is_a_file(scratch: Path, shared: Shared) -> Prepared:
    f = scratch / "notes.txt"
    f.write_text("not a run directory\n")
    return Prepared(["--recipe", "awd_ptb", "--run-dir", str(f), "--set", *TINY_AWD], guard=[f])


def _evaluate_non_run(scratch: Path, shared: Shared) -> Prepared:
    d = scratch / "notes"
    d.mkdir()
    (d / "readme.txt").write_text("not a run\n")
    return Prepared(["--run-dir", str(d)], guard=[d])


def _bad_hostfile(scratch: Path, shared: Shared) -> Prepared:
    import yaml

    hostfile = scratch / "hostfile"
    hostfile.write_text("node-01 slots=2\nnode-02 gpus=2\n")
    sweep = scratch / "sweep.yaml"
    sweep.write_text(yaml.safe_dump({"recipe": "awd_ptb", "sweep_dir": str(scratch / "out"), "hostfile": str(hostfile),
                                     "base": {"model.nhid": 48}, "grid": {"seed": [1, 2]}}))
    return Prepared([str(sweep), "--backend", "hostfile"], guard=[hostfile, sweep], absent=[scratch / "out"])


def _port_in_use(scratch: Path, shared: Shared) -> Prepared:
    hold = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    hold.bind(("127.0.0.1", 0))
    hold.listen()
    port = hold.getsockname()[1]
    return Prepared(["--recipe", "awd_ptb", "--run-dir", str(scratch / "run"), "--set", *TINY_AWD],
                    absent=[scratch / "run"], port=port, hold=hold)


def _unknown_model(scratch: Path, shared: Shared) -> Prepared:
    images = make_image_folder(scratch / "images")
    return Prepared(["--recipe", "vit_t", "--run-dir", str(scratch / "run"), "--set", f"data.root={images}",
                     *TINY_VIT, "model.name=vit_tiny_patch16_22"], guard=[images], absent=[scratch / "run"])


def _images(*sets: str):
    """A new vit_t run on the suite's generated image folder (4 classes, 96 training images), with ``sets``."""
    def setup(scratch: Path, shared: Shared) -> Prepared:
        images = make_image_folder(scratch / "images")
        return Prepared(["--recipe", "vit_t", "--run-dir", str(scratch / "run"), "--set", f"data.root={images}",
                         *TINY_VIT, *sets], guard=[images], absent=[scratch / "run"])
    return setup


def _corrupt_jpeg(scratch: Path, shared: Shared) -> Prepared:
    images = make_image_folder(scratch / "images", corrupt=True)
    return Prepared(["--recipe", "vit_t", "--run-dir", str(scratch / "run"), "--set", f"data.root={images}",
                     *TINY_VIT], guard=[images])


def _resume_with_latest(content: bytes | None):
    """A run whose ``checkpoints/latest`` is gone (None) or holds ``content``: the resume falls back to the newest
    step checkpoint that verifies and says so; the checkpoints written before are left as they were."""
    def setup(scratch: Path, shared: Shared) -> Prepared:
        run = copy_run(shared.awd_run, scratch)
        latest = run / "checkpoints" / "latest"
        latest.unlink()
        if content is not None:
            latest.write_bytes(content)
        return Prepared(["--run-dir", str(run), "--resume", "--set", "train.max_steps=3"],
                        guard=[run / "checkpoints" / "step_00000002"])
    return setup


def _diverging(scratch: Path, shared: Shared) -> Prepared:
    """optim.lr=1e30: the loss stays finite for a step, then validation is nan: never saved as best."""
    run = scratch / "run"
    return Prepared(["--recipe", "awd_ptb", "--run-dir", str(run), "--set", *TINY_AWD, "optim.lr=1e30",
                     "train.eval_every=2", "train.checkpoint_every=1", "optim.averaging=none"],
                    absent=[run / "checkpoints" / "best", REPO / "crash-rank0.log"])


def _nan_weights(scratch: Path, shared: Shared) -> Prepared:
    """A best checkpoint whose weights hold a nan (its manifest rewritten, so only its values are wrong)."""
    import torch

    from trainer.checkpoint import write_manifest
    from trainer.checkpoint.writing import own_entries

    run = copy_run(shared.awd_run, scratch)
    tag = run / "checkpoints" / "best"
    states = torch.load(tag / "mp_rank_00_model_states.pt", weights_only=False)
    states["module"]["encoder.weight"][3, 5] = float("nan")
    torch.save(states, tag / "mp_rank_00_model_states.pt")
    write_manifest(tag, [own_entries(tag, 0)])
    return Prepared(["--run-dir", str(run)], guard=[run])


def _startup_error(scratch: Path, shared: Shared) -> Prepared:
    """An unexpected error before the run directory exists: its crash log goes beside it, never into the checkout."""
    run = scratch / "runs" / "run"
    run.parent.mkdir()
    return Prepared(["--recipe", "awd_ptb", "--run-dir", str(run), "--set", *TINY_AWD],
                    absent=[run, REPO / "crash-rank0.log"], env={"TRAINER_FAULTS": "error@0:0"})


def _mounted(scratch: Path, options: str) -> tuple[Path, Callable[[], None]]:
    """A tmpfs of its own at ``scratch/mnt`` (root only): a read-only folder or a full disk, for real."""
    mnt = scratch / "mnt"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(mnt)], check=True)
    return mnt, lambda: subprocess.run(["umount", "-l", str(mnt)], check=False)


def _read_only_parent(scratch: Path, shared: Shared) -> Prepared:
    mnt, undo = _mounted(scratch, "size=1m,ro")
    return Prepared(["--recipe", "awd_ptb", "--run-dir", str(mnt / "run"), "--set", *TINY_AWD],
                    absent=[mnt / "run", REPO / "crash-rank0.log"], cleanup=undo)


def _full_disk(scratch: Path, shared: Shared) -> Prepared:
    """3 MB for a run whose checkpoints take more: the save that does not fit fails, what was written stays."""
    mnt, undo = _mounted(scratch, "size=3m")
    return Prepared(["--recipe", "awd_ptb", "--run-dir", str(mnt / "run"), "--set", *TINY_AWD, "train.max_steps=40",
                     "train.checkpoint_every=3", "train.eval_every=3"],
                    absent=[REPO / "crash-rank0.log"], cleanup=undo)


def _name_too_long(scratch: Path, shared: Shared) -> Prepared:
    run = scratch / ("r" * 300)
    return Prepared(["--recipe", "awd_ptb", "--run-dir", str(run), "--set", *TINY_AWD],
                    absent=[REPO / "crash-rank0.log"])


def _read_only_sweep_dir(scratch: Path, shared: Shared) -> Prepared:
    import yaml

    mnt, undo = _mounted(scratch, "size=1m,ro")
    sweep = scratch / "sweep.yaml"
    sweep.write_text(yaml.safe_dump({"recipe": "awd_ptb", "sweep_dir": str(mnt / "sweep"),
                                     "base": {"model.nhid": 48, "model.emsize": 32, "data.root": DATA_ROOT},
                                     "grid": {"seed": [1, 2]}}))
    return Prepared([str(sweep), "--backend", "local"], guard=[sweep], absent=[mnt / "sweep"], cleanup=undo)


def _sweep_edited(scratch: Path, shared: Shared) -> Prepared:
    """A sweep run again after its base was edited: its finished points are neither skipped nor resumed."""
    import yaml

    sweep, out = scratch / "sweep.yaml", scratch / "out"
    spec = {"recipe": "awd_ptb", "sweep_dir": str(out), "base": {**dict(s.split("=", 1) for s in TINY_AWD),
            "train.max_steps": 1, "train.eval_every": 1, "train.checkpoint_every": 1}, "grid": {"seed": [1, 2]}}
    sweep.write_text(yaml.safe_dump(spec))
    done = run_command(launch_command("sweep.py", [str(sweep), "--backend", "local"]))
    if done.returncode:
        raise RuntimeError(f"the sweep to edit failed:\n{(done.stdout + done.stderr)[-3000:]}")
    spec["base"]["optim.lr"] = 10
    sweep.write_text(yaml.safe_dump(spec))
    return Prepared([str(sweep), "--backend", "local"], guard=[sweep, out])


def _in_use(scratch: Path, shared: Shared) -> Prepared:
    """A second job on a run directory a first one (stopped with SIGSTOP, so it writes nothing meanwhile) holds."""
    import json
    import os
    import signal
    import time

    run = scratch / "run"
    first = subprocess.Popen(launch_command("train.py", ["--recipe", "awd_ptb", "--run-dir", str(run), "--set", *TINY_AWD,
                                                  "train.max_steps=100000"]),
                             cwd=REPO, env=launcher_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             start_new_session=True)

    def undo() -> None:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()

    lock, deadline = run / ".lock", time.monotonic() + 300
    while not (lock.is_file() and lock.read_text().strip() and json.loads(lock.read_text())["pid"] == first.pid):
        if first.poll() is not None or time.monotonic() > deadline:
            undo()
            raise RuntimeError("the first job never took the run directory's lock")
        time.sleep(0.2)
    os.killpg(first.pid, signal.SIGSTOP)
    return Prepared(["--recipe", "awd_ptb", "--run-dir", str(run), "--set", *TINY_AWD], guard=[run], cleanup=undo)


INPUT_CASES: list[Case] = [
    Case("unknown recipe", "train.py", lambda s, _: Prepared(["--recipe", "awd_ptbb", "--run-dir", str(s / "run")],
                                                             absent=[s / "run"]),
         ("unknown recipe 'awd_ptbb'", "did you mean 'awd_ptb'", "--list-recipes")),
    Case("no recipe", "train.py", lambda s, _: Prepared(["--run-dir", str(s / "run")], absent=[s / "run"]),
         ("--recipe NAME", "--list-recipes")),
    Case("unknown config key", "train.py", _new("model.nhidd=3"),
         ("unknown key 'model.nhidd'", "did you mean 'model.nhid'")),
    Case("wrong type", "train.py", _new("model.nhid=abc"), ("model.nhid", "integer", "'abc'", "correct it where it is set")),
    Case("out-of-range value", "train.py", _new("model.dropout=1.5"), ("model.dropout", "less than 1", "correct it where it is set")),
    Case("bad YAML config file", "train.py", _bad_yaml, ("bad.yaml line", "not valid YAML", "fix its syntax")),
    Case("early-dropout cutoff past the run", "train.py", _new("train.epochs=10", recipe="awd_ptb_early_dropout"),
         ("drop.cutoff_epoch=50 is not before train.epochs=10", "early dropout would never end")),
    Case("global batch smaller than the 2 ranks", "train.py", _new("data.batch_size=1"),
         ("data.batch_size=1", "smaller than the 2 data-parallel ranks", "fewer ranks"), ranks=2),
    Case("missing data directory", "train.py", _missing_data,
         ("nowhere", "train.txt, valid.txt, test.txt", "downloading is off", "data.root")),
    Case("empty data directory", "train.py", _empty_data,
         ("empty/ptb", "train.txt, valid.txt, test.txt", "downloading is off", "data.root")),
    Case("garbled corpus file (md5 checked)", "train.py", _garbled(verify=True),
         ("ptb/train.txt", "md5", "replace it with the original file")),
    Case("garbled corpus file (md5 off)", "train.py", _garbled(verify=False),
         ("ptb/train.txt", "not UTF-8", "replace it with the original file")),
    Case("empty corpus file (md5 off)", "train.py", _garbled(verify=False, content=b"\n\n"),
         ("ptb/train.txt", "no tokens", "replace it with the original file")),
    Case("resume: model shape differs", "train.py", _resume("model.nhid=64"),
         ("--resume cannot change model.nhid 48 -> 64", "train.init_from="), needs_shared=True),
    Case("resume: vocabulary differs", "train.py", _resume(data=b"a b c d e f g h\n" * 500),
         ("vocabulary", "10000 words", "use the run's own config and data"), needs_shared=True),
    Case("resume with another recipe", "train.py", _resume(recipe="awd_wt2"),
         ("'awd_ptb' run, not 'awd_wt2'", "drop --recipe"), needs_shared=True),
    Case("init_from: model shape differs", "train.py", _finetune_from("awd", "model.nhid=64"),
         ("model shape", "nhid 48", "nhid 64"), needs_shared=True),
    Case("init_from: another recipe family", "train.py", _finetune_from("vit"),
         ("'vit_t' run", "awd_ptb_finetune", "init_from"), needs_shared=True),
    Case("resume: truncated checkpoint", "train.py", _truncated_checkpoint("latest", "train.py"),
         ("no usable checkpoint", "step_00000002", "mp_rank_00_model_states.pt", "truncated", "another --run-dir"),
         needs_shared=True),
    Case("evaluate: truncated checkpoint", "evaluate.py", _truncated_checkpoint("best", "evaluate.py"),
         ("checkpoints/best is damaged", "mp_rank_00_model_states.pt", "truncated", "pick another --checkpoint"),
         needs_shared=True),
    Case("resume a directory that does not exist", "train.py",
         lambda s, _: Prepared(["--run-dir", str(s / "nothing"), "--resume"], absent=[s / "nothing"]),
         ("nothing has no config.yaml", "point --run-dir at a training run")),
    Case("evaluate a checkpoint that does not exist", "evaluate.py", _evaluate_missing_tag,
         ("no 'step_00000099' checkpoint", "pick another --checkpoint"), needs_shared=True),
    Case("resume without a checkpoint", "train.py", _resume_without_checkpoint,
         ("nothing to resume", "has no checkpoints", "another --run-dir"), needs_shared=True),
    Case("new run into a run directory", "train.py", _into_existing_run,
         ("already holds a run", "--resume", "another --run-dir"), needs_shared=True),
    Case("run directory is a file", "train.py", _run_dir_is_a_file,
         ("notes.txt is a file, not a directory", "choose another --run-dir")),
    Case("evaluate a non-run directory", "evaluate.py", _evaluate_non_run,
         ("no config.yaml", "point --run-dir at a training run")),
    Case("malformed hostfile (sweep)", "sweep.py", _bad_hostfile,
         ("hostfile", "line 2", "node-02 gpus=2", "slots=")),
    Case("port already in use (2 ranks)", "train.py", _port_in_use,
         ("is already in use", "MASTER_PORT", "--master_port"), ranks=2),
    Case("unknown timm model", "train.py", _unknown_model,
         ("vit_tiny_patch16_22", "did you mean 'vit_tiny_patch16_224'")),
    Case("corrupt JPEG in train/ (skipped, counted)", "train.py", _corrupt_jpeg,
         ("skipping unreadable image", "broken.JPEG"), succeeds=True),
]

# A run directory's safety (issue 22): one job per directory, a resume checked before it writes, nothing broken
# saved as best, every value checked before a rank starts, the filesystem's refusals in plain words.
RUN_CASES: list[Case] = [
    # ---- a run directory has one owner
    Case("a second job on a run directory in use", "train.py", _in_use,
         ("is in use by another job", "pid", "wait for that job to end", "another --run-dir")),
    Case("an unexpected error before the run directory exists", "train.py", _startup_error,
         ("unexpected InjectedFault", "runs/run.crash-rank0.log")),
    # ---- a resume is checked before it writes
    Case("resume: another optimizer", "train.py", _resume("optim.optimizer=adam"),
         ("--resume cannot change optim.optimizer 'sgd' -> 'adam'", "train.init_from="), needs_shared=True),
    Case("resume: another global batch", "train.py", _resume("data.batch_size=10"),
         ("--resume cannot change data.batch_size 20 -> 10", "train.init_from="), needs_shared=True),
    Case("resume: another seed", "train.py", _resume("seed=7"), ("--resume cannot change seed 141 -> 7",),
         needs_shared=True),
    Case("resume: another precision", "train.py", _resume("train.precision=bf16"),
         ("--resume cannot change train.precision 'fp32' -> 'bf16'",), needs_shared=True),
    Case("resume: another dropout rate", "train.py", _resume("model.dropout=0.1"),
         ("--resume cannot change model.dropout 0.4 -> 0.1",), needs_shared=True),
    Case("resume: another learning rate and clip", "train.py", _resume("optim.lr=10", "optim.clip=1"),
         ("--resume cannot change optim.clip 0.25 -> 1.0, optim.lr 30.0 -> 10.0",), needs_shared=True),
    Case("resume: a DeepSpeed setting", "train.py", _resume("train.deepspeed={communication_data_type: bf16}"),
         ("--resume cannot change train.deepspeed",), needs_shared=True),
    Case("resume: checkpoints/latest deleted (falls back)", "train.py", _resume_with_latest(None),
         ("resuming from step_00000002", "newest checkpoint that verifies", "latest is missing"), succeeds=True,
         needs_shared=True),
    Case("resume: checkpoints/latest holds garbage (falls back)", "train.py", _resume_with_latest(b"\xff\xfe\x00junk"),
         ("resuming from step_00000002", "newest checkpoint that verifies", "latest is damaged"), succeeds=True,
         needs_shared=True),
    Case("resume: checkpoints/latest names a missing tag (falls back)", "train.py",
         _resume_with_latest(b"step_00000099\n"),
         ("resuming from step_00000002", "newest checkpoint that verifies", "step_00000099 is unusable"),
         succeeds=True, needs_shared=True),
    Case("sweep run again after its base was edited", "sweep.py", _sweep_edited,
         ("changed since they ran", "optim.lr 30.0 -> 10.0", "--restart-changed")),
    # ---- nothing broken becomes best
    Case("optim.lr=1e30: validation diverges", "train.py", _diverging,
         ("validation loss and ppl are nan or inf at step 2", "not saved", "lower optim.lr")),
    Case("evaluate a checkpoint holding nan weights", "evaluate.py", _nan_weights,
         ("holds nan or inf weights", "encoder.weight", "an earlier --checkpoint"), needs_shared=True),
    Case("a batch larger than the training data allows", "train.py", _new("data.batch_size=350000"),
         ("data.batch_size=350000", "too few for one step", "largest data.batch_size this data allows is 309,863")),
    Case("an evaluation batch larger than the validation split", "train.py", _new("data.eval_batch_size=50000"),
         ("data.eval_batch_size=50000", "valid split", "largest data.eval_batch_size this data allows is 36,880")),
    Case("a test batch larger than the test split", "train.py", _new("data.test_batch_size=90000"),
         ("data.test_batch_size=90000", "test split", "largest data.test_batch_size this data allows is 41,215")),
    Case("an image batch larger than the image folder", "train.py", _images("data.batch_size=512"),
         ("data.batch_size=512", "96 training images", "largest batch these images allow is 96")),
    # ---- every value checked before any rank starts
    Case("--set mapping merged into its section", "train.py",
         _new("train.epochs=10", "drop={cutoff_epoch: 40}", recipe="awd_ptb_early_dropout"),
         ("drop.cutoff_epoch=40 is not before train.epochs=10", "early dropout would never end")),
    Case("train.deepspeed sets the ZeRO stage", "train.py", _new("train.deepspeed={zero_optimization: {stage: 3}}"),
         ("train.deepspeed.zero_optimization.stage is set by train.zero_stage",)),
    Case("train.deepspeed sets gradient clipping", "train.py", _new("train.deepspeed={gradient_clipping: 1.0}"),
         ("train.deepspeed.gradient_clipping is set by optim.clip",)),
    Case("train.deepspeed sets bf16", "train.py", _new("train.deepspeed={bf16: {enabled: true}}"),
         ("train.deepspeed.bf16 is set by train.precision",)),
    Case("train.deepspeed: a value DeepSpeed refuses", "train.py",
         _new("train.deepspeed={zero_optimization: {reduce_bucket_size: lots}}"),
         ("train.deepspeed.zero_optimization is refused by DeepSpeed", "reduce_bucket_size")),
    Case("a negative seed", "train.py", _new("seed=-1"), ("seed must be in [0, 2**63), got -1",)),
    Case("AdamW betas out of range", "train.py", _images("optim.betas=[0.9, 1.5]"),
         ("optim.betas", "must be in [0, 1)", "[0.9, 1.5]")),
    Case("an augmentation policy timm does not have", "train.py", _images("data.auto_augment=randm9"),
         ("data.auto_augment", "timm has no augmentation policy 'randm9'", "rand-m9-mstd0.5-inc1")),
    Case("fewer classes than the data has", "train.py", _images("model.num_classes=3"),
         ("model.num_classes=3", "has 4 classes", "model.num_classes=4")),
    # ---- operating-system errors while writing a run or sweep directory
    Case("run directory in a read-only folder", "train.py", _read_only_parent,
         ("cannot write", "mnt/run", "the file system is read-only", "choose a writable --run-dir")),
    Case("run directory name too long", "train.py", _name_too_long,
         ("cannot write", "rrrr", "name is too long", "choose a shorter --run-dir")),
    Case("the disk fills up during a checkpoint", "train.py", _full_disk,
         ("cannot write", "mnt/run", "no space left on the device", "files written before are kept")),
    Case("sweep_dir in a read-only folder", "sweep.py", _read_only_sweep_dir,
         ("cannot write", "mnt/sweep", "the file system is read-only")),
]
CASES = INPUT_CASES + RUN_CASES


# ------------------------------------------------------------------ running a case
@dataclass
class Outcome:
    returncode: int
    errors: list[str]  # lines starting with "error: "
    traceback: bool
    changed: list[str]  # files of guarded directories that changed or vanished
    output: str

    def naming(self, case: Case) -> list[str]:
        """The output lines that hold every expected fragment (for a run that succeeds: its warning)."""
        return [ln for ln in self.output.splitlines() if all(f in ln for f in case.expect)]

    def passed(self, case: Case) -> bool:
        if self.traceback or self.changed:
            return False
        if case.succeeds:
            return self.returncode == 0 and not self.errors and len(self.naming(case)) == 1
        return (self.returncode != 0 and len(self.errors) == 1
                and all(f in self.errors[0] for f in case.expect))


def run_case(case: Case, scratch: Path, shared: Shared | None = None, timeout: float = 600) -> Outcome:
    prepared = case.setup(Path(scratch), shared)
    try:
        if not prepared.guard and not prepared.absent:
            raise ValueError(f"bad-input case {case.name!r} names nothing it must leave alone")
        if any(p.exists() for p in prepared.absent):
            raise ValueError(f"bad-input case {case.name!r}: a path that must not appear exists before the command")
        before = snapshot(prepared.guard)
        proc = run_command(launch_command(case.script, prepared.args, case.ranks, prepared.port), timeout, prepared.env)
        after = snapshot(prepared.guard)
    finally:
        if prepared.hold is not None:
            prepared.hold.close()
        if prepared.cleanup is not None:
            prepared.cleanup()
    changed = sorted(f for f in before.keys() | after.keys() if before.get(f) != after.get(f))
    changed += [f"{p} (appeared)" for p in prepared.absent if p.exists() and not case.succeeds]
    out = proc.stdout + proc.stderr
    return Outcome(
        returncode=proc.returncode,
        errors=[ln for ln in out.splitlines() if ln.startswith("error: ")],
        traceback="Traceback" in out,
        changed=changed,
        output=out,
    )


def check_case(case: Case, scratch: Path, shared: Shared | None) -> None:
    """Asserts the case's one error line (or warning), exit status, no traceback and nothing changed: the tests of
    tests/e2e/test_bad_input.py and test_run_safety.py, case by case."""
    outcome = run_case(case, scratch, shared, timeout=420)  # the port case: the other rank must not hang
    tail = outcome.output[-3000:]
    assert not outcome.traceback, tail
    assert not outcome.changed, f"files of an earlier run changed: {outcome.changed}"
    if case.succeeds:  # bad data the run survives: skipped and named once, never a crash
        assert outcome.returncode == 0, tail
        assert not outcome.errors, outcome.errors
        assert len(outcome.naming(case)) == 1, tail
        return
    assert outcome.returncode != 0, tail
    assert len(outcome.errors) == 1, tail
    for fragment in case.expect:
        assert fragment in outcome.errors[0], outcome.errors[0]
