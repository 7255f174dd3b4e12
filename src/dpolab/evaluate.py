"""`dpolab eval`: teacher-forced DPO metrics of a model against a reference, equal to what the trainer computes.

Pairs are tokenized exactly as TRL's DPOTrainer does (`data.pair_token_ids`), truncated and padded by TRL's own
`DataCollatorForPreference`, and scored through TRL's fused LM head; the arithmetic is in `logps.py`. Given a
run directory or a checkpoint inside one, `max_length`, `truncation_mode`, `beta`, `loss_type`, the reference
model and the eval data come from the run's config.yaml. Reference log-probs are cached on disk, so evaluating
ten checkpoints computes them once.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from dpolab.errors import DpolabError

# Aggregates carry TRL's metric names; `/per_token` variants divide each log-prob sum by its token count.
METRICS = (
    "loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
    "logps/rejected",
)  # fmt: skip
RUN_KEYS = ("dataset_config", "prompt_column", "chosen_column", "rejected_column", "max_length", "truncation_mode",
            "beta", "loss_type", "loss_weights", "label_smoothing", "dtype")  # fmt: skip


@dataclass
class EvalSettings:
    """What `dpolab eval` computes with: TRL's defaults < the run's config.yaml < command-line flags."""

    model: str
    ref: str | None = None
    data: str | None = None
    split: str = "test"
    dataset_config: str | None = None
    prompt_column: str = "prompt"
    chosen_column: str = "chosen"
    rejected_column: str = "rejected"
    limit: int | None = None
    holdout: float = 0.0  # >0: the seeded held-out part of `split`, as `dpolab train --eval_holdout` made it
    seed: int = 42
    max_length: int | None = 1024
    truncation_mode: str = "keep_start"
    beta: float = 0.1
    loss_type: list[str] = field(default_factory=lambda: ["sigmoid"])
    loss_weights: list[float] | None = None
    label_smoothing: float = 0.0
    batch_size: int = 8
    dtype: str = "float32"
    output_dir: str | None = None
    trust_remote_code: bool = False
    run_dir: str | None = None


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dpolab eval",
        description="Teacher-forced DPO metrics of --model against --ref, computed exactly as DPOTrainer does.",
    )
    parser.add_argument(
        "--model", required=True, help="run dir (uses final/), checkpoint dir, model dir, Hub id, .gguf or LoRA adapter"
    )
    parser.add_argument("--ref", help="reference model (default: the run's model_name_or_path, or the adapter's base)")
    parser.add_argument("--data", help="pairs source (default: the run's dataset_name)")
    parser.add_argument("--split", help="split (default: the run's eval_split, else 'test')")
    parser.add_argument("--limit", type=int, help="only the first N pairs")
    parser.add_argument("--max_length", type=int)
    parser.add_argument("--truncation_mode", choices=["keep_start", "keep_end"])
    parser.add_argument("--beta", type=float)
    parser.add_argument("--loss_type", nargs="+")
    parser.add_argument("--label_smoothing", type=float)
    parser.add_argument(
        "--batch_size", type=int, help="eval batch size (default: the run's per_device_eval_batch_size)"
    )
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--output_dir", help="where eval.jsonl and eval.json go (default: RUN/eval/<checkpoint>)")
    parser.add_argument("--trust_remote_code", action="store_true")
    return parser


def locate_model(model: str) -> tuple[str, Path | None]:
    """(the model to load, the run directory it belongs to or None)."""
    path = Path(model)
    if (path / "config.yaml").is_file() and (path / "final").is_dir():
        return str(path / "final"), path
    if path.is_dir() and (path.parent / "config.yaml").is_file() and (path.parent / "metrics.jsonl").is_file():
        return str(path), path.parent
    if path.is_dir() and (path / "metrics.jsonl").is_file():
        raise DpolabError(
            f"{path} looks like a run directory but has no config.yaml (or no final/): give --ref and --data."
        )
    if path.name.startswith("checkpoint-") and not path.exists():
        raise DpolabError(f"Checkpoint not found: {path}. Checkpoints of that run: {_checkpoints(path.parent)}.")
    return model, None


def _checkpoints(run_dir: Path) -> str:
    names = sorted(p.name for p in run_dir.glob("checkpoint-*")) if run_dir.is_dir() else []
    return ", ".join(names) or "none"


def run_settings(run_dir: Path, model: str, name: str | None = None) -> EvalSettings:
    """Settings that score `model` as the run's trainer would: its reference, eval data, truncation and loss.

    Output goes to RUN/eval/<name> (default: the model directory's name, e.g. checkpoint-500 or final).
    """
    from dpolab.config import load_yaml

    run_config = load_yaml(run_dir / "config.yaml")
    settings = EvalSettings(
        model=model,
        run_dir=str(run_dir),
        ref=run_config.get("model_name_or_path"),
        data=run_config.get("dataset_name"),
        split=run_config.get("eval_split")
        or (run_config.get("train_split", "train") if run_config.get("eval_holdout") else EvalSettings.split),
        holdout=0.0 if run_config.get("eval_split") else run_config.get("eval_holdout", 0.0),
        seed=run_config.get("seed", EvalSettings.seed),
        batch_size=run_config.get("per_device_eval_batch_size", EvalSettings.batch_size),
        output_dir=str(run_dir / "eval" / (name or Path(model).name)),
    )
    for key in RUN_KEYS:
        if key in run_config:
            setattr(settings, key, run_config[key])
    return settings


def resolve_settings(args: argparse.Namespace) -> EvalSettings:
    """TRL's defaults < the run's config.yaml (when --model is inside a run) < the flags given."""
    model, run_dir = locate_model(args.model)
    settings = run_settings(run_dir, model) if run_dir else EvalSettings(model=model)
    return apply_overrides(settings, {k: v for k, v in vars(args).items() if k != "model"})


def apply_overrides(settings: EvalSettings, overrides: dict) -> EvalSettings:
    for key, value in overrides.items():
        if value not in (None, False):
            setattr(settings, key, value)
    if settings.ref is None:
        settings.ref = adapter_base(settings.model)
    missing = [f"--{name}" for name in ("data", "ref") if getattr(settings, name) is None]
    if missing:
        raise DpolabError(
            f"Give {' and '.join(missing)} (or a --model inside a dpolab run directory, whose config.yaml says)."
        )
    if settings.batch_size < 1:
        raise DpolabError(f"--batch_size must be >= 1, got {settings.batch_size}.")
    settings.output_dir = settings.output_dir or f"runs/eval-{time.strftime('%Y%m%d-%H%M%S')}"
    return settings


def adapter_base(model: str) -> str | None:
    config = Path(model) / "adapter_config.json"
    return json.loads(config.read_text()).get("base_model_name_or_path") if config.is_file() else None


def run(args: argparse.Namespace) -> dict:
    """`dpolab eval`: resolve the settings, evaluate, print the table."""
    summary = evaluate_model(resolve_settings(args))
    print(format_table(summary, Path(summary["settings"]["output_dir"])))
    print(format_length_bias(summary["length_bias"]))
    return summary


def evaluate_model(settings: EvalSettings) -> dict:
    """Write eval.jsonl (per pair) and eval.json (aggregates) to settings.output_dir; return the aggregates."""
    from dpolab.data import load_pairs, split_holdout
    from dpolab.models import load_tokenizer, resolve_model

    remote = settings.trust_remote_code
    policy_path = (
        settings.model if is_adapter(settings.model) else resolve_model(settings.model, trust_remote_code=remote)
    )
    ref_path = resolve_model(settings.ref, trust_remote_code=remote)
    pairs = load_pairs(
        settings.data, settings.split, dataset_config=settings.dataset_config, prompt_column=settings.prompt_column,
        chosen_column=settings.chosen_column, rejected_column=settings.rejected_column,
    )  # fmt: skip
    if settings.holdout:  # the run evaluated on a held-out fraction of its training split: the same pairs
        pairs = split_holdout(pairs, settings.holdout, settings.seed)[1]
    dataset = pairs.dataset
    if settings.limit is not None:
        dataset = dataset.select(range(min(settings.limit, len(dataset))))
    tokenizer = load_tokenizer(ref_path if is_adapter(policy_path) else policy_path, trust_remote_code=remote)
    check_same_tokenizer(tokenizer, load_tokenizer(ref_path, trust_remote_code=remote), policy_path, ref_path)
    check_same_architecture(adapter_base(policy_path) or policy_path, ref_path)

    examples, dropped = tokenize_pairs(dataset, tokenizer, settings.max_length, settings.truncation_mode)
    if not examples:
        raise DpolabError(
            f"No pair of {pairs.source} can be scored: the prompt alone reaches max_length={settings.max_length} "
            f"in all {dropped}. Raise --max_length."
        )
    ref_logps = cached_ref_logps(settings, ref_path, examples, tokenizer)
    if policy_path == ref_path:  # the model against itself: same forward, margins exactly 0
        policy_logps = ref_logps
    else:
        policy_logps = model_logps(load_model(policy_path, settings), examples, tokenizer, settings, desc="policy")
    records = pair_records(examples, policy_logps, ref_logps, settings)
    summary = aggregate(records, settings, dropped)
    summary.update(model=settings.model, ref=settings.ref, data=pairs.source, settings=asdict(settings))
    summary["length_bias"] = length_bias(records)
    output = Path(settings.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    (output / "eval.jsonl").write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")
    (output / "eval.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    return summary


def is_adapter(path: str) -> bool:
    return (Path(path) / "adapter_config.json").is_file()


def check_same_tokenizer(policy_tokenizer, ref_tokenizer, policy_path: str, ref_path: str) -> None:
    """Margins compare token-level log-probs, so policy and reference must tokenize identically."""
    if policy_tokenizer.get_vocab() != ref_tokenizer.get_vocab():
        raise DpolabError(
            f"The policy ({policy_path}) and reference ({ref_path}) tokenizers differ "
            f"({len(policy_tokenizer)} vs {len(ref_tokenizer)} tokens): log-prob margins between them mean nothing. "
            f"Give the base model the policy was trained from as --ref."
        )


def check_same_architecture(policy_path: str, ref_path: str) -> None:
    """A reference of another architecture gives numbers, but they are not DPO's implicit rewards."""
    from transformers import AutoConfig

    policy, ref = AutoConfig.from_pretrained(policy_path), AutoConfig.from_pretrained(ref_path)
    shape = lambda c: (c.model_type, getattr(c, "hidden_size", None), getattr(c, "num_hidden_layers", None))  # noqa: E731
    if shape(policy) != shape(ref):
        raise DpolabError(
            f"The reference ({ref_path}: {ref.model_type}, hidden {getattr(ref, 'hidden_size', '?')}, "
            f"{getattr(ref, 'num_hidden_layers', '?')} layers) is not the architecture of the policy ({policy_path}: "
            f"{policy.model_type}, hidden {getattr(policy, 'hidden_size', '?')}, "
            f"{getattr(policy, 'num_hidden_layers', '?')} layers). Give the base model the policy was trained from."
        )


def tokenize_pairs(dataset, tokenizer, max_length: int | None, truncation_mode: str) -> tuple[list[dict], int]:
    """Token ids per pair as the trainer builds them, minus the pairs TRL drops (prompt alone >= max_length)."""
    from tqdm.auto import tqdm

    from dpolab.data import pair_token_ids

    examples, dropped = [], 0
    for index, pair in enumerate(tqdm(dataset, desc="Tokenizing", unit="pair")):
        ids = pair_token_ids(pair, tokenizer)
        if max_length is not None and truncation_mode == "keep_start" and len(ids["prompt_ids"]) >= max_length:
            dropped += 1
            continue
        examples.append({"index": index, **ids})
    return examples, dropped


def load_model(path: str, settings: EvalSettings):
    """The model in eval mode on the GPU if there is one, with TRL's fused LM head (as the trainer scores)."""
    import torch
    from transformers import AutoModelForCausalLM
    from trl.trainer.utils import add_fused_lm_head

    dtype = getattr(torch, settings.dtype) if settings.dtype not in (None, "auto") else "auto"
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if is_adapter(path):
        from peft import PeftModel

        base = AutoModelForCausalLM.from_pretrained(
            adapter_base(path), dtype=dtype, trust_remote_code=settings.trust_remote_code
        )
        add_fused_lm_head(base)  # before wrapping, as TRL does
        model = PeftModel.from_pretrained(base, path)
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, trust_remote_code=settings.trust_remote_code)
        add_fused_lm_head(model)
    return model.to(device).eval()


