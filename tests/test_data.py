"""Data loading: every source and format, normalised to TRL's columns; every bad row named with its field."""

import json

import pytest
from conftest import rows_in_format, write_jsonl

from dpolab import data
from dpolab.data import LengthStats, hh_to_messages, load_pairs, percentiles
from dpolab.errors import DpolabError


def load_error(path, **kwargs) -> str:
    with pytest.raises(DpolabError) as error:
        load_pairs(str(path), **kwargs)
    return str(error.value)


@pytest.mark.parametrize(
    "fmt, expected_format, conversational",
    [
        ("strings", data.EXPLICIT_STRINGS, False),
        ("messages", data.EXPLICIT_MESSAGES, True),
        ("implicit", data.IMPLICIT_MESSAGES, True),
        ("hh", data.HH_RLHF, True),
    ],
)
def test_formats_are_detected_and_normalised(tmp_path, fmt, expected_format, conversational):
    pairs = load_pairs(str(write_jsonl(tmp_path / "d.jsonl", rows_in_format(fmt, 6))))
    assert pairs.format == expected_format
    assert pairs.is_conversational is conversational
    assert pairs.dataset.column_names == ["prompt", "chosen", "rejected"]
    first = pairs.dataset[0]
    question = rows_in_format("messages", 1)[0]["prompt"][0]["content"]
    if conversational:
        assert first["prompt"] == [{"role": "user", "content": question}]
        assert first["chosen"][0]["role"] == "assistant" and first["chosen"][0]["content"].startswith(question[8:13])
    else:
        assert first["prompt"] == question


def test_implicit_prompt_is_the_shared_prefix_like_trl(tmp_path):
    from trl.data_utils import extract_prompt

    row = {
        "chosen": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "4"},
        ],
        "rejected": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "5"},
        ],
    }
    pairs = load_pairs(str(write_jsonl(tmp_path / "d.jsonl", [row])))
    assert pairs.dataset[0] == extract_prompt(row)
    assert len(pairs.dataset[0]["prompt"]) == 4


def test_column_mapping(tmp_path):
    path = write_jsonl(tmp_path / "se.jsonl", rows_in_format("mapped", 5))
    pairs = load_pairs(str(path), prompt_column="question", chosen_column="response_j", rejected_column="response_k")
    assert pairs.format == data.EXPLICIT_STRINGS and len(pairs.dataset) == 5
    message = load_error(path)
    assert "missing column(s) 'chosen', 'rejected'" in message
    assert "Columns present: question, response_j, response_k" in message
    assert "--chosen_column" in message


