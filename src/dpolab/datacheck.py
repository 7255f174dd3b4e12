"""`dpolab data check SOURCE`: validate preference data and report what the trainer would see.

Format, usable/identical/duplicate pairs, and (with a tokenizer) token-length percentiles counted exactly as
TRL's DPOTrainer tokenizes, with how many pairs `max_length` truncates or TRL drops. Given a training config
(`--preset`, `--train_config`) instead of SOURCE, the data that config trains and evaluates on, as it would.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from dpolab.config import given_fields, make_config, trl_default
from dpolab.data import check_tokenization, describe_drops, load_pairs, percentiles, token_lengths
from dpolab.errors import DpolabError

# the fields a training config lends the check, by their data-check name: (part of the train config, its field)
FROM_TRAIN_CONFIG = {
    "dataset_config": ("script", "dataset_config"), "prompt_column": ("script", "prompt_column"),
    "chosen_column": ("script", "chosen_column"), "rejected_column": ("script", "rejected_column"),
    "drop_invalid_rows": ("script", "drop_invalid_rows"), "model_name_or_path": ("model", "model_name_or_path"),
    "max_length": ("training", "max_length"), "trust_remote_code": ("training", "trust_remote_code"),
}  # fmt: skip


@dataclass
class DataCheckConfig:
    """Validate preference data and report its format, token lengths and truncation.

    Give the data as SOURCE, or the `dpolab train` config that names it (--preset NAME or --train_config
    FILE.yaml): then its train split, and its eval split if it has one, are checked with its tokenizer, columns
    and max_length, before any GPU hour is spent (the fields given here win)."""

    source: str | None = field(
        default=None,
        metadata={
            "positional": True,
            "help": "Hub dataset id, .jsonl/.json/.parquet/.csv file, split directory or save_to_disk directory",
        },
    )
    preset: str | None = field(default=None, metadata={"help": "a `dpolab train` preset whose data to check"})
    train_config: str | None = field(
        default=None, metadata={"help": "a `dpolab train` YAML file (or a run's config.yaml) whose data to check"}
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

    @classmethod
    def from_argv(cls, argv: list[str]) -> DataCheckConfig:
        """As every command parses (`config.parse_config`); a training config given as --config says where it goes."""
        from dpolab.config import load_yaml, parse_config, pop_option

        try:
            return parse_config(cls, argv)
        except DpolabError as error:
            config_file = pop_option(list(argv), "--config")
            if config_file and "dataset_name" in load_yaml(config_file):
                hint = f"{config_file} is a `dpolab train` config: check its data with --train_config {config_file}"
                raise DpolabError(f"{error}\n{hint}") from None
            raise


def run(config: DataCheckConfig) -> dict:
    """Check each split the config names and print what the trainer would see; returns {split: figures}."""
    reports = {}
    for check in splits_to_check(config):
        if config.source is None:  # the splits of a training config: say which one each report is
            print(("\n" if reports else "") + f"== {check.source}, split '{check.split}' ==")
        reports[check.split] = check_split(check)
    return reports


def splits_to_check(config: DataCheckConfig) -> list[DataCheckConfig]:
    """The one source given, or the splits a training config trains and evaluates on, with its settings."""
    named = [name for name in ("source", "preset", "train_config") if getattr(config, name)]
    if len(named) != 1:
        raise DpolabError(
            "Give the data to check one way: SOURCE, --preset NAME or --train_config FILE.yaml"
            + (f" (got {', '.join(named)})." if named else ".")
        )
    if config.source:
        return [config]
    from dpolab.config import parse_train_args

    train = parse_train_args(["--preset", config.preset] if config.preset else ["--config", config.train_config])
    given = given_fields(config) - {"preset", "train_config"}
    values = {name: getattr(getattr(train, part), key) for name, (part, key) in FROM_TRAIN_CONFIG.items()}
    values |= {name: getattr(config, name) for name in given}
    script = train.script
    splits = [values.pop("split")] if "split" in given else [script.train_split, script.eval_split]
    source = script.dataset_name
    return [make_config(DataCheckConfig, source=source, split=split, **values) for split in splits if split]


def check_split(config: DataCheckConfig) -> dict:
    """Validate one split of a source and print what the trainer would see; returns the figures printed."""
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
