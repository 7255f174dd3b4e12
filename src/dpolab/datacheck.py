"""`dpolab data check SOURCE`: validate preference data and report what the trainer would see.

Format, usable/identical/duplicate pairs, and (with a tokenizer) token-length percentiles counted exactly as
TRL's DPOTrainer tokenizes, with how many pairs `max_length` truncates or TRL drops.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from dpolab.config import given_fields, trl_default
from dpolab.data import check_tokenization, describe_drops, load_pairs, percentiles, token_lengths
from dpolab.errors import DpolabError


@dataclass
class DataCheckConfig:
    """Validate preference data and report its format, token lengths and truncation."""

    source: str = field(
        metadata={
            "positional": True,
            "help": "Hub dataset id, .jsonl/.json/.parquet/.csv file, split directory or save_to_disk directory",
        }
    )
    split: str = field(default="train", metadata={"help": "split to check (a single file is one split, checked whole)"})
    dataset_config: str | None = field(default=None, metadata={"help": "Hub dataset configuration name"})
    prompt_column: str = field(default="prompt", metadata={"help": "column holding the prompt"})
    chosen_column: str = field(default="chosen", metadata={"help": "column holding the preferred answer"})
    rejected_column: str = field(default="rejected", metadata={"help": "column holding the dispreferred answer"})
    model_name_or_path: str | None = field(
        default=None, metadata={"help": "tokenizer for token lengths (Hub id, directory or .gguf)"}
    )
    max_length: int | None = field(default=None, metadata={"help": "TRL's max_length (default: TRL's, 1024)"})
    trust_remote_code: bool = field(default=False, metadata={"help": "allow tokenizer code from the Hub"})
    drop_invalid_rows: bool = field(
        default=False, metadata={"help": "list the rows that fail validation and check the rest, instead of stopping"}
    )


def run(config: DataCheckConfig) -> dict:
    """Validate a source and print what the trainer would see; returns the figures printed."""
    pairs = load_pairs(
        config.source,
        config.split,
        dataset_config=config.dataset_config,
        prompt_column=config.prompt_column,
        chosen_column=config.chosen_column,
        rejected_column=config.rejected_column,
        drop_invalid_rows=config.drop_invalid_rows,
    )
    report = {
        "source": pairs.source,
        "rows": pairs.rows_read,
        "format": pairs.format,
        "usable_pairs": len(pairs.dataset),
        "identical_pairs": len(pairs.identical_rows),
        "duplicate_pairs": pairs.duplicate_rows,
    }
    lines = [
        f"source:           {pairs.source}",
        f"rows:             {pairs.rows_read}",
        f"format:           {pairs.format}",
        f"usable pairs:     {len(pairs.dataset)}",
        f"identical pairs:  {len(pairs.identical_rows)} (chosen == rejected; dropped by `dpolab train`)"
        + (f", rows {', '.join(map(str, pairs.identical_rows[:10]))}" if pairs.identical_rows else ""),
        f"duplicate pairs:  {pairs.duplicate_rows} (same prompt, chosen and rejected as an earlier row)",
        *describe_drops(pairs),
    ]
    report.update(pairs.drop_report())
    if config.model_name_or_path:
        from dpolab.models import load_tokenizer, resolve_model

        tokenizer = load_tokenizer(
            resolve_model(config.model_name_or_path, trust_remote_code=config.trust_remote_code),
            trust_remote_code=config.trust_remote_code,
        )
        if pairs.is_conversational and tokenizer.chat_template is None:
            raise DpolabError(f"{config.model_name_or_path} has no chat template, and the data are message lists.")
        max_length = config.max_length if "max_length" in given_fields(config) else trl_default("max_length")
        stats = token_lengths(pairs, tokenizer)
        warnings = check_tokenization(stats, config.model_name_or_path, pairs.source, max_length)
        lines.append(f"\ntoken lengths ({config.model_name_or_path}, as TRL's DPOTrainer tokenizes them):")
        lines.append(f"  {'':<18}" + "".join(f"{name:>9}" for name in ("min", "p50", "p90", "p99", "max", "mean")))
        columns = {
            "prompt": stats.prompt,
            "chosen": stats.chosen,
            "rejected": stats.rejected,
            "prompt+chosen": [p + c for p, c in zip(stats.prompt, stats.chosen)],
            "prompt+rejected": [p + r for p, r in zip(stats.prompt, stats.rejected)],
        }
        report["token_lengths"] = {name: percentiles(values) for name, values in columns.items()}
        for name, figures in report["token_lengths"].items():
            lines.append(f"  {name:<18}" + "".join(f"{value:>9.0f}" for value in figures.values()))
        truncated, dropped = stats.truncated(max_length), stats.dropped(max_length)
        report.update(truncated_pairs=truncated, dropped_pairs=dropped)
        share = 100 * truncated / len(pairs.dataset)
        lines.append(
            f"max_length {max_length}: {truncated} pairs truncated ({share:.1f}%), {dropped} dropped by TRL "
            "(prompt alone reaches max_length)"
        )
        lines += warnings
    else:
        lines.append("\n(token lengths and truncation: give --model_name_or_path for the tokenizer)")
    print("\n".join(lines))
    return report
