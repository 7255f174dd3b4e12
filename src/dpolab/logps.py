"""The DPO arithmetic on per-pair log-probs, as TRL 1.16 `DPOTrainer._compute_loss` and `log` compute it.

Pure functions over tensors. A "pair" has four sequence log-probs, each the SUM over its completion tokens
(TRL's `logps/*`, not a mean), plus completion token counts for the per-token variants and length-normalised
losses. Shapes: 1-D tensors of length B (pairs) unless noted.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# Loss types whose batch loss `batch_loss` reproduces; TRL's others (aot*, discopop, exo_pair, nca_pair,
# sppo_hard) are left out, and evaluation then reports no loss rather than a wrong one.
SUPPORTED_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "robust", "bco_pair", "apo_zero", "apo_down", "sft", "sigmoid_norm")


def sequence_logps(per_token_logps: torch.Tensor, completion_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of log-probs over completion tokens, and the token count, per sequence.

    per_token_logps: [N, T-1], the log-prob of token t+1 given tokens <= t (zero where not scored);
    completion_mask: [N, T] from TRL's collator. The mask is shifted by one because position t predicts t+1.
    """
    shifted_mask = completion_mask[:, 1:].to(per_token_logps.dtype)
    return (per_token_logps * shifted_mask).sum(dim=1), shifted_mask.sum(dim=1)


def pair_metrics(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float,
) -> dict[str, torch.Tensor]:
    """Implicit rewards beta * (policy - reference), their margin, and TRL's strict-'>' correctness, per pair."""
    chosen_rewards = beta * (policy_chosen - ref_chosen)
    rejected_rewards = beta * (policy_rejected - ref_rejected)
    return {
        "rewards/chosen": chosen_rewards,
        "rewards/rejected": rejected_rewards,
        "rewards/margins": chosen_rewards - rejected_rewards,
        # A tie counts as wrong: with policy == reference every pair is a tie and accuracy is 0, not 0.5.
        "rewards/accuracies": (chosen_rewards > rejected_rewards).to(policy_chosen.dtype),
        "logps/chosen": policy_chosen,
        "logps/rejected": policy_rejected,
    }


def batch_loss(
    loss_types: list[str],
    loss_weights: list[float] | None,
    beta: float,
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    chosen_tokens: torch.Tensor,
    rejected_tokens: torch.Tensor,
    label_smoothing: float = 0.0,
) -> torch.Tensor | None:
    """One batch's loss exactly as TRL combines `loss_type`s (reverse-KL f-divergence); None if unsupported.

    The `sft` term is a token mean over the whole batch, so a loss is defined per batch, not per pair.
    """
    if any(loss_type not in SUPPORTED_LOSS_TYPES for loss_type in loss_types):
        return None
    weights = loss_weights or [1.0] * len(loss_types)
    chosen_logratios = policy_chosen - ref_chosen
    rejected_logratios = policy_rejected - ref_rejected
    delta = chosen_logratios - rejected_logratios
    total = torch.zeros((), dtype=policy_chosen.dtype)
    for loss_type, weight in zip(loss_types, weights, strict=True):
        if loss_type == "sigmoid":
            per_pair = -F.logsigmoid(beta * delta)
        elif loss_type == "hinge":
            per_pair = torch.relu(1 - beta * delta)
        elif loss_type == "ipo":  # TRL normalises IPO's log-ratios per completion token
            ipo_delta = chosen_logratios / chosen_tokens.clamp(min=1) - rejected_logratios / rejected_tokens.clamp(
                min=1
            )
            per_pair = (ipo_delta - 1 / (2 * beta)) ** 2
        elif loss_type == "robust":
            clean = -(1 - label_smoothing) * F.logsigmoid(beta * delta)
            flipped = -label_smoothing * F.logsigmoid(-beta * delta)
            per_pair = (clean - flipped) / (1 - 2 * label_smoothing)
        elif loss_type == "bco_pair":
            per_pair = -F.logsigmoid(beta * chosen_logratios) - F.logsigmoid(-beta * rejected_logratios)
        elif loss_type == "apo_zero":
            per_pair = 1 - torch.sigmoid(beta * chosen_logratios) + torch.sigmoid(beta * rejected_logratios)
        elif loss_type == "apo_down":
            per_pair = torch.sigmoid(beta * chosen_logratios) + 1 - torch.sigmoid(beta * delta)
        elif loss_type == "sft":  # -mean log-prob over every chosen token in the batch
            per_pair = (-policy_chosen.sum() / chosen_tokens.sum()).expand(policy_chosen.shape)
        else:  # sigmoid_norm: the margin of per-token mean log-ratios
            norm_delta = chosen_logratios / chosen_tokens.clamp(min=1) - rejected_logratios / rejected_tokens.clamp(
                min=1
            )
            per_pair = -F.logsigmoid(beta * norm_delta)
        total = total + per_pair.mean() * weight
    return total


def mean_of_batch_means(values: list[float], batch_size: int) -> float:
    """How TRL logs an eval metric: the mean over consecutive batches of each batch's mean.

    It differs from the plain mean when the last batch is short: [1, 1, 1, 4] in batches of 3 gives
    (1 + 4) / 2 = 2.5, while the per-pair mean is 7 / 4 = 1.75.
    """
    batch_means = [
        sum(values[start : start + batch_size]) / len(values[start : start + batch_size])
        for start in range(0, len(values), batch_size)
    ]
    return sum(batch_means) / len(batch_means)


def sample_weighted_batch_mean(batch_values: list[float], batch_sizes: list[int]) -> float:
    """How transformers' evaluation loop reports `eval_loss`: each batch's loss weighted by its size."""
    return sum(v * n for v, n in zip(batch_values, batch_sizes, strict=True)) / sum(batch_sizes)


def is_finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)
