"""`dpolab generate`: several models side by side, with length statistics checked by hand."""

import json

import pytest
from conftest import out_of_memory, rows_in_format, write_jsonl

from dpolab.cli import main
from dpolab.generate import distinct_n, length_stats, load_prompts, repetition_rate


def test_statistics_by_hand():
    assert distinct_n(["a b a b"], 2) == pytest.approx(2 / 3)  # bigrams ab, ba, ab: 2 distinct of 3
    assert distinct_n(["a b", "a b"], 2) == 0.5
    assert repetition_rate("x y z x y z") == pytest.approx(1 / 4)  # trigrams xyz yzx zxy xyz: 1 repeat in 4
    assert repetition_rate("one two") == 0.0
    stats = length_stats([
        {"reply": "a b c", "new_tokens": 10, "hit_max": False},
        {"reply": "d e f", "new_tokens": 30, "hit_max": True},
        {"reply": "g h i", "new_tokens": 20, "hit_max": False},
    ])  # fmt: skip
    assert stats["mean_new_tokens"] == 20 and stats["median_new_tokens"] == 20
    assert stats["hit_max_share"] == pytest.approx(1 / 3) and stats["distinct_2"] == 1.0


def test_builtin_and_file_prompts(tmp_path):
    builtin = load_prompts(None)
    assert len(builtin) == 20 and all(p[0]["role"] == "user" for p in builtin)
    (tmp_path / "p.txt").write_text("Hello?\n\nWhat is 2 + 2?\n")
    assert load_prompts(str(tmp_path / "p.txt"))[1] == [{"role": "user", "content": "What is 2 + 2?"}]
    (tmp_path / "bad.jsonl").write_text('{"text": "no prompt key"}\n')
    with pytest.raises(Exception, match="line 1: expected a JSON object with a 'prompt'"):
        load_prompts(str(tmp_path / "bad.jsonl"))


def test_generate_base_and_final_of_a_run(tmp_path, tiny_config, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", rows_in_format("messages", 8))
    assert main(["train", "--config", str(tiny_config(data, max_steps=2))]) == 0
    run_dir = tmp_path / "runs" / "tiny"
    (tmp_path / "prompts.txt").write_text("What is 12 + 34?\nWhat is 50 + 22?\nSay hello.\n")
    argv = [
        "generate",
        "--models",
        f"base,{run_dir}",
        "--prompts",
        str(tmp_path / "prompts.txt"),
        "--max_new_tokens",
        "6",
    ]
    assert main(argv) == 0
    rows = [json.loads(line) for line in (run_dir / "generations.jsonl").read_text().splitlines()]
    assert [row["model"] for row in rows] == ["base"] * 3 + [str(run_dir)] * 3
    assert all(0 <= row["new_tokens"] <= 6 for row in rows)
    assert all(row["hit_max"] == (row["new_tokens"] == 6) for row in rows)
    page = (run_dir / "generations.html").read_text()
    assert page.count("<tr>") >= 3 + 1 and "What is 50 + 22?" in page and "distinct-2" in page
    assert "mean tok" in capsys.readouterr().out


def test_generate_errors(tmp_path, tiny_model_dir, plain_model_dir, capsys):
    assert main(["generate", "--models", f"base,{tiny_model_dir}"]) == 2
    assert "'base' needs the other --models" in capsys.readouterr().err
    assert main(["generate", "--models", str(plain_model_dir), "--output_dir", str(tmp_path)]) == 2
    assert "has no chat template" in capsys.readouterr().err


def test_generate_out_of_memory_names_a_smaller_batch_and_writes_nothing(tmp_path, tiny_model_dir, monkeypatch, capsys):
    from transformers import GenerationMixin

    monkeypatch.setattr(GenerationMixin, "generate", out_of_memory)
    output = tmp_path / "out"
    argv = ["generate", "--models", str(tiny_model_dir), "--max_new_tokens", "4", "--output_dir", str(output)]
    assert main([*argv, "--batch_size", "8"]) == 2
    message = capsys.readouterr().err
    assert "CUDA ran out of memory generating 4 tokens for 8 prompts at once: run the same command with " in message
    assert "--batch_size 4." in message and "Traceback" not in message
    assert not list(output.glob("generations*"))