def model_logps(model, examples: list[dict], tokenizer, settings: EvalSettings, desc: str, disable_adapter=False):
    """Per pair: chosen/rejected log-prob sums and scored token counts, batched like the trainer's eval loop."""
    import contextlib

    import torch
    from tqdm.auto import tqdm
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    from dpolab.logps import sequence_logps

    collator = DataCollatorForPreference(
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
        max_length=settings.max_length,
        truncation_mode=settings.truncation_mode,
    )
    result = {"chosen": [], "rejected": [], "chosen_tokens": [], "rejected_tokens": []}
    adapter_off = model.disable_adapter() if disable_adapter else contextlib.nullcontext()
    device = next(model.parameters()).device
    from dpolab.train import score_completion_tokens_only

    with torch.no_grad(), adapter_off, score_completion_tokens_only():
        for start in tqdm(range(0, len(examples), settings.batch_size), desc=f"Scoring ({desc})", unit="batch"):
            batch = collator(
                [
                    {k: e[k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")}
                    for e in examples[start : start + settings.batch_size]
                ]
            )
            batch = {key: value.to(device) for key, value in batch.items()}
            labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
            outputs = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels,
                            fused_lm_head=True, use_cache=False)  # fmt: skip
            seq_len = batch["completion_mask"].size(1) - 1
            logps, tokens = sequence_logps(outputs.log_probs[:, -seq_len:].float(), batch["completion_mask"])
            chosen, rejected = logps.chunk(2)
            chosen_tokens, rejected_tokens = tokens.chunk(2)
            result["chosen"] += chosen.tolist()
            result["rejected"] += rejected.tolist()
            result["chosen_tokens"] += chosen_tokens.int().tolist()
            result["rejected_tokens"] += rejected_tokens.int().tolist()
    return result


def model_fingerprint(path: str) -> str:
    """Identifies a model's weights without hashing them: the path and each weight file's size and mtime."""
    directory = Path(path)
    if not directory.is_dir():
        return path  # a Hub id: its revision is fixed by the cache
    files = sorted(p for p in directory.iterdir() if p.suffix in (".safetensors", ".bin", ".json"))
    return json.dumps([str(directory.resolve())] + [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files])


def cached_ref_logps(settings: EvalSettings, ref_path: str, examples: list[dict], tokenizer) -> dict:
    """Reference log-probs, computed once per (reference weights, token ids, truncation, dtype) and kept on disk."""
    from dpolab.models import cache_dir

    token_ids = [[e["prompt_ids"], e["chosen_ids"], e["rejected_ids"]] for e in examples]
    key = hashlib.sha256(
        json.dumps(
            [
                model_fingerprint(ref_path),
                token_ids,
                settings.max_length,
                settings.truncation_mode,
                settings.dtype,
                settings.batch_size,
            ]
        ).encode()  # fmt: skip
    ).hexdigest()[:20]
    path = cache_dir() / "ref_logps" / f"{key}.json"
    if path.is_file():
        print(f"Reference log-probs from cache: {path}")
        return json.loads(path.read_text())
    if is_adapter(settings.model) and settings.ref == adapter_base(settings.model):
        logps = model_logps(
            load_model(settings.model, settings), examples, tokenizer, settings, "reference", disable_adapter=True
        )
    else:
        logps = model_logps(load_model(ref_path, settings), examples, tokenizer, settings, desc="reference")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(logps))
    return logps


