"""Diagnostics on synthetic curves: each failure fires with its evidence, a healthy run raises nothing."""

import math
import random

import pytest

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


def with_weights(records, share=0.998, relative=2e-5):
    for record in records:
        record.update({"weights/changed_share": share, "weights/relative_change": relative})
    return records


ANSWERS_300 = {"chosen": 300.0, "rejected": 310.0}


@pytest.mark.parametrize(
    "shape",
    ["decays-to-0.05", "noisy", "ipo", "sigmoid+sft", "rejected-at--2.5"],
)
def test_healthy_runs_of_several_shapes_raise_nothing(shape):
    rng = random.Random(0)
    if shape == "decays-to-0.05":  # the first logged loss (ln 2) is 14x the final median: no spike
        records = run_records(
            loss=lambda s: 0.05 + (math.log(2) - 0.05) * math.exp(-s / 8),
            margins=lambda s: 3 * (1 - math.exp(-s / 8)),
            accuracy=lambda s: min(1.0, 0.5 + s / 20),
        )
    elif shape == "noisy":  # small batches: loss and grad norm jump around a slow trend
        records = run_records(
            loss=lambda s: 0.69 - 0.002 * s + rng.uniform(-0.12, 0.12),
            grad=lambda s: rng.uniform(2.0, 9.0),
            accuracy=lambda s: rng.choice([0.25, 0.5, 0.75]),
        )
    elif shape == "ipo":  # IPO's loss lives near (1 / (2 beta))^2 = 25
        records = run_records(loss=lambda s: 25.0 - 0.1 * s)
    elif shape == "sigmoid+sft":  # the SFT term lifts the chosen answers
        records = run_records(loss=lambda s: 2.9 - 0.03 * s, chosen=lambda s: -40.0 + 0.3 * s)
    else:  # rewards/rejected -2.5 at beta 0.1 over 310-token answers: 0.08 nats per token
        records = run_records()
        for record in records:
            record["rewards/rejected"] = -2.5 * record["step"] / 50
    assert diagnose(with_weights(records), beta=0.1, answer_tokens=ANSWERS_300) == []


def test_a_nan_logged_as_loss_zero_is_divergence():
    records = run_records()
    for record in records[32:]:  # transformers' nan filter: a NaN loss from the first steps is logged as 0.0
        record.update({"loss": 0.0, "rewards/margins": float("nan"), "rewards/chosen": float("nan")})
    findings = diagnose(records, beta=0.1)
    assert names(findings)[0] == "divergence: NaN/inf"
    assert "step 33" in findings[0].evidence and "logging_nan_inf_filter" in findings[0].evidence


@pytest.mark.parametrize("loss", [math.log(2), 2.9, 25.0], ids=["sigmoid", "sigmoid+sft", "ipo"])
def test_a_dead_run_is_no_learning_whatever_the_loss_type(loss):
    records = run_records(loss=lambda s: loss, margins=lambda s: 0.0, accuracy=lambda s: 0.0)
    for record in records:
        record.update({"rewards/chosen": 0.0, "rewards/rejected": 0.0})
    findings = diagnose(records, beta=0.1)
    assert names(findings) == ["no learning"]
    assert "still the reference" in findings[0].evidence and "learning_rate" in findings[0].suggestion


def test_weights_that_did_not_move_are_named():
    records = with_weights(run_records(), share=0.008, relative=3e-7)  # bf16 + plain AdamW at lr 5e-7
    findings = diagnose(records, beta=0.1)
    assert names(findings) == ["weights barely moved"]
    assert "0.8%" in findings[0].evidence and "float32" in findings[0].suggestion


def test_likelihood_displacement():
    records = run_records(chosen=lambda s: -40.0 - 0.3 * s, rejected=lambda s: -42.0 - 0.6 * s)
    findings = diagnose(records, beta=0.1)
    assert names(findings) == ["likelihood displacement"]
    assert "logps/chosen fell from" in findings[0].evidence and "sft" in findings[0].suggestion


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


def test_drift_from_the_reference_is_judged_per_answer_token():
    records = run_records()
    for record in records:
        record["rewards/chosen"] = -3.0  # beta 0.1: 30 nats of log-ratio per answer
    findings = diagnose(records, beta=0.1, answer_tokens={"chosen": 20.0, "rejected": 20.0})
    assert names(findings) == ["drift from the reference"]
    assert "30 nats per answer, 1.50 per token over 20" in findings[0].evidence
    assert diagnose(records, beta=0.1, answer_tokens=ANSWERS_300) == []  # 0.1 nats per token: healthy


def test_length_exploitation_from_generations_and_length_bias():
    findings = diagnose(
        run_records(), beta=0.1, generation_lengths=[("base", 60), ("checkpoint-500", 90), ("final", 140)]
    )
    assert names(findings) == ["length exploitation: longer generations"]
    bias = {"pearson_margin_vs_length_difference": 0.8, "longer_wins_accuracy": 0.7, "model_accuracy": 0.72}
    findings = diagnose(run_records(), beta=0.1, length_bias=bias)
    assert names(findings) == ["length exploitation: margins follow length"] and "0.80" in findings[0].evidence
