"""`dpolab judge RUN_DIR --reward_model RM`: do the model's own answers get better? Win rates against the base
model, scored by a reward model, with the length-controlled win rate beside them.

Each model's answers to the same prompts (generated here exactly as `dpolab generate` does, or read from the
run's generations.jsonl when it holds them) are scored by a sequence-classification reward model (one output;
its own chat template). For each model against `base`: the win rate (ties count half), its 95% bootstrap
interval over prompts, the mean reward, and the length-controlled win rate: the win probability a logistic
regression of win on the standardised length difference predicts at zero difference (AlpacaEval 2's idea:
DPO makes answers longer, and reward models like longer answers). Writes judge.jsonl and judge.json.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path

from dpolab.errors import DpolabError, out_of_memory_error
from dpolab.generate import Decoding
from dpolab.rundir import (
    GENERATION_STATS,
    GENERATIONS,
    JUDGE_RECORDS,
    JUDGE_SUMMARY,
    RunDir,
    checkpoint_step,
    read_json,
    read_jsonl,
    require_run,
    write_json,
    write_jsonl,
)

BASELINE = "base"
BOOTSTRAP_RESAMPLES = 2000
EXTREMES = 3  # prompts shown where a model won or lost most
INTERCEPT_PRIOR, SLOPE_PRIOR = 1.0, 1e-3  # L2 weights of the length-controlled regression (see its docstring)


@dataclass(kw_only=True)
class JudgeConfig(Decoding):
    """Reward-model win rates of a run's models against its base model, and length-controlled win rates."""

    run_dir: str = field(metadata={"positional": True, "help": "the run directory"})
    reward_model: str = field(
        metadata={
            "help": "a sequence-classification reward model with one output: local directory or Hub id, "
            "e.g. Skywork/Skywork-Reward-V2-Qwen3-0.6B"
        }
    )
    models: str = field(
        default="base,final",
        metadata={
            "help": "comma-separated: base, final, checkpoint-N, or 'checkpoints' for every checkpoint and final"
        },
    )
    samples: int = field(default=1, metadata={"help": "answers per prompt and model (with --do_sample)"})
    generate: bool = field(
        default=True, metadata={"help": "generate answers the run's generations.jsonl lacks (false: read only)"}
    )
    trust_remote_code: bool = field(default=False, metadata={"help": "allow model code from the Hub"})


def run(config: JudgeConfig) -> dict:
    """Answers for every model, their rewards, then win rates against base; prints the table."""
    run_dir = require_run(config.run_dir)
    check_config(config)
    models = model_points(run_dir, config.models)
    reward_path = check_reward_model(config.reward_model, config.trust_remote_code)
    answers = collect_answers(run_dir, models, config)
    rewards = score_answers(reward_path, answers, config)
    records = [{**answer, "reward": reward} for answer, reward in zip(answers, rewards, strict=True)]
    summary = summarize(records, models, config, reward_path)
    write_jsonl(run_dir.file(JUDGE_RECORDS), records)
    write_json(run_dir.file(JUDGE_SUMMARY), summary)
    print(format_table(summary))
    print(f"written: {run_dir.file(JUDGE_RECORDS)}, {run_dir.file(JUDGE_SUMMARY)}")
    return summary


def check_config(config: JudgeConfig) -> None:
    problems = []
    if config.samples < 1:
        problems.append(f"--samples must be >= 1, got {config.samples}.")
    if config.samples > 1 and not config.do_sample:
        problems.append("--samples > 1 needs --do_sample: greedy decoding gives the same answer every time.")
    if config.max_new_tokens < 1:
        problems.append(f"--max_new_tokens must be >= 1, got {config.max_new_tokens}.")
    if problems:
        raise DpolabError("Invalid options:\n  - " + "\n  - ".join(problems))


