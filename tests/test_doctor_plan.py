"""`dpolab doctor` on this machine and on made-up environments; `dpolab plan`'s arithmetic by hand."""

import re
import subprocess
import sys
from dataclasses import replace

import pytest
from conftest import out_of_memory, rows_in_format, write_jsonl

from dpolab import plan
from dpolab.doctor import (
    ERROR,
    OK,
    WARN,
    compile_check,
    fast_path_check,
    python_check,
    requirement_conflicts,
    version_checks,
)
from dpolab.plan import (
    KNOWN_CONFIGS,
    ModelShape,
    RunShape,
    activation_bytes_per_token_layer,
    batch_token_peak,
    estimate,
    fit,
    peak_reserved,
    reserved,
    shape_from_config,
)


def test_doctor_on_this_machine_reports_the_build_and_passes():
    result = subprocess.run([sys.executable, "-m", "dpolab.cli", "doctor"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout
    import torch

    build = "CPU-only build" if torch.version.cuda is None else f"CUDA {torch.version.cuda}"
    assert f"torch build       {torch.__version__} ({build})" in result.stdout
    for package in ("transformers", "trl", "accelerate", "peft", "datasets", "numpy"):
        assert f"ok    {package}" in result.stdout
    assert "0 error(s)" in result.stdout


def test_doctor_says_whether_torch_compile_can_work_here():
    assert compile_check(True, has_triton=True, cxx=None).status == OK
    missing = compile_check(True, has_triton=False, cxx="/usr/bin/g++")  # a GPU needs Triton, not g++
    assert (missing.status, missing.fix) == (WARN, "pip install triton") and "would fail" in missing.detail
    assert compile_check(False, has_triton=False, cxx="/usr/bin/g++").status == OK
    no_compiler = compile_check(False, has_triton=True, cxx=None)
    assert no_compiler.status == WARN and "no C++ compiler" in no_compiler.detail and "g++" in no_compiler.fix


def test_doctor_says_which_attention_the_fast_path_takes_on_this_gpu():
    h100, a100, t4 = fast_path_check((9, 0)), fast_path_check((8, 0)), fast_path_check((7, 5))
    assert h100.status == a100.status == OK and "FlexAttention and compiled decoder layers" in a100.detail
    assert t4.status == WARN and t4.detail.startswith("this GPU's compute capability 7.5 is below 8.0")
    assert t4.detail.endswith("SDPA with a dense mask, uncompiled (slower; the same numbers)")


def test_doctor_flags_missing_and_mismatched_versions_with_the_fix():
    checks = version_checks({"trl": "1.16.0", "transformers": "4.46.0", "numpy": None},
                            {"trl": "1.16.0", "transformers": "5.24.0", "numpy": "2.4.6"})  # fmt: skip
    by_name = {check.name: check for check in checks}
    assert by_name["trl"].status == OK
    assert by_name["transformers"].status == WARN and by_name["transformers"].fix == "pip install transformers==5.24.0"
    assert by_name["numpy"].status == ERROR and "constraints.txt" in by_name["numpy"].fix
    assert python_check("3.12.1").status == ERROR and python_check("3.11.7").status == OK


def test_doctor_finds_known_bad_combinations_in_package_metadata():
    requirements = {"trl": ["transformers>=5.0", "accelerate>=1.4", "pytest; extra == 'test'"]}
    checks = requirement_conflicts(requirements, {"transformers": "4.57.1", "accelerate": "1.15.0", "pytest": "1.0"})
    assert [check.name for check in checks] == ["trl needs transformers"]
    assert checks[0].status == ERROR and "transformers>=5.0" in checks[0].detail and "4.57.1" in checks[0].detail


QWEN = shape_from_config(KNOWN_CONFIGS["Qwen/Qwen2-0.5B-Instruct"])


def test_qwen2_parameter_count_by_hand():
    # embeddings 151936 * 896 = 136,134,656 (tied); per layer: q 896*896+896, k and v 896*128+128 each,
    # o 896*896, MLP 3*896*4864, two norms 2*896 -> 14,912,384; 24 layers; final norm 896.
    assert QWEN.kv_dim == 128
    assert QWEN.params == 136_134_656 + 24 * 14_912_384 + 896 == 494_032_768


def test_memory_components_by_hand():
    tiny = ModelShape(hidden=8, intermediate=16, layers=2, heads=2, kv_heads=1, vocab=100, tied=True, qkv_bias=False)
    # kv_dim = 1 head * 4 = 4. params: embeddings 100*8 = 800; per layer: q 8*8 + k,v 2*8*4 + o 8*8 + MLP 3*8*16
    # + norms 2*8 = 64 + 64 + 64 + 384 + 16 = 592; two layers 1184; final norm 8: 1992
    assert tiny.params == 1992
    # per token and layer, bf16 weights: two norms 2*(fp32 in 4*8 + out 2*8 + fp32 inverse RMS 4) = 104; the
    # projections' inputs, one per norm, 2*2*8 = 32; q and attention output 2*2*8 = 32, k and v 2*2*4 = 16 (2 query
    # heads: a power of two, not repeated), logsumexp 4*2 = 8; MLP 4*2*16 = 128
    assert activation_bytes_per_token_layer(tiny) == 320
    # float32 weights under autocast: float32 norm outputs (+2*2*8) and q, k, v, gate, up each cast their own input
    # (5 instead of 2 bf16 copies: +3*2*8)
    assert activation_bytes_per_token_layer(tiny, residual_bytes=4) == 320 + 32 + 48 == 400
    # compiled layers (inductor recomputes pointwise results): the layer's fp32 input 4*8, the norms' inverse RMS
    # 2*4, the bf16 inputs of the attention, o_proj and the MLP 3*2*8, attention as eager 56, the MLP's gate, up and
    # product 3*2*16
    assert activation_bytes_per_token_layer(tiny, residual_bytes=4, compiled=True) == 32 + 8 + 48 + 56 + 96 == 240
    # Qwen2-0.5B: 14 query heads (not a power of two) over 2 key/value heads, so k and v are kept repeated to 896
    # wide: compiled 4h + 8 + 3*2h + (2*2h + 2*2h + 4*14) + 3*2i; eager 2*(4h + 4h + 4) + 5*2h + the same attention
    # + 4*2i
    assert activation_bytes_per_token_layer(QWEN, residual_bytes=4, compiled=True) == 45_376
    assert activation_bytes_per_token_layer(QWEN, residual_bytes=4) == 69_440
    # varlen_attn keeps k and v grouped (2 heads, 128 wide), gathered per sequence, counted twice: 2*2*(2*128)
    # instead of 2*2*896
    assert activation_bytes_per_token_layer(QWEN, 4, compiled=True, grouped_kv=True) == 45_376 - 2 * 2 * (896 - 256)
    compiled = estimate(tiny, RunShape(3, 10, 1, False, 4, autocast=True, compiled=True, tokens=40))
    assert compiled["activations (all layers kept, 40 tokens, compiled layers)"] == 40 * 2 * 240
    run = RunShape(batch=3, max_length=10, accumulation=1, checkpointing=False, weight_bytes=2)
    parts = estimate(tiny, run)
    tokens = 2 * 3 * 10  # worst case: chosen and rejected rows max_length long
    assert parts["weights (policy)"] == 1992 * 2 == parts["reference model"]
    # accumulation 1: only the head's gradient exists at the peak
    assert parts["gradients (at the peak: the LM head's bf16 copy)"] == 100 * 8 * 2
    assert parts["optimizer states (AdamW)"] == 2 * 1992 * 2
    assert parts[f"activations (all layers kept, {tokens} tokens)"] == tokens * 2 * 320
    # TRL's chunked head: one fp32 tile of (scored tokens, at most 4096) x (vocabulary, at most 32768), plus the
    # head's fp32 gradient; about half the tokens are scored
    assert parts["LM head: fp32 logits tile + head gradient"] == 30 * 100 * 4 + 100 * 8 * 4
    checkpointed = estimate(tiny, RunShape(3, 10, 1, True, 2))
    assert checkpointed[f"activations (checkpointed, {tokens} tokens)"] == tokens * (2 * 2 * 8 + 320)
    accumulated = estimate(tiny, RunShape(3, 10, 2, False, 2))
    assert accumulated["gradients"] == 1992 * 2  # kept between micro-batches
    master = estimate(tiny, RunShape(3, 10, 1, False, 4, autocast=True, precompute_ref=True, tokens=40))
    assert master["bf16 weight copies (autocast)"] == 1992 * 2 and master["reference model"] == 0
    # with checkpointing the forward keeps no weight copy; the layer recomputed in the backward keeps its own
    master_checkpointed = estimate(tiny, RunShape(3, 10, 1, True, 4, autocast=True, precompute_ref=True, tokens=40))
    assert tiny.layer_params == 592 and master_checkpointed["bf16 weight copies (autocast)"] == 592 * 2
    # float32 weights: the head's fp32 accumulator (LM head row) is its gradient
    assert master["gradients (at the peak: the LM head's, in its line below)"] == 0
    assert master["activations (all layers kept, 40 tokens)"] == 40 * 2 * 400
    lora = estimate(tiny, RunShape(3, 10, 1, False, 2, peft=True, lora_r=4, precompute_ref=True))
    assert lora["reference model"] == 0 and lora["gradients"] == 2 * 4 * (16 + 12) * 4
    # the fast path under SDPA: one 40 x 40 additive mask for every layer, in autocast's bf16 or the weights' dtype
    dense = estimate(tiny, RunShape(3, 10, 1, False, 4, autocast=True, tokens=40, dense_mask=True))
    assert dense["attention mask (SDPA: tokens x tokens, one for all layers)"] == 40 * 40 * 2
    assert (
        estimate(tiny, RunShape(3, 10, 1, False, 4, tokens=40, dense_mask=True))[
            "attention mask (SDPA: tokens x tokens, one for all layers)"
        ]
        == 40 * 40 * 4
    )
    assert set(dense) - set(master) == {"attention mask (SDPA: tokens x tokens, one for all layers)"}
    assert reserved(1000) == 1100 + plan.CUDA_CONTEXT_BYTES


def test_fit_keeps_the_global_batch_and_prefers_no_checkpointing():
    run = RunShape(batch=16, max_length=1024, accumulation=1, checkpointing=True, weight_bytes=4, autocast=True,
                   precompute_ref=True)  # fmt: skip
    best = fit(QWEN, run, 24 * 2**30)  # the worst case: every sequence 1024 tokens long
    assert best.batch * best.accumulation == 16 and not best.checkpointing
    assert peak_reserved(QWEN, best) <= 24 * 2**30 < peak_reserved(QWEN, replace(best, batch=best.batch * 2))
    short = fit(QWEN, run, 24 * 2**30, tokens_for_batch=lambda b: 100 * b)  # short pairs: the whole batch fits
    assert (short.batch, short.accumulation, short.checkpointing, short.tokens) == (16, 1, False, 1600)
    tight = fit(QWEN, run, 12 * 2**30)  # only checkpointing makes room
    assert tight is not None and tight.checkpointing
    assert fit(QWEN, run, 2 * 2**30) is None  # nothing fits 2 GiB


def test_batch_token_peak_by_hand():
    pairs = [(10, 5, 7)] * 50  # every pair alike: any batch of 4 holds the same tokens
    assert batch_token_peak(pairs, 4, packed=True, micro_batches=10) == 4 * 22  # prompt once, both answers
    assert batch_token_peak(pairs, 4, True, 10, row_multiple=64) == 128  # the collator rounds 88 up to 128
    assert batch_token_peak(pairs, 4, False, 10, row_multiple=64) == 2 * 4 * 17  # padded rows: not rounded
    assert batch_token_peak(pairs, 4, False, 10) == 2 * 4 * 17  # TRL: 8 rows padded to prompt + longer answer
    # one long pair in 1,000: a run of 10 micro-batches of 4 draws it with a chance of 1 - 0.999^40 = 3.9%, 20 such
    # runs with 55%; a run of 1,000 micro-batches (a 4,000-pair epoch) almost surely (1 - 0.999^4000 = 98.2%)
    mixed = [(10, 5, 7)] * 999 + [(10, 500, 500)]
    assert batch_token_peak(mixed, 4, True, micro_batches=1000) == 3 * 22 + 1010
    assert batch_token_peak(mixed, 4, True, micro_batches=1, runs=1) == 4 * 22


def test_the_planned_micro_batch_is_one_a_run_rarely_exceeds():
    """Over 1,000 runs of a whole epoch, the share whose largest micro-batch exceeds `batch_token_peak`'s (20
    simulated runs): about 1 in 21, where the 99.9th percentile of a micro-batch (the previous rule) is exceeded
    by nearly every run of 3,883 micro-batches (1 - 0.999^3883 = 98%)."""
    import numpy

    rng = numpy.random.default_rng(1)
    lengths = [(int(p), int(c), int(r)) for p, c, r in numpy.exp(rng.uniform(numpy.log(20), numpy.log(400), (2000, 3)))]
    planned = batch_token_peak(lengths, 16, True, micro_batches=3883)
    array = numpy.asarray(lengths).sum(axis=1)
    run_peaks = numpy.array([array[rng.integers(0, 2000, (3883, 16))].sum(axis=1).max() for _ in range(1000)])
    assert 0.01 < (run_peaks > planned).mean() < 0.12
    typical = numpy.quantile(array[rng.integers(0, 2000, (20000, 16))].sum(axis=1), 0.999)
    assert (run_peaks > typical).mean() > 0.9


def test_plan_command_for_the_full_preset(capsys):
    from dpolab.cli import main

    assert main(["plan", "--preset", "full"]) == 0
    out = capsys.readouterr().out
    assert "494M parameters" in out and "LM head: fp32 logits tile" in out and "bf16 weight copies" in out
    assert "fits 24 GiB" in out and "recommended for 24 GiB (same global batch 16)" in out
    assert "compiled layers on" in out  # what `dpolab train` does on a GPU (train.choose_torch_compile)
    assert "not counted" not in out
    assert main(["plan", "--preset", "full", "--torch_compile_mode", "reduce-overhead"]) == 0
    assert "not counted: the memory pool of the CUDA graphs" in capsys.readouterr().out  # not measured yet
    assert main(["plan", "--preset", "full", "--torch_compile", "false"]) == 0
    out = capsys.readouterr().out
    assert "compiled layers off" in out and "attention mask" not in out  # FlexAttention: no dense mask
    assert main(["plan", "--preset", "full", "--attn_implementation", "sdpa", "--torch_compile", "false"]) == 0
    assert "attention mask (SDPA: tokens x tokens, one for all layers)" in capsys.readouterr().out
    assert main(["plan", "--preset", "smoke"]) == 0  # 60 steps see 480 of 62,135 pairs: train keeps the reference
    out = capsys.readouterr().out  # (train.choose_reference_pass; without the data, the larger case)
    assert "precomputed reference off" in out and re.search(r"reference model +1\.84 GiB", out)
    assert main(["plan", "--preset", "lora"]) == 0
    assert "compiled layers off" in capsys.readouterr().out  # not measured with LoRA: train leaves it off
    assert main(["plan", "--preset", "full", "--gpu_memory_gib", "80"]) == 0
    assert "--per_device_train_batch_size 16 --gradient_accumulation_steps 1" in capsys.readouterr().out
    assert main(["plan", "--model_name_or_path", "someone/unknown-model"]) == 2
    assert "No config for 'someone/unknown-model'" in capsys.readouterr().err


def test_plan_reads_a_gguf_models_shape(capsys):
    """The demo's model is a .gguf: plan reads its shape from the file's metadata. SmolLM2-135M by hand: embeddings
    49,152 x 576 (tied) + 30 layers of (576 x 576 x 2 + 576 x 192 x 2 + 3 x 576 x 1,536 + 2 x 576) + 576 = 134.5M."""
    from dpolab import demo
    from dpolab.cli import main

    assert main(["plan", "--model_name_or_path", str(demo.find_gguf())]) == 0
    assert "135M parameters" in capsys.readouterr().out


def test_plan_command_plans_for_the_data_at_hand(tmp_path, tiny_config, tiny_model_dir, monkeypatch, capsys):
    """With the data and tokenizer at hand, `dpolab plan` plans for the largest micro-batch of the run's data, not
    every sequence max_length long, and recommends what `dpolab train` (fit_to_memory) then chooses on a card of that
    size. Every pair here is the same, so each micro-batch of b pairs holds b x (prompt + chosen + rejected) tokens,
    the packed row rounded up to 64 (compiled layers)."""
    import torch

    from dpolab.cli import main
    from dpolab.config import parse_train_args
    from dpolab.models import load_tokenizer
    from dpolab.train import check_tokens, fit_to_memory, load_train_eval

    prompt = [{"role": "user", "content": "What is 12 + 30?"}]
    chosen, rejected = [{"role": "assistant", "content": "42."}], [{"role": "assistant", "content": "43, I think."}]
    data = write_jsonl(tmp_path / "same.jsonl", [{"prompt": prompt, "chosen": chosen, "rejected": rejected}] * 16)
    tokenizer = load_tokenizer(str(tiny_model_dir))
    prompt_tokens = len(tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True)["input_ids"])
    answers = [len(tokenizer.apply_chat_template(prompt + answer, tokenize=True)["input_ids"]) - prompt_tokens
               for answer in (chosen, rejected)]  # fmt: skip
    pair_tokens = prompt_tokens + sum(answers)
    config_file = tiny_config(data, per_device_train_batch_size=8, max_length=128)

    assert main(["plan", "--config", str(config_file), "--torch_compile", "true", "--gpu_memory_gib", "80"]) == 0
    out = capsys.readouterr().out
    tokens = -(-8 * pair_tokens // 64) * 64
    assert f"micro-batch: {tokens:,} tokens, the largest a run of 3 steps is likely to meet" in out
    assert "--per_device_train_batch_size 8 --gradient_accumulation_steps 1" in out and f", {tokens:,} tokens)" in out
    assert "`dpolab train` chooses the same" in out and "precomputed reference on" in out  # 3 steps see 24 of 16

    budget = (plan.CUDA_CONTEXT_BYTES + 3 * 2**20) / 2**30  # too small for 8 pairs at once (the test below)
    argv = ["--config", str(config_file), "--torch_compile", "true", "--gpu_memory_gib", str(budget)]
    assert main(["plan", *argv]) == 0
    recommended = re.search(r"--per_device_train_batch_size (\d+) --gradient_accumulation_steps (\d+) "
                            r"--activation_checkpointing (\w+)", capsys.readouterr().out).groups()  # fmt: skip
    assert int(recommended[0]) < 8
    config = parse_train_args(argv)
    lengths = check_tokens(config, tokenizer, load_train_eval(config)[0])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a pretend H100 for fit_to_memory
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda: (80 * 2**30, 80 * 2**30))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *device: (9, 0))
    chosen_setting = fit_to_memory(config, str(tiny_model_dir), lengths, 16)
    assert recommended == (str(chosen_setting["per_device_train_batch_size"]),
                           str(chosen_setting["gradient_accumulation_steps"]),
                           str(chosen_setting["activation_checkpointing"]).lower())  # fmt: skip
    monkeypatch.undo()  # this machine's torch again, to parse configs
    missing = tmp_path / "nowhere.jsonl"
    assert main(["plan", "--config", str(tiny_config(missing, per_device_train_batch_size=8, max_length=128))]) == 0
    out = capsys.readouterr().out
    assert f"micro-batch: {2 * 8 * 128:,} tokens, every sequence max_length long (the worst case): the data or " in out
    assert "is not at hand here (" in out and "nowhere.jsonl" in out