def test_hh_rlhf_multi_turn():
    text = "\n\nHuman: Hi there\n\nAssistant: Hello.\n\nHuman: What is 2+2?\n\nAssistant: 4"
    assert hh_to_messages(text) == [
        {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4"},
    ]
    with pytest.raises(ValueError, match="ending with an 'Assistant:' turn"):
        hh_to_messages("\n\nHuman: only a question")


@pytest.mark.parametrize(
    "mutate, expected",
    [
        (lambda r: r["chosen"][0].pop("content"), "row 2: 'chosen'[0] has no 'content' (keys: role)"),
        (lambda r: r["chosen"][0].pop("role"), "row 2: 'chosen'[0] has no 'role'"),
        (lambda r: r["rejected"][0].update(role="bot"), "row 2: 'rejected'[0] has unknown role 'bot'"),
        (lambda r: r["prompt"][0].update(content="  "), "row 2: 'prompt'[0].content is empty"),
        (lambda r: r["chosen"][0].update(content=["a", "b"]), "row 2: 'chosen'[0].content must be a string, got list"),
        (lambda r: r.update(chosen=[]), "row 2: 'chosen' is an empty message list"),
        (lambda r: r.update(chosen="a string"), "row 2: mixed formats"),
        (lambda r: r.update(chosen=42), "row 2: 'chosen' must be a string or a list of messages, got int"),
        (lambda r: r["chosen"][0].update(role="user"), "row 2: 'chosen' has no assistant message"),
    ],
)
def test_bad_rows_name_row_field_and_problem(tmp_path, mutate, expected):
    rows = rows_in_format("messages", 5)
    mutate(rows[2])
    message = load_error(write_jsonl(tmp_path / "bad.jsonl", rows))
    assert "bad.jsonl" in message and "1 bad row(s)" in message
    assert expected in message


def test_bad_string_rows(tmp_path):
    rows = rows_in_format("strings", 4)
    rows[1]["rejected"] = ""
    rows[3]["prompt"] = None
    message = load_error(write_jsonl(tmp_path / "s.jsonl", rows))
    assert "row 1: 'rejected' is empty" in message
    assert "row 3: 'prompt' must be a string, got NoneType" in message


def test_implicit_rows_without_a_shared_prompt(tmp_path):
    rows = rows_in_format("implicit", 3)
    rows[1]["rejected"][0] = {"role": "user", "content": "something else"}
    assert "row 1: chosen and rejected share no leading prompt" in load_error(write_jsonl(tmp_path / "i.jsonl", rows))


def test_many_bad_rows_are_counted_not_all_printed(tmp_path):
    rows = rows_in_format("strings", 30)
    for row in rows:
        row["chosen"] = " "
    message = load_error(write_jsonl(tmp_path / "many.jsonl", rows))
    assert "30 bad row(s)" in message and "and 20 more bad rows" in message


def test_identical_pairs_are_dropped_and_reported_but_all_identical_is_an_error(tmp_path):
    rows = rows_in_format("strings", 5)
    rows[1]["rejected"] = rows[1]["chosen"]
    rows.append(dict(rows[0]))  # a duplicate
    pairs = load_pairs(str(write_jsonl(tmp_path / "d.jsonl", rows)))
    assert pairs.identical_rows == [1] and len(pairs.dataset) == 5 and pairs.duplicate_rows == 1
    for row in rows:
        row["rejected"] = row["chosen"]
    assert "chosen == rejected in all 6 rows" in load_error(write_jsonl(tmp_path / "same.jsonl", rows))


def test_file_errors(tmp_path):
    assert "Data file or directory not found: " in load_error(tmp_path / "missing.jsonl")
    (tmp_path / "latin1.jsonl").write_bytes('{"prompt": "caf\xe9"}\n'.encode("latin-1"))
    assert "not UTF-8 text" in load_error(tmp_path / "latin1.jsonl")
    (tmp_path / "broken.jsonl").write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": \n')
    assert "broken.jsonl line 2: not valid JSON" in load_error(tmp_path / "broken.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n")
    assert "holds no rows" in load_error(tmp_path / "empty.jsonl")
    (tmp_path / "list.jsonl").write_text("[1, 2]\n")
    assert "line 1: expected a JSON object, got list" in load_error(tmp_path / "list.jsonl")


def test_splits_from_files_and_directories(tmp_path):
    single = write_jsonl(tmp_path / "one.jsonl", rows_in_format("strings", 3))
    message = load_error(single, split="test")
    assert "is a single file: it is one split, used whole" in message and "`--split train`" in message
    assert len(load_pairs(str(single), None).dataset) == 3  # no split named: the whole file
    split_dir = tmp_path / "splits"
    write_jsonl(split_dir / "train.jsonl", rows_in_format("strings", 3))
    write_jsonl(split_dir / "test.jsonl", rows_in_format("strings", 2, seed=5))
    assert len(load_pairs(str(split_dir), "test").dataset) == 2
    message = load_error(split_dir, split="validation")
    assert "no file for split 'validation'" in message and "Found: test, train" in message


def test_json_parquet_csv_and_save_to_disk(tmp_path):
    from datasets import Dataset, DatasetDict

    rows = rows_in_format("messages", 4)
    (tmp_path / "d.json").write_text(json.dumps(rows))
    assert load_pairs(str(tmp_path / "d.json")).format == data.EXPLICIT_MESSAGES
    Dataset.from_list(rows).to_parquet(str(tmp_path / "d.parquet"))
    assert len(load_pairs(str(tmp_path / "d.parquet")).dataset) == 4
    csv_rows = [{key: json.dumps(value) for key, value in row.items()} for row in rows]
    Dataset.from_list(csv_rows).to_csv(str(tmp_path / "d.csv"), index=False)
    assert load_pairs(str(tmp_path / "d.csv")).format == data.EXPLICIT_MESSAGES  # JSON-encoded lists decoded
    DatasetDict({"train": Dataset.from_list(rows), "test": Dataset.from_list(rows[:2])}).save_to_disk(
        str(tmp_path / "saved")
    )
    assert len(load_pairs(str(tmp_path / "saved"), "test").dataset) == 2
    assert "no split 'dev'. Splits: train, test" in load_error(tmp_path / "saved", split="dev")


def test_offline_hub_dataset_error_names_it_and_the_fix(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from dpolab.hub import hub_reachable

    hub_reachable.cache_clear()
    with pytest.raises(DpolabError) as error:
        load_pairs("someone/not-cached-dataset-xyz")
    hub_reachable.cache_clear()
    message = str(error.value)
    assert "'someone/not-cached-dataset-xyz' is not in the local Hugging Face cache" in message
    assert "local .jsonl" in message


def test_percentiles_nearest_rank():
    figures = percentiles(list(range(1, 101)))  # 1..100
    assert figures == {"min": 1, "p50": 50, "p90": 90, "p99": 99, "max": 100, "mean": 50.5}
    assert percentiles([7])["p99"] == 7


def test_truncation_counts():
    stats = LengthStats(prompt=[10, 60, 30, 64], chosen=[20, 2, 40, 5], rejected=[50, 3, 10, 5])
    # max_length 64: pair 0 (10+50), pair 1 (60+3) fit; pair 2 (30+40) and pair 3 (64+5) are truncated
    assert stats.truncated(64) == 2
    assert stats.dropped(64) == 1  # pair 3: the prompt alone reaches max_length
    assert stats.truncated(None) == 0 and stats.dropped(None) == 0