def pair_records(examples: list[dict], policy: dict, ref: dict, settings: EvalSettings) -> list[dict]:
    """One record per pair: token counts, truncation, the four log-probs, rewards, margin, correctness."""
    import torch

    from dpolab.logps import pair_metrics

    tensor = lambda values: torch.tensor(values, dtype=torch.float64)  # noqa: E731
    metrics = pair_metrics(tensor(policy["chosen"]), tensor(policy["rejected"]), tensor(ref["chosen"]),
                           tensor(ref["rejected"]), settings.beta)  # fmt: skip
    records = []
    for i, example in enumerate(examples):
        prompt_len = len(example["prompt_ids"])
        chosen_len, rejected_len = len(example["chosen_ids"]), len(example["rejected_ids"])
        n_chosen, n_rejected = max(policy["chosen_tokens"][i], 1), max(policy["rejected_tokens"][i], 1)
        chosen_ratio = (policy["chosen"][i] - ref["chosen"][i]) / n_chosen
        rejected_ratio = (policy["rejected"][i] - ref["rejected"][i]) / n_rejected
        records.append({
            "index": example["index"],
            "prompt_tokens": prompt_len,
            "chosen_tokens": chosen_len,
            "rejected_tokens": rejected_len,
            "chosen_scored_tokens": policy["chosen_tokens"][i],
            "rejected_scored_tokens": policy["rejected_tokens"][i],
            "chosen_truncated": settings.max_length is not None and prompt_len + chosen_len > settings.max_length,
            "rejected_truncated": settings.max_length is not None and prompt_len + rejected_len > settings.max_length,
            "policy_chosen_logps": policy["chosen"][i],
            "policy_rejected_logps": policy["rejected"][i],
            "ref_chosen_logps": ref["chosen"][i],
            "ref_rejected_logps": ref["rejected"][i],
            "chosen_reward": metrics["rewards/chosen"][i].item(),
            "rejected_reward": metrics["rewards/rejected"][i].item(),
            "margin": metrics["rewards/margins"][i].item(),
            "correct": bool(metrics["rewards/accuracies"][i].item()),
            "margin_per_token": settings.beta * (chosen_ratio - rejected_ratio),
            "policy_chosen_logps_per_token": policy["chosen"][i] / n_chosen,
            "policy_rejected_logps_per_token": policy["rejected"][i] / n_rejected,
        })  # fmt: skip
    return records


