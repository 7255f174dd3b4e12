"""Proof that `dpolab eval` computes the trainer's numbers: against DPOTrainer.evaluate() on the same pairs."""

import json
import math

import pytest
from conftest import out_of_memory, rows_in_format, write_jsonl

from dpolab.cli import main

TOLERANCE = 1e-4
METRICS = (
    "rewards/chosen",
    "rewards/rejected",
    "rewards/margins",
    "rewards/accuracies",
    "logps/chosen",
    "logps/rejected",
)


def train_run(tmp_path, tiny_config, fmt, **overrides):
    """A short run with a held-out test split of 7 pairs, evaluated in batches of 3 (the last batch is short)."""
    data_dir = tmp_path / "data"
    write_jsonl(data_dir / "train.jsonl", rows_in_format(fmt, 16))
    write_jsonl(data_dir / "test.jsonl", rows_in_format(fmt, 7, seed=3))
    values = dict(eval_split="test", eval_strategy="steps", eval_steps=100, per_device_eval_batch_size=3,
                  learning_rate=5e-3, max_steps=4)  # fmt: skip
    config = tiny_config(data_dir, **{**values, **overrides})
    assert main(["train", "--config", str(config)]) == 0
    return tmp_path / "runs" / "tiny"


def last_logged_eval(run_dir) -> dict:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if "eval_loss" in r][-1]


def eval_outputs(output_dir):
    summary = json.loads((output_dir / "eval.json").read_text())
    records = [json.loads(line) for line in (output_dir / "eval.jsonl").read_text().splitlines()]
    return summary, records


def assert_matches_trainer(summary: dict, logged: dict):
    trainer = summary["trainer_equivalent"]
    for key in METRICS:
        assert trainer[key] == pytest.approx(logged[f"eval_{key}"], abs=TOLERANCE), key
    assert trainer["loss"] == pytest.approx(logged["eval_loss"], abs=TOLERANCE)
    # the last batch holds 1 pair, so the trainer's figure and the true per-pair mean differ in general
    assert summary["pairs"] == 7 and summary["eval_batch_size"] == 3


@pytest.mark.parametrize(
    "fmt, overrides",
    [
        ("strings", {}),
        ("messages", {"loss_type": ["sigmoid", "sft"]}),
        ("implicit", {}),
        ("messages", {"max_length": 28}),  # prompts are 22 tokens: completions lose about half
    ],
    ids=["strings", "messages-sft", "implicit", "truncated"],
)
def test_eval_of_a_run_equals_the_trainers_logged_eval(tmp_path, tiny_config, fmt, overrides, capsys):
    run_dir = train_run(tmp_path, tiny_config, fmt, **overrides)
    assert main(["eval", "--model", str(run_dir)]) == 0  # settings, reference and data from config.yaml
    summary, records = eval_outputs(run_dir / "eval" / "final")
    assert_matches_trainer(summary, last_logged_eval(run_dir))
    if "max_length" in overrides:
        assert summary["truncated_pairs"] > 0
        assert all(r["prompt_tokens"] + r["chosen_scored_tokens"] <= 28 for r in records)
    assert "trainer (batch 3)" in capsys.readouterr().out


def test_per_pair_margins_equal_the_trainers(tmp_path, tiny_config, tiny_model_dir):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    from dpolab.data import load_pairs

    run_dir = train_run(tmp_path, tiny_config, "implicit", max_length=34)
    assert (
        main(["eval", "--model", str(run_dir / "final"), "--batch_size", "2", "--output_dir", str(tmp_path / "e")]) == 0
    )
    _, records = eval_outputs(tmp_path / "e")

    pairs = load_pairs(str(tmp_path / "data"), "test")
    args = DPOConfig(output_dir=str(tmp_path / "t"), bf16=False, max_length=34, per_device_eval_batch_size=1,
                     report_to=[], activation_checkpointing=False)  # fmt: skip
    trainer = DPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(run_dir / "final"),
        ref_model=AutoModelForCausalLM.from_pretrained(tiny_model_dir),
        args=args,
        train_dataset=pairs.dataset,
        eval_dataset=Dataset.from_list(list(pairs.dataset)),
        processing_class=AutoTokenizer.from_pretrained(tiny_model_dir),
    )
    captured = {}
    original_log = trainer.log

    def capture(logs, start_time=None):  # batch size 1: TRL's per-batch metric lists are per pair
        captured.update({key: list(values) for key, values in trainer._metrics["eval"].items()})
        return original_log(logs, start_time)

    trainer.log = capture
    trainer.evaluate()
    assert len(captured["rewards/margins"]) == len(records) == 7
    for record, margin, chosen in zip(records, captured["rewards/margins"], captured["logps/chosen"]):
        assert record["margin"] == pytest.approx(margin, abs=TOLERANCE)
        assert record["policy_chosen_logps"] == pytest.approx(chosen, abs=TOLERANCE)
    assert any(abs(r["margin"]) > 1e-3 for r in records), "training should have moved the margins"


