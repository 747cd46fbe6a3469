"""Bad input end to end (bench/bad_inputs.py's cases): one `error:` line naming the problem and the fix, a non-zero
exit, no traceback unless --debug, and every file an earlier run wrote left as it was."""

import pytest

from conftest import ROOT  # noqa: F401  (puts the repository on sys.path)
from bench.bad_inputs import INPUT_CASES, Case, command, run_case, run_command, train_shared


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """One tiny awd_ptb run and one tiny vit_t run, copied by the cases that start from a trained run."""
    return train_shared(tmp_path_factory.mktemp("shared"))


@pytest.mark.parametrize("case", INPUT_CASES, ids=[c.name for c in INPUT_CASES])
def test_bad_input(case, tmp_path, request):
    check_case(case, tmp_path, request)


def check_case(case: Case, tmp_path, request) -> None:
    """The case's one error line (or warning), exit status, no traceback and nothing changed (tests/e2e/test_run_safety.py
    runs the run-directory cases through it too)."""
    shared = request.getfixturevalue("shared") if case.needs_shared else None
    outcome = run_case(case, tmp_path, shared, timeout=420)  # the port case: the other rank must not hang
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


def test_debug_shows_the_traceback():
    proc = run_command(command("train.py", ["--recipe", "awd_ptb", "--debug", "--set", "model.nhidd=3"]))
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "Traceback" in out and "ConfigError: config error: unknown key 'model.nhidd'" in out, out[-3000:]