def aggregate(records: list[dict], settings: EvalSettings, dropped: int) -> dict:
    """TRL's metrics two ways: as the trainer logs them (mean of per-batch means) and as true per-pair means."""
    import torch

    from dpolab.logps import batch_loss, mean_of_batch_means, sample_weighted_batch_mean

    columns = {
        "rewards/chosen": [r["chosen_reward"] for r in records],
        "rewards/rejected": [r["rejected_reward"] for r in records],
        "rewards/margins": [r["margin"] for r in records],
        "rewards/accuracies": [float(r["correct"]) for r in records],
        "logps/chosen": [r["policy_chosen_logps"] for r in records],
        "logps/rejected": [r["policy_rejected_logps"] for r in records],
    }
    per_token = {
        "rewards/margins/per_token": [r["margin_per_token"] for r in records],
        "logps/chosen/per_token": [r["policy_chosen_logps_per_token"] for r in records],
        "logps/rejected/per_token": [r["policy_rejected_logps_per_token"] for r in records],
    }
    loss_inputs = ("policy_chosen_logps", "policy_rejected_logps", "ref_chosen_logps", "ref_rejected_logps",
                   "chosen_scored_tokens", "rejected_scored_tokens")  # fmt: skip
    batch_losses, batch_sizes = [], []
    for start in range(0, len(records), settings.batch_size):
        batch = records[start : start + settings.batch_size]
        tensors = [torch.tensor([r[key] for r in batch], dtype=torch.float64) for key in loss_inputs]
        loss = batch_loss(settings.loss_type, settings.loss_weights, settings.beta, *tensors, settings.label_smoothing)
        if loss is None:
            batch_losses = None
            break
        batch_losses.append(loss.item())
        batch_sizes.append(len(batch))
    trainer = {key: mean_of_batch_means(values, settings.batch_size) for key, values in columns.items()}
    trainer["loss"] = sample_weighted_batch_mean(batch_losses, batch_sizes) if batch_losses else None
    per_pair = {key: sum(values) / len(values) for key, values in {**columns, **per_token}.items()}
    # Before training every margin is 0, so this is the informative "does the model prefer chosen" figure.
    per_pair["chosen_logp_higher"] = sum(r["policy_chosen_logps"] > r["policy_rejected_logps"] for r in records) / len(
        records
    )
    return {
        "pairs": len(records),
        "dropped_pairs": dropped,
        "truncated_pairs": sum(r["chosen_truncated"] or r["rejected_truncated"] for r in records),
        "eval_batch_size": settings.batch_size,
        "trainer_equivalent": trainer,
        "per_pair_mean": per_pair,
    }


