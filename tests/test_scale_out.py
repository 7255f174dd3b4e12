"""LoRA end to end (adapter + merged model) and a 2-process CPU run (gloo) matching a 1-process run."""

import json
import os
import subprocess
import sys

import pytest
from conftest import rows_in_format, write_jsonl

from dpolab.cli import main


def test_lora_trains_end_to_end_with_a_merged_model(tmp_path, tiny_config, tiny_model_dir):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    data = write_jsonl(tmp_path / "d.jsonl", rows_in_format("messages", 12))
    config = tiny_config(data, use_peft=True, lora_r=4, lora_alpha=8, lora_target_modules=["q_proj", "v_proj"],
                         learning_rate=2e-2, merge_lora=True)  # fmt: skip
    assert main(["train", "--config", str(config)]) == 0
    final = tmp_path / "runs" / "tiny" / "final"
    assert (final / "adapter_config.json").is_file() and (final / "adapter_model.safetensors").is_file()
    assert not (final / "model.safetensors").exists()  # the adapter only: no second copy of the base

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with_adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), final)
    merged = AutoModelForCausalLM.from_pretrained(final / "merged")
    ids = torch.tensor([[5, 17, 42, 99, 7]])
    with torch.no_grad():
        adapted_logits = with_adapter(ids).logits
        assert torch.allclose(merged(ids).logits, adapted_logits, atol=1e-4)  # merged == base + adapter
        assert not torch.allclose(base(ids).logits, adapted_logits, atol=1e-4)  # and the adapter learned


def test_merge_lora_needs_use_peft(tmp_path, tiny_config, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", rows_in_format("messages", 4))
    assert main(["train", "--config", str(tiny_config(data, merge_lora=True))]) == 2
    assert "merge_lora merges a LoRA adapter: it needs use_peft true" in capsys.readouterr().err


def test_the_lora_preset_loads():
    from dpolab.config import parse_train_args

    config = parse_train_args(["--preset", "lora"])
    assert config.model.use_peft and config.model.lora_r == 32
    assert config.model.model_name_or_path == "Qwen/Qwen2-0.5B-Instruct"


def losses(run_dir):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if "loss" in r]


def test_two_cpu_processes_match_one_with_the_same_global_batch(tmp_path, tiny_config):
    data = write_jsonl(tmp_path / "d.jsonl", rows_in_format("messages", 24))
    config = str(tiny_config(data, max_steps=3, train_sampling_strategy="sequential", learning_rate=5e-3))
    assert main(["train", "--config", config, "--run_name", "one", "--per_device_train_batch_size", "4"]) == 0
    # accelerate's torchrun launcher, and TrainingArguments' use_cpu: accelerate then runs MULTI_CPU over gloo.
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
              "--main_process_port", "29533",
              "-m", "dpolab", "train", "--config", config, "--run_name", "two", "--per_device_train_batch_size", "2",
              "--use_cpu", "true"]  # fmt: skip
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(launch, capture_output=True, text=True, timeout=600, env=environment)
    assert result.returncode == 0, result.stderr[-3000:]
    one, two = losses(tmp_path / "runs" / "one"), losses(tmp_path / "runs" / "two")
    assert [r["step"] for r in two] == [1, 2, 3]
    for a, b in zip(one, two, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-4), a["step"]
        assert a["rewards/margins"] == pytest.approx(b["rewards/margins"], abs=1e-4)
    assert json.loads((tmp_path / "runs" / "two" / "summary.json").read_text())["steps"] == 3
