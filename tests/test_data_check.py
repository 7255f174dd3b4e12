"""`dpolab data check`, and token counts that are exactly the ones TRL's DPOTrainer trains on."""

import pytest
from conftest import rows_in_format, write_jsonl

from dpolab.cli import main
from dpolab.data import load_pairs, pair_token_ids


@pytest.mark.parametrize("fmt", ["strings", "messages", "implicit"])
def test_token_ids_equal_the_trainers(tmp_path, tiny_model_dir, fmt):
    from transformers import AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    pairs = load_pairs(str(write_jsonl(tmp_path / "d.jsonl", rows_in_format(fmt, 6))))
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    args = DPOConfig(output_dir=str(tmp_path / "out"), bf16=False, max_length=None, report_to=[])
    trainer = DPOTrainer(model=str(tiny_model_dir), args=args, train_dataset=pairs.dataset, processing_class=tokenizer)
    for pair, prepared in zip(pairs.dataset, trainer.train_dataset, strict=True):
        ours = pair_token_ids(pair, tokenizer)
        assert ours == {key: prepared[key] for key in ("prompt_ids", "chosen_ids", "rejected_ids")}
    if fmt != "strings":  # the completion is the template's tail: it ends with the end-of-turn token
        assert ours["chosen_ids"][-2] == tokenizer.convert_tokens_to_ids("<|im_end|>")


def test_data_check_report(tmp_path, tiny_model_dir, capsys):
    rows = rows_in_format("implicit", 10)
    rows[3]["rejected"] = rows[3]["chosen"]  # identical pair
    rows.append(rows[0])  # duplicate
    path = write_jsonl(tmp_path / "uf.jsonl", rows)
    assert main(["data", "check", str(path), "--model_name_or_path", str(tiny_model_dir), "--max_length", "24"]) == 0
    out = capsys.readouterr().out
    assert "rows:             11" in out
    assert "format:           implicit prompt, message lists" in out
    assert "identical pairs:  1" in out and "rows 3" in out
    assert "duplicate pairs:  1" in out
    for name in ("prompt", "chosen", "rejected", "prompt+chosen", "p50", "p99"):
        assert name in out

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    pairs = load_pairs(str(path))
    lengths = [pair_token_ids(pair, tokenizer) for pair in pairs.dataset]
    truncated = sum(
        len(ids["prompt_ids"]) + max(len(ids["chosen_ids"]), len(ids["rejected_ids"])) > 24 for ids in lengths
    )
    assert 0 < truncated  # the check is meaningful for this data
    assert f"max_length 24: {truncated} pairs truncated" in out


def test_data_check_without_tokenizer_and_bad_data(tmp_path, capsys):
    path = write_jsonl(tmp_path / "s.jsonl", rows_in_format("strings", 4))
    assert main(["data", "check", str(path)]) == 0
    assert "give --model_name_or_path" in capsys.readouterr().out
    rows = rows_in_format("messages", 4)
    del rows[2]["chosen"][0]["content"]
    assert main(["data", "check", str(write_jsonl(tmp_path / "bad.jsonl", rows))]) == 2
    err = capsys.readouterr().err
    assert "row 2: 'chosen'[0] has no 'content'" in err and "Traceback" not in err
