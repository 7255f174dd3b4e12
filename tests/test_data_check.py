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

    truncated = truncated_by_hand(path, AutoTokenizer.from_pretrained(tiny_model_dir), 24)
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


def truncated_by_hand(path, tokenizer, max_length: int) -> int:
    """Pairs whose prompt plus longer answer exceed max_length, counted from TRL's token ids."""
    lengths = [pair_token_ids(pair, tokenizer) for pair in load_pairs(str(path)).dataset]
    return sum(len(ids["prompt_ids"]) + max(len(ids["chosen_ids"]), len(ids["rejected_ids"])) > max_length
               for ids in lengths)  # fmt: skip


def test_data_check_of_a_training_config(tmp_path, tiny_model_dir, tiny_config, capsys):
    """`--train_config` checks the splits that config trains and evaluates on, with its tokenizer and max_length;
    the check's own flags win."""
    from transformers import AutoTokenizer

    data = tmp_path / "data"
    train_file = write_jsonl(data / "train.jsonl", rows_in_format("implicit", 10))
    test_file = write_jsonl(data / "test.jsonl", rows_in_format("implicit", 6, seed=1))
    config = tiny_config(data, eval_split="test", max_length=24)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    files = {"train": train_file, "test": test_file}
    expected = {name: truncated_by_hand(path, tokenizer, 24) for name, path in files.items()}
    assert all(expected.values())  # the config's max_length truncates some pairs of each split

    assert main(["data", "check", "--train_config", str(config)]) == 0
    out = capsys.readouterr().out
    train_part, test_part = out.split(f"== {data}, split 'test' ==")
    assert f"== {data}, split 'train' ==" in train_part
    assert "rows:             10" in train_part and f"max_length 24: {expected['train']} pairs truncated" in train_part
    assert "rows:             6" in test_part and f"max_length 24: {expected['test']} pairs truncated" in test_part
    assert f"token lengths ({tiny_model_dir}" in test_part  # the config's model is the tokenizer

    assert main(["data", "check", "--train_config", str(config), "--split", "test", "--max_length", "30"]) == 0
    out = capsys.readouterr().out
    assert "split 'train'" not in out and "rows:             6" in out
    assert f"max_length 30: {truncated_by_hand(test_file, tokenizer, 30)} pairs truncated" in out
