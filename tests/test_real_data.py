"""Real data as users have it: HH-RLHF-style rows with empty replies and early-diverging conversations, a single
file as one split, a tokenizer that turns the text into nothing, and the seed user's mirror/proxy/cache setting."""

import json
import shutil

import pytest
import yaml
from conftest import arithmetic_questions, rows_in_format, write_jsonl

from dpolab.cli import main


def hh_rows():
    """16 good pairs, 2 with an empty chosen reply (rows 3 and 9), 1 that differs before its last turn (row 12)."""
    rows = []
    for index, (question, right, wrong) in enumerate(arithmetic_questions(19)):
        chosen = f"\n\nHuman: {question}\n\nAssistant: {'' if index in (3, 9) else right}"
        rows.append({"chosen": chosen, "rejected": f"\n\nHuman: {question}\n\nAssistant: {wrong}"})
    follow_up = "\n\nHuman: Are you sure?\n\nAssistant: "
    rows[12] = {
        "chosen": f"\n\nHuman: What is 2 + 2?\n\nAssistant: 4.{follow_up}Yes, 2 + 2 = 4.",
        "rejected": f"\n\nHuman: What is 2 + 2?\n\nAssistant: 5.{follow_up}Yes, 2 + 2 = 5.",
    }
    return rows


def test_invalid_rows_stop_training_and_name_the_flag(tmp_path, tiny_config, capsys):
    data = write_jsonl(tmp_path / "hh.jsonl", hh_rows())
    assert main(["train", "--config", str(tiny_config(data))]) == 2
    message = capsys.readouterr().err
    assert "2 bad row(s)" in message and "row 3: 'chosen'[1].content is empty" in message and "row 9:" in message
    assert "--drop_invalid_rows true" in message and "go on with the other 17" in message
    assert not (tmp_path / "runs").exists()


def test_hh_data_with_empty_replies_trains_with_drop_invalid_rows(tmp_path, tiny_config, capsys):
    data = write_jsonl(tmp_path / "hh.jsonl", hh_rows())
    assert main(["train", "--config", str(tiny_config(data, drop_invalid_rows=True))]) == 0
    out = capsys.readouterr().out
    assert "dropped 2 invalid row(s) (drop_invalid_rows): row 3: 'chosen'[1].content is empty; row 9:" in out
    assert "1 pair(s) whose conversations differ before the last turn (rows 12)" in out
    run_dir = tmp_path / "runs" / "tiny"
    quality = yaml.safe_load((run_dir / "config.yaml").read_text())["dpolab_provenance"]["data_quality"]["train"]
    assert quality["invalid_rows"] == 2 and [r["row"] for r in quality["first_invalid"]] == [3, 9]
    assert quality["early_divergence_rows"] == [12]
    assert json.loads((run_dir / "summary.json").read_text())["train_pairs"] == 17


def test_data_check_lists_what_drop_invalid_rows_leaves_out(tmp_path, capsys):
    data = write_jsonl(tmp_path / "hh.jsonl", hh_rows())
    assert main(["data", "check", str(data)]) == 2
    assert "--drop_invalid_rows true" in capsys.readouterr().err
    assert main(["data", "check", str(data), "--drop_invalid_rows"]) == 0
    out = capsys.readouterr().out
    assert "usable pairs:     17" in out and "dropped 2 invalid row(s)" in out and "rows 12)" in out


def test_every_row_invalid_is_still_an_error(tmp_path, tiny_config, capsys):
    rows = [{"chosen": "\n\nHuman: hi\n\nAssistant:", "rejected": "\n\nHuman: hi\n\nAssistant: hello"}] * 4
    data = write_jsonl(tmp_path / "bad.jsonl", rows)
    assert main(["train", "--config", str(tiny_config(data, drop_invalid_rows=True))]) == 2
    assert "Every row is invalid" in capsys.readouterr().err


def test_a_single_file_is_one_split_everywhere(tmp_path, tiny_model_dir, capsys):
    data = write_jsonl(tmp_path / "pairs.jsonl", rows_in_format("messages", 6))
    base = str(tiny_model_dir)
    assert main(["eval", "--model", base, "--ref", base, "--data", str(data), "--output_dir", str(tmp_path / "e")]) == 0
    assert json.loads((tmp_path / "e" / "eval.json").read_text())["pairs"] == 6  # the whole file, no --split
    assert main(["eval", "--model", base, "--ref", base, "--data", str(data), "--split", "test"]) == 2
    assert "one split, used whole" in capsys.readouterr().err