def model_points(run_dir: RunDir, spec: str) -> list[tuple[str, int, str]]:
    """(label, step, model path) for base, checkpoint-N and final; base first (the baseline)."""
    summary = run_dir.read_summary() or {}
    available = {p.name: (checkpoint_step(p), str(p)) for p in run_dir.checkpoints()}
    if run_dir.final_dir.is_dir():
        available["final"] = (summary.get("steps", max([s for s, _ in available.values()], default=0) + 1),
                              str(run_dir.final_dir))  # fmt: skip
    labels = [label.strip() for label in spec.split(",") if label.strip()]
    if "checkpoints" in labels:  # every checkpoint, and final unless a checkpoint holds the same step (as sweep)
        index = labels.index("checkpoints")
        saved = sorted((name for name in available if name != "final"), key=lambda name: available[name][0])
        final_step = available.get("final", (None,))[0]
        extra = ["final"] if "final" in available and final_step not in [available[n][0] for n in saved] else []
        labels[index : index + 1] = saved + extra
    points = [(BASELINE, 0, run_dir.base_model())]
    for label in dict.fromkeys(labels):
        if label == BASELINE:
            continue
        if label not in available:
            raise DpolabError(
                f"{run_dir.path} has no model '{label}'. It has: {', '.join(['base', *sorted(available)])}."
            )
        points.append((label, *available[label]))
    if len(points) < 2:
        raise DpolabError("Name at least one model to judge against base: --models final (or checkpoint-N).")
    return points


def check_reward_model(name: str, trust_remote_code: bool) -> str:
    """The reward model's location; a causal LM or a classifier with several labels is refused before loading."""
    from transformers import AutoConfig

    from dpolab.models import resolve_model

    path = resolve_model(name, trust_remote_code=trust_remote_code)
    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    architectures = config.architectures or []
    if not any("SequenceClassification" in architecture for architecture in architectures):
        kind = "a causal language model" if any("CausalLM" in a for a in architectures) else "not a reward model"
        raise DpolabError(
            f"{name} is {kind} ({', '.join(architectures) or 'no architecture'}): a reward model is a sequence "
            f"classifier with one output (AutoModelForSequenceClassification, num_labels 1), e.g. "
            f"Skywork/Skywork-Reward-V2-Qwen3-0.6B or OpenAssistant/reward-model-deberta-v3-large-v2."
        )
    if config.num_labels != 1:
        raise DpolabError(
            f"{name} has {config.num_labels} output labels ({', '.join(map(str, config.id2label.values()))}): a reward "
            f"model gives one score per answer (num_labels 1). A classifier's label probabilities are not rewards."
        )
    return path


# --- answers ----------------------------------------------------------------------------------------------------


def collect_answers(run_dir: RunDir, models, config: JudgeConfig) -> list[dict]:
    """One record per (model, prompt, sample): read from generations.jsonl when it holds them with the same
    prompts and decoding, generated otherwise."""
    from dpolab.generate import GenerateConfig, decoding_record, generate_all, load_prompts

    prompts = load_prompts(config.prompts)
    decoding, written = written_generations(run_dir)
    settings = {item.name: getattr(config, item.name) for item in dataclasses.fields(Decoding)}
    answers = []
    for sample in range(config.samples):
        generation = GenerateConfig(models="", **settings | {"seed": config.seed + sample})
        for label, step, path in models:
            rows = written.get(location(path)) if decoding == decoding_record(generation) else None
            if rows is not None and [row["prompt"] for row in rows] != prompts:
                rows = None  # written for other prompts
            if rows is None:
                if not config.generate:
                    raise DpolabError(
                        f"{run_dir.file(GENERATIONS)} holds no answers of {label} to these prompts with this decoding: "
                        f"run `dpolab generate --models {path}` with the same prompts, or drop --generate false."
                    )
                rows = generate_all([(label, path)], prompts, generation)
            answers += [
                {"model": label, "step": step, "sample": sample, "prompt_index": row["prompt_index"],
                 "prompt": row["prompt"], "answer": row["reply"], "length": row["new_tokens"]}
                for row in rows
            ]  # fmt: skip
    return answers


def written_generations(run_dir: RunDir) -> tuple[dict | None, dict[str, list[dict]]]:
    """The decoding of the run's generations.jsonl and its rows by model location (read once)."""
    from dpolab.rundir import locate_model

    stats = read_json(run_dir.file(GENERATION_STATS)) or {}
    locations, by_model = {}, {}
    for row in read_jsonl(run_dir.file(GENERATIONS)):
        label = row["model"]
        if label not in locations:
            locations[label] = location(run_dir.base_model() if label == BASELINE else locate_model(label)[0])
        by_model.setdefault(locations[label], []).append(row)
    return stats.get("decoding"), by_model


def location(path: str) -> str:
    """A model's path as one string whatever way it was written (a Hub id stays itself)."""
    return str(Path(path).resolve()) if Path(path).exists() else path


