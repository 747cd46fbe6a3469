"""Shared helpers for the benchmarks: launch real training runs, read their metrics, print tables.

Every benchmark goes through ``launch/train.py`` (1 rank: plain ``python``; N ranks: the ``deepspeed``
launcher) so the numbers are those of the engine users run, not of a re-implementation.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
_DATA = Path(os.environ.get("DSRECIPES_DATA") or REPO.parent / "shared" / "data").resolve()
PTB_DIR = _DATA / "ptb"
# "../shared/data", as the README spells it, when the data sits beside the checkout
DATA_ROOT = os.path.relpath(_DATA, REPO) if _DATA.is_relative_to(REPO.parent) else str(_DATA)
BIN = Path(sys.executable).parent

SMALL = {"model.emsize": 200, "model.nhid": 400}
PAPER: dict = {}  # the recipe defaults are the paper's PTB shape

_ports_used: set[int] = set()


def free_port() -> int:
    """A port free now and not handed out before in this process, so back-to-back runs never collide."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _ports_used:
            _ports_used.add(port)
            return port


def overrides(*layers: dict) -> list[str]:
    merged: dict = {}
    for layer in layers:
        merged.update(layer)
    return [f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in merged.items()]


def train_command(ranks: int, run_dir: Path, sets: list[str], threads: int | None = None,
                  recipe: str = "awd_ptb") -> tuple[list[str], dict]:
    """The command line and environment of one run.

    With ``threads=None`` OMP_NUM_THREADS is dropped so the engine's own CPU-thread split
    (cores / local ranks) applies whatever the caller's shell exports; an int pins it.
    """
    port = free_port()
    env = run_env(threads)
    args = ["launch/train.py", "--recipe", recipe, "--run-dir", str(run_dir), "--set", *sets]
    if ranks == 1:
        env["MASTER_PORT"] = str(port)
        return [sys.executable, *args], env
    return [str(BIN / "deepspeed"), "--num_gpus", str(ranks), "--master_port", str(port), *args], env


def run_env(threads: int | None = None) -> dict:
    """The environment of a launched process (a run, or a benchmark's own helper process), so both get the same
    CPU threads: ``threads=None`` drops OMP_NUM_THREADS, an int pins it."""
    from trainer.launch_env import interpreter_path  # the same ninja as every other run (or the op rebuilds)

    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    env["PATH"] = interpreter_path(env.get("PATH"))
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def shell_line(cmd: list[str]) -> str:
    """The command as a reader would type it from the repo root with the venv active."""
    parts = list(cmd)
    parts[0] = Path(parts[0]).name
    return " ".join(parts)


@dataclass
class Run:
    ranks: int
    run_dir: Path
    cmd: list[str]
    proc: subprocess.Popen
    log_path: Path
    t0: float
    cpu0: float
    wall_s: float = float("nan")
    cores_used: float = float("nan")  # CPU seconds of the run / wall seconds: < its thread count = contention
    load_avg: float = float("nan")  # 1-minute load average when it ended

    def wait(self, poll_s: float | None = None, report=None) -> "Run":
        """Block until the run ends; with ``poll_s``, call ``report(self)`` between polls."""
        while True:
            try:
                self.proc.wait(timeout=poll_s)
                break
            except subprocess.TimeoutExpired:
                if report:
                    report(self)
        self.wall_s = time.perf_counter() - self.t0
        self.cores_used = (_children_cpu_s() - self.cpu0) / self.wall_s
        self.load_avg = os.getloadavg()[0]
        if self.proc.returncode != 0:
            tail = self.log_path.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"run failed (rc {self.proc.returncode}): {shell_line(self.cmd)}\n{tail}")
        return self

    def metrics(self, split: str | None = None) -> list[dict]:
        return read_metrics(self.run_dir, split)


def start_run(ranks: int, run_dir: Path, sets: list[str], threads: int | None = None,
              recipe: str = "awd_ptb") -> Run:
    """Start a training run in the background; its console output goes to ``run_dir``.log."""
    run_dir = Path(run_dir)
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    cmd, env = train_command(ranks, run_dir, sets, threads, recipe)
    log_path = run_dir.with_suffix(".log")
    with log_path.open("w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    return Run(ranks, run_dir, cmd, proc, log_path, time.perf_counter(), _children_cpu_s())


def _children_cpu_s() -> float:
    """CPU time of reaped child processes; runs are sequential, so a delta is one run's (all ranks)."""
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def run_training(ranks: int, run_dir: Path, sets: list[str], threads: int | None = None,
                 recipe: str = "awd_ptb") -> Run:
    return start_run(ranks, run_dir, sets, threads, recipe).wait()


def metrics_lines(run_dir: Path) -> list[str]:
    """The complete lines of ``metrics.jsonl``; one being appended right now is left for the next read."""
    path = Path(run_dir) / "metrics.jsonl"
    text = path.read_text() if path.exists() else ""
    return [line for line in text[: text.rfind("\n") + 1].splitlines() if line.strip()]


def read_metrics(run_dir: Path, split: str | None = None) -> list[dict]:
    rows = [json.loads(line) for line in metrics_lines(run_dir)]
    return [r for r in rows if split is None or r.get("split") == split]


def median(xs) -> float:
    xs = list(xs)
    return statistics.median(xs) if xs else float("nan")


def scratch_dir(prefix: str) -> Path:
    """Run directories under runs/bench/ (git-ignored), removed by ``cleanup``."""
    root = REPO / "runs" / "bench"
    root.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=prefix, dir=root))


