"""Diagnostics on synthetic curves: each failure fires with its evidence, a healthy run raises nothing."""

import math

from dpolab.diagnostics import diagnose


def run_records(steps=50, loss=None, margins=None, accuracy=None, chosen=None, rejected=None, grad=None, evals=None):
    """metrics.jsonl-like records from per-step functions of the step (1-based)."""
    records = []
    for step in range(1, steps + 1):
        records.append({
            "step": step,
            "epoch": step / steps,
            "loss": loss(step) if loss else 0.69 - 0.4 * step / steps,
            "rewards/margins": margins(step) if margins else 0.02 * step,
            "rewards/accuracies": accuracy(step) if accuracy else min(0.5 + 0.01 * step, 0.85),
            "rewards/chosen": 0.01 * step,
            "rewards/rejected": -0.01 * step,
            "logps/chosen": chosen(step) if chosen else -40.0 + 0.02 * step,
            "logps/rejected": rejected(step) if rejected else -42.0 - 0.05 * step,
            "grad_norm": grad(step) if grad else 5.0 + math.sin(step),
            "learning_rate": 1e-6,
        })  # fmt: skip
    for step, value in evals or []:
        records.append({"step": step, "epoch": step / steps, "eval_loss": value})
    return records


def names(findings):
    return [finding.name for finding in findings]


def test_a_healthy_run_raises_nothing():
    evals = [(10, 0.66), (20, 0.6), (30, 0.55), (40, 0.52), (50, 0.5)]
    assert diagnose(run_records(evals=evals), beta=0.1, generation_lengths=[("base", 80), ("final", 85)]) == []


def test_likelihood_displacement():
    records = run_records(chosen=lambda s: -40.0 - 0.3 * s, rejected=lambda s: -42.0 - 0.6 * s)
    findings = diagnose(records, beta=0.1)
    assert names(findings) == ["likelihood displacement"]
    assert "logps/chosen fell from" in findings[0].evidence and "sft" in findings[0].suggestion


def test_no_learning_loss_frozen_at_ln2():
    records = run_records(loss=lambda s: math.log(2), margins=lambda s: 0.0, accuracy=lambda s: 0.0)
    findings = diagnose(records, beta=0.1)
    assert names(findings) == ["no learning"]
    assert "0.6931" in findings[0].evidence and "learning_rate" in findings[0].suggestion


def test_overfitting_eval_loss_rises_while_train_saturates():
    records = run_records(accuracy=lambda s: 1.0, margins=lambda s: 0.2 * s,
                          evals=[(10, 0.5), (20, 0.4), (30, 0.45), (40, 0.55), (50, 0.7)])  # fmt: skip
    findings = diagnose(records, beta=0.1)
    assert names(findings) == ["saturation / overfitting"]
    assert "step 20" in findings[0].evidence


def test_divergence_nan_spike_and_grad_explosion():
    nan = run_records(loss=lambda s: float("nan") if s == 33 else 0.5)
    assert "divergence: NaN/inf" in names(diagnose(nan, beta=0.1))
    assert "step 33" in diagnose(nan, beta=0.1)[0].evidence
    spike = run_records(loss=lambda s: 6.0 if s == 40 else 0.5)
    assert "divergence: loss spike" in names(diagnose(spike, beta=0.1))
    exploding = run_records(grad=lambda s: 900.0 if s == 25 else 4.0)
    assert names(diagnose(exploding, beta=0.1)) == ["divergence: grad-norm explosion"]


def test_drift_from_the_reference():
    records = run_records()
    for record in records:
        record["rewards/chosen"] = -3.0  # beta 0.1: 30 nats of log-ratio
    findings = diagnose(records, beta=0.1)
    assert names(findings) == ["drift from the reference"] and "30 nats" in findings[0].evidence


def test_length_exploitation_from_generations_and_length_bias():
    findings = diagnose(
        run_records(), beta=0.1, generation_lengths=[("base", 60), ("checkpoint-500", 90), ("final", 140)]
    )
    assert names(findings) == ["length exploitation: longer generations"]
    bias = {"pearson_margin_vs_length_difference": 0.8, "longer_wins_accuracy": 0.7, "model_accuracy": 0.72}
    findings = diagnose(run_records(), beta=0.1, length_bias=bias)
    assert names(findings) == ["length exploitation: margins follow length"] and "0.80" in findings[0].evidence
