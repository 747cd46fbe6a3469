"""A command started in the background (here or on one of the test hosts), its output kept line by line with the
time each line arrived, so a test can bound how long after one line another came."""

from __future__ import annotations

import subprocess
import threading
import time
from pathlib import Path


class StreamedJob:
    def __init__(self, argv: list[str], log: Path, cwd: Path, env: dict):
        """``argv`` as is; for a test host, ``host.cmd(argv)``."""
        self.log = log
        self.lines: list[tuple[float, str]] = []
        self.started = time.monotonic()
        self.proc = subprocess.Popen(argv, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, start_new_session=True)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        with self.log.open("w") as f:
            for line in self.proc.stdout:
                self.lines.append((time.monotonic(), line.rstrip("\n")))
                f.write(line)
                f.flush()

    def wait(self, timeout: float) -> int:
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            self._reader.join(timeout=10)
            raise AssertionError(f"still running after {timeout} s:\n{self.output[-4000:]}") from None
        self._reader.join(timeout=30)
        return self.proc.returncode

    @property
    def output(self) -> str:
        return "\n".join(line for _, line in self.lines)

    def first(self, needle: str) -> float | None:
        """When the first line containing ``needle`` arrived."""
        return next((t for t, line in self.lines if needle in line), None)

    def wait_for(self, needle: str, timeout: float) -> float:
        deadline = time.monotonic() + timeout
        while (t := self.first(needle)) is None:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"no line with {needle!r}:\n{self.output[-4000:]}")
            time.sleep(0.1)
        return t
