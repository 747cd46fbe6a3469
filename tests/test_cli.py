"""The command line: listings, resolved configs, and bad input as one line with no traceback."""

import yaml

from conftest import SMALL_AWD, error_lines, launch, output


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


def test_unknown_recipe_and_bad_values():
    one_line_error(launch("train.py", ["--recipe", "awd_ptbb"]), "unknown recipe 'awd_ptbb'", "--list-recipes")
    one_line_error(launch("train.py", ["--recipe", "awd_ptb", "--set", "model.dropout=1.5"]), "model.dropout")
    one_line_error(launch("train.py", ["--recipe", "awd_ptb", "--set", "optim.lr=-0.1"]), "optim.lr")
    one_line_error(launch("train.py", ["--recipe", "awd_ptb", "--set", "model.wdropp=0.1"]), "model.wdropp")
    one_line_error(launch("train.py", []), "--recipe")


def test_missing_data_names_the_files_and_the_fix(tmp_path):
    empty = tmp_path / "nothing-here"
    empty.mkdir()
    proc = launch("train.py", ["--recipe", "awd_ptb", "--run-dir", str(tmp_path / "run"), "--set",
                               f"data.root={empty}", "train.progress=false"])
    line = one_line_error(proc, "train.txt", "valid.txt", "test.txt", "data.root")
    assert "download" in line


def test_global_batch_must_divide_over_ranks(tmp_path, shared_data):
    proc = launch("train.py", ["--recipe", "awd_ptb", "--run-dir", str(tmp_path / "run"), "--set", *SMALL_AWD,
                               "data.batch_size=21"], ranks=2)
    one_line_error(proc, "data.batch_size=21", "2 data-parallel ranks")


def test_resume_needs_a_checkpoint_and_a_new_run_never_overwrites(tmp_path, shared_data):
    run = tmp_path / "run"
    one_line_error(launch("train.py", ["--recipe", "awd_ptb", "--run-dir", str(run), "--resume"]), "--run-dir")
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 1, "epoch": 0, "split": "train", "loss": 1.0}\n')
    before = (run / "metrics.jsonl").read_bytes()
    proc = launch("train.py", ["--recipe", "awd_ptb", "--run-dir", str(run), "--set", *SMALL_AWD])
    one_line_error(proc, "already holds a run", "--resume")
    assert (run / "metrics.jsonl").read_bytes() == before


def test_corrupt_checkpoint_is_reported(tmp_path, shared_data):
    run = tmp_path / "run"
    (run / "checkpoints" / "step_00000010").mkdir(parents=True)
    (run / "checkpoints" / "latest").write_text("step_00000010")
    (run / "checkpoints" / "step_00000010" / "mp_rank_00_model_states.pt").write_bytes(b"PK\x03\x04 truncated")
    printed = launch("train.py", ["--recipe", "awd_ptb", "--print-config", "--set", *SMALL_AWD])
    (run / "config.yaml").write_text(printed.stdout)
    proc = launch("train.py", ["--run-dir", str(run), "--resume"])
    one_line_error(proc, "step_00000010", "corrupt")
    proc = launch("evaluate.py", ["--run-dir", str(run), "--checkpoint", "best"])
    one_line_error(proc, "no 'best' checkpoint")
