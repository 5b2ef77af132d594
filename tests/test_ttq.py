"""``fewbit ttq``: the command on a tiny workload, its bad input, and the rendering of its record."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fewbit import cli, ttq
from fewbit.report import ttq as render

TINY_LM = ["layers=1", "d_model=32", "heads=2", "d_ff=64", "block_size=32", "batch_size=8", "warmup=2",
           "eval_limit=512", "steps=4"]


@pytest.mark.parametrize("runs", ["2", "0"])
def test_runs_below_three_is_refused_before_training(runs, capsys, tmp_path):
    assert cli.main(["ttq", "lm", "--runs", runs, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert f"--runs {runs}" in err and "at least 3 runs" in err
    assert not any(tmp_path.iterdir())  # nothing ran
    with pytest.raises(ValueError, match="at least 3"):
        ttq.run("lm", ["fp32"], runs=1)


def test_unknown_recipe_or_workload_is_refused(capsys):
    assert cli.main(["ttq", "lm", "--recipes", "fp32,nope", "--runs", "3"]) == 2
    assert "unknown recipe 'nope'" in capsys.readouterr().err
    assert cli.main(["ttq", "asr", "--runs", "3"]) == 2
    assert "no quality target for workload 'asr'" in capsys.readouterr().err


def test_an_unreachable_target_aborts_every_run_and_the_score_is_invalid(capsys, tmp_path):
    code = cli.main(["ttq", "lm", "--recipes", "fp32", "--runs", "3", "--target", "1.0", "--json", "--quiet",
                     "--out", str(tmp_path), *TINY_LM])
    captured = capsys.readouterr()
    assert code == 0
    record = json.loads(captured.out)  # --json: stdout holds the record alone
    (row,) = record["results"]
    assert row["recipe"] == "fp32" and row["score"]["valid"] is False and row["score"]["seconds"] is None
    assert "3 of 3 runs did not converge" in row["score"]["reason"]
    assert row["score"]["rcp"]["status"] in ("invalid", "missing")
    for i, run in enumerate(row["runs"]):
        assert run["status"] == "aborted" and run["seed"] == i
        assert "did not reach perplexity <= 1 within the budget of 4 steps" in run["reason"]
        log = Path(run["log_path"])
        assert log == tmp_path / "fp32" / f"result_{i}.txt" and log.is_file()
        assert '"status": "aborted"' in log.read_text().splitlines()[-1]
        assert run["compliance"]["passed"] is False  # the quality check fails: the target was never reached
    assert "score invalid" in captured.err and "invalid" in captured.err
    assert (tmp_path / "ttq.json").is_file() and "score invalid" in (tmp_path / "report.md").read_text()


def _record(valid: bool) -> dict:
    run = {"seed": 0, "status": "success" if valid else "aborted", "reason": "r", "seconds": 1.5,
           "init_seconds": 0.5, "samples_to_target": 320 if valid else None, "final_metric": 8.5,
           "log_path": "/x/result_0.txt", "compliance": {"passed": valid}}
    score = {"runs": 3, "converged": 3 if valid else 0, "valid": valid, "reason": "" if valid else "bad",
             "seconds": 2.25 if valid else None, "samples": 320.0 if valid else None, "steps": 20.0 if valid
             else None, "rcp": {"status": "pass" if valid else "invalid", "message": "m"}}
    return {"workload": "lm", "target": {"describe": "perplexity <= 9", "eval_every": 20, "split": "valid"},
            "config": {"steps": 10}, "results": [{"recipe": "fp32", "score": score, "runs": [run] * 3}]}


def test_rendering():
    assert render.cells(_record(True)) == [["fp32", "3/3", "2.2", "320", "pass", "8.5", "3/3 pass"]]
    assert render.cells(_record(False)) == [["fp32", "0/3", "invalid", "invalid", "invalid", "8.5", "0/3 pass"]]
    assert render.notes(_record(True)) == []
    assert render.notes(_record(False))[0] == "fp32: score invalid: bad"
    assert "| fp32 | 3/3 | 2.2 | 320 | pass |" in render.markdown(_record(True))


def test_ttq_under_torchrun_two_ranks_one_report(tmp_path):
    """``torchrun --nproc_per_node 2 -m fewbit.cli ttq``: both ranks train (DDP), rank 0 alone writes the logs and
    prints the one JSON record; every log passes the compliance checker."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "FEWBIT_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "fewbit.cli",
           "ttq", "lm", "--recipes", "fp32", "--runs", "3", "--target", "1e6", "--out", str(tmp_path / "out"),
           "--json", *TINY_LM, "steps=10", "threads=1"]  # evaluated at step 5
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads(done.stdout)  # one record: the other rank printed nothing
    runs_ = record["results"][0]["runs"]
    assert [r["status"] for r in runs_] == ["success"] * 3
    assert all(r["compliance"]["passed"] for r in runs_)
    logs = sorted(p.name for p in (tmp_path / "out" / "fp32").glob("result_*.txt"))
    assert logs == ["result_0.txt", "result_1.txt", "result_2.txt"]
    text = (tmp_path / "out" / "fp32" / "result_0.txt").read_text()
    assert text.count('"key": "run_start"') == 1  # one rank's events, not two