def test_lora_adapter_eval_equals_the_trainers(tmp_path, tiny_config):
    run_dir = train_run(tmp_path, tiny_config, "messages", use_peft=True, lora_r=4, lora_alpha=8, learning_rate=2e-2)
    assert (run_dir / "final" / "adapter_config.json").is_file()
    assert main(["eval", "--model", str(run_dir)]) == 0
    summary, _ = eval_outputs(run_dir / "eval" / "final")
    assert_matches_trainer(summary, last_logged_eval(run_dir))
    assert abs(summary["per_pair_mean"]["rewards/margins"]) > 1e-4  # reference = the adapter switched off


def test_swapped_pairs_flip_every_margin_and_self_reference_gives_zero(tmp_path, tiny_config, tiny_model_dir):
    run_dir = train_run(tmp_path, tiny_config, "messages")
    rows = rows_in_format("messages", 7, seed=3)
    swapped = [{**row, "chosen": row["rejected"], "rejected": row["chosen"]} for row in rows]
    write_jsonl(tmp_path / "swapped" / "test.jsonl", swapped)
    final = str(run_dir / "final")
    assert main(["eval", "--model", final, "--output_dir", str(tmp_path / "a")]) == 0
    assert (
        main(["eval", "--model", final, "--data", str(tmp_path / "swapped"), "--output_dir", str(tmp_path / "b")]) == 0
    )
    _, straight = eval_outputs(tmp_path / "a")
    _, flipped = eval_outputs(tmp_path / "b")
    for a, b in zip(straight, flipped, strict=True):
        assert a["margin"] == pytest.approx(-b["margin"], abs=1e-5)

    base = str(tiny_model_dir)
    assert main(["eval", "--model", base, "--ref", base, "--data", str(tmp_path / "data"), "--split", "test",
                 "--output_dir", str(tmp_path / "self")]) == 0  # fmt: skip
    summary, records = eval_outputs(tmp_path / "self")
    assert all(r["margin"] == 0.0 and r["correct"] is False for r in records)
    assert summary["trainer_equivalent"]["rewards/accuracies"] == 0.0  # strict '>': ties are wrong
    assert summary["trainer_equivalent"]["loss"] == pytest.approx(math.log(2), abs=1e-6)


def test_reference_logps_are_cached(tmp_path, tiny_config, capsys):
    run_dir = train_run(tmp_path, tiny_config, "messages")
    capsys.readouterr()
    # the run's own reference pre-pass scored the eval split: its eval reads them back
    assert main(["eval", "--model", str(run_dir)]) == 0
    assert "Reference log-probs from cache" in capsys.readouterr().out
    # other pairs (the first 5) are scored once, then read back
    assert main(["eval", "--model", str(run_dir), "--limit", "5", "--output_dir", str(tmp_path / "five")]) == 0
    assert "Reference log-probs from cache" not in capsys.readouterr().out
    assert main(["eval", "--model", str(run_dir), "--limit", "5", "--output_dir", str(tmp_path / "again")]) == 0
    assert "Reference log-probs from cache" in capsys.readouterr().out


def test_eval_errors(tmp_path, tiny_config, tiny_model_dir, capsys):
    run_dir = train_run(tmp_path, tiny_config, "messages")
    assert main(["eval", "--model", str(run_dir / "checkpoint-99")]) == 2
    assert "Checkpoint not found" in capsys.readouterr().err

    (run_dir / "config.yaml").rename(run_dir / "config.yaml.bak")
    assert main(["eval", "--model", str(run_dir)]) == 2
    assert "has no config.yaml" in capsys.readouterr().err
    (run_dir / "config.yaml.bak").rename(run_dir / "config.yaml")

    assert main(["eval", "--model", str(tiny_model_dir)]) == 2
    assert "Give --data and --ref" in capsys.readouterr().err

    long_prompts = rows_in_format("messages", 3)
    for row in long_prompts:
        row["prompt"][0]["content"] = "What is the sum? " * 20
    write_jsonl(tmp_path / "long" / "test.jsonl", long_prompts)
    assert main(["eval", "--model", str(run_dir), "--data", str(tmp_path / "long"), "--max_length", "16"]) == 2
    assert "No pair of" in capsys.readouterr().err


