"""Do the updates land? How far the weights moved, and which updates a weight's dtype can hold. Pure functions.

A bfloat16 weight keeps 8 significant bits: a weight near 0.02 moves in steps of about 1.2e-4, and an update
smaller than half a step rounds back to the same number. AdamW moves each weight by about the learning rate per
step (its normalised update is about 1 at the start), so bf16 weights trained with plain AdamW at lr 5e-7 keep
almost every update from landing. Float32 master weights (bf16 only inside autocast) hold them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

HALF_PRECISION = (torch.bfloat16, torch.float16)
# Optimizers that carry the low bits a bf16 weight drops (Kahan summation): no lost-update warning for them.
COMPENSATED_OPTIMIZERS = ("stable_adamw", "adamw_anyprecision")
SAMPLE_PER_TENSOR = 4096  # weights sampled per parameter tensor for the movement metric (one gather each)


def half_step(weights: torch.Tensor) -> torch.Tensor:
    """Half the spacing between representable numbers at each weight, in the weight's own dtype (as float32).

    |w| = m * 2**e with m in [0.5, 1): the spacing there is eps * 2**(e - 1), eps = the dtype's spacing at 1.0.
    Zero weights get 0 (any update lands on them).
    """
    exponent = torch.frexp(weights.float()).exponent
    half = torch.ldexp(torch.full_like(weights, torch.finfo(weights.dtype).eps, dtype=torch.float32), exponent - 2)
    return torch.where(weights == 0, torch.zeros_like(half), half)


def lost_update_count(weights: torch.Tensor, update: float) -> int:
    """How many of these weights an update of size `update` would not change (it rounds away)."""
    return int((half_step(weights) > abs(update)).sum())


@dataclass
class LostUpdates:
    lost: int
    total: int
    dtype: str

    @property
    def share(self) -> float:
        return self.lost / self.total if self.total else 0.0


def lost_updates(parameters, learning_rate: float) -> LostUpdates | None:
    """Over the trainable half-precision weights: how many an AdamW step of size `learning_rate` leaves unchanged.

    None when no trainable weight is in half precision (float32 weights hold such updates).
    """
    lost = total = 0
    dtype = None
    for parameter in parameters:
        if parameter.requires_grad and parameter.dtype in HALF_PRECISION:
            lost += lost_update_count(parameter.detach(), learning_rate)
            total += parameter.numel()
            dtype = str(parameter.dtype).removeprefix("torch.")
    return LostUpdates(lost, total, dtype) if total else None


def lost_update_warning(lost: LostUpdates, learning_rate: float, optim: str) -> str:
    return (
        f"{lost.dtype} weights with plain {optim} at learning_rate {learning_rate:g}: for {lost.share:.1%} of the "
        f"trainable weights ({lost.lost:,} of {lost.total:,}) an update of {learning_rate:g} is below half a "
        f"{lost.dtype} step and rounds away, so training will barely move them (the loss still wiggles). Set "
        f"`dtype: float32` (float32 master weights; `bf16: true` keeps bf16 speed through autocast, TRL's own "
        f"default), or train LoRA adapters (`use_peft: true`, kept in float32)."
    )


# --- how far the weights moved ------------------------------------------------------------------------------------


def sample_indices(numel: int, count: int = SAMPLE_PER_TENSOR) -> torch.Tensor:
    """Evenly spread flat indices into a tensor of `numel` elements (all of them when it is small)."""
    if numel <= count:
        return torch.arange(numel)
    return torch.arange(count, dtype=torch.int64) * (numel - 1) // (count - 1)  # integers: exact at any size


def movement(initial: torch.Tensor, current: torch.Tensor) -> dict[str, float]:
    """Share of sampled weights that changed, and the relative size of the change ||w - w0|| / ||w0||.

    initial, current: the same sample of weights, flat, float32 (one device sync for the three numbers).
    """
    changed, difference, norm = torch.stack(
        [(current != initial).sum().float(), (current - initial).pow(2).sum(), initial.pow(2).sum()]
    ).tolist()
    return {
        "weights/changed_share": changed / initial.numel() if initial.numel() else 0.0,
        "weights/relative_change": (difference / norm) ** 0.5 if norm > 0 else float(difference > 0),
    }


def gather_sample(parameters_and_indices) -> torch.Tensor:
    """The sampled weights of every tensor, flat and in float32 (a cast alone never counts as a change)."""
    return torch.cat([p.detach().reshape(-1)[index].float() for p, index in parameters_and_indices])
