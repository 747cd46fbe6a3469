"""awd_wt2 on a small corpus written in WikiText's format: it trains, tests, and checks its files."""

import json
import random

import pytest
import yaml

from harness.launching import check, error_lines, launch
from trainer.registry import get_recipe


def wikitext_like(path, n_articles, seed):
    """Articles with ' = Heading = ' lines, blank lines, @-@ joins and <unk>, as in wiki.*.tokens."""
    rng = random.Random(seed)
    words = [f"w{i}" for i in range(300)] + ["the", "of", "and", "<unk>", "@-@", "@,@", ",", "."]
    weights = [1.0 / (i + 1) for i in range(len(words))]
    lines = []
    for a in range(n_articles):
        lines += [" \n", f" = Article {a} = \n", " \n"]
        for _ in range(rng.randint(3, 6)):
            lines.append(" " + " ".join(rng.choices(words, weights, k=rng.randint(20, 60))) + " \n")
        lines += [" \n", f" = = Section {a} = = \n", " \n",
                  " " + " ".join(rng.choices(words, weights, k=40)) + " \n"]
    path.write_text("".join(lines))


@pytest.fixture(scope="module")
def wt2_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("wt2data") / "wikitext-2"
    root.mkdir()
    for split, n, seed in (("train", 60, 1), ("valid", 8, 2), ("test", 8, 3)):
        wikitext_like(root / f"{split}.txt", n, seed)
    return root


def test_awd_wt2_is_the_papers_wikitext2_command():
    c = get_recipe("awd_wt2").load_config()
    assert (c.data.dataset, c.data.batch_size, c.seed, c.train.epochs) == ("wikitext-2", 80, 1882, 750)
    assert (c.model.emsize, c.model.nhid, c.model.nlayers, c.model.dropouth, c.model.dropouti) == (
        400, 1150, 3, 0.2, 0.65)
    assert (c.pointer.window, c.pointer.lambdah, c.pointer.theta) == (3785, 0.1279, 0.662)
    assert (c.optim.averaging, c.optim.lr, c.optim.clip) == ("nt_asgd", 30.0, 0.25)
    ft = get_recipe("awd_wt2_finetune").load_config()
    assert (ft.optim.t0, ft.optim.stop_on_nonmono, ft.data.batch_size, ft.seed) == (1, True, 80, 1882)


def test_awd_wt2_trains_and_tests_on_a_wikitext_format_corpus(wt2_dir, tmp_path):
    run = tmp_path / "run"
    check(launch("train.py", ["--recipe", "awd_wt2", "--run-dir", str(run), "--set", f"data.root={wt2_dir}",
                              "data.verify=false", "model.emsize=32", "model.nhid=48", "data.bptt=20",
                              "train.max_steps=6", "train.log_every=3", "train.progress=false"], ranks=2))
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["split"] for r in rows] == ["train", "train", "valid", "test"]
    assert rows[-1]["checkpoint"] == "best" and rows[-1]["ppl"] > 1
    assert rows[1]["loss"] < rows[0]["loss"]
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["recipe"] == "awd_wt2" and saved["data"]["batch_size"] == 80


def test_files_that_are_not_the_real_wikitext2_fail_their_md5_check(wt2_dir, tmp_path):
    proc = launch("train.py", ["--recipe", "awd_wt2", "--run-dir", str(tmp_path / "run"), "--set",
                               f"data.root={wt2_dir}", "train.progress=false"])
    assert proc.returncode != 0 and "Traceback" not in proc.stdout + proc.stderr
    [line] = error_lines(proc)
    assert "md5" in line and ".txt" in line
