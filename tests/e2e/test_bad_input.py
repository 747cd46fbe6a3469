"""Bad input end to end (harness/bad_inputs.py's cases, which bench/bad_inputs.py reports): one `error:` line
naming the problem and the fix, a non-zero exit, no traceback unless --debug, and every file an earlier run wrote
left as it was."""

import pytest

from harness.bad_inputs import INPUT_CASES, check_case, train_shared
from harness.launching import launch_command, run_command


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """One tiny awd_ptb run and one tiny vit_t run, copied by the cases that start from a trained run."""
    return train_shared(tmp_path_factory.mktemp("shared"))


@pytest.mark.parametrize("case", INPUT_CASES, ids=[c.name for c in INPUT_CASES])
def test_bad_input(case, tmp_path, request):
    check_case(case, tmp_path, request.getfixturevalue("shared") if case.needs_shared else None)


def test_debug_shows_the_traceback():
    proc = run_command(launch_command("train.py", ["--recipe", "awd_ptb", "--debug", "--set", "model.nhidd=3"]))
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "Traceback" in out and "ConfigError: config error: unknown key 'model.nhidd'" in out, out[-3000:]
