"""The DPO arithmetic on per-pair log-probs, as TRL 1.16 `DPOTrainer._compute_loss` and `log` compute it.

Pure functions over tensors. A "pair" has four sequence log-probs, each the SUM over its completion tokens
(TRL's `logps/*`, not a mean), plus completion token counts for the per-token variants and length-normalised
losses. Shapes: 1-D tensors of length B (pairs) unless noted.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


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


def length_weighted_logps(
    per_token_logps: torch.Tensor, shifted_mask: torch.Tensor, ld_alpha: float | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(TRL's logps, the plain sums, the token counts) per sequence of a [chosen..., rejected...] batch.

    per_token_logps, shifted_mask: [2B, T-1], zero / 0 where not scored. With `ld_alpha` (LD-DPO), TRL weights
    the tokens of each answer beyond the shorter answer's length by ld_alpha; without it, logps are plain sums.
    """
    mask = shifted_mask.to(per_token_logps.dtype)
    plain = (per_token_logps * mask).sum(dim=1)
    counts = mask.sum(dim=1)
    if ld_alpha is None:
        return plain, plain, counts
    position = shifted_mask.cumsum(dim=1)
    chosen_lengths, rejected_lengths = counts.long().chunk(2)
    shared = torch.minimum(chosen_lengths, rejected_lengths).repeat(2).unsqueeze(1)
    shared_part = (per_token_logps * mask * (position <= shared)).sum(dim=1)
    tail_part = (per_token_logps * mask * (position > shared)).sum(dim=1)
    return shared_part + ld_alpha * tail_part, plain, counts


