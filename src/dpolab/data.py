"""Preference data: load any source, validate every row, normalise to TRL's `prompt`/`chosen`/`rejected`.

Sources: a Hub dataset id, a .jsonl/.json/.parquet/.csv file, a directory of such files named after their
split (`train.jsonl`, `test.jsonl`), or a `save_to_disk` directory. Formats are detected from the columns and
the first row, and every row must use the same one. Nothing here loads a model; `token_lengths` takes a
tokenizer for `dpolab data check`.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from dpolab.errors import DpolabError

FILE_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")
ROLES = ("system", "user", "assistant", "tool")
MAX_REPORTED_ROW_ERRORS = 10

# Formats, as reported to the user.
EXPLICIT_STRINGS = "explicit prompt, strings"
EXPLICIT_MESSAGES = "explicit prompt, message lists"
IMPLICIT_MESSAGES = "implicit prompt, message lists (prompt = shared leading messages)"
IMPLICIT_STRINGS = "implicit prompt, strings (prompt = shared leading text)"
HH_RLHF = "HH-RLHF strings (converted to message lists)"
STRING_FORMATS = (EXPLICIT_STRINGS, IMPLICIT_STRINGS)

HH_TURN = re.compile(r"\n\n(Human|Assistant):[ ]?")
HH_ROLES = {"Human": "user", "Assistant": "assistant"}


@dataclass
class Pairs:
    """Validated preference pairs; `dataset` has exactly the columns prompt, chosen, rejected."""

    dataset: Dataset  # noqa: F821 (datasets is imported lazily)
    source: str
    format: str
    rows_read: int
    identical_rows: list[int] = field(default_factory=list)  # chosen == rejected, dropped
    duplicate_rows: int = 0  # rows repeating an earlier (prompt, chosen, rejected)
    invalid_rows: list[tuple[int, str]] = field(default_factory=list)  # (row, problem), dropped by drop_invalid_rows
    early_divergence_rows: list[int] = field(default_factory=list)  # conversations differing before the last turn

    def drop_report(self) -> dict:
        """What was left out or looks odd, for config.yaml's provenance (the first rows of each and a count)."""
        return {
            "invalid_rows": len(self.invalid_rows),
            "first_invalid": [{"row": row, "problem": problem} for row, problem in self.invalid_rows[:10]],
            "identical_rows": len(self.identical_rows),
            "early_divergence_rows": self.early_divergence_rows[:50],
        }

    @property
    def is_conversational(self) -> bool:
        return self.format not in STRING_FORMATS


def load_pairs(
    source: str,
    split: str = "train",
    *,
    dataset_config: str | None = None,
    prompt_column: str = "prompt",
    chosen_column: str = "chosen",
    rejected_column: str = "rejected",
    drop_invalid_rows: bool = False,
) -> Pairs:
    """Read one split of a source (a single file is one split: `split` None or "train"), validate every row and
    return it in TRL's format; invalid rows are an error, or dropped and listed with `drop_invalid_rows`."""
    rows, where = read_rows(source, split, dataset_config)
    rows = rename_columns(rows, where, {prompt_column: "prompt", chosen_column: "chosen", rejected_column: "rejected"})
    return normalize_rows(rows, where, drop_invalid_rows)


def split_holdout(pairs: Pairs, fraction: float, seed: int) -> tuple[Pairs, Pairs]:
    """Hold out a seeded random fraction of the pairs for evaluation; the two parts never overlap."""
    parts = pairs.dataset.train_test_split(test_size=fraction, seed=seed, shuffle=True)
    if len(parts["test"]) == 0 or len(parts["train"]) == 0:
        raise DpolabError(f"eval_holdout={fraction} of {len(pairs.dataset)} pairs leaves an empty split.")
    train = Pairs(parts["train"], f"{pairs.source} (train part)", pairs.format, len(parts["train"]),
                  invalid_rows=pairs.invalid_rows, early_divergence_rows=pairs.early_divergence_rows)  # fmt: skip
    held_out = Pairs(parts["test"], f"{pairs.source} (held-out {fraction:g})", pairs.format, len(parts["test"]))
    return train, held_out


# --- reading -------------------------------------------------------------------------------------------------


