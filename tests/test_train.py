"""`dpolab train` end to end through the CLI on a tiny model: every data format, overrides, run directories."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import rows_in_format, write_jsonl

from dpolab.cli import main
from dpolab.train import KEY_METRICS

RUN_FILES = ("config.yaml", "metrics.jsonl", "summary.json", "final")


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def assert_complete_run(run_dir: Path, steps: int, base_model_dir: Path, evaluated: bool = False):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    for name in RUN_FILES:
        assert (run_dir / name).exists(), name
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*")), "no TensorBoard event file"

    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    versions = config["dpolab_provenance"]["versions"]
    assert versions["trl"] == "1.16.0" and versions["torch"].startswith("2.13.0")
    assert config["max_steps"] == steps

    records = read_jsonl(run_dir / "metrics.jsonl")
    train_records = [r for r in records if "loss" in r]
    assert [r["step"] for r in train_records] == list(range(1, steps + 1))  # logging_steps 1, no duplicates
    for key in (*KEY_METRICS, "rewards/chosen", "rewards/rejected", "learning_rate", "grad_norm"):
        assert key in train_records[-1], key
    assert any("eval_loss" in r for r in records) is evaluated

    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == steps
    assert summary["final"]["loss"] == train_records[-1]["loss"]
    assert summary["pairs_per_s"] > 0
    assert set(summary["best"]) >= {"loss", "rewards/accuracies", "rewards/margins"}

    final = run_dir / "final"
    assert (final / "model.safetensors").is_file()
    assert not list(final.glob("*.bin")), "final/ must hold safetensors only"
    trained = AutoModelForCausalLM.from_pretrained(final)
    AutoTokenizer.from_pretrained(final)
    base = AutoModelForCausalLM.from_pretrained(base_model_dir)
    changed = [
        name for (name, p), (_, q) in zip(trained.named_parameters(), base.named_parameters()) if not torch.equal(p, q)
    ]
    assert changed, "training did not change any parameter"


@pytest.mark.parametrize("fmt", ["strings", "messages", "implicit", "hh"])
def test_train_on_each_format(tmp_path, tiny_config, tiny_model_dir, fmt, capsys):
    data = write_jsonl(tmp_path / f"{fmt}.jsonl", rows_in_format(fmt, 12))
    assert main(["train", "--config", str(tiny_config(data))]) == 0
    assert_complete_run(tmp_path / "runs" / "tiny", 3, tiny_model_dir)
    output = capsys.readouterr()
    assert "Run finished" in output.out
    if fmt == "strings":  # plain strings with a chat model skip its template: warned loudly
        assert "WARNING" in output.err and "WITHOUT the template" in output.err
    else:
        assert "WITHOUT the template" not in output.err


def test_the_run_is_described_before_its_first_step(tmp_path, tiny_config, capsys):
    """Steps, pairs per step and their split, as the Trainer then runs them: one epoch of 10 pairs in global
    batches of 4 (2 x accumulation 2) is 3 steps, the last one short."""
    data = write_jsonl(tmp_path / "d.jsonl", rows_in_format("messages", 10))
    config = tiny_config(data, max_steps=-1, num_train_epochs=1, per_device_train_batch_size=2,
                         gradient_accumulation_steps=2, learning_rate=1e-3, lr_scheduler_type="cosine")  # fmt: skip
    assert main(["train", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert "Training on the CPU: 3 steps x 4 pairs (2 per micro-batch x accumulation 2) = 1.00 epochs of 10 " in out
    assert "learning_rate 0.001 (cosine), beta 0.1, loss_type sigmoid, max_length 64; no checkpoints" in out
    summary = json.loads((tmp_path / "runs" / "tiny" / "summary.json").read_text())
    assert summary["steps"] == 3 and "gpu_memory_gib" not in summary  # this machine has no GPU


def test_the_summary_puts_a_gpu_runs_peak_memory_beside_the_plan():
    from dpolab.train import format_summary

    summary = {"run_dir": "runs/x", "final_model": "runs/x/final", "setup_s": 30.0, "steps": 12, "epochs": 0.1,
               "runtime_s": 60.0, "pairs_per_s": 3.2, "final": {}, "final_eval": {}, "weights": None,
               "gpu_memory_gib": {"peak_reserved": 21.37, "peak_allocated": 19.9, "planned": 23.62}}  # fmt: skip
    assert "  GPU memory: peak 21.37 GiB reserved (19.90 allocated; fit_to_memory planned 23.62)" in format_summary(
        summary
    )
    del summary["gpu_memory_gib"]  # a run on the CPU: no such line (checked on a real run below)
    assert "GPU memory" not in format_summary(summary)


def test_a_real_model_trained_long_on_the_cpu_is_warned():
    from dpolab.train import cpu_training_warning

    text = cpu_training_warning("cpu", 494_032_768, 3900, "2.13.0+cpu")
    assert text.startswith("this run trains 494M parameters for 3,900 steps on the CPU: expect days, not hours.")
    assert "torch 2.13.0+cpu (a CPU-only build) sees no GPU" in text
    assert cpu_training_warning("cuda", 494_032_768, 3900, "2.13.0+cu130") is None
    assert cpu_training_warning("cpu", 134_515_008, 20, "2.13.0+cpu") is None  # the demo: 135M, 20 steps
    assert cpu_training_warning("cpu", 2_000_000, 5000, "2.13.0+cpu") is None  # the tests' tiny models


def test_tensorboard_custom_scalars_chart_what_the_run_logged(tmp_path, tiny_config):
    """The Custom Scalars tab's charts: every metric pattern in them matches exactly one curve the run wrote, train
    and eval (a misspelt name would draw an empty chart)."""
    import re

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.custom_scalar import layout_pb2

    data = write_jsonl(tmp_path / "d.jsonl", rows_in_format("messages", 12))
    config = tiny_config(data, eval_holdout=0.25, eval_strategy="steps", eval_steps=2)
    assert main(["train", "--config", str(config)]) == 0
    events = EventAccumulator(str(tmp_path / "runs" / "tiny" / "tensorboard"))
    events.Reload()
    layout = layout_pb2.Layout.FromString(events.Tensors("custom_scalars__config__")[0].tensor_proto.string_val[0])
    curves = events.Tags()["scalars"]
    patterns = [pattern for section in layout.category for chart in section.chart for pattern in chart.multiline.tag]
    assert len(patterns) == 18 and "^eval/logps/rejected$" in patterns
    for pattern in patterns:
        assert len([curve for curve in curves if re.search(pattern, curve)]) == 1, (pattern, curves)


def test_no_warning_a_user_cannot_act_on(tmp_path, tiny_config):
    """TRL's calls to transformers' renamed gradient-checkpointing methods warned three times in every run. Run with
    FutureWarnings as errors, in a process of its own (transformers routes warnings through logging): unfiltered,
    the first one stops the run."""
    data = write_jsonl(tmp_path / "d.jsonl", rows_in_format("messages", 8))
    config = tiny_config(data, activation_checkpointing=True, precompute_ref_log_probs=False, report_to=[])
    command = [sys.executable, "-W", "error::FutureWarning", "-m", "dpolab.cli", "train", "--config", str(config)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "Run finished" in result.stdout, result.stderr
    assert "is deprecated" not in result.stderr, result.stderr


def test_the_summary_counts_the_reference_pre_pass_as_set_up_not_training(tmp_path, tiny_config, monkeypatch, capsys):
    """Trainer's pairs/s and dpolab's runtime start at the first step; the pre-pass runs before it, in set-up."""
    import time

    from dpolab import packing

    trainer_class = packing.reference_trainer_class()
    original = trainer_class.reference_pass

    def slow_reference_pass(self, *args, **kwargs):
        time.sleep(1.5)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(trainer_class, "reference_pass", slow_reference_pass)
    data = write_jsonl(tmp_path / "d.jsonl", rows_in_format("implicit", 12))
    began = time.time()
    assert main(["train", "--config", str(tiny_config(data, precompute_ref_log_probs=True))]) == 0
    wall = time.time() - began
    summary = json.loads((tmp_path / "runs" / "tiny" / "summary.json").read_text())
    assert summary["setup_s"] >= 1.5  # the pre-pass is set-up ...
    assert summary["runtime_s"] <= wall - 1.5  # ... not training time
    assert summary["setup_s"] + summary["runtime_s"] <= wall + 0.1  # both rounded to 0.1 s
    printed = capsys.readouterr().out
    assert f"set-up {summary['setup_s']:.0f} s (data, model, reference pre-pass); 3 steps" in printed
    assert "pairs/s while training)" in printed


def test_column_mapping_overrides_and_eval_holdout(tmp_path, tiny_config, tiny_model_dir):
    data = write_jsonl(tmp_path / "se.jsonl", rows_in_format("mapped", 16))
    config = tiny_config(data, prompt_column="question", chosen_column="response_j", rejected_column="response_k")
    argv = ["train", "--config", str(config), "--max_steps", "2", "--beta", "0.5", "--eval_holdout", "0.25"]
    argv += ["--eval_strategy", "steps", "--eval_steps", "100"]  # no eval on the way: one at the end
    assert main(argv) == 0
    run_dir = tmp_path / "runs" / "tiny"
    assert_complete_run(run_dir, 2, tiny_model_dir, evaluated=True)
    resolved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert resolved["beta"] == 0.5 and resolved["chosen_column"] == "response_j"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["train_pairs"] == 12 and summary["eval_pairs"] == 4
    assert "loss" in summary["final_eval"]


def test_local_ultrafeedback_shaped_split_directory(tmp_path, tiny_config, tiny_model_dir):
    """The reference dataset's shape (implicit prompt, score columns) from a local train/test directory."""
    write_jsonl(tmp_path / "uf" / "train.jsonl", rows_in_format("implicit", 12))
    write_jsonl(tmp_path / "uf" / "test.jsonl", rows_in_format("implicit", 4, seed=9))
    config = tiny_config(tmp_path / "uf", eval_split="test", eval_strategy="steps", eval_steps=2)
    assert main(["train", "--config", str(config)]) == 0
    run_dir = tmp_path / "runs" / "tiny"
    assert_complete_run(run_dir, 3, tiny_model_dir, evaluated=True)
    evals = [r for r in read_jsonl(run_dir / "metrics.jsonl") if "eval_loss" in r]
    assert [r["step"] for r in evals] == [2, 3]  # at eval_steps, and once more at the end
    assert "eval_rewards/accuracies" in evals[-1]