def test_eval_out_of_memory_names_a_smaller_batch_and_writes_nothing(tmp_path, tiny_model_dir, monkeypatch, capsys):

    from dpolab import logps

    monkeypatch.setattr(logps, "length_weighted_logps", out_of_memory)  # read by the scoring loop at each call
    write_jsonl(tmp_path / "d" / "test.jsonl", rows_in_format("messages", 6))
    model, output = str(tiny_model_dir), tmp_path / "out"
    argv = ["eval", "--model", model, "--ref", model, "--data", str(tmp_path / "d"), "--output_dir", str(output)]
    assert main([*argv, "--batch_size", "4"]) == 2
    message = capsys.readouterr().err
    assert "CUDA ran out of memory scoring the reference at 4 pairs per batch: run the same command with " in message
    assert "--batch_size 2." in message and "Traceback" not in message
    assert main([*argv, "--batch_size", "1"]) == 2
    assert "one pair per batch does not fit: a shorter --max_length, or the CPU." in capsys.readouterr().err
    assert not output.exists()


def test_eval_with_varlen_attention_scores_as_sdpa_and_needs_the_fast_path(tmp_path, tiny_model_dir, monkeypatch,
                                                                          capsys):  # fmt: skip
    write_jsonl(tmp_path / "d" / "test.jsonl", rows_in_format("implicit", 6))
    model = str(tiny_model_dir)
    argv = ["eval", "--model", model, "--ref", model, "--data", str(tmp_path / "d"), "--beta", "0.1"]
    chosen_logps = {}
    for attention in ("sdpa", "varlen_attn"):
        output = tmp_path / attention
        monkeypatch.setenv("DPOLAB_CACHE", str(tmp_path / f"cache-{attention}"))  # each scores, none reads the other
        assert main([*argv, "--attn_implementation", attention, "--output_dir", str(output)]) == 0
        chosen_logps[attention] = [row["policy_chosen_logps"] for row in eval_outputs(output)[1]]
    assert chosen_logps["varlen_attn"] == pytest.approx(chosen_logps["sdpa"], abs=1e-5) and chosen_logps["sdpa"][0] != 0
    refused = tmp_path / "refused"
    monkeypatch.setenv("DPOLAB_CACHE", str(tmp_path / "cache-refused"))
    assert main([*argv, "--attn_implementation", "varlen_attn", "--fast_path", "false", "--output_dir",
                 str(refused)]) == 2  # fmt: skip
    assert "attn_implementation varlen_attn computes only the fast path's packed rows" in capsys.readouterr().err
    assert not refused.exists()


