"""Known DPO failure patterns, read off what a run wrote. Pure functions; each finding names its evidence.

A series is a list of (step, value) in step order, keyed by TRL's metric name (`loss`, `rewards/margins`,
`eval_loss`, ...). Each check is stated in units that hold whatever the loss type and the curve's shape:
log-ratios (reward / beta, in nats), per answer token where the answer's length matters, and spikes relative
to the curve's own recent past. A finding is a prompt to look, with the numbers.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

from dpolab.rundir import FORWARD_METRIC_PREFIXES


@dataclass
class Finding:
    name: str
    evidence: str
    suggestion: str

    def as_dict(self) -> dict:
        return {"name": self.name, "evidence": self.evidence, "suggestion": self.suggestion}


def finding_text(finding: dict) -> str:
    """A finding (`Finding.as_dict()`, as summary.json keeps it) for a terminal: two lines."""
    return f"DIAGNOSTIC {finding['name']}: {finding['evidence']}\n  try: {finding['suggestion']}"


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


RECENT = 10  # a spike is judged against the median of this many preceding points
MIN_HISTORY = 5
NO_LEARNING_NATS = 0.01  # mean |log-ratio| per answer below this after warm-up: the policy is the reference
DRIFT_NATS_PER_TOKEN = 1.0  # mean |log-ratio| per answer token above this: far from the reference
DRIFT_NATS_PER_ANSWER = 100.0  # the same when answer lengths are unknown (a 100-token answer at 1 nat/token)
BARELY_MOVED_SHARE = 0.5  # fewer sampled weights than this changed: most updates did not land


def divergence(series) -> list[Finding]:
    findings = []
    forward = sorted(key for key in series if key.removeprefix("eval_").startswith(FORWARD_METRIC_PREFIXES))
    for key in (*forward, "loss", "grad_norm", "eval_loss"):
        bad = [(step, value) for step, value in series.get(key, []) if not math.isfinite(value)]
        if bad:
            step, value = bad[0]
            masked = [v for s, v in series.get("loss", []) if s == step and v == 0.0]
            note = (
                " The loss logged there, 0.0, is transformers' logging_nan_inf_filter standing in for a NaN loss."
                if masked and key != "loss"
                else ""
            )
            findings.append(Finding(
                "divergence: NaN/inf",
                f"{key} is {value} at step {step} ({len(bad)} non-finite values).{note}",
                "Lower learning_rate, keep bf16 (not fp16), set max_grad_norm, and resume from the last good "
                "checkpoint.",
            ))  # fmt: skip
            break  # one NaN shows in every metric: the first one found is the finding
    for key, factor, margin, label in (
        ("loss", 3.0, 0.5, "loss spike"),
        ("grad_norm", 10.0, 0.0, "grad-norm explosion"),
    ):
        spike = first_spike([(s, v) for s, v in series.get(key, []) if math.isfinite(v)], factor, margin)
        if spike:
            step, value, baseline = spike
            findings.append(Finding(
                f"divergence: {label}",
                f"{key} jumps to {value:.3g} at step {step}, {value / baseline:.1f}x the median {baseline:.3g} of "
                f"the {RECENT} points before it.",
                "Lower learning_rate or add warmup (warmup_steps: 0.1); check max_grad_norm and the batch at that "
                "step.",
            ))  # fmt: skip
    return findings


def first_spike(points: list[tuple[int, float]], factor: float, margin: float) -> tuple[int, float, float] | None:
    """The first point above `factor` x the median of the points just before it (and `margin` above it).

    Judged against the recent past, a curve that starts high and decays (a loss from ln 2 to 0.05) has no spike.
    """
    for index in range(MIN_HISTORY, len(points)):
        baseline = statistics.median(value for _, value in points[max(0, index - RECENT) : index])
        step, value = points[index]
        if baseline > 0 and value > factor * baseline and value > baseline + margin:
            return step, value, baseline
    return None


def no_learning(series, beta: float) -> list[Finding]:
    """Log-ratios ~0 after warm-up: the policy is still the reference, whatever the loss type logs."""
    chosen, rejected = series.get("rewards/chosen", []), series.get("rewards/rejected", [])
    if len(chosen) < 5 or len(rejected) < 5 or beta <= 0:
        return []
    chosen_nats = _mean([abs(v) / beta for _, v in _after_warmup(chosen) if math.isfinite(v)])
    rejected_nats = _mean([abs(v) / beta for _, v in _after_warmup(rejected) if math.isfinite(v)])
    if chosen_nats is None or rejected_nats is None or max(chosen_nats, rejected_nats) >= NO_LEARNING_NATS:
        return []
    points = _after_warmup(chosen)
    losses = [v for _, v in _after_warmup(series.get("loss", []))]
    loss = f"; the loss stays near {_mean(losses):.4f}" if losses else ""
    return [Finding(
        "no learning",
        f"after warm-up (steps {points[0][0]}-{points[-1][0]}) the mean log-ratio to the reference is "
        f"{chosen_nats:.2g} nats for chosen and {rejected_nats:.2g} for rejected answers{loss}: the policy is "
        "still the reference (for the sigmoid loss that is a loss frozen at ln 2 = 0.6931).",
        "Raise learning_rate (TRL's default 1e-6 is small for short runs), check the LR warmup/scheduler, that "
        "parameters are trainable (LoRA targets) and that the weights move (weights/changed_share), and that chosen "
        "and rejected still differ after truncation.",
    )]  # fmt: skip


def weights_barely_moved(series) -> list[Finding]:
    """Most sampled weights never changed: updates are rounding away (or nothing is trainable)."""
    shares = series.get("weights/changed_share", [])
    if not shares:
        return []
    step, share = shares[-1]
    relative = series.get("weights/relative_change", [(step, float("nan"))])[-1][1]
    if share >= BARELY_MOVED_SHARE:
        return []
    return [Finding(
        "weights barely moved",
        f"by step {step} only {share:.1%} of the sampled trainable weights changed at all (relative change "
        f"{relative:.2g}): most optimizer updates did not land, so these curves are not a trained model.",
        "bf16 (or fp16) weights with plain AdamW drop updates below half a bf16 step (about lr < |w| / 512): set "
        "dtype: float32 (bf16 autocast keeps the speed), raise learning_rate, or train LoRA adapters.",
    )]  # fmt: skip


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


def reference_drift(series, beta: float, answer_tokens: dict | None = None) -> list[Finding]:
    """Implicit rewards are beta * log-ratio: far from the reference is a large log-ratio per answer token."""
    findings = []
    for key, side in (("rewards/chosen", "chosen"), ("rewards/rejected", "rejected")):
        tail = _window(series.get(key, []), 0.8, 1.0)
        if not tail or beta <= 0:
            continue
        nats = abs(_mean(tail)) / beta
        tokens = (answer_tokens or {}).get(side)
        if tokens:
            drifted, per = nats / tokens > DRIFT_NATS_PER_TOKEN, f", {nats / tokens:.2f} per token over {tokens:.0f}"
        else:
            drifted, per = nats > DRIFT_NATS_PER_ANSWER, " (answer lengths unknown)"
        if drifted:
            findings.append(Finding(
                "drift from the reference",
                f"{key} ends at {_mean(tail):.3g} with beta {beta}: a log-ratio of {nats:.0f} nats per answer{per} "
                "tokens.",
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
    answer_tokens: dict | None = None,
) -> list[Finding]:
    """Every finding for a run: metric records (metrics.jsonl) plus optional generation lengths, length bias and
    the mean scored tokens per chosen and rejected answer."""
    series = series_from_records(records)
    return [
        *divergence(series),
        *weights_barely_moved(series),
        *no_learning(series, beta),
        *likelihood_displacement(series),
        *overfitting(series),
        *reference_drift(series, beta, answer_tokens),
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
    tokens = (summary or {}).get("answer_tokens")
    return diagnose(records, float(config.get("beta", 0.1)), lengths or None, bias, tokens)
