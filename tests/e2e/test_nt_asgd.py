"""NT-ASGD: the non-monotone trigger, and the sharded average on real DeepSpeed engines (1 and 2 ranks, ZeRO 0-2)."""

import json
import subprocess
import sys

import pytest

from harness.launching import checkout_env, free_port
from harness.paths import BIN, REPO as ROOT
from trainer.nt_asgd.averager import nonmono_triggered


def run_trigger(losses, nonmono):
    history, fired = [], []
    for loss in losses:
        fired.append(nonmono_triggered(history, loss, nonmono))
        history.append(loss)
    return fired


def test_trigger_fires_when_worse_than_the_best_before_the_last_nonmono():
    # improving: never fires
    assert not any(run_trigger([9, 8, 7, 6, 5, 4, 3, 2], nonmono=5))
    # a plateau inside the last `nonmono` checks does not fire; worse than the best before them does
    fired = run_trigger([9, 8, 7, 7.5, 7.6, 7.7, 7.8, 7.9, 7.05], nonmono=5)
    assert fired == [False] * 8 + [True]
    # too little history: the first nonmono+1 checks can never fire
    assert run_trigger([1, 2, 3, 4, 5, 6], nonmono=5) == [False] * 6
    assert run_trigger([1, 2, 3], nonmono=1) == [False, False, True]
    # equal to the best is not worse
    assert run_trigger([3, 2, 2, 2], nonmono=1) == [False, False, False, False]


@pytest.fixture(scope="module", params=[1, 2], ids=["1rank", "2ranks"])
def probe(request, tmp_path_factory):
    ranks = request.param
    out = tmp_path_factory.mktemp(f"asgd{ranks}") / "report.json"
    script = str(ROOT / "tests" / "probes" / "asgd_probe.py")
    if ranks == 1:
        cmd = [sys.executable, script, str(out)]
    else:
        cmd = [str(BIN / "deepspeed"), "--num_gpus", str(ranks), "--master_port", str(free_port()), script, str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=checkout_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return json.loads(out.read_text())


def test_average_equals_the_mean_of_the_iterates_under_every_zero_stage(probe):
    world = probe[0]["world"]
    for rank_report in probe:
        for stage, r in rank_report["stages"].items():
            assert r["count"] == 6, stage  # iterates after steps 3..8
            assert r["max_err"] < 1e-6, (stage, r)
            assert r["saved_err"] < 1e-6 and r["reloaded_err"] < 1e-6, (stage, r)
            assert r["raw_restored"], stage
    # each rank keeps 1/N of the average
    for stage in ("0", "1", "2"):
        shards = [rr["stages"][stage]["shard_numel"] for rr in probe]
        assert sum(shards) == probe[0]["stages"][stage]["total"] == 174
        assert max(shards) == -(-174 // world)


def test_all_ranks_switch_at_the_same_step(probe):
    starts = {r["trigger"]["start_step"] for r in probe}
    assert starts == {51}
    assert all(r["trigger"]["events"] == [None, None, None, None, "start"] for r in probe)