def test_policy_and_reference_tokenizers_must_match(tmp_path, tiny_config, tiny_model_dir, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    other = tmp_path / "other"
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.add_tokens(["<extra_token>"])
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model.resize_token_embeddings(len(tokenizer))
    model.save_pretrained(other)
    tokenizer.save_pretrained(other)
    data = write_jsonl(tmp_path / "d" / "test.jsonl", rows_in_format("messages", 3))
    assert main(["eval", "--model", str(other), "--ref", str(tiny_model_dir), "--data", str(data.parent)]) == 2
    assert "tokenizers differ" in capsys.readouterr().err


def test_sweep_evaluates_base_and_checkpoints_once(tmp_path, tiny_config, capsys):
    import csv

    run_dir = train_run(tmp_path, tiny_config, "messages", save_strategy="steps", save_steps=2)
    assert main(["sweep", str(run_dir)]) == 0
    rows = list(csv.DictReader((run_dir / "sweep.csv").open()))
    assert [(r["name"], r["step"]) for r in rows] == [("base", "0"), ("checkpoint-2", "2"), ("checkpoint-4", "4")]
    assert float(rows[0]["rewards/margins"]) == 0.0 and float(rows[0]["rewards/accuracies"]) == 0.0
    assert float(rows[2]["loss"]) == pytest.approx(last_logged_eval(run_dir)["eval_loss"], abs=TOLERANCE)
    assert (run_dir / "sweep.png").stat().st_size > 10_000
    capsys.readouterr()
    assert main(["sweep", str(run_dir)]) == 0  # resumable: nothing is computed again
    out = capsys.readouterr().out
    assert out.count("already evaluated") == 3 and "evaluating" not in out
    assert "rewards/accuracies  rewards/margins  logps/chosen" in out  # whole metric names in the printed table
    assert main(["sweep", str(tmp_path / "data")]) == 2
    assert "not a dpolab run directory" in capsys.readouterr().err


def test_length_bias_statistics_by_hand():
    from dpolab.lengthbias import length_bias, pearson, ranks, spearman

    assert pearson([1, 2, 3], [2, 4, 6]) == pytest.approx(1.0)
    assert pearson([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert pearson([1, 1, 1], [1, 2, 3]) is None
    assert ranks([10, 20, 20, 5]) == [2.0, 3.5, 3.5, 1.0]
    assert spearman([1, 2, 3, 4], [1, 4, 9, 16]) == pytest.approx(1.0)  # monotone, not linear
    records = [  # chosen longer by 20 and 5 tokens, shorter by 5, equal once
        {"chosen_tokens": 30, "rejected_tokens": 10, "margin": 2.0, "margin_per_token": 0.1, "correct": True},
        {"chosen_tokens": 15, "rejected_tokens": 10, "margin": 1.0, "margin_per_token": 0.1, "correct": True},
        {"chosen_tokens": 10, "rejected_tokens": 15, "margin": -1.0, "margin_per_token": 0.1, "correct": False},
        {"chosen_tokens": 12, "rejected_tokens": 12, "margin": 0.5, "margin_per_token": 0.1, "correct": True},
    ]
    bias = length_bias(records)
    assert bias["longer_wins_accuracy"] == 0.5 and bias["model_accuracy"] == 0.75
    assert bias["equal_length_share"] == 0.25
    assert bias["pearson_margin_vs_length_difference"] > 0.9
    assert bias["pearson_per_token_margin_vs_length_difference"] is None  # constant per-token margins
    labels = {b["length_difference"]: b for b in bias["buckets"]}
    assert labels["[11, 51)"]["pairs"] == 1 and labels["[1, 11)"]["mean_margin"] == 1.0
    assert labels["0"]["pairs"] == 1 and labels["[-10, 0)"]["accuracy"] == 0.0


def test_lengthbias_command_reads_an_eval_directory(tmp_path, tiny_config, capsys):
    run_dir = train_run(tmp_path, tiny_config, "messages")
    assert main(["eval", "--model", str(run_dir)]) == 0
    assert "longer answer wins" in capsys.readouterr().out  # part of eval's output
    assert main(["lengthbias", str(run_dir / "eval" / "final")]) == 0
    assert "Spearman" in capsys.readouterr().out
    assert main(["lengthbias", str(tmp_path / "nowhere")]) == 2
    assert "run `dpolab eval` first" in capsys.readouterr().err


def test_eval_of_a_run_with_a_held_out_fraction_uses_the_same_pairs(tmp_path, tiny_config):
    data = write_jsonl(tmp_path / "uf.jsonl", rows_in_format("implicit", 24))
    config = tiny_config(data, eval_holdout=0.25, eval_strategy="steps", eval_steps=100, per_device_eval_batch_size=4,
                         learning_rate=5e-3)  # fmt: skip
    assert main(["train", "--config", str(config)]) == 0
    run_dir = tmp_path / "runs" / "tiny"
    assert main(["eval", "--model", str(run_dir)]) == 0
    summary, _ = eval_outputs(run_dir / "eval" / "final")
    assert summary["pairs"] == 6  # a quarter of 24, the part the trainer evaluated
    logged = last_logged_eval(run_dir)
    for key in METRICS:
        assert summary["trainer_equivalent"][key] == pytest.approx(logged[f"eval_{key}"], abs=TOLERANCE), key


def test_fast_scoring_equals_the_padded_one_and_never_waits_for_the_device(tmp_path, tiny_model_dir):
    """`dpolab eval`'s scoring on the fast path (packed rows, dpolab's LM head, results read once at the end) against
    TRL's padded path and head; waits counted with TRL's head compacting as on CUDA."""
    from test_packing import HostWaits
    from transformers import AutoTokenizer

    from dpolab import evaluate
    from dpolab.data import load_pairs
    from dpolab.models import load_scoring_model

    rows = rows_in_format("messages", 7)
    for index, row in enumerate(rows):  # answers of different lengths, some truncated at max_length 40
        row["chosen"][-1]["content"] += " The sky is blue." * (index % 3)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    examples, _ = evaluate.tokenize_pairs(load_pairs(str(write_jsonl(tmp_path / "d.jsonl", rows))).dataset, tokenizer,
                                          40, "keep_start")  # fmt: skip
    scored = {}
    for fast_path in (False, True):
        settings = evaluate.EvalConfig(model=str(tiny_model_dir), max_length=40, truncation_mode="keep_start",
                                       batch_size=3, fast_path=fast_path, ld_alpha=0.5)  # fmt: skip
        model = load_scoring_model(str(tiny_model_dir), "float32")
        waits = HostWaits()
        with waits.mode:
            scored[fast_path] = evaluate.model_logps(model, examples, tokenizer, settings, "test")
        scored[fast_path]["waits"] = waits.count
    padded, fast = scored[False], scored[True]
    assert getattr(model, "_dpolab_answer_head", False)
    for key in ("chosen", "rejected", "chosen_unweighted"):
        assert fast[key] == pytest.approx(padded[key], abs=1e-5) and len(fast[key]) == 7, key
    assert fast["chosen"] != pytest.approx(fast["chosen_unweighted"])  # ld_alpha weighted what it should
    assert fast["chosen_tokens"] == padded["chosen_tokens"] and fast["rejected_tokens"] == padded["rejected_tokens"]
    # padded: TRL's boolean compaction, twice in each of the 3 batches, and transformers' padding-mask checks
    assert fast["waits"] == 0 and padded["waits"] > 2 * 3