def read_rows(source: str, split: str | None, dataset_config: str | None = None) -> tuple[list[dict], str]:
    """The rows of one split of `source` as plain dicts, and a label naming where they came from.

    A single file is one split, used whole (`split` None or "train"); a directory or a Hub dataset needs a split.
    """
    path = Path(source).expanduser()
    if path.is_file():
        if split not in (None, "train"):
            raise DpolabError(
                f"{source} is a single file: it is one split, used whole, not a split '{split}'. Leave the split out "
                f"(or give `--split train`; for a run, `--eval_split none`), use a directory with one file per split "
                f"(train.jsonl, test.jsonl), or `eval_holdout`."
            )
        return _read_file(path), str(path)
    if split is None:
        raise DpolabError(f"{source} has splits: name one (`--split test`, `--train_split train`, ...).")
    if path.is_dir():
        if (path / "dataset_dict.json").exists() or (path / "state.json").exists():
            return _read_saved_dataset(path, split)
        split_files = {p.stem: p for p in sorted(path.iterdir()) if p.suffix in FILE_SUFFIXES}
        if split not in split_files:
            found = ", ".join(split_files) or "no .jsonl/.json/.parquet/.csv files"
            raise DpolabError(
                f"{source}: no file for split '{split}' (expected {split}.jsonl or similar). Found: {found}."
            )
        return _read_file(split_files[split]), str(split_files[split])
    if source.startswith((".", "/", "~")) or path.suffix in FILE_SUFFIXES:
        raise DpolabError(f"Data file or directory not found: {source}")
    return _read_hub_dataset(source, split, dataset_config)


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise DpolabError(
            f"{path}: not UTF-8 text ({error.reason} at byte {error.start}). Re-save the file as UTF-8."
        ) from None


