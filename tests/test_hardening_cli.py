"""The command line under bad input, damaged run folders and interrupts: every expected failure is one line
``fewbit: error: ...`` with exit code 2, Ctrl-C exits 130 with what was written still readable, and a run folder is
never replaced or mixed with another run without being asked."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fewbit import cli
from fewbit.cli import main
from fewbit.train import checkpoint as ckpt
from tests.test_workloads_cli import TINY

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FEWBIT_CACHE", str(tmp_path / "cache"))


def _error(capsys) -> str:
    """The one stderr line of a failed command."""
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("fewbit: error: "), err
    assert "Traceback" not in err
    return err


def _steps(folder: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (folder / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture
def run_folder(tmp_path):
    out = tmp_path / "run"
    assert main(["train", "translate", "--out", str(out), "--quiet", *TINY]) == 0
    return out


# ---- 7. no silent replacement of a run ---------------------------------------------------------------------------


def test_training_into_an_existing_run_is_refused_unless_overwrite(run_folder, capsys):
    before = {p.name: p.read_bytes() for p in run_folder.iterdir() if p.is_file()}
    capsys.readouterr()
    assert main(["train", "translate", "--out", str(run_folder), "--quiet", *TINY, "seed=1"]) == 2
    assert "already holds a run (run.json, model.safetensors, metrics.jsonl); pass --overwrite" in _error(capsys)
    assert {p.name: p.read_bytes() for p in run_folder.iterdir() if p.is_file()} == before  # untouched
    assert main(["train", "translate", "--out", str(run_folder), "--quiet", "--overwrite", *TINY, "seed=1"]) == 0
    assert _steps(run_folder) == [1, 2, 3, 4]  # one run's metrics, not two
    assert json.loads((run_folder / "run.json").read_text())["config"]["seed"] == 1


def test_resume_continues_checkpoints_without_repeating_steps_and_refuses_a_changed_setting(tmp_path, capsys):
    out = tmp_path / "run"
    base = ["train", "translate", "--out", str(out), "--quiet", "--checkpoint-every", "2", *TINY]
    assert main(base) == 0
    assert main([*base, "--resume", "steps=6"]) == 0
    assert _steps(out) == [1, 2, 3, 4, 5, 6]
    assert json.loads((out / "run.json").read_text())["train"]["steps"] == 6
    capsys.readouterr()
    assert main([*base, "--resume", "steps=8", "lr=0.5"]) == 2
    assert "config differs at 'lr'" in _error(capsys)
    assert main([*base, "--resume", "--overwrite"]) == 2
    assert "exclude each other" in _error(capsys)


def test_resume_needs_checkpoints(run_folder, capsys):
    capsys.readouterr()
    assert main(["train", "translate", "--out", str(run_folder), "--quiet", "--resume", *TINY]) == 2
    assert "give checkpoint_every (--checkpoint-every N)" in _error(capsys)
    assert main(["train", "translate", "--out", str(run_folder), "--quiet", "--resume", "--checkpoint-every", "2",
                 *TINY]) == 2
    assert "no checkpoints to resume; pass --overwrite" in _error(capsys)


# ---- 2, 9. bad options and config values -------------------------------------------------------------------------


@pytest.mark.parametrize(("argv", "message"), [
    (["train", "vision", "grad_clip=-1"], r"grad_clip=-1.0; it must be a finite max-norm > 0, or 0/None"),
    (["train", "translate", "lr=.inf", *TINY], "config key 'lr': inf; a learning rate must be a finite number"),
    (["train", "translate", "lr=-0.1", *TINY], "lr=-0.1 must be > 0"),  # the config's own check
    (["train", "translate", "--checkpoint-every", "-1", *TINY], "--checkpoint-every -1: use 0 for no checkpoints"),
])
def test_bad_training_options_are_one_line_errors(argv, message, capsys, tmp_path):
    assert main([*argv, "--out", str(tmp_path / "x")]) == 2
    assert message in _error(capsys)
    assert not (tmp_path / "x").exists()  # refused before any work


def test_eval_limit_must_not_be_negative(run_folder, capsys):
    capsys.readouterr()
    assert main(["eval", "translate", "--checkpoint", str(run_folder), "--limit", "-5"]) == 2
    assert "--limit -5: use 0 for the whole split or N > 0" in _error(capsys)


def test_yaml_and_json_errors_are_one_line(tmp_path, capsys, run_folder):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n  weight: {\n")
    for option in ("--recipe", "--config"):
        capsys.readouterr()
        assert main(["train", "translate", option, str(bad), *TINY, "--out", str(tmp_path / "y")]) == 2
        message = _error(capsys)
        assert str(bad) in message and "not valid YAML" in message
    (run_folder / "run.json").write_text('{"workload": "translate", ')
    capsys.readouterr()
    assert main(["eval", "translate", "--checkpoint", str(run_folder)]) == 2
    assert "run.json is corrupted: not valid JSON" in _error(capsys)


def test_internal_lookup_errors_do_not_reach_the_user_as_tracebacks(monkeypatch, capsys):
    def lookup(args):
        return {}["missing"]

    monkeypatch.setattr(cli, "_cmd_formats", lookup)
    assert main(["formats"]) == 2
    assert _error(capsys) == "fewbit: error: KeyError: 'missing'"
    monkeypatch.setattr(cli, "_cmd_formats", lambda args: next(iter([])))
    assert main(["formats"]) == 2
    assert _error(capsys) == "fewbit: error: StopIteration: StopIteration"


@pytest.mark.parametrize("verdict", ["all skipped", "collapse"])
def test_a_training_verdict_is_one_line(monkeypatch, capsys, verdict):
    from fewbit.train import AllStepsSkipped, LossScaleCollapse

    error = AllStepsSkipped("all 3 step(s) met a non-finite loss") if verdict == "all skipped" \
        else LossScaleCollapse("gradients overflowed 10 steps in a row")

    def fails(args):
        raise error

    monkeypatch.setattr(cli, "_cmd_formats", fails)
    assert main(["formats"]) == 2
    assert _error(capsys) == f"fewbit: error: {error}"


# ---- 6. a damaged run folder is refused by fewbit eval -----------------------------------------------------------


def _flip_bit_in_weights(path: Path) -> None:
    data = bytearray(path.read_bytes())
    size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + size])
    name = max((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][1])
    start, end = header[name]["data_offsets"]
    data[8 + size + (start + end) // 2] ^= 0x40
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(("damage", "message"), [
    ("flipped bit", "model.safetensors is corrupted: tensor '.*' does not match its checksum"),
    ("truncated", "model.safetensors is truncated or corrupted"),
    ("edited run.json", "run.json is corrupted: it does not match the checksum recorded in"),
    ("damaged artifact", "tokenizer.model is corrupted: it does not match its checksum"),
    ("missing weights", "incomplete run: model.safetensors is missing"),
])
def test_eval_refuses_a_damaged_run_naming_the_file(run_folder, capsys, damage, message):
    import re

    weights = run_folder / "model.safetensors"
    if damage == "flipped bit":
        _flip_bit_in_weights(weights)
    elif damage == "truncated":
        weights.write_bytes(weights.read_bytes()[:-100])
    elif damage == "edited run.json":
        record = json.loads((run_folder / "run.json").read_text())
        record["config"]["d_model"] = 32  # same value, rewritten: the bytes differ (indentation)
        (run_folder / "run.json").write_text(json.dumps(record))
    elif damage == "damaged artifact":
        tokenizer = run_folder / "tokenizer.model"
        tokenizer.write_bytes(tokenizer.read_bytes()[:-10])
    elif damage == "missing weights":
        weights.unlink()
    capsys.readouterr()
    assert main(["eval", "translate", "--checkpoint", str(run_folder)]) == 2
    assert re.search(message, _error(capsys))


# ---- Ctrl-C ------------------------------------------------------------------------------------------------------


def test_keyboard_interrupt_exits_130(monkeypatch, capsys):
    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_cmd_formats", interrupted)
    assert main(["formats"]) == 130
    assert capsys.readouterr().err.strip() == "fewbit: interrupted"


def test_sigint_during_training_exits_130_leaving_readable_outputs_that_resume(tmp_path):
    out = tmp_path / "run"
    argv = [sys.executable, "-m", "fewbit.cli", "train", "translate", "--out", str(out), "--quiet",
            "--checkpoint-every", "2", *TINY, "steps=400"]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "FEWBIT_CACHE": str(tmp_path / "cache")}
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while not (out / "metrics.jsonl").exists() or len(_steps(out)) < 5:
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert err.strip().splitlines()[-1] == "fewbit: interrupted" and "Traceback" not in err
    steps = _steps(out)  # every line parses
    assert steps == list(range(1, len(steps) + 1)) and len(steps) < 400
    newest = ckpt.list_checkpoints(out / "checkpoints")[-1]
    ckpt.load(newest)  # verified: checksums hold
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".tmp")]
    resumed_to = int(newest.name.removeprefix("step-")) + 2
    assert main([*argv[3:], "--resume", f"steps={resumed_to}"]) == 0
    assert _steps(out) == list(range(1, resumed_to + 1))
