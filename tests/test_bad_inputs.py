"""The catalogue of user mistakes: each is one clear message, exit code 2, no traceback, and nothing written."""

import subprocess
import sys

import pytest
import yaml
from conftest import rows_in_format, write_jsonl


def messages_rows(count=8):
    return rows_in_format("messages", count)


def mutate_rows(mutation):
    rows = messages_rows()
    mutation(rows)
    return rows


def set_content(rows, value):
    rows[3]["chosen"][0]["content"] = value


# name -> (how to break it, the text the error must contain). `setup(world)` returns the `dpolab` argv.
CASES = {
    "missing data file": (
        lambda w: w.train(dataset_name=str(w.tmp / "nope.jsonl")),
        "Data file or directory not found",
    ),
    "empty dataset": (lambda w: w.train(data=w.file("empty.jsonl", "\n")), "holds no rows"),
    "missing columns": (
        lambda w: w.train(data=w.rows([{"question": "q", "answer": "a"}])),
        "missing column(s) 'chosen', 'rejected'. Columns present: question, answer",
    ),
    "non-string content": (
        lambda w: w.train(data=w.rows(mutate_rows(lambda r: set_content(r, 42)))),
        "row 3: 'chosen'[0].content must be a string, got int",
    ),
    "message without role": (
        lambda w: w.train(data=w.rows(mutate_rows(lambda r: r[2]["prompt"][0].pop("role")))),
        "row 2: 'prompt'[0] has no 'role'",
    ),
    "message without content": (
        lambda w: w.train(data=w.rows(mutate_rows(lambda r: r[1]["rejected"][0].pop("content")))),
        "row 1: 'rejected'[0] has no 'content'",
    ),
    "unknown role": (
        lambda w: w.train(data=w.rows(mutate_rows(lambda r: r[4]["chosen"][0].update(role="ai")))),
        "row 4: 'chosen'[0] has unknown role 'ai'",
    ),
    "chosen == rejected everywhere": (
        lambda w: w.train(data=w.rows([{**r, "rejected": r["chosen"]} for r in messages_rows()])),
        "chosen == rejected in all 8 rows",
    ),
    "every pair longer than max_length after the prompt": (
        lambda w: w.train(max_length=12),  # prompts alone are 22 tokens
        "All 8 train pairs were dropped",
    ),
    "mixed string and message rows": (
        lambda w: w.train(data=w.rows(messages_rows(4) + rows_in_format("strings", 2))),
        "row 4: mixed formats",
    ),
    "YAML syntax error": (lambda w: ["train", "--config", w.file("bad.yaml", "beta: [0.1\nseed: 1\n")], "line 2"),
    "unknown config key": (
        lambda w: w.train(learning_rat=1e-5),
        "unknown key 'learning_rat'. Did you mean 'learning_rate'?",
    ),
    "wrong type for a field": (lambda w: w.train(max_steps="many"), "invalid int value: 'many'"),
    "negative beta": (lambda w: w.train(beta=-0.5), "beta must be > 0"),
    "unknown loss_type": (lambda w: w.train(loss_type=["dpo"]), "loss_type: unknown 'dpo'"),
    "unknown preset": (lambda w: ["train", "--preset", "ful"], "Unknown preset 'ful'. Did you mean 'full'?"),
    "model directory missing": (
        lambda w: w.train(model_name_or_path=str(w.tmp / "models" / "gone")),
        "Model directory not found",
    ),
    "corrupt .gguf": (
        lambda w: w.train(model_name_or_path=w.file("broken.gguf", "GGUF but not really")),
        "could not be read as a GGUF model",
    ),
    "tokenizer without a chat template given message data": (
        lambda w: w.train(model_name_or_path=str(w.plain_model)),
        "has no chat template",
    ),
    "--resume with no checkpoint": (lambda w: w.train(resume=True), "Nothing to resume"),
    "an existing run without --resume": (lambda w: w.existing_run(), "already exists and is never overwritten"),
    "offline with no local copy": (
        lambda w: w.train(model_name_or_path="someone/uncached-model-xyz"),
        "Model 'someone/uncached-model-xyz' is not in the local Hugging Face cache",
    ),
    "checkpoint of another architecture as --ref": (lambda w: w.eval_other_architecture(), "is not the architecture"),
    "eval split missing": (lambda w: w.train(eval_split="validation"), "no file for split 'validation'"),
    "batch size 0": (lambda w: w.train(per_device_train_batch_size=0), "per_device_train_batch_size must be >= 1"),
    "non-UTF-8 file": (lambda w: w.train(data=w.file("latin1.jsonl", b'{"prompt": "caf\xe9"}\n')), "not UTF-8 text"),
    "pickle-only weights without the flag": (
        lambda w: w.train(model_name_or_path=str(w.pickle_model())),
        "holds its weights only as pickle",
    ),
    "--config and --preset together": (lambda w: ["train", "--preset", "smoke", "--config", w.config()], "not both"),
    "an empty reply, without drop_invalid_rows": (
        lambda w: w.train(data=w.rows(mutate_rows(lambda r: set_content(r, " ")))),
        "add `--drop_invalid_rows true`",
    ),
    "every row invalid, even with drop_invalid_rows": (
        lambda w: w.train(data=w.rows([{**r, "chosen": []} for r in messages_rows()]), drop_invalid_rows=True),
        "Every row is invalid",
    ),
    "answers the tokenizer turns into nothing": (
        lambda w: w.train(
            model_name_or_path=str(w.broken_tokenizer()),
            data=w.rows(
                [
                    {
                        "prompt": [{"role": "user", "content": "say something"}],
                        "chosen": [{"role": "assistant", "content": "fine"}],
                        "rejected": [{"role": "assistant", "content": "no"}],
                    }
                ]
                * 4
            ),
        ),  # fmt: skip
        "into no tokens at all",
    ),
    "a split named for a single file": (
        lambda w: [
            "eval",
            "--model",
            str(w.model),
            "--ref",
            str(w.model),
            "--data",
            w.data + "/train.jsonl",
            "--split",
            "test",
        ],  # fmt: skip
        "one split, used whole",
    ),
    "a misspelt eval option": (lambda w: ["eval", "--modle", "x"], "unknown option '--modle'. Did you mean '--model'?"),
    "data check given two sources": (
        lambda w: ["data", "check", w.data, "--preset", "smoke"],
        "Give the data to check one way: SOURCE, --preset NAME or --train_config FILE.yaml (got source, preset).",
    ),
    "data check given a training config as its own --config": (
        lambda w: ["data", "check", "--config", w.config()],
        "is a `dpolab train` config: check its data with --train_config",
    ),
    "judge without a reward model": (
        lambda w: ["judge", str(w.tmp / "runs" / "x")],
        "--reward_model is required (a sequence-classification reward model with one output: local directory or "
        "Hub id, e.g. Skywork/Skywork-Reward-V2-Qwen3-0.6B).",
    ),
    "eval of a missing checkpoint": (
        lambda w: ["eval", "--model", str(w.tmp / "runs" / "x" / "checkpoint-7")],
        "Checkpoint not found",
    ),
}