def test_train_fits_the_micro_batch_to_the_card(tmp_path, tiny_config, tiny_model_dir, monkeypatch, capsys):
    """fit_to_memory on a pretend card with 3 MiB beyond the CUDA context: the tiny model's 8 pairs do not fit in one
    micro-batch, so it splits them, keeping 8 pairs per optimizer step; it plans for the largest micro-batch of
    simulated runs as long as this one (3 steps; 3 epochs). On a GPU older than compute capability 8.0 the fast
    path's SDPA mask is planned too; with eager attention, TRL's padded rows (the fast path declines it)."""
    import torch

    from dpolab.config import parse_train_args
    from dpolab.models import load_tokenizer
    from dpolab.train import check_tokens, fit_to_memory, load_train_eval

    real_fit = plan.fit
    data = write_jsonl(tmp_path / "d.jsonl", rows_in_format("messages", 16))
    budget = (plan.CUDA_CONTEXT_BYTES + 3 * 2**20) / 2**30
    config = parse_train_args(["--config", str(tiny_config(data)), "--per_device_train_batch_size", "8",
                               "--gpu_memory_gib", str(budget)])  # fmt: skip
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda: (80 * 2**30, 80 * 2**30))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *device: (9, 0))
    planned = []
    monkeypatch.setattr(plan, "fit", lambda model, shape, *args: planned.append(shape) or real_fit(model, shape, *args))
    drawn = []  # (pairs per micro-batch, micro-batches a simulated run draws)
    real_peak = plan.batch_token_peak

    layouts = []  # packed (the fast path's rows) or not (TRL's padded rows)

    def peak_spy(pairs, batch, packed, micro_batches, **kwargs):
        drawn.append((batch, micro_batches))
        layouts.append(packed)
        return real_peak(pairs, batch, packed, micro_batches, **kwargs)

    monkeypatch.setattr(plan, "batch_token_peak", peak_spy)
    lengths = check_tokens(config, load_tokenizer(str(tiny_model_dir)), load_train_eval(config)[0])
    chosen = fit_to_memory(config, str(tiny_model_dir), lengths, 16)
    assert planned[-1].dense_mask is False  # FlexAttention on this pretend H100
    assert (8, 3) in drawn and all(runs == -(-3 * 8 // batch) for batch, runs in drawn)  # max_steps 3 of 8 pairs
    assert chosen["per_device_train_batch_size"] * chosen["gradient_accumulation_steps"] == 8
    assert 1 < chosen["per_device_train_batch_size"] < 8 and not chosen["activation_checkpointing"]
    assert config.training.per_device_train_batch_size == chosen["per_device_train_batch_size"]
    out = capsys.readouterr().out
    assert "fit_to_memory: per_device_train_batch_size" in out and "not counted" not in out
    config.training.torch_compile, config.training.torch_compile_mode = True, "reduce-overhead"
    config.script.gpu_memory_gib = 80  # rows rounded to 512 tokens: more than the pretend card above
    fit_to_memory(config, str(tiny_model_dir), lengths, 16)
    assert "; the CUDA graphs memory pool not counted)" in capsys.readouterr().out
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *device: (7, 5))  # a T4: SDPA's dense mask
    config.training.max_steps, config.training.num_train_epochs = -1, 3  # 3 epochs of 16 pairs: 6 steps of 8
    drawn.clear()
    fit_to_memory(config, str(tiny_model_dir), lengths, 16)
    assert planned[-1].dense_mask is True
    assert (8, 6) in drawn and all(runs == -(-48 // batch) for batch, runs in drawn)
    assert all(layouts)
    layouts.clear()
    config.model.attn_implementation = "eager"  # the fast path declines it (packing.unsupported_reason): TRL's rows
    fit_to_memory(config, str(tiny_model_dir), lengths, 16)
    assert layouts and not any(layouts) and planned[-1].dense_mask is False


def train_out_of_memory(tmp_path, tiny_config, capsys, *argv, pairs=8, **overrides) -> str:
    """`dpolab train` of the tiny model where a method patched to `out_of_memory` runs: one clear error (exit code
    2, no traceback), returned."""
    from dpolab.cli import main

    data = write_jsonl(tmp_path / "d.jsonl", rows_in_format("messages", pairs))
    assert main(["train", "--config", str(tiny_config(data, **overrides)), *argv]) == 2
    message = capsys.readouterr().err
    assert "Traceback" not in message
    return message


def test_out_of_memory_names_a_setting_that_fits_and_the_checkpoint(tmp_path, tiny_config, monkeypatch, capsys):
    from trl import DPOTrainer

    monkeypatch.setattr(DPOTrainer, "train", out_of_memory)
    message = train_out_of_memory(tmp_path, tiny_config, capsys)
    assert "CUDA ran out of memory at step 0 (micro-batch 4 x accumulation 1" in message
    # fit_to_memory would choose the split that ran out again: the setting turns it off
    assert "--per_device_train_batch_size 2 --gradient_accumulation_steps 2 --fit_to_memory false;" in message
    assert "no checkpoint was saved yet" in message
    message = train_out_of_memory(tmp_path, tiny_config, capsys, "--fit_to_memory", "false", "--run_name", "unfit")
    assert "--per_device_train_batch_size 2 --gradient_accumulation_steps 2; no checkpoint" in message
    graphs = ["--torch_compile", "true", "--torch_compile_backend", "aot_eager", "--torch_compile_mode",
              "reduce-overhead", "--run_name", "graphs"]  # fmt: skip
    message = train_out_of_memory(tmp_path, tiny_config, capsys, *graphs)
    assert "not count; without them (the layers compiled one by one): without torch_compile_mode (drop" in message


def test_out_of_memory_in_the_reference_pre_pass_names_its_batch_size(tmp_path, tiny_config, monkeypatch, capsys):
    from trl import DPOTrainer

    monkeypatch.setattr(DPOTrainer, "compute_ref_log_probs", out_of_memory)
    message = train_out_of_memory(tmp_path, tiny_config, capsys)
    assert "CUDA ran out of memory in the reference pre-pass (train data, 4 pairs per batch)" in message
    assert "run the same command with --precompute_ref_batch_size 2" in message
    assert not (tmp_path / "runs" / "tiny").exists()  # a run that never started leaves nothing


def evaluation_loop(*args, **kwargs):
    """transformers' evaluation loop as it fails when the card is full, named as its own: the frame the message
    looks for."""
    out_of_memory()


def test_out_of_memory_in_an_evaluation_names_the_eval_batch(tmp_path, tiny_config, monkeypatch, capsys):
    from transformers import Trainer

    monkeypatch.setattr(Trainer, "evaluation_loop", evaluation_loop)
    message = train_out_of_memory(tmp_path, tiny_config, capsys, pairs=12, eval_holdout=0.25, eval_strategy="steps",
                                  eval_steps=2, save_strategy="steps", save_steps=1)  # fmt: skip
    assert "CUDA ran out of memory at step 2 (micro-batch 4 x accumulation 1" in message
    assert "It ran out in an evaluation (4 pairs per eval batch); smaller eval batches: " in message
    last = tmp_path / "runs" / "tiny" / "checkpoint-1"  # the evaluation at step 2 runs before step 2's save
    assert f"then resume from {last} with the same command plus --resume, --per_device_eval_batch_size 2." in message


def test_out_of_memory_in_the_evaluation_after_training_names_the_eval_batch(tmp_path, tiny_config, monkeypatch,
                                                                             capsys):  # fmt: skip
    """The last evaluation dpolab runs itself (eval_delay past the end: the Trainer evaluated at no step) is guarded
    as the Trainer's are: one message with the eval batch to halve and the checkpoint the run ended with."""
    from transformers import Trainer

    monkeypatch.setattr(Trainer, "evaluation_loop", evaluation_loop)
    message = train_out_of_memory(tmp_path, tiny_config, capsys, pairs=12, eval_holdout=0.25, eval_strategy="steps",
                                  eval_steps=1, eval_delay=100, save_strategy="steps", save_steps=3)  # fmt: skip
    assert "CUDA ran out of memory at step 3 (micro-batch 4 x accumulation 1" in message
    last = tmp_path / "runs" / "tiny" / "checkpoint-3"
    assert f"then resume from {last} with the same command plus --resume, --per_device_eval_batch_size 2." in message
    assert not (tmp_path / "runs" / "tiny" / "final").exists()


@pytest.mark.parametrize("weights, compiled", [("float32", False), ("bfloat16", False), ("float32", True)])
def test_activations_per_token_are_what_a_real_layer_keeps(weights, compiled):
    """The plan's activation count against the tensors a Qwen2 decoder layer really saves for its backward (float32
    weights under bf16 autocast, or bf16 weights; eager or compiled by inductor), counted with saved-tensor hooks:
    each storage once, the weights (and autocast's copies of them) and the rotary tables (one per model) left out,
    per token as the difference between two lengths."""
    import torch
    from transformers import Qwen2Config
    from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer, Qwen2RotaryEmbedding

    config = Qwen2Config(hidden_size=64, intermediate_size=176, num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=100, attn_implementation="sdpa")  # fmt: skip
    dtype = getattr(torch, weights)
    layer = Qwen2DecoderLayer(config, 0).to(dtype).train()
    if compiled:
        layer.compile(dynamic=True)
    rotary = Qwen2RotaryEmbedding(config)

    def kept_bytes(length: int) -> int:
        hidden = torch.randn(1, length, 64, dtype=dtype, requires_grad=True)
        position_ids = torch.arange(length)[None]
        cos, sin = rotary(hidden, position_ids)
        left_out = {t.untyped_storage().data_ptr() for t in (cos, sin, *layer.parameters())}
        seen = {}

        def pack(tensor):
            storage = tensor.untyped_storage()
            # autocast's bf16 copies of the weights are counted by the plan once per model, not per token
            if storage.data_ptr() not in left_out and length in tensor.shape:
                seen[storage.data_ptr()] = storage.nbytes()
            return tensor

        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=weights == "float32"):
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
                output = layer(hidden, attention_mask=None, position_ids=position_ids, position_embeddings=(cos, sin))
        (output[0] if isinstance(output, tuple) else output).float().sum().backward()
        return sum(seen.values())

    kept_bytes(96)  # compiles, where compiled
    per_token = (kept_bytes(224) - kept_bytes(96)) // 128  # lengths no weight dimension equals
    shape = plan.shape_from_config(config.to_dict())
    residual_bytes = 4 if weights == "float32" else 2
    assert per_token == plan.activation_bytes_per_token_layer(shape, residual_bytes, compiled)