# --- rewards ------------------------------------------------------------------------------------------------------


def score_answers(reward_path: str, answers: list[dict], config: JudgeConfig) -> list[float]:
    """The reward model's score of each (prompt, answer): its chat template when it has one, else the
    (question, answer) text pair its tokenizer encodes (OpenAssistant's DeBERTa reward models)."""
    import torch
    from tqdm.auto import tqdm
    from transformers import AutoModelForSequenceClassification

    from dpolab.models import device, load_tokenizer

    tokenizer = load_tokenizer(reward_path, trust_remote_code=config.trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForSequenceClassification.from_pretrained(
        reward_path, dtype="auto", trust_remote_code=config.trust_remote_code
    )
    model.config.pad_token_id = tokenizer.pad_token_id
    model = model.to(device()).eval()
    scores = []
    padding_side, tokenizer.padding_side = tokenizer.padding_side, "right"
    try:
        for start in tqdm(range(0, len(answers), config.batch_size), desc="Scoring answers", unit="batch"):
            batch = answers[start : start + config.batch_size]
            if tokenizer.chat_template is not None:
                conversations = [[*a["prompt"], {"role": "assistant", "content": a["answer"]}] for a in batch]
                inputs = tokenizer.apply_chat_template(conversations, tokenize=True, return_dict=True,
                                                       return_tensors="pt", padding=True, truncation=True)  # fmt: skip
            else:
                questions = [a["prompt"][-1]["content"] for a in batch]
                inputs = tokenizer(questions, [a["answer"] for a in batch], return_tensors="pt", padding=True,
                                   truncation=True)  # fmt: skip
            with torch.no_grad():
                logits = model(**inputs.to(model.device)).logits
            scores += logits[:, 0].float().tolist()
    except torch.OutOfMemoryError:
        doing = f"scoring {config.batch_size} answers at once with {reward_path}"
        at_one = "one answer at a time does not fit: a smaller reward model or --max_new_tokens"
        raise out_of_memory_error(doing, config.batch_size, at_one) from None
    finally:
        tokenizer.padding_side = padding_side
    return scores


# --- statistics (pure) --------------------------------------------------------------------------------------------


def wins(model_rewards: list[float], base_rewards: list[float]) -> list[float]:
    """1 where the model's answer scores higher, 0.5 for a tie, 0 where base's does."""
    return [1.0 if m > b else 0.5 if m == b else 0.0 for m, b in zip(model_rewards, base_rewards, strict=True)]


def bootstrap_interval(outcomes: list[float], groups: list[int], resamples: int = BOOTSTRAP_RESAMPLES,
                       seed: int = 0) -> tuple[float, float]:  # fmt: skip
    """95% percentile interval of the mean outcome, resampling whole groups (prompts, with all their samples)."""
    import random

    by_group: dict[int, list[float]] = {}
    for outcome, group in zip(outcomes, groups, strict=True):
        by_group.setdefault(group, []).append(outcome)
    keys = list(by_group)
    rng = random.Random(seed)
    means = []
    for _ in range(resamples):
        drawn = [value for key in rng.choices(keys, k=len(keys)) for value in by_group[key]]
        means.append(sum(drawn) / len(drawn))
    means.sort()
    return means[int(0.025 * resamples)], means[min(resamples - 1, int(0.975 * resamples))]


def length_controlled_win_rate(outcomes: list[float], length_differences: list[float]) -> float:
    """The win probability at equal lengths: sigmoid(a) of a logistic regression of the outcome (ties as 1/2) on
    tanh(length difference / its standard deviation), AlpacaEval 2's length feature.

    A weak Gaussian prior on the intercept (one pseudo-observation's worth) keeps the estimate at 1/2 only when
    the data say nothing, and a very weak one on the slope keeps a fit finite when the longer answer always wins
    (then the length explains the wins and the estimate stays near 1/2). Fitted with torch's L-BFGS.
    """
    import torch

    if not outcomes:
        return float("nan")
    y = torch.tensor(outcomes, dtype=torch.float64)
    d = torch.tensor(length_differences, dtype=torch.float64)
    spread = float(d.std()) if len(length_differences) > 1 else 0.0
    feature = torch.tanh(d / spread) if spread > 0 else torch.zeros_like(d)
    params = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([params], max_iter=500, tolerance_grad=1e-12, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        logits = params[0] + params[1] * feature
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, y, reduction="sum")
        loss = loss + 0.5 * INTERCEPT_PRIOR * params[0] ** 2 + 0.5 * SLOPE_PRIOR * params[1] ** 2
        loss.backward()
        return loss

    optimizer.step(closure)
    return float(torch.sigmoid(params[0].detach()))


def compare_with_base(records: list[dict], label: str) -> dict:
    """Win rate, its interval and the length-controlled win rate of one model against base, matched by
    (prompt, sample)."""
    base = {(r["prompt_index"], r["sample"]): r for r in records if r["model"] == BASELINE}
    mine = [r for r in records if r["model"] == label]
    pairs = [(r, base[(r["prompt_index"], r["sample"])]) for r in mine]
    outcomes = wins([m["reward"] for m, _ in pairs], [b["reward"] for _, b in pairs])
    interval = bootstrap_interval(outcomes, [m["prompt_index"] for m, _ in pairs])
    differences = [m["length"] - b["length"] for m, b in pairs]
    return {
        "win_rate": sum(outcomes) / len(outcomes),
        "win_rate_ci": list(interval),
        "lc_win_rate": length_controlled_win_rate(outcomes, differences),
        "wins": outcomes.count(1.0),
        "ties": outcomes.count(0.5),
        "losses": outcomes.count(0.0),
    }


def extremes(records: list[dict], label: str, count: int = EXTREMES) -> dict:
    """The prompts where the model's reward beat base's by most, and fell behind by most."""
    from dpolab.render import prompt_text

    base = {(r["prompt_index"], r["sample"]): r for r in records if r["model"] == BASELINE}
    rows = []
    for r in records:
        if r["model"] == label:
            b = base[(r["prompt_index"], r["sample"])]
            rows.append({"prompt": prompt_text(r["prompt"]), "answer": r["answer"], "baseline_answer": b["answer"],
                         "reward_difference": r["reward"] - b["reward"]})  # fmt: skip
    rows.sort(key=lambda row: row["reward_difference"])
    return {"won": [r for r in reversed(rows[-count:]) if r["reward_difference"] > 0],
            "lost": [r for r in rows[:count] if r["reward_difference"] < 0]}  # fmt: skip


def summarize(records: list[dict], models, config: JudgeConfig, reward_path: str) -> dict:
    summary_models = {}
    for label, step, _ in models:
        mine = [r for r in records if r["model"] == label]
        entry = {"step": step, "mean_reward": sum(r["reward"] for r in mine) / len(mine),
                 "mean_length": sum(r["length"] for r in mine) / len(mine)}  # fmt: skip
        if label != BASELINE:
            entry.update(compare_with_base(records, label))
        summary_models[label] = entry
    return {
        "reward_model": config.reward_model,
        "reward_model_path": reward_path,
        "prompts": len({r["prompt_index"] for r in records}),
        "samples": config.samples,
        "decoding": {
            "do_sample": config.do_sample,
            "temperature": config.temperature if config.do_sample else None,
            "seed": config.seed,
            "max_new_tokens": config.max_new_tokens,
        },  # fmt: skip
        "baseline": BASELINE,
        "models": summary_models,
        "extremes": {label: extremes(records, label) for label, _, _ in models if label != BASELINE},
    }


def format_table(summary: dict) -> str:
    fmt = lambda value: "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.3f}"  # noqa: E731
    lines = [
        f"dpolab judge: reward model {summary['reward_model']}, {summary['prompts']} prompts x {summary['samples']} "
        f"sample(s), against {summary['baseline']}",
        f"  {'model':<18}{'step':>6}{'win rate':>10}{'95% interval':>17}{'LC win rate':>13}{'mean reward':>13}"
        f"{'mean length':>13}",
    ]
    for label, m in summary["models"].items():
        interval = m.get("win_rate_ci")
        span = f"{interval[0]:.3f}-{interval[1]:.3f}" if interval else "-"
        lines.append(f"  {label:<18}{m['step']:>6}{fmt(m.get('win_rate')):>10}{span:>17}{fmt(m.get('lc_win_rate')):>13}"
                     f"{m['mean_reward']:>13.3f}{m['mean_length']:>13.1f}")  # fmt: skip
    lines.append(
        "  win rate: ties count half; LC: the win rate a logistic regression on the length difference predicts at "
        "equal lengths."
    )
    return "\n".join(lines)
