"""Updates that land: every preset moves the weights, bf16 + plain AdamW is warned and diagnosed, the NaN guard
sees NaN (and lets fp16's routine overflow steps pass), and eval scores at the run's precision."""

import json
import math
import re

import pytest
import torch
from conftest import rows_in_format, write_jsonl

from dpolab.cli import main
from dpolab.weights import half_step, lost_update_count, lost_updates, movement


def test_half_a_bf16_step_by_hand():
    # 0.02 = 0.64 * 2**-5: bf16 spacing there is 2**-7 * 2**-6 = 2**-13 = 1.22e-4, half of it 6.1e-5
    weights = torch.tensor([0.02, 1.0, 0.0, -0.02], dtype=torch.bfloat16)
    assert half_step(weights).tolist() == pytest.approx([2**-14, 2**-8, 0.0, 2**-14])
    assert lost_update_count(weights, 5e-7) == 3  # every non-zero weight keeps its value
    assert lost_update_count(weights, 1e-3) == 1  # only 1.0 (half step 3.9e-3) does
    assert lost_update_count(torch.tensor([0.02, 1.0]), 5e-7) == 0  # float32 holds it
    # and that is what bf16 arithmetic does: the non-zero weights stay, the zero one moves
    assert (weights + 5e-7).tolist() == [0.02001953125, 1.0, pytest.approx(5e-7, rel=1e-2), -0.02001953125]


def test_lost_updates_count_trainable_half_precision_weights_only():
    trainable = torch.nn.Parameter(torch.full((10,), 0.02, dtype=torch.bfloat16))
    frozen = torch.nn.Parameter(torch.full((5,), 0.02, dtype=torch.bfloat16), requires_grad=False)
    lost = lost_updates([trainable, frozen], 5e-7)
    assert (lost.lost, lost.total, lost.dtype, lost.share) == (10, 10, "bfloat16", 1.0)
    assert lost_updates([torch.nn.Parameter(torch.ones(3))], 5e-7) is None  # float32: nothing to lose


def test_sampled_indices_stay_inside_large_tensors():
    from dpolab.weights import sample_indices

    numel = 151_936 * 128  # float32 cannot hold numel - 1 exactly: linspace would round past the end
    indices = sample_indices(numel)
    assert indices[0] == 0 and indices[-1] == numel - 1 and len(set(indices.tolist())) == 4096
    assert sample_indices(10).tolist() == list(range(10))


def test_movement_by_hand():
    initial, current = torch.tensor([3.0, 4.0, 0.0]), torch.tensor([3.0, 4.5, 0.0])
    moved = movement(initial, current)
    assert moved["weights/changed_share"] == pytest.approx(1 / 3)
    assert moved["weights/relative_change"] == pytest.approx(0.5 / 5)


def test_weight_movement_is_measured_every_ten_steps_and_at_the_end():
    from types import SimpleNamespace

    from dpolab.callbacks import WeightMovementCallback

    model = torch.nn.Linear(4, 4)
    callback = WeightMovementCallback()
    callback.on_train_begin(None, None, None, model=model)
    measured = {}
    for step in range(1, 26):  # logging_steps 1: a log after every step
        with torch.no_grad():
            model.weight[0, 0] += 1.0  # one of 20 weights moves
        logs = {"loss": 0.69}
        callback.on_log(None, SimpleNamespace(global_step=step), None, logs=logs)
        if "weights/changed_share" in logs:
            measured[step] = logs["weights/changed_share"]
    closing = {"train_runtime": 1.0}
    callback.on_log(None, SimpleNamespace(global_step=25), None, logs=closing)
    assert measured == {1: 1 / 20, 11: 1 / 20, 21: 1 / 20}
    assert closing["weights/changed_share"] == 1 / 20 and closing["weights/relative_change"] > 0


def preset_argv(tmp_path, tiny_model_dir, preset):
    write_jsonl(tmp_path / "data" / "train.jsonl", rows_in_format("messages", 48))
    write_jsonl(tmp_path / "data" / "test.jsonl", rows_in_format("messages", 4, seed=5))
    return ["train", "--preset", preset, "--model_name_or_path", str(tiny_model_dir), "--dataset_name",
            str(tmp_path / "data"), "--runs_dir", str(tmp_path / "runs"), "--run_name", preset, "--max_steps", "3",
            "--eval_strategy", "no", "--save_strategy", "no", "--dataloader_pin_memory", "false"]  # fmt: skip


def changed_share(final_dir, base_dir, dtype) -> float:
    """Share of weights that differ from the initial weights cast to the run's dtype (a cast is not a change)."""
    from transformers import AutoModelForCausalLM

    trained = AutoModelForCausalLM.from_pretrained(final_dir, dtype=dtype).state_dict()
    initial = AutoModelForCausalLM.from_pretrained(base_dir, dtype=dtype).state_dict()
    changed = sum(int((trained[k] != initial[k]).sum()) for k in initial)
    return changed / sum(v.numel() for v in initial.values())


