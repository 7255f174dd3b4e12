"""Runs that survive: kill -9 then --resume equals an uninterrupted run; Ctrl-C saves; NaN never becomes final/."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import rows_in_format, write_jsonl

from dpolab.cli import main

STEPS = 24
KEYS = ("loss", "rewards/margins", "rewards/accuracies", "logps/chosen", "logps/rejected", "grad_norm")


def crash_config(tmp_path, tiny_config):
    data = write_jsonl(tmp_path / "d.jsonl", rows_in_format("messages", 48))
    return str(tiny_config(data, max_steps=STEPS, per_device_train_batch_size=2, save_strategy="steps", save_steps=1,
                           learning_rate=2e-3))  # fmt: skip


def start_training(config, run_name):
    return subprocess.Popen(
        [sys.executable, "-m", "dpolab.cli", "train", "--config", config, "--run_name", run_name],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


def wait_for_step(run_dir, step, process, timeout=240):
    """Block until metrics.jsonl has logged `step` (the run is mid-training)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        path = run_dir / "metrics.jsonl"
        if path.is_file() and any(f'"step": {step},' in line for line in path.read_text().splitlines()):
            return
        assert process.poll() is None, "training ended before it could be interrupted:\n" + process.stderr.read()
        time.sleep(0.02)
    raise AssertionError("training did not reach the step in time")


def train_records(run_dir):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if "loss" in r]


def weights(run_dir):
    from safetensors.torch import load_file

    return load_file(run_dir / "final" / "model.safetensors")


def test_kill_9_then_resume_equals_an_uninterrupted_run(tmp_path, tiny_config):
    config = crash_config(tmp_path, tiny_config)
    assert main(["train", "--config", config, "--run_name", "straight"]) == 0

    killed_dir = tmp_path / "runs" / "killed"
    process = start_training(config, "killed")
    wait_for_step(killed_dir, 9, process)
    process.send_signal(signal.SIGKILL)  # no handler, no cleanup: mid-step, maybe mid-checkpoint
    process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL
    assert not (killed_dir / "final").exists()

    assert main(["train", "--config", config, "--run_name", "killed", "--resume"]) == 0

    straight, resumed = weights(tmp_path / "runs" / "straight"), weights(killed_dir)
    assert straight.keys() == resumed.keys()
    worst = max((straight[name] - resumed[name]).abs().max().item() for name in straight)
    assert worst <= 1e-5, f"final weights differ by {worst}"
    straight_log, resumed_log = train_records(tmp_path / "runs" / "straight"), train_records(killed_dir)
    assert [r["step"] for r in resumed_log] == list(range(1, STEPS + 1))  # no step lost, none logged twice
    for a, b in zip(straight_log, resumed_log, strict=True):
        for key in KEYS:
            assert a[key] == pytest.approx(b[key], abs=1e-5), (a["step"], key)
    summary = json.loads((killed_dir / "summary.json").read_text())
    assert summary["final"]["loss"] == pytest.approx(straight_log[-1]["loss"], abs=1e-5)


def test_ctrl_c_saves_a_checkpoint_and_says_how_to_resume(tmp_path, tiny_config):
    config = crash_config(tmp_path, tiny_config)
    run_dir = tmp_path / "runs" / "interrupted"
    process = start_training(config, "interrupted")
    wait_for_step(run_dir, 5, process)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr[-2000:]
    assert "Interrupted at step" in stderr and "--resume" in stderr and "Traceback" not in stderr
    assert not (run_dir / "final").exists()
    records = train_records(run_dir)
    assert (run_dir / f"checkpoint-{records[-1]['step']}").is_dir()  # saved at the step it stopped
    assert main(["train", "--config", config, "--run_name", "interrupted", "--resume"]) == 0
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == STEPS


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, tiny_config, capsys):
    import torch
    from safetensors.torch import load_file

    config = crash_config(tmp_path, tiny_config)
    assert main(["train", "--config", config, "--run_name", "nan", "--learning_rate", "1e12"]) == 2
    message = capsys.readouterr().err
    assert "Training stopped at step" in message and "Nothing was saved as final/" in message
    assert "--learning_rate" in message
    run_dir = tmp_path / "runs" / "nan"
    assert not (run_dir / "final").exists()
    checkpoints = list(run_dir.glob("checkpoint-*"))
    for checkpoint in checkpoints:  # whatever is left is finite
        state = load_file(checkpoint / "model.safetensors")
        assert all(torch.isfinite(tensor).all() for tensor in state.values()), checkpoint
    if checkpoints:
        assert "The last good checkpoint is" in message