def headline_metrics(summary: dict) -> dict:
    """The trainer-equivalent aggregates plus the share of pairs whose chosen answer is the likelier one."""
    return dict(summary["trainer_equivalent"], chosen_logp_higher=summary["per_pair_mean"]["chosen_logp_higher"])


def format_table(summary: dict, output: Path) -> str:
    trainer, per_pair = summary["trainer_equivalent"], summary["per_pair_mean"]
    fmt = lambda value: "-" if value is None else f"{value:.4f}"  # noqa: E731
    trainer_label = f"trainer (batch {summary['eval_batch_size']})"
    lines = [
        f"dpolab eval: {summary['model']}  vs reference {summary['ref']}",
        f"  {summary['pairs']} pairs from {summary['data']} ({summary['dropped_pairs']} dropped: prompt >= max_length; "
        f"{summary['truncated_pairs']} truncated)",
        f"  {'metric (TRL name)':<28}{trainer_label:>20}{'per-pair mean':>16}",
    ]
    for key in METRICS:
        lines.append(f"  {key:<28}{fmt(trainer.get(key)):>20}{fmt(per_pair.get(key)):>16}")
    for key in ("rewards/margins/per_token", "logps/chosen/per_token", "logps/rejected/per_token"):
        lines.append(f"  {key:<28}{'':>20}{fmt(per_pair[key]):>16}")
    lines += [
        "  trainer = TRL's logged figure: the mean of per-batch means (eval_loss: batch losses weighted by size).",
        "  logps are sums over completion tokens; per_token rows divide each by its token count.",
        f"  written: {output / 'eval.jsonl'} (per pair), {output / 'eval.json'}",
    ]
    return "\n".join(lines)