class World:
    """A tiny model, a good dataset and a config; each case breaks one thing."""

    def __init__(self, tmp, model, plain_model):
        self.tmp, self.model, self.plain_model = tmp, model, plain_model
        self.data = str(write_jsonl(tmp / "data" / "train.jsonl", messages_rows()).parent)

    def file(self, name, content):
        path = self.tmp / name
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
        return str(path)

    def rows(self, rows):
        return str(write_jsonl(self.tmp / "case" / "train.jsonl", rows).parent)

    def config(self, data=None, **overrides):
        values = {
            "model_name_or_path": str(self.model), "dataset_name": data or self.data,
            "runs_dir": str(self.tmp / "runs"), "run_name": "case", "max_steps": 2, "per_device_train_batch_size": 4,
            "bf16": False, "max_length": 64, "activation_checkpointing": False, "save_strategy": "no",
            "logging_steps": 1,
        }  # fmt: skip
        values.update(overrides)
        return self.file("config.yaml", yaml.safe_dump(values))

    def train(self, data=None, **overrides):
        return ["train", "--config", self.config(data, **overrides)]

    def existing_run(self):
        (self.tmp / "runs" / "case").mkdir(parents=True)
        (self.tmp / "runs" / "case" / "config.yaml").write_text("mine: true\n")
        return self.train()

    def broken_tokenizer(self):
        from test_real_data import broken_tokenizer_model

        return broken_tokenizer_model(self.tmp, self.model)

    def pickle_model(self):
        import shutil

        directory = self.tmp / "pickled"
        shutil.copytree(self.model, directory)
        (directory / "model.safetensors").unlink()
        (directory / "pytorch_model.bin").write_bytes(b"not really a pickle")
        return directory

    def eval_other_architecture(self):
        from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

        tokenizer = AutoTokenizer.from_pretrained(self.model)
        other = self.tmp / "llama"
        config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                             num_attention_heads=2, num_key_value_heads=2)  # fmt: skip
        LlamaForCausalLM(config).save_pretrained(other)
        tokenizer.save_pretrained(other)
        return ["eval", "--model", str(self.model), "--ref", str(other), "--data", self.data, "--split", "train"]


@pytest.fixture
def world(tmp_path, tiny_model_dir, plain_model_dir):
    return World(tmp_path, tiny_model_dir, plain_model_dir)


def files_under(path):
    return sorted(str(p) for p in path.rglob("*")) if path.exists() else []


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_clear_error_and_writes_nothing(case, world, capsys):
    from dpolab.cli import main

    setup, expected = CASES[case]
    argv = setup(world)
    runs_before = files_under(world.tmp / "runs")
    assert main(argv) == 2, case
    message = capsys.readouterr().err
    assert expected in message, message
    assert any(line.startswith("dpolab ") and ": error: " in line for line in message.splitlines())
    assert "Traceback" not in message
    assert files_under(world.tmp / "runs") == runs_before, "a failed command left files behind"


def test_the_catalogue_is_complete():
    assert len(CASES) >= 25


def test_the_cli_exits_2_without_traceback(world):
    result = subprocess.run([sys.executable, "-m", "dpolab.cli", *world.train(beta=-1)], capture_output=True, text=True)
    assert result.returncode == 2
    assert "beta must be > 0" in result.stderr and "Traceback" not in result.stderr


def test_a_reader_that_leaves_early_gets_no_traceback():
    """`dpolab ... --help | head -1`: the pipe closes before dpolab writes; it stops quietly."""
    process = subprocess.Popen([sys.executable, "-m", "dpolab.cli", "data", "check", "--help"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    process.stdout.close()  # before the interpreter has even started: every write meets a closed pipe
    stderr = process.stderr.read().decode()
    assert process.wait(timeout=60) == 1
    assert "Traceback" not in stderr and "BrokenPipeError" not in stderr, stderr
