"""The command lines of ``launch/train.py`` and ``launch/evaluate.py``, and their one-line errors."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import traceback
from pathlib import Path
from typing import Callable

from .errors import ConfigError, HostError, UserError, describe_os_error


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--set", dest="overrides", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                   help="override config keys by dotted path, e.g. --set model.nhid=400 train.max_steps=200")
    p.add_argument("--debug", action="store_true", help="show full tracebacks")
    # The deepspeed launcher appends --local_rank=N; the rank comes from the environment anyway.
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)


def train_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="launch/train.py", description="Train a recipe with DeepSpeed.")
    p.add_argument("--recipe", help="recipe name (see --list-recipes)")
    p.add_argument("--config", action="append", default=[], metavar="FILE.yaml",
                   help="YAML merged over the recipe's defaults (repeatable)")
    p.add_argument("--run-dir", help="run directory (default runs/<recipe>-<timestamp>)")
    p.add_argument("--resume", action="store_true", help="continue the run in --run-dir from its latest checkpoint")
    p.add_argument("--list-recipes", action="store_true", help="list the recipes and exit")
    p.add_argument("--print-config", action="store_true", help="print the fully resolved config as YAML and exit")
    _add_common(p)
    return p


def evaluate_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="launch/evaluate.py", description="Evaluate a run's checkpoint.")
    p.add_argument("--run-dir", required=True)
    p.add_argument("--split", choices=["valid", "test"], default=None,
                   help="default: the recipe's reported split (test for language models, valid for ImageNet)")
    p.add_argument("--checkpoint", default="best", help="best, latest or a checkpoint tag")
    p.add_argument("--pointer", action="store_true", help="with the continuous cache pointer (language models)")
    _add_common(p)
    return p


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def _crash_log(exc: BaseException, run_dir: str | None) -> str:
    """Keep the traceback on disk so a one-line console error loses nothing: in the run directory; before it
    exists, beside it (``<run>.crash-rank<R>.log`` in its parent); with neither, in a temporary folder. Never in
    the current directory (the user's checkout). The error line names the file."""
    text = "".join(traceback.format_exception(exc))
    name = f"crash-rank{_rank()}.log"
    places = []
    if run_dir:
        run = Path(run_dir)
        places += [run / name, run.parent / f"{run.name}.{name}"]
    places.append(Path(tempfile.gettempdir()) / f"dsrecipes-crash-{os.getpid()}" / name)
    for path in places:
        try:
            if path.parent == places[-1].parent:
                path.parent.mkdir(exist_ok=True)
            elif not path.parent.is_dir():
                continue
            path.write_text(text)
            return str(path)
        except OSError:
            with contextlib.suppress(OSError):
                path.unlink(missing_ok=True)  # a full disk leaves an empty file behind
            continue
    return ""


def _plain(e: BaseException, run_dir: str | None) -> str | None:
    """A one-line user error for what is not a bug: a filesystem that refuses a write, a device out of memory."""
    if isinstance(e, OSError):
        return describe_os_error(e, run_dir)
    if type(e).__name__ == "OutOfMemoryError" or "can't allocate memory" in str(e):
        return (f"[rank {_rank()}] out of memory ({str(e).splitlines()[0][:160]}): the model and batch need more "
                "memory than this device has; lower data.batch_size, or split each rank's share with "
                "train.micro_batch_size")
    return None


def guarded(main: Callable[[argparse.Namespace], int], parser: argparse.ArgumentParser,
            argv: list[str] | None = None) -> int:
    """Run ``main``; an error is one line: a user error's once for the job, an unexpected one's with a crash log.

    In a multi-rank job the failing rank records its error for the others first (their watchdogs then end them
    within seconds, naming it), and an error that is really a peer lost mid-collective is left to the watchdog
    to name. ``main`` hands the job's watchdog over as ``args.watchdog`` as soon as start-up has one (as it hands
    over the run directory, for the crash log): an error of start-up's own is reported through it too."""
    args = parser.parse_args(argv)
    args.watchdog = None
    code = 0
    try:
        code = main(args) or 0
    except KeyboardInterrupt:
        code = 130
    except UserError as e:
        code = 2
        _fail(code, f"error: {e}", args, everywhere=isinstance(e, HostError))
    except Exception as e:  # noqa: BLE001 - the last line of defence before a raw traceback
        code = 1
        run_dir = getattr(args, "run_dir", None)
        plain = _plain(e, run_dir)
        if plain is not None:
            code = 2
            _crash_log(e, run_dir)  # the traceback is still kept, off the terminal
            _fail(code, f"error: {plain}", args, everywhere=True)
            return code
        if args.watchdog is not None and not args.debug:
            args.watchdog.await_verdict(e)
        where = _crash_log(e, run_dir)
        msg = str(e).splitlines()[0] if str(e) else ""
        _fail(code, f"error: [rank {_rank()}] unexpected {type(e).__name__}: {msg} "
                    f"(traceback in {where or 'n/a'}; rerun with --debug to see it)", args, everywhere=True)
    finally:
        if args.watchdog is not None:
            args.watchdog.close(ok=code == 0)
    return code


def _fail(code: int, line: str, args: argparse.Namespace, everywhere: bool) -> None:
    """Show ``line`` (``--debug``: re-raise instead). With a watchdog the job's first failure is shown, by the
    rank that had it; before one exists, a user error (the same on every rank: arguments, config) is shown by
    rank 0 only, unless it is ``everywhere``'s (a host's own problem, an unexpected error)."""
    dog = args.watchdog
    first = dog.report_failure(code, line) if dog is not None else (everywhere or _rank() == 0)
    if args.debug:
        raise
    if first:
        print(line, file=sys.stderr, flush=True)


def require(cond: bool, message: str) -> None:
    if not cond:
        raise ConfigError(message)
