"""Running launch/ scripts as users type them: plain ``python`` for 1 rank, the ``deepspeed`` launcher for more,
with the environment every launched job gets (trainer.launch_env.launcher_env); and reading what they printed."""

from __future__ import annotations

import os
import random
import re
import socket
import subprocess
import sys

from trainer.launch_env import launcher_env

from .paths import BIN, REPO

__all__ = ["free_port", "launch", "launch_command", "run_command", "checkout_env", "output", "check", "error_lines",
           "metric_value", "launcher_env"]

# Under `pytest -n N` (pytest-xdist) each worker draws master ports from its own block, so two tests never race for
# the same port.
WORKER = os.environ.get("PYTEST_XDIST_WORKER")
_ports_used: set[int] = set()


def free_port() -> int:
    """A free port, never one handed out before in this process (back-to-back runs do not collide); under xdist,
    from this worker's own block of 3000 below the kernel's ephemeral range (bind(0) hands out even ports only, so
    its choice cannot be split between workers by residue)."""
    while True:
        if WORKER:
            lo = 20000 + 3000 * int(WORKER.removeprefix("gw"))
            port = random.randrange(lo, lo + 3000)
        else:
            port = 0
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            port = s.getsockname()[1]
        if port not in _ports_used:
            _ports_used.add(port)
            return port


def launch_command(script: str, args: list[str], ranks: int = 1, port: int | None = None) -> list[str]:
    """``launch/<script>``: plain python for 1 rank, ``deepspeed --num_gpus N`` for more."""
    path = str(REPO / "launch" / script)
    if ranks == 1:
        return [sys.executable, path, *args]
    return [str(BIN / "deepspeed"), "--num_gpus", str(ranks), "--master_port", str(port or free_port()), path, *args]


def run_command(cmd: list[str], timeout: float = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=REPO, env=launcher_env(env), capture_output=True, text=True, timeout=timeout)


def launch(script: str, args: list[str], ranks: int = 1, timeout: float = 900, env: dict | None = None,
           port: int | None = None) -> subprocess.CompletedProcess:
    """Run a launch/ script on ``ranks`` CPU ranks and wait for it."""
    return run_command(launch_command(script, args, ranks, port), timeout, env)


def checkout_env(env: dict | None = None) -> dict:
    """``env`` (default: this process's) with this checkout first on PYTHONPATH: a script outside launch/ (the test
    probes) imports the checkout under test, as launch/ scripts do, whatever copy is installed."""
    env = dict(os.environ if env is None else env)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    return env


def output(proc: subprocess.CompletedProcess) -> str:
    return proc.stdout + proc.stderr


def check(proc: subprocess.CompletedProcess) -> str:
    out = output(proc)
    assert proc.returncode == 0, out[-4000:]
    return out


def error_lines(proc: subprocess.CompletedProcess) -> list[str]:
    return [line for line in output(proc).splitlines() if line.startswith("error: ")]


def metric_value(text: str, name: str) -> float:
    m = re.search(rf"\b{name} ([0-9.eE+-]+)", text)
    assert m, f"no '{name} <value>' in output:\n{text[-2000:]}"
    return float(m.group(1))
