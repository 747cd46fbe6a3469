"""The repository's promises to a newcomer: README's commands are the ones CI and users run."""

import re

from harness.paths import REPO as ROOT



def readme_commands():
    return re.findall(r"```bash\n(.+?)\n```", (ROOT / "README.md").read_text(), flags=re.S)


def test_ci_runs_exactly_the_readme_test_command():
    run_cmd, test_cmd = readme_commands()[:2]
    ci_lines = [l for l in (ROOT / ".ci" / "run").read_text().splitlines() if l and not l.startswith(("#", "set ", "cd "))]
    assert ci_lines == [test_cmd]
    assert "pytest" in test_cmd and "pip install" in test_cmd


def test_readme_first_command_trains_awd_ptb_briefly():
    run_cmd = readme_commands()[0]
    assert "launch/train.py --recipe awd_ptb" in run_cmd and "train.max_steps=" in run_cmd and "pip install" in run_cmd