def test_a_presets_eval_split_can_be_unset(tmp_path):
    from dpolab.config import parse_train_args

    config = parse_train_args(["--preset", "full", "--eval_split", "none", "--eval_strategy", "no"])
    assert config.script.eval_split is None
    assert parse_train_args(["--preset", "full"]).script.eval_split == "test"


def broken_tokenizer_model(tmp_path, tiny_model_dir):
    """The tiny model beside a word-level tokenizer saved from a bare `tokenizers` object: AutoTokenizer reloads it
    as Qwen2's byte-level tokenizer (the model type says qwen2), which turns these texts into nothing."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    directory = tmp_path / "broken"
    shutil.copytree(tiny_model_dir, directory)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (directory / name).unlink(missing_ok=True)
    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, "hello": 3}
    word_level = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    word_level.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }} {% endfor %}"
    PreTrainedTokenizerFast(tokenizer_object=word_level, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>",
                            chat_template=template + "{% if add_generation_prompt %}assistant: {% endif %}",
                            ).save_pretrained(directory)  # fmt: skip
    return directory


def test_answers_that_tokenize_to_nothing_are_refused_before_a_model_loads(
    tmp_path, tiny_config, tiny_model_dir, monkeypatch, capsys
):
    import dpolab.train

    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded before the tokenizer was checked")

    monkeypatch.setattr(dpolab.train, "load_policy", no_model)
    broken = broken_tokenizer_model(tmp_path, tiny_model_dir)
    rows = [{"prompt": [{"role": "user", "content": "say something"}], "chosen": [{"role": "assistant", "content":
             "fine thanks"}], "rejected": [{"role": "assistant", "content": "go away"}]}] * 6  # fmt: skip
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    assert main(["train", "--config", str(tiny_config(data, model_name_or_path=str(broken)))]) == 2
    message = capsys.readouterr().err
    assert "6 of 6 pairs checked" in message and "into no tokens at all (pairs 0, 1, 2, 3, 4, 5" in message
    assert "loss ln 2, zero gradients" in message and not (tmp_path / "runs").exists()
    assert main(["data", "check", str(data), "--model_name_or_path", str(broken)]) == 2
    assert "into no tokens at all" in capsys.readouterr().err


def test_many_answers_truncated_to_nothing_are_warned(tmp_path, tiny_config, capsys):
    rows = rows_in_format("messages", 8)
    for row in rows[:6]:  # prompts longer than max_length: TRL drops these pairs
        row["prompt"][0]["content"] = "What is the sum? " * 20
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    assert main(["train", "--config", str(tiny_config(data, max_length=40))]) == 0
    assert "75% of the pairs checked have a prompt that alone reaches max_length=40" in capsys.readouterr().err


@pytest.mark.parametrize("variable", ["TRANSFORMERS_CACHE", "PYTORCH_TRANSFORMERS_CACHE"])
def test_doctor_names_deprecated_cache_variables(variable, tmp_path):
    from dpolab.doctor import WARN, cache_checks

    checks = {check.name: check for check in cache_checks({variable: "/tmp/old-cache"}, tmp_path)}
    assert checks[variable].status == WARN and "HF_HOME" in checks[variable].fix
    assert "a full run's checkpoints take" in checks["disk for runs"].detail


def test_doctor_says_when_the_mirror_is_unreachable_and_names_the_proxy():
    import socket

    from dpolab.doctor import OK, WARN, network_checks

    with socket.socket() as closed:  # a local port nobody listens on
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    checks = {c.name: c for c in network_checks({"HF_ENDPOINT": f"http://127.0.0.1:{port}",
                                                 "https_proxy": "http://10.0.0.1:1080"})}  # fmt: skip
    assert (
        checks["HF_ENDPOINT"].status == WARN
        and f"http://127.0.0.1:{port} not reachable" in checks["HF_ENDPOINT"].detail
    )
    assert "hf-mirror.com" in checks["HF_ENDPOINT"].fix
    assert checks["proxy"].status == WARN and "unset http_proxy https_proxy" in checks["proxy"].fix
    with socket.socket() as server:  # a listening port: the mirror answers
        server.bind(("127.0.0.1", 0))
        server.listen()
        reachable = network_checks({"HF_ENDPOINT": f"http://127.0.0.1:{server.getsockname()[1]}"})
    assert [(c.name, c.status) for c in reachable] == [("HF_ENDPOINT", OK)]
