"""A world built in fixtures: a tokenizer trained here, a tiny random Qwen2 model, and data in every format."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach for the Hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("DISABLE_MLFLOW_INTEGRATION", "TRUE")

CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def arithmetic_questions(count: int, seed: int = 0) -> list[tuple[str, str, str]]:
    """(question, right answer, wrong answer) triples, distinct questions."""
    rng = random.Random(seed)
    seen, triples = set(), []
    while len(triples) < count:
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        if (a, b) in seen:
            continue
        seen.add((a, b))
        wrong = a + b + rng.choice([-10, -1, 1, 10])
        triples.append((f"What is {a} + {b}?", f"{a} + {b} = {a + b}.", f"{a} + {b} = {wrong}."))
    return triples


def _corpus() -> list[str]:
    lines = []
    for question, right, wrong in arithmetic_questions(300, seed=1):
        lines += [question, right, wrong, f"Human: {question} Assistant: {right}"]
    lines += ["You are a helpful assistant.", "The sky is blue. The grass is green.", "Hello, how are you today?"]
    return lines


def out_of_memory(*args, **kwargs):
    """A method that fails as CUDA does when the card is full (monkeypatched over a model's or the trainer's)."""
    import torch

    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A 2-layer, 64-hidden Qwen2 with random weights and a BPE tokenizer (ChatML template) trained here."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    directory = tmp_path_factory.mktemp("tiny-qwen2")
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    bpe.train_from_iterator(_corpus(), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>", chat_template=CHATML_TEMPLATE
    )
    tokenizer.save_pretrained(directory)

    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    Qwen2ForCausalLM(config).save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def plain_model_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny model with a tokenizer that has no chat template."""
    import shutil

    directory = tmp_path_factory.mktemp("tiny-qwen2-plain")
    for path in tiny_model_dir.iterdir():
        shutil.copy(path, directory / path.name)
    (directory / "chat_template.jinja").unlink(missing_ok=True)
    config_path = directory / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config.pop("chat_template", None)
    config_path.write_text(json.dumps(config))
    return directory


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def rows_in_format(fmt: str, count: int = 16, seed: int = 0) -> list[dict]:
    """Preference rows in one of the formats dpolab detects."""
    rows = []
    for question, right, wrong in arithmetic_questions(count, seed):
        if fmt == "strings":
            rows.append({"prompt": question, "chosen": " " + right, "rejected": " " + wrong})
        elif fmt == "messages":
            rows.append(
                {
                    "prompt": [{"role": "user", "content": question}],
                    "chosen": [{"role": "assistant", "content": right}],
                    "rejected": [{"role": "assistant", "content": wrong}],
                }
            )
        elif fmt == "implicit":  # ultrafeedback_binarized's shape
            user = {"role": "user", "content": question}
            rows.append(
                {
                    "chosen": [user, {"role": "assistant", "content": right}],
                    "rejected": [user, {"role": "assistant", "content": wrong}],
                    "score_chosen": 8.0,
                    "score_rejected": 3.0,
                }
            )
        elif fmt == "hh":
            rows.append(
                {
                    "chosen": f"\n\nHuman: {question}\n\nAssistant: {right}",
                    "rejected": f"\n\nHuman: {question}\n\nAssistant: {wrong}",
                }
            )
        elif fmt == "mapped":  # stack-exchange-paired style column names
            rows.append({"question": question, "response_j": right, "response_k": wrong})
        else:
            raise ValueError(fmt)
    return rows


@pytest.fixture
def tiny_config(tmp_path, tiny_model_dir):
    """Write a YAML config training the tiny model for a few CPU steps; returns a function(data, **overrides)."""
    import yaml

    def make(dataset_name, **overrides) -> Path:
        values = {
            "model_name_or_path": str(tiny_model_dir),
            "dataset_name": str(dataset_name),
            "runs_dir": str(tmp_path / "runs"),
            "run_name": "tiny",
            "max_steps": 3,
            "per_device_train_batch_size": 4,
            "per_device_eval_batch_size": 4,
            "learning_rate": 1e-3,
            "beta": 0.1,
            "max_length": 64,
            "logging_steps": 1,
            "save_strategy": "no",
            "bf16": False,
            "activation_checkpointing": False,
            "report_to": ["tensorboard"],
            "seed": 0,
            "dataloader_num_workers": 0,
        }
        values.update(overrides)
        path = tmp_path / "config.yaml"
        path.write_text(yaml.safe_dump(values))
        return path

    return make


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch):
    """Each test gets its own dpolab cache (converted models, reference log-probs)."""
    monkeypatch.setenv("DPOLAB_CACHE", str(tmp_path / "dpolab-cache"))


@pytest.fixture(autouse=True, scope="session")
def transformers_logs_to_the_session_stderr():
    """transformers binds its log handler to the sys.stderr of its first log call; made inside a test that captures
    stderr (capsys), that stream is closed for every later test, whose warnings then print "--- Logging error ---"
    tracebacks into what the next capsys test reads. Bound here, before any test, to the session's stream."""
    from transformers.utils import logging

    logging.get_verbosity()  # sets up the handler