# --- `dpolab sweep`: the base model and every checkpoint of a run on held-out pairs ---------------------------

SWEEP_COLUMNS = ("step", "name", "loss", "rewards/accuracies", "rewards/margins", "logps/chosen", "logps/rejected",
                 "chosen_logp_higher")  # fmt: skip


def make_sweep_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dpolab sweep",
        description="Evaluate the base model and each checkpoint-N and final/ of a run: sweep.csv and sweep.png.",
    )
    parser.add_argument("run_dir")
    parser.add_argument("--data", help="held-out pairs (default: the run's dataset_name)")
    parser.add_argument("--split", help="split (default: the run's eval_split)")
    parser.add_argument("--limit", type=int)
    parser.add_argument("--batch_size", type=int)
    return parser


def sweep_points(run_dir: Path) -> list[tuple[str, int, str]]:
    """(name, step, model) for the base model, each checkpoint-N in step order, and final/."""
    from dpolab.config import load_yaml

    if not (run_dir / "config.yaml").is_file():
        raise DpolabError(f"{run_dir} is not a dpolab run directory: it has no config.yaml.")
    points = [("base", 0, load_yaml(run_dir / "config.yaml")["model_name_or_path"])]
    checkpoints = sorted(run_dir.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1]))
    points += [(p.name, int(p.name.split("-")[-1]), str(p)) for p in checkpoints]
    if (run_dir / "final").is_dir():
        summary = run_dir / "summary.json"
        final_step = json.loads(summary.read_text())["steps"] if summary.is_file() else points[-1][1] + 1
        if final_step not in [step for _, step, _ in points]:
            points.append(("final", final_step, str(run_dir / "final")))
    return points


