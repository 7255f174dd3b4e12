"""`dpolab judge`: reward-model win rates against base, length-controlled, on a tiny random reward model; the
statistics checked by hand and against a reward model that only rewards length."""

import json
import random

import pytest
from conftest import out_of_memory, rows_in_format, write_jsonl

from dpolab.cli import main
from dpolab.judge import bootstrap_interval, compare_with_base, length_controlled_win_rate, wins


def test_wins_ties_and_intervals_by_hand():
    assert wins([2.0, 1.0, 3.0], [1.0, 1.0, 4.0]) == [1.0, 0.5, 0.0]
    # every prompt won: every resample has mean 1
    assert bootstrap_interval([1.0] * 5, list(range(5))) == (1.0, 1.0)
    low, high = bootstrap_interval([1.0, 0.0] * 20, list(range(40)))
    assert low < 0.5 < high and high - low < 0.4


def records(base_lengths, model_lengths, reward):
    """judge.jsonl-like records of base and one model, rewards from `reward(length)`."""
    rows = []
    for label, lengths in (("base", base_lengths), ("final", model_lengths)):
        for index, length in enumerate(lengths):
            rows.append({"model": label, "prompt_index": index, "sample": 0, "length": length, "reward": reward(length),
                         "prompt": [{"role": "user", "content": f"q{index}"}], "answer": "a" * length})  # fmt: skip
    return rows


def test_a_model_against_itself_wins_half():
    rng = random.Random(0)
    lengths = [rng.randint(20, 200) for _ in range(50)]
    result = compare_with_base(records(lengths, lengths, lambda n: rng.random()), "final")
    result_same = compare_with_base([{**r, "reward": 1.0} for r in records(lengths, lengths, float)], "final")
    assert result_same["win_rate"] == 0.5 and result_same["win_rate_ci"] == [0.5, 0.5]
    assert result_same["lc_win_rate"] == pytest.approx(0.5, abs=1e-6)
    assert result_same["ties"] == 50
    assert 0 <= result["win_rate"] <= 1


def test_a_length_only_reward_model_gives_rising_win_rates_and_lc_near_a_half():
    """The stub reward model scores an answer by its length alone (written here, not a real reward model): a
    model whose answers are longer wins more often, and the length-controlled win rate sees through it."""
    rng = random.Random(0)
    rates = []
    for shift in (5, 20, 40, 80):
        base = [rng.randint(20, 200) for _ in range(200)]
        model = [b + int(rng.gauss(shift, 30)) for b in base]
        result = compare_with_base(records(base, model, float), "final")
        rates.append(result["win_rate"])
        assert result["lc_win_rate"] == pytest.approx(0.5, abs=0.1), (shift, result)
    assert rates == sorted(rates) and rates[-1] > 0.95 and rates[0] < 0.7


def test_a_better_model_keeps_its_lead_after_length_control():
    rng = random.Random(1)
    base = [rng.randint(20, 200) for _ in range(200)]
    model = [b + int(rng.gauss(0, 30)) for b in base]
    outcomes = [1.0 if rng.random() < 0.8 else 0.0 for _ in base]
    lc = length_controlled_win_rate(outcomes, [m - b for m, b in zip(model, base)])
    assert lc == pytest.approx(0.8, abs=0.06)


@pytest.fixture(scope="session")
def reward_models(tiny_model_dir, tmp_path_factory):
    """A tiny random sequence classifier with one output (a reward model) and one with three labels."""
    from transformers import AutoConfig, AutoTokenizer, Qwen2ForSequenceClassification

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    made = {}
    for name, labels in (("reward", 1), ("three-labels", 3)):
        directory = tmp_path_factory.mktemp(name)
        config = AutoConfig.from_pretrained(tiny_model_dir, num_labels=labels)
        config.pad_token_id = tokenizer.pad_token_id
        Qwen2ForSequenceClassification(config).save_pretrained(directory)
        tokenizer.save_pretrained(directory)
        made[name] = directory
    return made


@pytest.fixture
def judged_run(tmp_path, tiny_config):
    data = write_jsonl(tmp_path / "d.jsonl", rows_in_format("messages", 12))
    assert main(["train", "--config", str(tiny_config(data, max_steps=4, save_strategy="steps", save_steps=2))]) == 0
    (tmp_path / "prompts.txt").write_text("What is 12 + 34?\nWhat is 50 + 22?\nSay hello.\n")
    return tmp_path / "runs" / "tiny", tmp_path / "prompts.txt"