@pytest.mark.parametrize("preset", ["smoke", "full", "demo"])
def test_every_full_model_preset_moves_the_weights_at_its_own_settings(tmp_path, tiny_model_dir, preset, capsys):
    from dpolab.config import parse_train_args
    from dpolab.models import torch_dtype

    argv = preset_argv(tmp_path, tiny_model_dir, preset)
    config = parse_train_args(argv[1:])
    assert main(argv) == 0
    assert "WARNING" not in capsys.readouterr().err
    share = changed_share(tmp_path / "runs" / preset / "final", tiny_model_dir, torch_dtype(config.model.dtype))
    assert share > 0.95, f"{preset} ({config.model.dtype}, lr {config.training.learning_rate}): {share:.1%} changed"
    summary = json.loads((tmp_path / "runs" / preset / "summary.json").read_text())
    assert summary["weights"]["weights/changed_share"] > 0.95
    assert "weights barely moved" not in [finding["name"] for finding in summary["diagnostics"]]


def test_the_lora_preset_trains_float32_adapters(tmp_path, tiny_model_dir):
    from safetensors.torch import load_file

    argv = preset_argv(tmp_path, tiny_model_dir, "lora")
    assert main(argv) == 0
    adapter = load_file(tmp_path / "runs" / "lora" / "final" / "adapter_model.safetensors")
    assert {tensor.dtype for tensor in adapter.values()} == {torch.float32}  # peft keeps adapters in float32
    lora_b = [tensor for name, tensor in adapter.items() if "lora_B" in name]
    assert lora_b and all(tensor.abs().sum() > 0 for tensor in lora_b)  # B starts at zero: every one moved
    summary = json.loads((tmp_path / "runs" / "lora" / "summary.json").read_text())
    assert summary["weights"]["weights/changed_share"] > 0.95


def test_bf16_weights_with_plain_adamw_are_warned_and_diagnosed(tmp_path, tiny_model_dir, capsys):
    argv = preset_argv(tmp_path, tiny_model_dir, "smoke") + ["--dtype", "bfloat16", "--logging_steps", "1"]
    assert main(argv) == 0
    output = capsys.readouterr()
    assert "WARNING: bfloat16 weights with plain adamw_torch_fused at learning_rate 5e-07" in output.err
    assert "rounds away" in output.err and "dtype: float32" in output.err
    assert "DIAGNOSTIC weights barely moved" in output.out
    summary = json.loads((tmp_path / "runs" / "smoke" / "summary.json").read_text())
    assert summary["weights"]["weights/changed_share"] < 0.1
    assert changed_share(tmp_path / "runs" / "smoke" / "final", tiny_model_dir, torch.bfloat16) < 0.1
    assert main(["report", str(tmp_path / "runs" / "smoke")]) == 0
    assert "<b>weights barely moved</b>" in (tmp_path / "runs" / "smoke" / "report.html").read_text()