def run_sweep(args: argparse.Namespace) -> list[dict]:
    """Evaluate each point once (an eval.json with the same settings is reused), then write the table and plot."""
    run_dir = Path(args.run_dir)
    overrides = {k: v for k, v in vars(args).items() if k != "run_dir"}
    rows = []
    for name, step, model in sweep_points(run_dir):
        settings = apply_overrides(run_settings(run_dir, model, name), overrides)
        previous = Path(settings.output_dir) / "eval.json"
        summary = json.loads(previous.read_text()) if previous.is_file() else None
        if summary is not None and summary.get("settings") == asdict(settings):
            print(f"{name}: already evaluated ({previous})")
        else:
            print(f"{name}: evaluating {model}")
            summary = evaluate_model(settings)
        metrics = headline_metrics(summary)
        rows.append({"step": step, "name": name, **{key: metrics.get(key) for key in SWEEP_COLUMNS[2:]}})
    write_sweep(rows, run_dir)
    return rows


def write_sweep(rows: list[dict], run_dir: Path) -> None:
    import csv

    with open(run_dir / "sweep.csv", "w", newline="", encoding="utf-8") as file:
        writer = csv.DictWriter(file, fieldnames=SWEEP_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    plot_sweep(rows, run_dir / "sweep.png")
    width = 12
    print("".join(f"{column[: width - 1]:>{width}}" for column in SWEEP_COLUMNS))
    for row in rows:
        print("".join(f"{_cell(row[column]):>{width}}" for column in SWEEP_COLUMNS))
    print(f"written: {run_dir / 'sweep.csv'}, {run_dir / 'sweep.png'}")


def _cell(value) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def plot_sweep(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [row["step"] for row in rows]
    figure, axes = plt.subplots(2, 2, figsize=(11, 7), constrained_layout=True)
    panels = [
        ("held-out DPO loss", ["loss"]),
        ("held-out reward accuracy (strict >)", ["rewards/accuracies", "chosen_logp_higher"]),
        ("held-out reward margin", ["rewards/margins"]),
        ("held-out log-probs (sum over tokens)", ["logps/chosen", "logps/rejected"]),
    ]
    for axis, (title, keys) in zip(axes.flat, panels):
        for key in keys:
            values = [row[key] for row in rows]
            if any(value is not None for value in values):
                axis.plot(steps, values, marker="o", label=key)
        axis.set_title(title)
        axis.set_xlabel("optimizer step (0 = base model)")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    figure.suptitle(f"Checkpoint sweep: {path.parent.name}")
    figure.savefig(path, dpi=110)
    plt.close(figure)


# --- length bias: does the margin follow the length difference? ----------------------------------------------


def pearson(xs: list[float], ys: list[float]) -> float | None:
    n = len(xs)
    if n < 2:
        return None
    mean_x, mean_y = sum(xs) / n, sum(ys) / n
    cov = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys))
    var_x = sum((x - mean_x) ** 2 for x in xs)
    var_y = sum((y - mean_y) ** 2 for y in ys)
    return None if var_x == 0 or var_y == 0 else cov / (var_x * var_y) ** 0.5