def f_divergence_scores(
    chosen_logratios: torch.Tensor,
    rejected_logratios: torch.Tensor,
    f_divergence_type: str = "reverse_kl",
    f_alpha_divergence_coef: float = 0.5,
) -> tuple[torch.Tensor, torch.Tensor]:
    """f'(policy/reference) of each answer, the scores TRL's f-DPO losses compare (reverse KL: the log-ratios)."""
    if f_divergence_type == "reverse_kl":
        return chosen_logratios, rejected_logratios
    if f_divergence_type == "forward_kl":  # f'(t) = 1 - 1/t
        return 1 - torch.exp(-chosen_logratios), 1 - torch.exp(-rejected_logratios)
    if f_divergence_type == "js_divergence":  # f'(t) = log 2 + logsigmoid(log t)
        return math.log(2) + F.logsigmoid(chosen_logratios), math.log(2) + F.logsigmoid(rejected_logratios)
    if f_divergence_type == "alpha_divergence":  # f'(t) = (t^(alpha-1) - 1) / (alpha - 1); alpha -> 1 is reverse KL
        if abs(f_alpha_divergence_coef - 1.0) < 1e-6:
            return chosen_logratios, rejected_logratios
        coef = 1.0 / (f_alpha_divergence_coef - 1.0)
        # TRL clamps the exponent so exp() stays representable: 80 for float32 and bfloat16
        chosen = torch.clamp((f_alpha_divergence_coef - 1.0) * chosen_logratios, max=80.0)
        rejected = torch.clamp((f_alpha_divergence_coef - 1.0) * rejected_logratios, max=80.0)
        return (torch.exp(chosen) - 1.0) * coef, (torch.exp(rejected) - 1.0) * coef
    raise ValueError(f"Unknown f_divergence_type: {f_divergence_type}")


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
    *,
    f_divergence_type: str = "reverse_kl",
    f_alpha_divergence_coef: float = 0.5,
    discopop_tau: float = 0.05,
    policy_chosen_unweighted: torch.Tensor | None = None,
) -> torch.Tensor:
    """One batch's loss exactly as TRL 1.16 `DPOTrainer._compute_loss` combines its `loss_type`s.

    The `sft` term is a token mean over the whole batch, and `aot`/`aot_unpaired` sort within the batch, so a loss
    is defined per batch, not per pair. `policy_chosen_unweighted`: the plain log-prob sums when `ld_alpha`
    weighted `policy_chosen` (the `sft` term uses the plain ones, as TRL does).
    """
    weights = loss_weights or [1.0] * len(loss_types)
    chosen_logratios = policy_chosen - ref_chosen
    rejected_logratios = policy_rejected - ref_rejected
    chosen_scores, rejected_scores = f_divergence_scores(
        chosen_logratios, rejected_logratios, f_divergence_type, f_alpha_divergence_coef
    )
    delta = chosen_scores - rejected_scores
    chosen_count, rejected_count = chosen_tokens.clamp(min=1), rejected_tokens.clamp(min=1)
    total = torch.zeros((), dtype=policy_chosen.dtype, device=policy_chosen.device)
    for loss_type, weight in zip(loss_types, weights, strict=True):
        if loss_type == "sigmoid":
            per_pair = -F.logsigmoid(beta * delta)
        elif loss_type == "hinge":
            per_pair = torch.relu(1 - beta * delta)
        elif loss_type == "ipo":  # TRL normalises IPO's scores per completion token
            per_pair = (chosen_scores / chosen_count - rejected_scores / rejected_count - 1 / (2 * beta)) ** 2
        elif loss_type == "exo_pair":
            epsilon = torch.tensor(label_smoothing, dtype=delta.dtype, device=delta.device)
            per_pair = torch.sigmoid(beta * delta) * (
                F.logsigmoid(beta * delta) - torch.log1p(-epsilon)
            ) + torch.sigmoid(-beta * delta) * (F.logsigmoid(-beta * delta) - torch.log(epsilon))
        elif loss_type == "nca_pair":
            chosen_rewards, rejected_rewards = beta * chosen_logratios, beta * rejected_logratios
            per_pair = (
                -F.logsigmoid(chosen_rewards)
                - 0.5 * F.logsigmoid(-chosen_rewards)
                - 0.5 * F.logsigmoid(-rejected_rewards)
            )
        elif loss_type == "robust":
            clean = -(1 - label_smoothing) * F.logsigmoid(beta * delta)
            flipped = -label_smoothing * F.logsigmoid(-beta * delta)
            per_pair = (clean - flipped) / (1 - 2 * label_smoothing)
        elif loss_type == "bco_pair":
            per_pair = -F.logsigmoid(beta * chosen_logratios) - F.logsigmoid(-beta * rejected_logratios)
        elif loss_type == "sppo_hard":
            per_pair = (chosen_logratios - 0.5 / beta) ** 2 + (rejected_logratios + 0.5 / beta) ** 2
        elif loss_type in ("aot", "aot_unpaired"):
            if loss_type == "aot":
                sorted_delta = torch.sort(policy_chosen - policy_rejected)[0] - torch.sort(ref_chosen - ref_rejected)[0]
            else:
                sorted_delta = torch.sort(chosen_logratios)[0] - torch.sort(rejected_logratios)[0]
            per_pair = (
                -F.logsigmoid(beta * sorted_delta) * (1 - label_smoothing)
                - F.logsigmoid(-beta * sorted_delta) * label_smoothing
            )
        elif loss_type == "apo_zero":
            per_pair = 1 - torch.sigmoid(beta * chosen_logratios) + torch.sigmoid(beta * rejected_logratios)
        elif loss_type == "apo_down":
            per_pair = (
                torch.sigmoid(beta * chosen_logratios)
                + 1
                - torch.sigmoid(beta * (chosen_logratios - rejected_logratios))
            )
        elif loss_type == "discopop":
            logits = beta * delta
            modulation = torch.sigmoid(logits / discopop_tau)
            per_pair = -F.logsigmoid(logits) * (1 - modulation) + torch.exp(-logits) * modulation
        elif loss_type == "sft":  # -mean log-prob over every chosen token in the batch
            plain = policy_chosen if policy_chosen_unweighted is None else policy_chosen_unweighted
            per_pair = (-plain.sum() / chosen_tokens.sum()).expand(policy_chosen.shape)
        elif loss_type == "sigmoid_norm":  # the margin of per-token mean scores
            per_pair = -F.logsigmoid(beta * (chosen_scores / chosen_count - rejected_scores / rejected_count))
        else:
            raise ValueError(f"Unknown loss type: {loss_type}")
        total = total + per_pair.mean() * weight
    return total


def read_per_pair(per_batch: list[tuple[torch.Tensor, ...]], names: tuple[str, ...]) -> dict[str, list]:
    """Per-batch values kept on the device (one tuple of 1-D tensors per batch, in `names`' order), read back at the
    end in one transfer per name: the scoring loops that fill them never make the host wait for the device."""
    read = [torch.cat(values).tolist() for values in zip(*per_batch)] or [[] for _ in names]
    return dict(zip(names, read, strict=True))


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
