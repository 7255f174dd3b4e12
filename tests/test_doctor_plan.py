"""`dpolab doctor` on this machine and on made-up environments; `dpolab plan`'s arithmetic by hand."""

import subprocess
import sys

from dpolab.doctor import ERROR, OK, WARN, python_check, requirement_conflicts, version_checks
from dpolab.plan import (
    KNOWN_CONFIGS,
    ModelShape,
    RunShape,
    activation_bytes_per_token_layer,
    estimate,
    recommend,
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
    # per token and layer: norms fp32 in 2*4*8 + bf16 out 2*2*8 + qkv pre/post rotary 2*(8+8)*2 + attention out
    # 2*8 + MLP 4*2*16 = 64 + 32 + 64 + 16 + 128
    assert activation_bytes_per_token_layer(tiny) == 304
    run = RunShape(batch=3, max_length=10, accumulation=1, checkpointing=False, weight_bytes=2)
    parts = estimate(tiny, run)
    tokens = 2 * 3 * 10  # chosen and rejected
    assert parts["weights (policy)"] == 1992 * 2 == parts["gradients"] == parts["reference model"]
    assert parts["optimizer states (AdamW)"] == 2 * 1992 * 2
    assert parts["activations (all layers kept)"] == tokens * 2 * 304
    assert parts["logits (vocab x tokens, fp32 upcast)"] == tokens * 100 * 4
    checkpointed = estimate(tiny, RunShape(3, 10, 1, True, 2))
    assert checkpointed["activations (checkpointed)"] == tokens * (2 * 2 * 8 + 304)
    lora = estimate(tiny, RunShape(3, 10, 1, False, 2, peft=True, lora_r=4, precompute_ref=True))
    assert lora["reference model"] == 0 and lora["gradients"] == 2 * 4 * (16 + 12) * 4


def test_full_preset_recommendation_fits_24_gib():
    run = RunShape(batch=2, max_length=1024, accumulation=8, checkpointing=True, weight_bytes=2)
    best = recommend(QWEN, run, 24 * 2**30)
    assert best.batch * best.accumulation == 16
    assert sum(estimate(QWEN, best).values()) <= 24 * 2**30
    assert recommend(QWEN, run, 2 * 2**30) is None  # nothing fits 2 GiB


def test_plan_command_for_the_full_preset(capsys):
    from dpolab.cli import main

    assert main(["plan", "--preset", "full"]) == 0
    out = capsys.readouterr().out
    assert "494M parameters" in out and "logits (vocab x tokens, fp32 upcast)" in out
    assert "fits 24 GiB" in out and "recommended for 24 GiB (same global batch 16)" in out
    assert main(["plan", "--model_name_or_path", "someone/unknown-model"]) == 2
    assert "No config for 'someone/unknown-model'" in capsys.readouterr().err