def cleanup(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def short_eval_data(lines: int = 100) -> Path:
    """Real PTB train.txt with the first ``lines`` of valid/test, so short throughput runs do not spend
    minutes in the end-of-run evaluation. The vocabulary must come out identical to real PTB's (PTB's
    valid/test words all occur in train), which is checked, so the model shape is unchanged.
    """
    sys.path.insert(0, str(REPO))
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


def markdown_table(headers: list[str], rows: list[list]) -> str:
    def cell(v) -> str:
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 10 else f"{v:,.0f}"
        return str(v)

    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    out += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(out)


def machine_line() -> str:
    model = platform.processor() or "?"
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    except OSError:
        pass
    from importlib.metadata import version

    return (f"{os.cpu_count()} CPUs ({model}), torch {version('torch')}, deepspeed {version('deepspeed')}, "
            f"python {platform.python_version()}, {time.strftime('%Y-%m-%d %H:%M %Z')}")


# ---------------------------------------------------------------- reporting: what every benchmark prints
# stdout is the report (BENCHMARKS.md holds it verbatim: bench/report.py); progress goes to stderr.

def progress(*parts) -> None:
    """A progress line: to stderr, so that it stays out of the recorded report."""
    print(*parts, file=sys.stderr, flush=True)


def header(*notes: str) -> None:
    """The report's first lines: machine, versions, date and the benchmark's settings, then its own command."""
    print(" | ".join([machine_line(), *notes]))
    script = os.path.relpath(os.path.abspath(sys.argv[0]), REPO)
    print("command: python", " ".join([script, *sys.argv[1:]]), flush=True)


def legend(doc: str) -> None:
    """A benchmark's docstring up to its usage lines (``python bench/...``): what its configurations and columns
    mean, printed beside its tables so that the output reads on its own."""
    lines = []
    for line in doc.strip("\n").splitlines():
        if line.lstrip().startswith("python bench/"):
            break
        lines.append(line)
    print("\n" + "\n".join(lines).rstrip(), flush=True)


def round_order(items: list, r: int) -> list:
    """Round ``r``'s order of interleaved configurations: reversed every other round, so that a drift in the
    machine's load falls on all of them alike."""
    return list(items) if r % 2 == 0 else list(items)[::-1]


def median_ci(xs, level: float = 0.95) -> tuple[float, float]:
    """Distribution-free confidence interval of the median: the order statistics x(k), x(n+1-k) with the largest
    k whose coverage 1 - 2 P(Binomial(n, 1/2) < k) is at least ``level``. It narrows as rounds are added, unlike the
    rounds' own spread. Below 6 values no k reaches 95%: then (min, max)."""
    from math import comb

    xs = sorted(xs)
    n, k = len(xs), 1
    if not n:
        return float("nan"), float("nan")
    while k < (n + 1) // 2 and 1 - 2 * sum(comb(n, i) for i in range(k + 1)) / 2 ** n >= level:
        k += 1
    return xs[k - 1], xs[n - k]


def pct(x: float) -> str:
    return f"{x:+.2%}"


def pct_range(lo: float, hi: float) -> str:
    return f"{pct(lo)} .. {pct(hi)}"


def ratio_span(xs) -> str:
    """Ratios' min .. max (e.g. of per-round ratios)."""
    xs = list(xs)
    return f"{min(xs):.3f} .. {max(xs):.3f}"


def judge(lo: float, hi: float, budget: float) -> str:
    """A cost against its budget from its spread: PASS when the upper end is within it; INCONCLUSIVE when it is not
    but the spread is wider than the budget (the noise hides the answer: more rounds or a quieter machine); FAIL
    otherwise."""
    if hi <= budget:
        return "PASS"
    return "INCONCLUSIVE" if hi - lo > budget else "FAIL"


def verdict(what: str, results: list[str]) -> int:
    """Prints ``verdict: WHAT: PASS|FAIL|INCONCLUSIVE`` (all rows must pass) and returns the exit status, 0 on PASS."""
    overall = "PASS" if all(r == "PASS" for r in results) else "FAIL" if "FAIL" in results else "INCONCLUSIVE"
    print(f"\nverdict: {what}: {overall}", flush=True)
    return 0 if overall == "PASS" else 1


def jpeg_like_photo(rng, width: int, height: int):
    """A PIL image that compresses like a photograph (smooth random colour field plus sensor-like noise: ~40-80 kB
    as a quality-90 JPEG at ImageNet's ~500x375), so decoding costs what ImageNet's does."""
    import numpy as np
    from PIL import Image

    coarse = rng.integers(0, 255, (height // 16 + 1, width // 16 + 1, 3)).astype(np.uint8)
    field = Image.fromarray(coarse).resize((width, height), Image.BICUBIC)
    noise = rng.integers(-20, 20, (height, width, 3))
    return Image.fromarray(np.clip(np.asarray(field) + noise, 0, 255).astype(np.uint8))
