"""Known DPO failure patterns, read off the metric series. Pure functions; each finding names its evidence.

A series is a list of (step, value) in step order, keyed by TRL's metric name (`loss`, `rewards/margins`,
`eval_loss`, ...). Thresholds are deliberately coarse: a finding is a prompt to look, with the numbers.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

LN2 = math.log(2)


@dataclass
class Finding:
    name: str
    evidence: str
    suggestion: str

    def as_dict(self) -> dict:
        return {"name": self.name, "evidence": self.evidence, "suggestion": self.suggestion}


def series_from_records(records: list[dict]) -> dict[str, list[tuple[int, float]]]:
    """metrics.jsonl records -> {metric: [(step, value), ...]} (numbers only; NaN/inf kept)."""
    series: dict[str, list[tuple[int, float]]] = {}
    for record in records:
        for key, value in record.items():
            if key not in ("step", "epoch") and isinstance(value, (int, float)) and not isinstance(value, bool):
                series.setdefault(key, []).append((record["step"], float(value)))
    return series


def _window(points: list[tuple[int, float]], start: float, end: float) -> list[float]:
    """Values in the [start, end) fraction of the points (by position)."""
    n = len(points)
    chunk = points[int(start * n) : max(int(end * n), int(start * n) + 1)]
    return [value for _, value in chunk if math.isfinite(value)]


def _mean(values: list[float]) -> float | None:
    return statistics.fmean(values) if values else None


def _after_warmup(points):
    """The points after the first 20% of training (at least the last point)."""
    return points[int(0.2 * len(points)) :] or points[-1:]


def divergence(series) -> list[Finding]:
    findings = []
    for key in ("loss", "grad_norm", "rewards/margins", "eval_loss"):
        bad = [(step, value) for step, value in series.get(key, []) if not math.isfinite(value)]
        if bad:
            findings.append(Finding(
                "divergence: NaN/inf",
                f"{key} is {bad[0][1]} at step {bad[0][0]} ({len(bad)} non-finite values).",
                "Lower learning_rate, keep bf16 (not fp16), set max_grad_norm, and resume from the last good "
                "checkpoint.",
            ))  # fmt: skip
    for key, factor, label in (("loss", 4.0, "loss spike"), ("grad_norm", 10.0, "grad-norm explosion")):
        points = [(s, v) for s, v in series.get(key, []) if math.isfinite(v)]
        if len(points) < 8:
            continue
        median = statistics.median(v for _, v in points)
        worst_step, worst = max(points, key=lambda p: p[1])
        if median > 0 and worst > factor * median and worst > median + 0.5:
            findings.append(Finding(
                f"divergence: {label}",
                f"{key} reaches {worst:.3g} at step {worst_step}, {worst / median:.1f}x its median {median:.3g}.",
                "Lower learning_rate or add warmup (warmup_steps: 0.1); check max_grad_norm and the batch at that "
                "step.",
            ))  # fmt: skip
    return findings


def no_learning(series) -> list[Finding]:
    """Margins ~0 and loss ~ln 2 after warm-up: the policy is not moving away from the reference."""
    margins = _after_warmup(series.get("rewards/margins", []))
    losses = _after_warmup(series.get("loss", []))
    if len(series.get("rewards/margins", [])) < 5 or not losses:
        return []
    mean_margin = _mean([v for _, v in margins])
    mean_loss = _mean([v for _, v in losses])
    accuracy = _mean([v for _, v in _after_warmup(series.get("rewards/accuracies", []))])
    if mean_margin is not None and abs(mean_margin) < 0.01 and mean_loss is not None and abs(mean_loss - LN2) < 0.01:
        acc = f", accuracy {accuracy:.2f}" if accuracy is not None else ""
        return [Finding(
            "no learning",
            f"after warm-up (steps {margins[0][0]}-{margins[-1][0]}) the mean margin is {mean_margin:.4f} and the loss "
            f"{mean_loss:.4f} ~ ln 2 = 0.6931{acc}: the policy is still the reference.",
            "Raise learning_rate (TRL's default 1e-6 is small for short runs), check the LR warmup/scheduler, that "
            "parameters are trainable (LoRA targets), and that chosen and rejected differ after truncation.",
        )]  # fmt: skip
    return []


def likelihood_displacement(series) -> list[Finding]:
    """logps/chosen falling substantially together with logps/rejected (the chosen answer gets LESS likely)."""
    chosen, rejected = series.get("logps/chosen", []), series.get("logps/rejected", [])
    if len(chosen) < 5 or len(rejected) < 5:
        return []
    chosen_start, chosen_end = _mean(_window(chosen, 0, 0.2)), _mean(_window(chosen, 0.8, 1.0))
    rejected_start, rejected_end = _mean(_window(rejected, 0, 0.2)), _mean(_window(rejected, 0.8, 1.0))
    drop = chosen_start - chosen_end
    if drop > max(1.0, 0.1 * abs(chosen_start)) and rejected_end < rejected_start:
        return [Finding(
            "likelihood displacement",
            f"logps/chosen fell from {chosen_start:.2f} to {chosen_end:.2f} (steps {chosen[0][0]}-{chosen[-1][0]}) "
            f"while logps/rejected fell from {rejected_start:.2f} to {rejected_end:.2f}: the margin grows by pushing "
            "both answers down, and generations can get worse while reward accuracy rises.",
            "Add an SFT term on the chosen answers: loss_type: [sigmoid, sft] (as the demo does); or lower "
            "learning_rate / raise beta.",
        )]  # fmt: skip
    return []


def overfitting(series) -> list[Finding]:
    """Train accuracy ~1 with margins still growing while the eval loss rises from its minimum."""
    accuracy = _mean(_window(series.get("rewards/accuracies", []), 0.8, 1.0))
    margins = series.get("rewards/margins", [])
    evals = [(s, v) for s, v in series.get("eval_loss", []) if math.isfinite(v)]
    if accuracy is None or accuracy < 0.95 or len(margins) < 5 or len(evals) < 3:
        return []
    growing = _mean(_window(margins, 0.8, 1.0)) > _mean(_window(margins, 0.4, 0.6))
    best_step, best = min(evals, key=lambda p: p[1])
    last_step, last = evals[-1]
    if growing and last > best * 1.05 and last_step > best_step:
        return [Finding(
            "saturation / overfitting",
            f"train accuracy {accuracy:.2f} with margins still growing, while eval_loss rose from {best:.4f} "
            f"(step {best_step}) to {last:.4f} (step {last_step}).",
            f"Keep the checkpoint near step {best_step} (`dpolab sweep`), stop earlier, or add data / raise beta.",
        )]  # fmt: skip
    return []


def reference_drift(series, beta: float) -> list[Finding]:
    """Implicit rewards are beta * log-ratio; |log-ratio| in the tens of nats is a long way from the reference."""
    findings = []
    for key in ("rewards/chosen", "rewards/rejected"):
        tail = _window(series.get(key, []), 0.8, 1.0)
        if tail and beta > 0:
            log_ratio = abs(_mean(tail)) / beta
            if log_ratio > 20:
                findings.append(Finding(
                    "drift from the reference",
                    f"{key} ends at {_mean(tail):.3g} with beta {beta}: a log-ratio of {log_ratio:.0f} nats per "
                    "answer.",
                    "Raise beta or lower learning_rate; check generations for degenerate text (`dpolab generate`).",
                ))  # fmt: skip
    return findings


def length_exploitation(generation_lengths: list[tuple[str, float]] | None, bias: dict | None) -> list[Finding]:
    """Replies growing longer across checkpoints, or margins that follow the length difference."""
    findings = []
    if generation_lengths and len(generation_lengths) >= 2:
        (first_label, first), (last_label, last) = generation_lengths[0], generation_lengths[-1]
        if first > 0 and last > 1.3 * first and last - first >= 10:
            findings.append(Finding(
                "length exploitation: longer generations",
                f"mean reply length rose from {first:.0f} tokens ({first_label}) to {last:.0f} ({last_label}).",
                "DPO rewards length when chosen answers are longer: try ld_alpha, loss_type sigmoid_norm, or "
                "length-balanced pairs.",
            ))  # fmt: skip
    if bias:
        r = bias.get("pearson_margin_vs_length_difference")
        if r is not None and r > 0.5:
            findings.append(Finding(
                "length exploitation: margins follow length",
                f"Pearson {r:.2f} between margin and length difference; 'longer answer wins' scores "
                f"{bias['longer_wins_accuracy']:.2f} against the model's {bias['model_accuracy']:.2f}.",
                "Compare the per-token margins (eval.json) and consider length-normalised losses (sigmoid_norm, "
                "ld_alpha).",
            ))  # fmt: skip
    return findings


def diagnose(
    records: list[dict],
    beta: float,
    generation_lengths: list[tuple[str, float]] | None = None,
    length_bias: dict | None = None,
) -> list[Finding]:
    """Every finding for a run: metric records (metrics.jsonl) plus optional generation lengths and length bias."""
    series = series_from_records(records)
    return [
        *divergence(series),
        *no_learning(series),
        *likelihood_displacement(series),
        *overfitting(series),
        *reference_drift(series, beta),
        *length_exploitation(generation_lengths, length_bias),
    ]


def diagnose_run(
    records: list[dict],
    config: dict,
    summary: dict | None = None,
    generation_stats: dict | None = None,
    final_eval: dict | None = None,
) -> list[Finding]:
    """Every finding for a run from what its workflows wrote: metrics, config, summary, generations, eval."""
    lengths = [(label, s["mean_new_tokens"]) for label, s in (generation_stats or {}).get("models", {}).items()]
    bias = (final_eval or {}).get("length_bias")
    return diagnose(records, float(config.get("beta", 0.1)), lengths or None, bias)
