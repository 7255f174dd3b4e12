"""`dpolab lengthbias PATH`: do the margins follow the length difference between chosen and rejected?

Pure statistics over the per-pair records `dpolab eval` wrote (eval.jsonl); also part of eval's own output.
Imports neither torch nor transformers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from dpolab.errors import DpolabError
from dpolab.rundir import EVAL_RECORDS, read_jsonl


@dataclass
class LengthBiasConfig:
    """Margins against length differences, from the per-pair records of `dpolab eval`."""

    path: str = field(metadata={"positional": True, "help": "eval.jsonl, or the directory holding it"})


def run(config: LengthBiasConfig) -> dict:
    path = Path(config.path)
    path = path / EVAL_RECORDS if path.is_dir() else path
    if not path.is_file():
        raise DpolabError(f"No {EVAL_RECORDS} at {path}: run `dpolab eval` first.")
    bias = length_bias(read_jsonl(path))
    print(format_length_bias(bias))
    return bias


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