def test_metrics_survive_a_line_cut_by_a_crash(tmp_path):
    from dpolab.rundir import RunDir, read_jsonl

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 0.7}\n{"step": 2, "loss": 0.6}\n{"step": 3, "lo')
    assert [r["step"] for r in read_jsonl(path)] == [1, 2]
    RunDir(tmp_path).truncate_metrics(1)
    assert path.read_text() == '{"step": 1, "loss": 0.7}\n'


def test_a_full_disk_while_saving_says_what_to_free_and_where_to_resume(tmp_path, tiny_config, monkeypatch, capsys):
    import errno

    from trl import DPOTrainer

    save = DPOTrainer._save_checkpoint

    def disk_full_at_step_2(self, model, trial):
        if self.state.global_step == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return save(self, model, trial)

    monkeypatch.setattr(DPOTrainer, "_save_checkpoint", disk_full_at_step_2)
    data = write_jsonl(tmp_path / "d.jsonl", rows_in_format("messages", 12))
    config = tiny_config(data, save_strategy="steps", save_steps=1, save_total_limit=2)
    assert main(["train", "--config", str(config)]) == 2
    message = capsys.readouterr().err
    run = tmp_path / "runs" / "tiny"
    assert f"The disk under {run} is full (at step 2, saving)" in message
    last = run / "checkpoint-1"
    assert f"(--save_total_limit 1), then resume from {last} with the same command plus --resume" in message
    assert "Traceback" not in message and not (run / "final").exists()


def test_disk_space_a_run_needs_by_hand():
    from types import SimpleNamespace

    from dpolab.train import disk_space_needed

    full = SimpleNamespace(save_strategy="steps", save_steps=500, save_total_limit=3, num_train_epochs=1)
    weights = 494_032_768 * 4  # Qwen2-0.5B in float32, every weight trained
    # 3,900 steps save 7 checkpoints; 3 kept, a 4th written before the oldest goes: 4 x (weights + 2 AdamW states)
    assert disk_space_needed(weights, weights, full, steps=3900) == 4 * 3 * weights + weights
    assert disk_space_needed(weights, weights, full, steps=1000) == 2 * 3 * weights + weights  # 2 saves only
    no_saves = SimpleNamespace(**{**vars(full), "save_strategy": "no"})
    assert disk_space_needed(weights, weights, no_saves, steps=3900) == weights  # final/ alone
    adapter = 8_798_208 * 4  # LoRA r=32 on every projection: the adapter alone is saved
    assert disk_space_needed(adapter, adapter, full, steps=3900) == 4 * 3 * adapter + adapter


def test_a_run_whose_checkpoints_will_not_fit_is_warned_before_it_starts(tmp_path, tiny_config, monkeypatch, capsys):
    import shutil

    data = write_jsonl(tmp_path / "d.jsonl", rows_in_format("messages", 8))
    config = tiny_config(data, save_strategy="steps", save_steps=1, save_total_limit=2)
    assert main(["train", "--config", str(config)]) == 0
    assert "GiB free under" not in capsys.readouterr().err  # this machine's disk holds a tiny run
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=1000))
    assert main(["train", "--config", str(config), "--run_name", "small-disk"]) == 0  # a warning, not an error
    message = capsys.readouterr().err
    assert f"WARNING: 0.0 GiB free under {tmp_path / 'runs' / 'small-disk'}, and this run's checkpoints" in message
    assert "save_total_limit 2" in message
