"""`dpolab eval`: teacher-forced DPO metrics of a model against a reference, equal to what the trainer computes.

Pairs are tokenized exactly as TRL's DPOTrainer does (`data.pair_token_ids`), truncated and padded by TRL's own
`DataCollatorForPreference`, and scored through TRL's fused LM head at the run's precision (weights dtype and
bf16/fp16 autocast); the arithmetic is in `logps.py`. Given a run directory or a checkpoint inside one, the
settings, the reference model and the eval data come from the run's config.yaml. Reference log-probs are cached
on disk, so evaluating ten checkpoints computes them once.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path

from dpolab.config import given_fields, trl_default
from dpolab.errors import DpolabError, out_of_memory_error
from dpolab.rundir import EVAL_RECORDS, EVAL_SUMMARY, RunDir, locate_model, write_json, write_jsonl

# Aggregates carry TRL's metric names; `/per_token` variants divide each log-prob sum by its token count.
METRICS = (
    "loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
    "logps/rejected",
)  # fmt: skip
PER_TOKEN_METRICS = ("rewards/margins/per_token", "logps/chosen/per_token", "logps/rejected/per_token")


@dataclass
class EvalConfig:
    """Teacher-forced DPO metrics of --model against its reference, computed exactly as DPOTrainer does.

    Each unset field comes from the run's config.yaml when --model is a run or a checkpoint of one, else from
    TRL's own default.
    """

    model: str = field(
        metadata={"help": "run dir (uses final/), checkpoint dir, model dir, Hub id, .gguf or LoRA adapter"}
    )
    ref: str | None = field(default=None, metadata={"help": "reference model (default: the run's base model, or "
                                                             "the adapter's base)"})  # fmt: skip
    data: str | None = field(default=None, metadata={"help": "pairs source (default: the run's dataset_name)"})
    split: str | None = field(
        default=None,
        metadata={"help": "split (default: the run's eval split; a directory's or Hub dataset's 'test'; a single "
                          "file is one split, used whole)"},
    )  # fmt: skip
    dataset_config: str | None = field(default=None, metadata={"help": "Hub dataset configuration name"})
    prompt_column: str | None = field(default=None, metadata={"help": "column holding the prompt"})
    chosen_column: str | None = field(default=None, metadata={"help": "column holding the preferred answer"})
    rejected_column: str | None = field(default=None, metadata={"help": "column holding the dispreferred answer"})
    holdout: float | None = field(
        default=None, metadata={"help": "score the seeded held-out fraction of the split, as `train --eval_holdout`"}
    )
    seed: int | None = field(default=None, metadata={"help": "seed of the held-out split"})
    limit: int | None = field(default=None, metadata={"help": "only the first N pairs"})
    drop_invalid_rows: bool = field(default=False, metadata={"help": "leave out (and list) the rows that fail "
                                                                      "validation instead of stopping"})  # fmt: skip
    max_length: int | None = field(default=None, metadata={"help": "TRL's max_length (prompt + completion)"})
    truncation_mode: str | None = field(
        default=None, metadata={"help": "TRL's truncation_mode", "choices": ("keep_start", "keep_end")}
    )
    beta: float | None = field(default=None, metadata={"help": "TRL's beta"})
    loss_type: list[str] | None = field(default=None, metadata={"help": "TRL's loss_type"})
    loss_weights: list[float] | None = field(default=None, metadata={"help": "TRL's loss_weights"})
    label_smoothing: float | None = field(default=None, metadata={"help": "TRL's label_smoothing"})
    ld_alpha: float | None = field(default=None, metadata={"help": "TRL's ld_alpha (LD-DPO length weighting)"})
    f_divergence_type: str | None = field(default=None, metadata={"help": "TRL's f_divergence_type"})
    f_alpha_divergence_coef: float | None = field(default=None, metadata={"help": "TRL's f_alpha_divergence_coef"})
    discopop_tau: float | None = field(default=None, metadata={"help": "TRL's discopop_tau"})
    use_weighting: bool | None = field(default=None, metadata={"help": "TRL's use_weighting (WPO): not reproduced"})
    batch_size: int | None = field(
        default=None, metadata={"help": "eval batch size (TRL's per_device_eval_batch_size)"}
    )
    dtype: str | None = field(
        default=None,
        metadata={"help": "weights dtype (TRL's dtype)", "choices": ("float32", "bfloat16", "float16", "auto")},
    )
    attn_implementation: str | None = field(default=None, metadata={"help": "attention implementation (TRL's)"})
    fast_path: bool | None = field(
        default=None, metadata={"help": "score pairs packed with their prompt shared, as dpolab's trainer does"}
    )
    bf16: bool | None = field(default=None, metadata={"help": "bf16 autocast, as the trainer's `bf16`"})
    fp16: bool | None = field(default=None, metadata={"help": "fp16 autocast, as the trainer's `fp16`"})
    output_dir: str | None = field(
        default=None, metadata={"help": "where eval.jsonl and eval.json go (default: RUN/eval/<checkpoint>)"}
    )
    trust_remote_code: bool = field(default=False, metadata={"help": "allow model code from the Hub"})


# Eval field -> the run's config.yaml key it is read from.
FROM_RUN = {
    "ref": "model_name_or_path", "data": "dataset_name", "dataset_config": "dataset_config",
    "prompt_column": "prompt_column", "chosen_column": "chosen_column", "rejected_column": "rejected_column",
    "seed": "seed", "max_length": "max_length", "truncation_mode": "truncation_mode", "beta": "beta",
    "loss_type": "loss_type", "loss_weights": "loss_weights", "label_smoothing": "label_smoothing",
    "ld_alpha": "ld_alpha", "f_divergence_type": "f_divergence_type",
    "f_alpha_divergence_coef": "f_alpha_divergence_coef", "discopop_tau": "discopop_tau",
    "use_weighting": "use_weighting", "batch_size": "per_device_eval_batch_size", "dtype": "dtype",
    "bf16": "bf16", "fp16": "fp16", "attn_implementation": "attn_implementation", "fast_path": "fast_path",
}  # fmt: skip
# Eval field -> the TRL field whose default applies when neither the user nor a run sets it.
FROM_TRL = {
    "seed": "seed", "max_length": "max_length", "truncation_mode": "truncation_mode", "beta": "beta",
    "loss_type": "loss_type", "loss_weights": "loss_weights", "label_smoothing": "label_smoothing",
    "ld_alpha": "ld_alpha", "f_divergence_type": "f_divergence_type",
    "f_alpha_divergence_coef": "f_alpha_divergence_coef", "discopop_tau": "discopop_tau",
    "use_weighting": "use_weighting", "batch_size": "per_device_eval_batch_size", "dtype": "dtype", "fp16": "fp16",
}  # fmt: skip
# dpolab's own defaults for what TRL has no field for (or, for bf16, a machine-dependent one).
DEFAULTS = {"prompt_column": "prompt", "chosen_column": "chosen", "rejected_column": "rejected", "holdout": 0.0,
            "bf16": False, "fast_path": True}  # fmt: skip


def run(config: EvalConfig) -> dict:
    """`dpolab eval`: resolve the settings, score the pairs, print the table."""
    from dpolab.lengthbias import format_length_bias

    settings = resolve(config)
    summary = evaluate(settings)
    print(format_table(summary, Path(settings.output_dir)))
    print(format_length_bias(summary["length_bias"]))
    return summary


# --- settings ---------------------------------------------------------------------------------------------------


def resolve(config: EvalConfig, run: RunDir | None = None, name: str | None = None) -> EvalConfig:
    """Every field filled: what the user gave < the run's config.yaml (when --model belongs to a run) < TRL's.

    `run` and `name` (the output sub-directory) are given by callers that already know the run (sweep, demo).
    """
    given = given_fields(config)
    model, located_run = (config.model, run) if run is not None else locate_model(config.model)
    values = {key: getattr(config, key) for key in given}
    values["model"] = model
    run_values = {}
    if located_run is not None:
        run_config = located_run.read_config()
        run_values = {key: run_config[source] for key, source in FROM_RUN.items() if source in run_config}
        if "data" in given:  # other data than the run's: its split and held-out fraction do not apply
            pass
        elif run_config.get("eval_split"):
            run_values["split"] = run_config["eval_split"]
        elif run_config.get("eval_holdout"):  # the trainer scored a seeded held-out part of the train split
            run_values.update(split=run_config.get("train_split", "train"), holdout=run_config["eval_holdout"])
        run_values["output_dir"] = str(located_run.eval_dir(name or Path(model).name))
    for key in (f.name for f in dataclasses.fields(EvalConfig)):
        if key in values:
            continue
        if key in run_values:
            values[key] = run_values[key]
        elif key in FROM_TRL:
            values[key] = trl_default(FROM_TRL[key])
        elif key in DEFAULTS:
            values[key] = DEFAULTS[key]
    if values.get("split") is None and values.get("data") and not Path(values["data"]).is_file():
        values["split"] = "test"  # a directory or a Hub dataset: its test split; a single file is used whole
    settings = dataclasses.replace(config, **values)
    return check_settings(settings)


def check_settings(settings: EvalConfig) -> EvalConfig:
    """Every problem at once; settings eval cannot reproduce are refused, never silently ignored."""
    from dpolab.models import adapter_base

    if settings.ref is None:
        settings.ref = adapter_base(settings.model)
    missing = [f"--{name}" for name in ("data", "ref") if getattr(settings, name) is None]
    if missing:
        raise DpolabError(
            f"Give {' and '.join(missing)} (or a --model inside a dpolab run directory, whose config.yaml says)."
        )
    problems = []
    if settings.batch_size is not None and settings.batch_size < 1:
        problems.append(f"--batch_size must be >= 1, got {settings.batch_size}.")
    if settings.limit is not None and settings.limit < 1:
        problems.append(f"--limit must be >= 1 (or unset for every pair), got {settings.limit}.")
    if settings.use_weighting:
        problems.append(
            "use_weighting (WPO) is not reproduced by `dpolab eval`: its weights need the policy's per-token "
            "probabilities over the whole vocabulary. Score with --use_weighting false (log-probs, rewards and "
            "margins do not depend on it; only the loss would)."
        )
    if settings.bf16 and settings.fp16:
        problems.append("bf16 and fp16 autocast are both on: pick one.")
    if problems:
        raise DpolabError("Invalid eval settings:\n  - " + "\n  - ".join(problems))
    settings.output_dir = settings.output_dir or f"runs/eval-{time.strftime('%Y%m%d-%H%M%S')}"
    return settings


# --- the workflow -------------------------------------------------------------------------------------------------


def evaluate(settings: EvalConfig) -> dict:
    """Write eval.jsonl (per pair) and eval.json (aggregates) to settings.output_dir; return the aggregates."""
    from dpolab.lengthbias import length_bias

    policy_path, ref_path, tokenizer = locate_models(settings)
    pairs, dataset = load_eval_pairs(settings)
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
        from dpolab.models import load_scoring_model

        model = load_scoring_model(
            policy_path, settings.dtype, settings.trust_remote_code, settings.attn_implementation
        )
        policy_logps = model_logps(model, examples, tokenizer, settings, desc="policy")
    records = pair_records(examples, policy_logps, ref_logps, settings)
    summary = aggregate(records, settings, dropped)
    summary.update(model=settings.model, ref=settings.ref, data=pairs.source, settings=settings_record(settings))
    summary["length_bias"] = length_bias(records)
    output = Path(settings.output_dir)
    write_jsonl(output / EVAL_RECORDS, records)
    write_json(output / EVAL_SUMMARY, summary)
    return summary


def settings_record(settings: EvalConfig) -> dict:
    """The settings as written into eval.json (and compared by `sweep` to reuse an evaluation)."""
    return dataclasses.asdict(settings)


def locate_models(settings: EvalConfig) -> tuple[str, str, object]:
    """(policy path, reference path, tokenizer), after checking the two tokenize and are built alike."""
    from dpolab.models import (
        adapter_base,
        check_same_architecture,
        check_same_tokenizer,
        is_adapter,
        load_tokenizer,
        resolve_model,
    )

    remote = settings.trust_remote_code
    policy_path = (
        settings.model if is_adapter(settings.model) else resolve_model(settings.model, trust_remote_code=remote)
    )
    ref_path = resolve_model(settings.ref, trust_remote_code=remote)
    tokenizer = load_tokenizer(ref_path if is_adapter(policy_path) else policy_path, trust_remote_code=remote)
    check_same_tokenizer(tokenizer, load_tokenizer(ref_path, trust_remote_code=remote), policy_path, ref_path)
    check_same_architecture(adapter_base(policy_path) or policy_path, ref_path)
    return policy_path, ref_path, tokenizer


def load_eval_pairs(settings: EvalConfig):
    """The validated pairs and the dataset to score (the held-out part, the first `limit`)."""
    from dpolab.data import describe_drops, load_pairs, split_holdout

    pairs = load_pairs(
        settings.data, settings.split, dataset_config=settings.dataset_config, prompt_column=settings.prompt_column,
        chosen_column=settings.chosen_column, rejected_column=settings.rejected_column,
        drop_invalid_rows=settings.drop_invalid_rows,
    )  # fmt: skip
    for line in describe_drops(pairs):
        print(line)
    if settings.holdout:  # the run evaluated on a held-out fraction of its training split: the same pairs
        pairs = split_holdout(pairs, settings.holdout, settings.seed)[1]
    dataset = pairs.dataset
    if settings.limit is not None:
        dataset = dataset.select(range(min(settings.limit, len(dataset))))
    return pairs, dataset


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


# --- scoring ----------------------------------------------------------------------------------------------------


def autocast(settings: EvalConfig, device_type: str):
    """The trainer's mixed precision: bf16 or fp16 autocast over the weights' own dtype, or none."""
    import torch

    dtype = torch.bfloat16 if settings.bf16 else torch.float16
    return torch.autocast(device_type, dtype=dtype, enabled=bool(settings.bf16 or settings.fp16))


def model_logps(model, examples: list[dict], tokenizer, settings: EvalConfig, desc: str, disable_adapter=False):
    """Per pair: chosen/rejected log-prob sums and scored token counts, batched like the trainer's eval loop.

    With `ld_alpha`, the sums weight each answer's tokens beyond the shorter answer's length by ld_alpha, as TRL
    does; `chosen_unweighted` keeps the plain chosen sums for the `sft` term.
    """
    import contextlib

    import torch
    from tqdm.auto import tqdm
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    from dpolab import models, packing
    from dpolab.logps import length_weighted_logps, read_per_pair
    from dpolab.models import score_completion_tokens_only

    pad_token_id = models.pad_token_id(tokenizer)
    attention = model.config._attn_implementation
    reason = packing.fast_path_off_reason(model.config, settings.fast_path, settings.truncation_mode)
    if reason is None:
        packing.install(model)
        packing.install_answer_head_on(model, packing.REFERENCE_HEAD_OUTPUTS)  # where it applies; else TRL's head
        collator = packing.PackedCollator(
            pad_token_id=pad_token_id,
            max_length=settings.max_length,
            varlen=attention == packing.VARLEN_ATTENTION,
        )
    else:
        collator = DataCollatorForPreference(
            pad_token_id=pad_token_id, max_length=settings.max_length, truncation_mode=settings.truncation_mode
        )
    per_batch = []  # kept on the device and read once at the end: the host never waits for it in between
    adapter_off = model.disable_adapter() if disable_adapter else contextlib.nullcontext()
    device = next(model.parameters()).device
    with torch.no_grad(), adapter_off, score_completion_tokens_only(), autocast(settings, device.type):
        try:
            for start in tqdm(range(0, len(examples), settings.batch_size), desc=f"Scoring ({desc})", unit="batch"):
                batch = collator(
                    [
                        {k: e[k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")}
                        for e in examples[start : start + settings.batch_size]
                    ]
                )
                batch = {key: value.to(device) for key, value in batch.items()}
                labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
                inputs = {key: value for key, value in batch.items() if key != "completion_mask"}
                outputs = model(**inputs, labels=labels, fused_lm_head=True, use_cache=False)
                seq_len = batch["completion_mask"].size(1) - 1
                per_token = outputs.log_probs[:, -seq_len:].float()
                shifted_mask = batch["completion_mask"][:, 1:]
                logps, plain, tokens = length_weighted_logps(per_token, shifted_mask, settings.ld_alpha)
                per_batch.append((*logps.chunk(2), plain.chunk(2)[0], *tokens.int().chunk(2)))
        except torch.OutOfMemoryError:
            doing = f"scoring the {desc} at {settings.batch_size} pairs per batch"
            at_one = "one pair per batch does not fit: a shorter --max_length, or the CPU"
            raise out_of_memory_error(doing, settings.batch_size, at_one) from None
    return read_per_pair(per_batch, ("chosen", "rejected", "chosen_unweighted", "chosen_tokens", "rejected_tokens"))


def cached_ref_logps(settings: EvalConfig, ref_path: str, examples: list[dict], tokenizer) -> dict:
    """Reference log-probs from dpolab's cache (written by an earlier eval or by the run's own pre-pass), else
    computed and kept there."""
    from dpolab.models import (
        adapter_base,
        is_adapter,
        load_scoring_model,
        read_reference_cache,
        reference_cache_path,
        token_ids_digest,
        write_reference_cache,
    )

    ids = {key: [e[key] for e in examples] for key in ("prompt_ids", "chosen_ids", "rejected_ids")}
    path = reference_cache_path(
        ref_path, token_ids_digest([ids]), max_length=settings.max_length, truncation_mode=settings.truncation_mode,
        dtype=settings.dtype, bf16=settings.bf16, fp16=settings.fp16, ld_alpha=settings.ld_alpha,
    )  # fmt: skip
    cached = read_reference_cache(path)
    if cached is not None:
        return cached
    if is_adapter(settings.model) and settings.ref == adapter_base(settings.model):
        model = load_scoring_model(
            settings.model, settings.dtype, settings.trust_remote_code, settings.attn_implementation
        )
        logps = model_logps(model, examples, tokenizer, settings, "reference", disable_adapter=True)
    else:
        model = load_scoring_model(ref_path, settings.dtype, settings.trust_remote_code, settings.attn_implementation)
        logps = model_logps(model, examples, tokenizer, settings, desc="reference")
    write_reference_cache(path, logps)
    return logps


# --- per-pair records and aggregates (pure) ---------------------------------------------------------------------


def pair_records(examples: list[dict], policy: dict, ref: dict, settings: EvalConfig) -> list[dict]:
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
        record = {
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
        }
        if settings.ld_alpha is not None:
            record["policy_chosen_logps_unweighted"] = policy["chosen_unweighted"][i]
        records.append(record)
    return records


def aggregate(records: list[dict], settings: EvalConfig, dropped: int) -> dict:
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
        unweighted = (
            torch.tensor([r["policy_chosen_logps_unweighted"] for r in batch], dtype=torch.float64)
            if settings.ld_alpha is not None
            else None
        )
        loss = batch_loss(
            settings.loss_type, settings.loss_weights, settings.beta, *tensors, settings.label_smoothing,
            f_divergence_type=settings.f_divergence_type, f_alpha_divergence_coef=settings.f_alpha_divergence_coef,
            discopop_tau=settings.discopop_tau, policy_chosen_unweighted=unweighted,
        )  # fmt: skip
        batch_losses.append(loss.item())
        batch_sizes.append(len(batch))
    trainer = {key: mean_of_batch_means(values, settings.batch_size) for key, values in columns.items()}
    trainer["loss"] = sample_weighted_batch_mean(batch_losses, batch_sizes)
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
    settings = summary["settings"]
    precision = settings["dtype"] + (" + bf16 autocast" if settings["bf16"] else " + fp16 autocast" if settings["fp16"]
                                     else "")  # fmt: skip
    lines = [
        f"dpolab eval: {summary['model']}  vs reference {summary['ref']}  ({precision})",
        f"  {summary['pairs']} pairs from {summary['data']} ({summary['dropped_pairs']} dropped: prompt >= max_length; "
        f"{summary['truncated_pairs']} truncated)",
        f"  {'metric (TRL name)':<28}{trainer_label:>20}{'per-pair mean':>16}",
    ]
    for key in METRICS:
        lines.append(f"  {key:<28}{fmt(trainer.get(key)):>20}{fmt(per_pair.get(key)):>16}")
    for key in PER_TOKEN_METRICS:
        lines.append(f"  {key:<28}{'':>20}{fmt(per_pair[key]):>16}")
    lines += [
        "  trainer = TRL's logged figure: the mean of per-batch means (eval_loss: batch losses weighted by size).",
        "  logps are sums over completion tokens; per_token rows divide each by its token count.",
        f"  written: {output / EVAL_RECORDS} (per pair), {output / EVAL_SUMMARY}",
    ]
    return "\n".join(lines)