def test_existing_run_is_never_overwritten_and_resume_continues(tmp_path, tiny_config, tiny_model_dir, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", rows_in_format("messages", 16))
    config = str(tiny_config(data, save_strategy="steps", save_steps=2, max_steps=2))
    assert main(["train", "--config", config]) == 0
    run_dir = tmp_path / "runs" / "tiny"
    before = {p: p.stat().st_mtime_ns for p in run_dir.rglob("*") if p.is_file()}

    capsys.readouterr()
    assert main(["train", "--config", config]) == 2
    message = capsys.readouterr().err
    assert f"Run directory {run_dir} already exists" in message
    assert "--resume" in message and "--run_name" in message
    assert before == {p: p.stat().st_mtime_ns for p in run_dir.rglob("*") if p.is_file()}

    assert main(["train", "--config", config, "--resume", "--max_steps", "4"]) == 0
    assert "Resuming" in capsys.readouterr().out
    assert_complete_run(run_dir, 4, tiny_model_dir)
    assert (run_dir / "checkpoint-4").is_dir()


def test_resume_errors(tmp_path, tiny_config, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", rows_in_format("messages", 8))
    config = str(tiny_config(data, max_steps=1))
    assert main(["train", "--config", config, "--resume"]) == 2
    assert "Nothing to resume" in capsys.readouterr().err
    assert main(["train", "--config", config]) == 0  # save_strategy "no": no checkpoint
    capsys.readouterr()
    assert main(["train", "--config", config, "--resume"]) == 2
    assert "has no complete checkpoint-N directory" in capsys.readouterr().err


def test_message_data_needs_a_chat_template(tmp_path, tiny_config, plain_model_dir, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", rows_in_format("messages", 8))
    assert main(["train", "--config", str(tiny_config(data, model_name_or_path=str(plain_model_dir)))]) == 2
    assert "has no chat template" in capsys.readouterr().err


def test_bad_data_fails_before_any_model_is_loaded(tmp_path, tiny_config, capsys, monkeypatch):
    rows = rows_in_format("messages", 8)
    rows[5]["rejected"][0]["role"] = "narrator"
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    import transformers

    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded before the data were validated")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_model)
    assert main(["train", "--config", str(tiny_config(data))]) == 2
    message = capsys.readouterr().err
    assert "row 5: 'rejected'[0] has unknown role 'narrator'" in message
    assert "Traceback" not in message


def test_missing_model_directory(tmp_path, tiny_config, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", rows_in_format("messages", 8))
    config = tiny_config(data, model_name_or_path=str(tmp_path / "no-such-model"))
    assert main(["train", "--config", str(config)]) == 2
    assert "Model directory not found" in capsys.readouterr().err


def run_cli(*args, env=None, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "dpolab.cli", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **(env or {})},
        cwd=cwd,
    )


def test_smoke_preset_without_the_hub_stops_with_the_model_error(tmp_path):
    result = run_cli(
        "train", "--preset", "smoke", "--runs_dir", str(tmp_path / "runs"),
        env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")},
    )  # fmt: skip
    assert result.returncode == 2
    assert "Model 'Qwen/Qwen2-0.5B-Instruct' is not in the local Hugging Face cache" in result.stderr
    assert "local directory" in result.stderr
    assert "Traceback" not in result.stderr


def test_help_for_every_command():
    from dpolab.cli import COMMANDS

    for args in (["--help"], *([*name.split(), "--help"] for name in COMMANDS)):
        result = run_cli(*args)
        assert result.returncode == 0, (args, result.stderr)
        assert "usage" in result.stdout.lower(), args
    assert "--beta" in run_cli("train", "--help").stdout
    result = run_cli("trian")
    assert result.returncode == 2 and "unknown command 'trian'" in result.stderr


def test_every_pair_longer_than_max_length_is_an_error_not_a_crash(tmp_path, tiny_config, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", rows_in_format("messages", 8))  # prompts are 22 tokens
    assert main(["train", "--config", str(tiny_config(data, max_length=16))]) == 2
    message = capsys.readouterr().err
    assert "All 8 train pairs were dropped" in message and "max_length=16" in message


def test_readme_links_the_chinese_guide_in_its_first_lines():
    root = Path(__file__).resolve().parents[1]
    assert "README.zh-CN.md" in "".join(root.joinpath("README.md").read_text().splitlines(keepends=True)[:8])
    guide = root.joinpath("README.zh-CN.md").read_text()
    for needed in ("HF_ENDPOINT", "HF_HOME", "unset http_proxy https_proxy", "--preset smoke", "--preset full",
                   "dpolab doctor", "TRANSFORMERS_CACHE"):  # fmt: skip
        assert needed in guide, needed