def _read_file(path: Path) -> list[dict]:
    if path.suffix == ".jsonl":
        rows = []
        for line_number, line in enumerate(_read_text(path).splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise DpolabError(f"{path} line {line_number}: not valid JSON ({error.msg}).") from None
            if not isinstance(row, dict):
                raise DpolabError(f"{path} line {line_number}: expected a JSON object, got {type(row).__name__}.")
            rows.append(row)
    elif path.suffix == ".json":
        try:
            data = json.loads(_read_text(path))
        except json.JSONDecodeError as error:
            raise DpolabError(f"{path} line {error.lineno}: not valid JSON ({error.msg}).") from None
        if isinstance(data, dict) and all(isinstance(column, list) for column in data.values()):
            data = [dict(zip(data, values)) for values in zip(*data.values())]  # a mapping of columns
        if not isinstance(data, list) or not all(isinstance(row, dict) for row in data):
            raise DpolabError(f"{path}: expected a list of objects (one per pair) or a mapping of columns.")
        rows = data
    else:
        rows = _read_with_datasets(path)
    if not rows:
        raise DpolabError(f"{path}: the file holds no rows.")
    return rows


def _read_with_datasets(path: Path) -> list[dict]:
    from datasets import load_dataset

    if path.suffix == ".csv":
        _read_text(path)  # a clear error for non-UTF-8 text before pandas raises its own
    try:
        rows = load_dataset(path.suffix[1:], data_files=str(path), split="train").to_list()
    except Exception as error:  # pyarrow/pandas raise many types for a malformed file
        raise DpolabError(f"{path}: could not be read as {path.suffix[1:]}: {error}") from None
    if path.suffix == ".csv":  # CSV cannot hold lists: message lists arrive JSON-encoded
        for row in rows:
            for key, value in row.items():
                if isinstance(value, str) and value.lstrip().startswith("[{"):
                    try:
                        row[key] = json.loads(value)
                    except json.JSONDecodeError:
                        pass
    return rows


def _read_saved_dataset(path: Path, split: str) -> tuple[list[dict], str]:
    from datasets import DatasetDict, load_from_disk

    dataset = load_from_disk(str(path))
    if isinstance(dataset, DatasetDict):
        if split not in dataset:
            raise DpolabError(f"{path}: no split '{split}'. Splits: {', '.join(dataset)}.")
        return dataset[split].to_list(), f"{path} split {split}"
    if split != "train":
        raise DpolabError(f"{path} holds a single Dataset (split 'train'), not a split '{split}'.")
    return dataset.to_list(), str(path)


def _read_hub_dataset(name: str, split: str, dataset_config: str | None) -> tuple[list[dict], str]:
    import datasets

    from dpolab.hub import hub_reachable

    offline = not hub_reachable()
    datasets.config.HF_HUB_OFFLINE = offline  # use the local cache at once rather than retrying a dead network
    try:
        dataset = datasets.load_dataset(name, dataset_config, split=split)
    except ValueError as error:
        if "split" in str(error).lower():
            raise DpolabError(f"Dataset '{name}' has no split '{split}': {error}") from None
        raise DpolabError(f"Dataset '{name}' could not be loaded: {error}") from None
    except Exception as error:  # ConnectionError, FileNotFoundError, DatasetNotFoundError, ...
        if offline:
            raise DpolabError(
                f"Dataset '{name}' is not in the local Hugging Face cache and the Hub is not reachable. "
                f"Download it where there is network (`hf download {name} --repo-type dataset`) or point "
                f"`dataset_name` at a local .jsonl/.parquet file or `save_to_disk` directory."
            ) from None
        raise DpolabError(f"Dataset '{name}' could not be loaded: {error}") from None
    return dataset.to_list(), f"{name} split {split}"


def rename_columns(rows: list[dict], where: str, mapping: dict[str, str]) -> list[dict]:
    """Apply the column mapping (source name -> prompt/chosen/rejected); missing columns are an error."""
    present = list(rows[0].keys())
    required = [source for source, target in mapping.items() if target != "prompt"]
    missing = [column for column in required if column not in present]
    if missing:
        raise DpolabError(
            f"{where}: missing column(s) {', '.join(repr(c) for c in missing)}. Columns present: "
            f"{', '.join(present)}. Map yours with --prompt_column/--chosen_column/--rejected_column."
        )
    prompt_source = next(source for source, target in mapping.items() if target == "prompt")
    if prompt_source != "prompt" and prompt_source not in present:
        raise DpolabError(f"{where}: prompt column '{prompt_source}' not found. Columns present: {', '.join(present)}.")
    renamed = []
    for row in rows:
        out = {target: row.get(source) for source, target in mapping.items() if source in row}
        renamed.append(out)
    return renamed


# --- validation and normalisation (pure) ---------------------------------------------------------------------


def row_format(row: dict, has_prompt: bool) -> str | None:
    """The format one row is written in, or None when chosen is neither a string nor a list."""
    chosen = row.get("chosen")
    if isinstance(chosen, list):
        # A string prompt beside full conversations is a copy of the first turn; TRL's maybe_extract_prompt
        # ignores it the same way.
        return EXPLICIT_MESSAGES if has_prompt and isinstance(row.get("prompt"), list) else IMPLICIT_MESSAGES
    if isinstance(chosen, str):
        if has_prompt:
            return EXPLICIT_STRINGS
        if chosen.lstrip().startswith("Human:") and "\n\nAssistant:" in chosen:
            return HH_RLHF
        return IMPLICIT_STRINGS
    return None


def message_problem(value, field_name: str) -> str | None:
    """What is wrong with a message list, or None."""
    if not isinstance(value, list):
        return f"'{field_name}' must be a list of messages, got {type(value).__name__}"
    if not value:
        return f"'{field_name}' is an empty message list"
    for index, message in enumerate(value):
        where = f"'{field_name}'[{index}]"
        if not isinstance(message, dict):
            return f"{where} must be an object with 'role' and 'content', got {type(message).__name__}"
        if "role" not in message:
            return f"{where} has no 'role' (keys: {', '.join(message) or 'none'})"
        if "content" not in message:
            return f"{where} has no 'content' (keys: {', '.join(message)})"
        if message["role"] not in ROLES:
            return f"{where} has unknown role {message['role']!r} (expected one of {', '.join(ROLES)})"
        if not isinstance(message["content"], str):
            return f"{where}.content must be a string, got {type(message['content']).__name__}"
        if not message["content"].strip():
            return f"{where}.content is empty"
    return None


def text_problem(value, field_name: str) -> str | None:
    if not isinstance(value, str):
        return f"'{field_name}' must be a string, got {type(value).__name__}"
    if not value.strip():
        return f"'{field_name}' is empty"
    return None


def hh_to_messages(text: str) -> list[dict]:
    """`"\\n\\nHuman: hi\\n\\nAssistant: hello"` -> [{user: hi}, {assistant: hello}]; ValueError if malformed."""
    parts = HH_TURN.split("\n\n" + text.lstrip("\n"))
    if parts[0].strip():
        raise ValueError(f"text before the first 'Human:' turn: {parts[0][:40]!r}")
    messages = [{"role": HH_ROLES[role], "content": content.strip()} for role, content in zip(parts[1::2], parts[2::2])]
    if len(messages) < 2 or messages[-1]["role"] != "assistant":
        raise ValueError("expected alternating 'Human:'/'Assistant:' turns ending with an 'Assistant:' turn")
    return messages


def normalize_row(row: dict, fmt: str) -> tuple[dict | None, str | None]:
    """One row in TRL's explicit format, or (None, what is wrong). Implicit prompts use TRL's extract_prompt."""
    from trl.data_utils import extract_prompt

    if fmt == EXPLICIT_STRINGS:
        for name in ("prompt", "chosen", "rejected"):
            if problem := text_problem(row.get(name), name):
                return None, problem
        return {"prompt": row["prompt"], "chosen": row["chosen"], "rejected": row["rejected"]}, None
    if fmt == EXPLICIT_MESSAGES:
        for name in ("prompt", "chosen", "rejected"):
            if problem := message_problem(row.get(name), name):
                return None, problem
        for name in ("chosen", "rejected"):
            if not any(message["role"] == "assistant" for message in row[name]):
                return None, f"'{name}' has no assistant message"
        return {"prompt": row["prompt"], "chosen": row["chosen"], "rejected": row["rejected"]}, None
    if fmt == HH_RLHF:
        converted = {}
        for name in ("chosen", "rejected"):
            if problem := text_problem(row.get(name), name):
                return None, problem
            try:
                converted[name] = hh_to_messages(row[name])
            except ValueError as error:
                return None, f"'{name}' is not an HH-RLHF dialogue: {error}"
            if problem := message_problem(converted[name], name):
                return None, problem
        row = converted
    elif fmt == IMPLICIT_MESSAGES:
        for name in ("chosen", "rejected"):
            if problem := message_problem(row.get(name), name):
                return None, problem
    elif fmt == IMPLICIT_STRINGS:
        for name in ("chosen", "rejected"):
            if problem := text_problem(row.get(name), name):
                return None, problem
    pair = extract_prompt({"chosen": row["chosen"], "rejected": row["rejected"]})
    if not pair["prompt"]:
        return None, "chosen and rejected share no leading prompt (their first message/text differs)"
    for name in ("chosen", "rejected"):
        if not pair[name]:
            return None, f"'{name}' has nothing after the shared prompt"
    return pair, None


def normalize_rows(rows: list[dict], where: str, drop_invalid_rows: bool = False) -> Pairs:
    """Validate every row against the format of the first. Bad rows are one DpolabError listing them, or, with
    `drop_invalid_rows`, left out and listed in `Pairs.invalid_rows`; all rows bad is an error either way."""
    from datasets import Dataset

    if not rows:
        raise DpolabError(f"{where}: no rows.")
    has_prompt = "prompt" in rows[0]
    fmt = row_format(rows[0], has_prompt)
    problems, normalized, identical, diverging = [], [], [], []
    for index, row in enumerate(rows):
        row_fmt = row_format(row, has_prompt)
        if row_fmt is None:
            problem = f"'chosen' must be a string or a list of messages, got {type(row.get('chosen')).__name__}"
        elif row_fmt != fmt and {row_fmt, fmt} != {HH_RLHF, IMPLICIT_STRINGS}:
            problem = f"mixed formats: this row is '{row_fmt}' but row 0 is '{fmt}'; every row must use one format"
        elif row["chosen"] == row["rejected"]:
            identical.append(index)  # no preference to learn; dropped and reported, not fatal
            problem = None
        else:
            pair, problem = normalize_row(row, fmt)
            if pair is not None:
                normalized.append(pair)
                if diverges_early(pair, fmt):
                    diverging.append(index)
        if problem:
            problems.append((index, problem))
    if problems and (not drop_invalid_rows or not normalized):
        shown = [f"row {index}: {problem}" for index, problem in problems[:MAX_REPORTED_ROW_ERRORS]]
        more = f"\n  ... and {len(problems) - len(shown)} more bad rows" if len(problems) > len(shown) else ""
        good = len(normalized) + len(identical)
        how = (
            "Every row is invalid: check the columns and the format (`dpolab data check`)."
            if not normalized
            else f"To leave these {len(problems)} rows out and go on with the other {good}, add "
            "`--drop_invalid_rows true` (they are listed in the output and in a run's config.yaml)."
        )
        raise DpolabError(
            f"{where}: {len(problems)} bad row(s) (rows count from 0):\n  " + "\n  ".join(shown) + more + f"\n{how}"
        )
    if not normalized:
        raise DpolabError(
            f"{where}: no usable pairs: chosen == rejected in all {len(rows)} rows, so there is no preference to learn."
        )
    keys = Counter(json.dumps(pair, sort_keys=True) for pair in normalized)
    return Pairs(
        dataset=Dataset.from_list(normalized),
        source=where,
        format=fmt,
        rows_read=len(rows),
        identical_rows=identical,
        duplicate_rows=sum(count - 1 for count in keys.values()),
        invalid_rows=problems,
        early_divergence_rows=diverging,
    )


def diverges_early(pair: dict, fmt: str) -> bool:
    """An implicit-prompt conversation whose chosen and rejected sides differ before their last message: TRL's
    prompt is only the shared part, so the 'completions' hold several turns."""
    return fmt in (IMPLICIT_MESSAGES, HH_RLHF) and (len(pair["chosen"]) > 1 or len(pair["rejected"]) > 1)


def describe_drops(pairs: Pairs) -> list[str]:
    """Lines saying which rows were left out or look odd (for `train` and `data check` output)."""
    lines = []
    if pairs.invalid_rows:
        shown = "; ".join(f"row {row}: {problem}" for row, problem in pairs.invalid_rows[:5])
        more = f"; ... ({len(pairs.invalid_rows) - 5} more)" if len(pairs.invalid_rows) > 5 else ""
        lines.append(f"dropped {len(pairs.invalid_rows)} invalid row(s) (drop_invalid_rows): {shown}{more}")
    if pairs.early_divergence_rows:
        rows = ", ".join(map(str, pairs.early_divergence_rows[:10])) + (
            ", ..." if len(pairs.early_divergence_rows) > 10 else ""
        )
        lines.append(
            f"{len(pairs.early_divergence_rows)} pair(s) whose conversations differ before the last turn (rows "
            f"{rows}): their prompt is only the shared opening, and their answers hold several turns"
        )
    return lines


# --- token lengths, exactly as the trainer tokenizes ---------------------------------------------------------


def pair_token_ids(pair: dict, tokenizer) -> dict[str, list[int]]:
    """prompt/chosen/rejected token ids as TRL 1.16 `DPOTrainer._prepare_dataset` builds them.

    Conversational pairs: prompt templated with `add_generation_prompt=True`, completions are the tail of the
    whole conversation's template (so they include end tokens); plain strings get EOS appended to completions.
    """
    from trl.data_utils import _tokenize, common_prefix_length

    prompt, chosen, rejected = pair["prompt"], pair["chosen"], pair["rejected"]
    if isinstance(prompt, list):
        prompt_ids = _tokenize(tokenizer, prompt, add_generation_prompt=True)["input_ids"]
    else:
        eos = tokenizer.eos_token
        chosen, rejected = (text if text.endswith(eos) else text + eos for text in (chosen, rejected))
        prompt_ids = _tokenize(tokenizer, prompt)["input_ids"]
    prompt_chosen_ids = _tokenize(tokenizer, prompt + chosen)["input_ids"]
    prompt_rejected_ids = _tokenize(tokenizer, prompt + rejected)["input_ids"]
    prompt_length = min(
        common_prefix_length(prompt_ids, prompt_chosen_ids), common_prefix_length(prompt_ids, prompt_rejected_ids)
    )
    return {
        "prompt_ids": prompt_ids[:prompt_length],
        "chosen_ids": prompt_chosen_ids[prompt_length:],
        "rejected_ids": prompt_rejected_ids[prompt_length:],
    }


@dataclass
class LengthStats:
    """Token counts per pair and what `max_length` does to them (TRL's keep_start truncation)."""

    prompt: list[int]
    chosen: list[int]
    rejected: list[int]
    pair_index: list[int] = field(default_factory=list)  # the pair each count belongs to (a sample may skip some)

    def truncated(self, max_length: int | None) -> int:
        """Pairs where prompt + chosen or prompt + rejected exceeds max_length."""
        if max_length is None:
            return 0
        return sum(p + max(c, r) > max_length for p, c, r in zip(self.prompt, self.chosen, self.rejected, strict=True))

    def dropped(self, max_length: int | None) -> int:
        """Pairs TRL drops because the prompt alone reaches max_length (their answers are truncated to nothing)."""
        return 0 if max_length is None else sum(p >= max_length for p in self.prompt)

    def empty_answers(self) -> list[int]:
        """The pairs whose chosen or rejected answer tokenizes to no token at all."""
        return [i for i, c, r in zip(self.pair_index, self.chosen, self.rejected, strict=True) if c == 0 or r == 0]

    def scored(self, max_length: int | None) -> list[tuple[int, int, int]]:
        """(prompt, chosen, rejected) tokens as the trainer scores them: answers cut at max_length."""
        if max_length is None:
            return list(zip(self.prompt, self.chosen, self.rejected, strict=True))
        return [(p, min(c, max(max_length - p, 0)), min(r, max(max_length - p, 0)))
                for p, c, r in zip(self.prompt, self.chosen, self.rejected, strict=True)]  # fmt: skip


def token_lengths(pairs: Pairs, tokenizer, progress: bool = True, sample: int | None = None) -> LengthStats:
    """Token counts of every pair, or of a seeded random `sample` of them, as TRL tokenizes them."""
    from tqdm.auto import tqdm

    indices = list(range(len(pairs.dataset)))
    if sample is not None and sample < len(indices):
        import random

        indices = sorted(random.Random(0).sample(indices, sample))
    stats = LengthStats([], [], [], [])
    for index in tqdm(indices, desc="Tokenizing", disable=not progress, unit="pair"):
        ids = pair_token_ids(pairs.dataset[index], tokenizer)
        stats.prompt.append(len(ids["prompt_ids"]))
        stats.chosen.append(len(ids["chosen_ids"]))
        stats.rejected.append(len(ids["rejected_ids"]))
        stats.pair_index.append(index)
    return stats


def check_tokenization(stats: LengthStats, tokenizer_name: str, source: str, max_length: int | None) -> list[str]:
    """Answers that tokenize to nothing are an error (a broken or mismatched tokenizer trains on nothing: loss
    ln 2, zero gradients); returns warnings when many answers are truncated to nothing."""
    empty = stats.empty_answers()
    if empty:
        shown = ", ".join(map(str, empty[:10])) + (", ..." if len(empty) > 10 else "")
        raise DpolabError(
            f"{len(empty)} of {len(stats.prompt)} pairs checked from {source} have an answer that the tokenizer of "
            f"{tokenizer_name} turns into no tokens at all (pairs {shown}, counting from 0). Training on them learns "
            f"nothing (loss ln 2, zero gradients). The tokenizer is broken or does not belong to the data: check it "
            f"with `dpolab data check --model_name_or_path ...`; a tokenizer saved from a bare `tokenizers` object "
            f"next to a model config can be reloaded as the model's own tokenizer class and lose its vocabulary."
        )
    dropped = stats.dropped(max_length)
    if stats.prompt and dropped / len(stats.prompt) > 0.1:
        return [
            f"WARNING: {dropped / len(stats.prompt):.0%} of the pairs checked have a prompt that alone reaches "
            f"max_length={max_length}: their answers are truncated to nothing and TRL drops them. Raise --max_length."
        ]
    return []


def percentiles(values: list[int], points=(50, 90, 99)) -> dict[str, float]:
    """Nearest-rank percentiles plus min, mean and max."""
    ordered = sorted(values)
    result = {"min": ordered[0]}
    for point in points:
        rank = max(1, -(-point * len(ordered) // 100))  # ceil(point/100 * n), 1-based
        result[f"p{point}"] = ordered[rank - 1]
    result["max"] = ordered[-1]
    result["mean"] = sum(ordered) / len(ordered)
    return result