def test_judge_a_run_end_to_end(judged_run, reward_models, capsys):
    run_dir, prompts = judged_run
    argv = ["judge", str(run_dir), "--reward_model", str(reward_models["reward"]), "--models", "checkpoints",
            "--prompts", str(prompts), "--max_new_tokens", "6", "--do_sample", "--samples", "2"]  # fmt: skip
    assert main(argv) == 0
    summary = json.loads((run_dir / "judge.json").read_text())
    assert list(summary["models"]) == ["base", "checkpoint-2", "checkpoint-4"]  # final/ is step 4's model again
    for label in ("checkpoint-2", "checkpoint-4"):
        model = summary["models"][label]
        assert 0 <= model["win_rate_ci"][0] <= model["win_rate"] <= model["win_rate_ci"][1] <= 1
        assert 0 < model["lc_win_rate"] < 1 and model["wins"] + model["ties"] + model["losses"] == 6
    assert summary["prompts"] == 3 and summary["samples"] == 2
    records = [json.loads(line) for line in (run_dir / "judge.jsonl").read_text().splitlines()]
    assert len(records) == 3 * 3 * 2 and all(isinstance(r["reward"], float) for r in records)
    assert "LC win rate" in capsys.readouterr().out
    assert main(["report", str(run_dir)]) == 0
    page = (run_dir / "report.html").read_text()
    assert "<h2>Judged answers" in page and "checkpoint-2" in page[page.index("<h2>Judged answers") :]


def test_judge_reads_generations_already_written(judged_run, reward_models, capsys):
    run_dir, prompts = judged_run
    generate = ["generate", "--models", f"base,{run_dir}", "--prompts", str(prompts), "--max_new_tokens", "6"]
    assert main(generate) == 0
    argv = ["judge", str(run_dir), "--reward_model", str(reward_models["reward"]), "--prompts", str(prompts),
            "--max_new_tokens", "6", "--generate", "false"]  # fmt: skip
    assert main(argv) == 0  # nothing generated: read from generations.jsonl
    written = [json.loads(line) for line in (run_dir / "generations.jsonl").read_text().splitlines()]
    judged = [json.loads(line) for line in (run_dir / "judge.jsonl").read_text().splitlines()]
    assert [r["answer"] for r in judged] == [r["reply"] for r in written]
    capsys.readouterr()
    assert main([*argv[:-2], "--max_new_tokens", "5", "--generate", "false"]) == 2  # other decoding: not written
    assert "holds no answers of base" in capsys.readouterr().err


def test_judge_errors_and_what_is_not_a_reward_model(judged_run, reward_models, tiny_model_dir, capsys):
    run_dir, prompts = judged_run
    common = ["--prompts", str(prompts), "--max_new_tokens", "4"]
    assert main(["judge", str(run_dir), "--reward_model", str(tiny_model_dir), *common]) == 2
    assert "is a causal language model" in capsys.readouterr().err
    assert main(["judge", str(run_dir), "--reward_model", str(reward_models["three-labels"]), *common]) == 2
    assert "has 3 output labels" in capsys.readouterr().err
    reward = str(reward_models["reward"])
    assert main(["judge", str(run_dir), "--reward_model", reward, "--models", "checkpoint-99", *common]) == 2
    assert "has no model 'checkpoint-99'" in capsys.readouterr().err
    assert main(["judge", str(run_dir), "--reward_model", reward, "--samples", "3", *common]) == 2
    assert "--samples > 1 needs --do_sample" in capsys.readouterr().err
    assert not (run_dir / "judge.json").exists()
    from transformers import Qwen2ForSequenceClassification

    with pytest.MonkeyPatch.context() as patch:  # the reward model's forward on a full card
        patch.setattr(Qwen2ForSequenceClassification, "forward", out_of_memory)
        assert main(["judge", str(run_dir), "--reward_model", reward, "--batch_size", "4", *common]) == 2
    message = capsys.readouterr().err
    assert f"CUDA ran out of memory scoring 4 answers at once with {reward}: run the same command with " in message
    assert "--batch_size 2." in message and "Traceback" not in message
    assert not (run_dir / "judge.json").exists()