def test_a_model_that_computes_nan_is_stopped_by_its_dpo_metrics(tmp_path, tiny_config, tiny_model_dir, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    broken = tmp_path / "nan-model"
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight[0, 0] = float("nan")
    model.save_pretrained(broken)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(broken)
    data = write_jsonl(tmp_path / "d.jsonl", rows_in_format("messages", 12))
    config = tiny_config(data, model_name_or_path=str(broken), precompute_ref_log_probs=False, max_grad_norm=0.0)
    assert main(["train", "--config", str(config)]) == 2
    message = capsys.readouterr().err
    # caught in what TRL computed in the forward (entropy, rewards/*, logps/*), not in the filtered loss
    assert re.search(r"Training stopped at step 1: (entropy|rewards/\w+|logps/\w+|logits/\w+) is nan", message)
    assert not (tmp_path / "runs" / "tiny" / "final").exists()


def test_the_guard_lets_fp16_overflow_steps_pass_but_not_nan_metrics():
    from types import SimpleNamespace

    from dpolab.callbacks import RunGuard, non_finite_value

    overflow = {"loss": 0.6, "grad_norm": float("inf"), "rewards/margins": 0.1}
    assert non_finite_value(overflow, routine_overflow=True) is None
    assert non_finite_value(overflow, routine_overflow=False) == ("grad_norm", float("inf"))
    nan_metric = {"loss": 0.0, "grad_norm": 1.0, "rewards/chosen": float("nan")}
    assert non_finite_value(nan_metric, routine_overflow=True) == ("rewards/chosen", nan_metric["rewards/chosen"])

    skipped = [True]
    guard = RunGuard(step_was_skipped=lambda: skipped[0])
    state, control = SimpleNamespace(global_step=7), SimpleNamespace(should_save=True, should_training_stop=False)
    guard.on_step_end(SimpleNamespace(fp16=True), state, control)
    guard.on_log(SimpleNamespace(fp16=True), state, control, logs=dict(overflow))
    assert not control.should_training_stop and guard.skipped_steps == 1 and guard.non_finite is None
    skipped[0] = False  # bf16/fp32 never skip: an infinite gradient norm is a real problem there
    guard.on_step_end(SimpleNamespace(fp16=False), state, control)
    guard.on_log(SimpleNamespace(fp16=False), state, control, logs=dict(overflow))
    assert control.should_training_stop and guard.non_finite == (7, "grad_norm", math.inf)


def test_eval_follows_a_bf16_autocast_run_and_equals_its_trainer(tmp_path, tiny_config):
    """bf16 autocast rounds every matmul's inputs to 8 significant bits, so a float32 eval of a bf16 run differs from
    the trainer (log-prob sums off by 3e-4 to 1.6e-3 on a CPU with AMX, whose bf16 kernels accumulate in float32;
    ~1e-2 on CPUs without); eval at the run's precision runs the same packed forward under the same autocast on the
    same batches: its log-probs agree to float noise (~4e-6 of -81), and every metric within 1e-3 (the margins also
    hold the reference's bf16 log-probs, scored in the trainer's padded batches)."""
    write_jsonl(tmp_path / "data" / "train.jsonl", rows_in_format("messages", 16))
    write_jsonl(tmp_path / "data" / "test.jsonl", rows_in_format("messages", 7, seed=3))
    config = tiny_config(tmp_path / "data", eval_split="test", eval_strategy="steps", eval_steps=100, max_steps=3,
                         per_device_eval_batch_size=3, learning_rate=5e-3, bf16=True, use_cpu=True)  # fmt: skip
    assert main(["train", "--config", str(config)]) == 0
    run_dir = tmp_path / "runs" / "tiny"
    logged = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in logged if "eval_loss" in r][-1]
    assert main(["eval", "--model", str(run_dir)]) == 0
    summary = json.loads((run_dir / "eval" / "final" / "eval.json").read_text())
    assert summary["settings"]["bf16"] is True
    for key in ("rewards/margins", "logps/chosen", "logps/rejected"):
        assert summary["trainer_equivalent"][key] == pytest.approx(logged[f"eval_{key}"], abs=1e-3), key
    assert main(["eval", "--model", str(run_dir), "--bf16", "false", "--output_dir", str(tmp_path / "fp32")]) == 0
    fp32 = json.loads((tmp_path / "fp32" / "eval.json").read_text())

    def largest_logps_gap(scored):
        trainer = scored["trainer_equivalent"]
        return max(abs(trainer[key] - logged[f"eval_{key}"]) for key in ("logps/chosen", "logps/rejected"))

    at_run_precision, in_float32 = largest_logps_gap(summary), largest_logps_gap(fp32)
    # eval at the run's precision is 10x closer to the trainer's log-probs than float32 scoring
    assert in_float32 > 10 * max(at_run_precision, 1e-5), (at_run_precision, in_float32)


def test_zero_and_false_overrides_are_honoured_by_eval(tmp_path, tiny_config, capsys):
    write_jsonl(tmp_path / "data" / "train.jsonl", rows_in_format("messages", 12))
    write_jsonl(tmp_path / "data" / "test.jsonl", rows_in_format("messages", 5, seed=3))
    config = tiny_config(tmp_path / "data", eval_split="test", loss_type=["robust"], label_smoothing=0.2,
                         max_steps=2, learning_rate=5e-3)  # fmt: skip
    assert main(["train", "--config", str(config)]) == 0
    run_dir = tmp_path / "runs" / "tiny"
    assert main(["eval", "--model", str(run_dir), "--output_dir", str(tmp_path / "a")]) == 0
    assert main(["eval", "--model", str(run_dir), "--label_smoothing", "0", "--output_dir", str(tmp_path / "b")]) == 0
    smoothed, plain = (json.loads((tmp_path / n / "eval.json").read_text()) for n in "ab")
    assert smoothed["settings"]["label_smoothing"] == 0.2 and plain["settings"]["label_smoothing"] == 0.0
    assert smoothed["trainer_equivalent"]["loss"] != plain["trainer_equivalent"]["loss"]
    assert main(["eval", "--model", str(run_dir), "--limit", "0"]) == 2
    assert "--limit must be >= 1" in capsys.readouterr().err


def test_settings_eval_cannot_reproduce_are_refused(tmp_path, tiny_config, capsys):
    data = write_jsonl(tmp_path / "data" / "test.jsonl", rows_in_format("messages", 4))
    base = str(tmp_path.parent)  # any path: refused before anything loads
    assert main(["eval", "--model", base, "--ref", base, "--data", str(data.parent), "--use_weighting", "true"]) == 2
    assert "use_weighting (WPO) is not reproduced" in capsys.readouterr().err