def ranks(values: list[float]) -> list[float]:
    """1-based ranks, ties sharing their average rank (as Spearman's rho needs)."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    result = [0.0] * len(values)
    start = 0
    while start < len(order):
        end = start
        while end + 1 < len(order) and values[order[end + 1]] == values[order[start]]:
            end += 1
        for position in range(start, end + 1):
            result[order[position]] = (start + end) / 2 + 1
        start = end + 1
    return result


def spearman(xs: list[float], ys: list[float]) -> float | None:
    return pearson(ranks(xs), ranks(ys))


# Half-open [low, high) token-difference buckets, symmetric around "equal length".
LENGTH_BUCKETS = ((-(10**9), -50), (-50, -10), (-10, 0), (0, 1), (1, 11), (11, 51), (51, 10**9))


def length_bias(records: list[dict]) -> dict:
    """Margins against the token-length difference (chosen - rejected), for sums and per-token means."""
    differences = [r["chosen_tokens"] - r["rejected_tokens"] for r in records]
    buckets = []
    for low, high in LENGTH_BUCKETS:
        members = [r for r, d in zip(records, differences) if low <= d < high]
        if members:
            buckets.append({
                "length_difference": _bucket_label(low, high),
                "pairs": len(members),
                "accuracy": sum(r["correct"] for r in members) / len(members),
                "mean_margin": sum(r["margin"] for r in members) / len(members),
                "mean_margin_per_token": sum(r["margin_per_token"] for r in members) / len(members),
            })  # fmt: skip
    margins = [r["margin"] for r in records]
    per_token = [r["margin_per_token"] for r in records]
    decided = [d for d in differences if d != 0]
    return {
        "buckets": buckets,
        "pearson_margin_vs_length_difference": pearson(differences, margins),
        "spearman_margin_vs_length_difference": spearman(differences, margins),
        "pearson_per_token_margin_vs_length_difference": pearson(differences, per_token),
        "spearman_per_token_margin_vs_length_difference": spearman(differences, per_token),
        "model_accuracy": sum(r["correct"] for r in records) / len(records),
        # "The longer answer wins": right when chosen is longer; ties in length count as wrong, like TRL's '>'.
        "longer_wins_accuracy": sum(d > 0 for d in differences) / len(records),
        "chosen_longer_share": sum(d > 0 for d in differences) / len(records),
        "equal_length_share": 1 - len(decided) / len(records),
    }


def _bucket_label(low: int, high: int) -> str:
    if low == -(10**9):
        return f"< {high}"
    if high == 10**9:
        return f">= {low}"
    return "0" if (low, high) == (0, 1) else f"[{low}, {high})"


def format_length_bias(bias: dict) -> str:
    fmt = lambda value: "-" if value is None else f"{value:+.3f}"  # noqa: E731
    lines = [
        "length bias (chosen tokens - rejected tokens):",
        f"  {'difference':<14}{'pairs':>7}{'accuracy':>10}{'mean margin':>13}{'per token':>11}",
    ]
    for bucket in bias["buckets"]:
        lines.append(
            f"  {bucket['length_difference']:<14}{bucket['pairs']:>7}{bucket['accuracy']:>10.3f}"
            f"{bucket['mean_margin']:>13.4f}{bucket['mean_margin_per_token']:>11.4f}"
        )
    lines += [
        f"  margin vs length difference: Pearson {fmt(bias['pearson_margin_vs_length_difference'])}, "
        f"Spearman {fmt(bias['spearman_margin_vs_length_difference'])}; per-token margin: Pearson "
        f"{fmt(bias['pearson_per_token_margin_vs_length_difference'])}, Spearman "
        f"{fmt(bias['spearman_per_token_margin_vs_length_difference'])}",
        f"  model accuracy {bias['model_accuracy']:.3f} vs 'longer answer wins' {bias['longer_wins_accuracy']:.3f}; "
        f"chosen is longer in {bias['chosen_longer_share']:.1%} of pairs, "
        f"equal length in {bias['equal_length_share']:.1%}",
    ]
    return "\n".join(lines)


def make_lengthbias_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dpolab lengthbias", description="Length bias from an eval.jsonl.")
    parser.add_argument("path", help="eval.jsonl, or the directory holding it")
    return parser


def run_lengthbias(args: argparse.Namespace) -> dict:
    path = Path(args.path)
    path = path / "eval.jsonl" if path.is_dir() else path
    if not path.is_file():
        raise DpolabError(f"No eval.jsonl at {path}: run `dpolab eval` first.")
    from dpolab.train import read_jsonl

    bias = length_bias(read_jsonl(path))
    print(format_length_bias(bias))
    return bias
