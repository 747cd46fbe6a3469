"""The command line: listings, resolved configs, and missing data as one line with no traceback (the other bad
inputs are tests/e2e/test_bad_input.py's; failed downloads, from a local server, tests/unit/test_datasets.py's). Nothing here
downloads, so it passes the same on- and offline."""

import yaml

from harness.launching import error_lines, launch, output



def one_line_error(proc, *words):
    out = output(proc)
    assert proc.returncode != 0, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    errors = error_lines(proc)
    assert len(errors) == 1, out[-3000:]
    for w in words:
        assert w in errors[0], errors[0]
    return errors[0]


def test_list_recipes_and_print_config():
    listing = launch("train.py", ["--list-recipes"])
    assert listing.returncode == 0 and "awd_ptb" in listing.stdout
    printed = launch("train.py", ["--recipe", "awd_ptb", "--print-config", "--set", "model.nhid=321", "seed=7"])
    cfg = yaml.safe_load(printed.stdout)
    assert cfg["recipe"] == "awd_ptb" and cfg["model"]["nhid"] == 321 and cfg["seed"] == 7
    assert cfg["model"]["emsize"] == 400 and cfg["optim"]["clip"] == 0.25


def test_missing_data_names_the_files_and_the_fix(tmp_path):
    empty = tmp_path / "nothing-here"
    empty.mkdir()
    proc = launch("train.py", ["--recipe", "awd_ptb", "--run-dir", str(tmp_path / "run"), "--set",
                               f"data.root={empty}", "data.download=false", "train.progress=false"])
    one_line_error(proc, "train.txt", "valid.txt", "test.txt", "data.root", "downloading is off")
