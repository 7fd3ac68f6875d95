"""What every cascade loss shares: the candidate layout, the output type, masked reductions.

Reduction rule of every loss (METHOD.md writes LCRON's as mean_b mean_j): a loss is first averaged
over the terms of one request (its real items, or its real pairs), then over the requests that have
at least one term and meet the loss's own validity condition (e.g. more real items than a top-q cut).
For a per-item loss on full groups this is exactly the research code's mean over all B x N entries;
with padding, padded items never count and a request with nothing to learn from does not dilute the mean.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lcron_dist.data import schema

STAGE_NAMES = schema.STAGE_NAMES
"""Stage (model) names in cascade order; `scores` holds one tensor per stage in this order."""

_SERVING_GROUPS: dict[int, tuple[int, ...]] = {2: (3, 2), 3: (4, 3, 2)}
"""Groups' worth of items each stage keeps when serving: 30 -> 20 and 40 -> 30 -> 20 at 10 per group."""

_SEEN_GROUPS: dict[int, tuple[int, ...]] = {2: (4, 2), 3: (5, 4, 2)}
"""Leading groups each stage was shown in production (METHOD.md section 4, BCE)."""


@dataclass(frozen=True)
class CascadeLayout:
    """Candidate layout of one request: groups of `group_size` items, ground-truth group first."""

    num_stages: int
    group_size: int = schema.GROUP_SIZE

    def __post_init__(self) -> None:
        if self.num_stages not in STAGE_NAMES:
            raise ValueError(f"num_stages must be one of {sorted(STAGE_NAMES)}, got {self.num_stages}")
        if self.group_size < 1:
            raise ValueError(f"group_size must be >= 1, got {self.group_size}")

    @property
    def stage_names(self) -> tuple[str, ...]:
        return STAGE_NAMES[self.num_stages]

    @property
    def num_groups(self) -> int:
        return len(schema.GROUPS[self.num_stages])

    @property
    def num_items(self) -> int:
        """N: candidates per request (40 for 2 stages, 50 for 3 at 10 per group)."""
        return self.num_groups * self.group_size

    @property
    def serving_quotas(self) -> tuple[int, ...]:
        """Items each stage keeps when serving: (30, 20) or (40, 30, 20) at 10 per group."""
        return tuple(g * self.group_size for g in _SERVING_GROUPS[self.num_stages])

    @property
    def seen_items(self) -> tuple[int, ...]:
        """Leading items each stage was shown in production: (40, 20) or (50, 40, 20) at 10 per group."""
        return tuple(g * self.group_size for g in _SEEN_GROUPS[self.num_stages])

    def per_stage(self, value: float | Sequence[float] | None, default: Sequence[float], name: str) -> tuple:
        """One value per stage from a scalar, a per-stage sequence or None (= default)."""
        if value is None:
            return tuple(default)
        if isinstance(value, (int, float)):
            return (value,) * self.num_stages
        values = tuple(value)
        if len(values) != self.num_stages:
            raise ValueError(f"{name} needs one value per stage {self.stage_names}, got {values}")
        return values


@dataclass(frozen=True)
class Candidates:
    """Per-request label view shared by every loss (built once per forward)."""

    relevance: torch.Tensor
    """[B, N] graded label (float), 0 on padding."""
    mask: torch.Tensor
    """[B, N] bool, real items."""
    target: torch.Tensor
    """[B, N] bool, binary y: real and in the ground-truth (first) group."""
    position: torch.Tensor
    """[N] long, candidate position 0..N-1; group = position // group_size."""
    num_real: torch.Tensor
    """[B] long, real items per request (n_b)."""

    @property
    def negative(self) -> torch.Tensor:
        """[B, N] bool: real items outside the ground truth (1 − y on real items)."""
        return self.mask & ~self.target


@dataclass(frozen=True)
class LossOutput:
    """What a loss returns: the scalar to backpropagate and its detached components."""

    total: torch.Tensor
    parts: dict[str, torch.Tensor]


class CascadeLoss(nn.Module):
    """Base of every loss: checks the inputs against the layout and builds the label view.

    Subclasses implement `compute(scores, cands)`. Scores are promoted to at least float32, because
    NeuralSort's n·s/τ logits and the log(· + ε) terms are meaningless in 16-bit precision, and zeroed on
    padded items.
    """

    def __init__(self, num_stages: int, group_size: int = schema.GROUP_SIZE) -> None:
        super().__init__()
        self.layout = CascadeLayout(num_stages, group_size)

    @property
    def stage_names(self) -> tuple[str, ...]:
        return self.layout.stage_names

    def forward(self, scores: Sequence[torch.Tensor], relevance: torch.Tensor, mask: torch.Tensor) -> LossOutput:
        """Compute the loss of one batch.

        Args:
            scores: one [B, N] score tensor per stage, in cascade order (see `stage_names`).
            relevance: [B, N] graded label (positives 10..29, negatives 8/7/6/5, 0 on padding).
            mask: [B, N] bool, real (not padded) items; padding may sit anywhere.

        Returns:
            LossOutput with `total` (scalar) and detached `parts`.
        """
        layout = self.layout
        if len(scores) != layout.num_stages:
            raise ValueError(f"expected {layout.num_stages} score tensors {layout.stage_names}, got {len(scores)}")
        shape = (relevance.shape[0], layout.num_items)
        for name, tensor in [*zip(layout.stage_names, scores), ("relevance", relevance), ("mask", mask)]:
            if tuple(tensor.shape) != shape:
                raise ValueError(f"{name} must be [B, N] = {list(shape)} for this layout, got {list(tensor.shape)}")
        dtype = functools.reduce(torch.promote_types, [s.dtype for s in scores], torch.float32)
        mask = mask.bool()
        position = torch.arange(layout.num_items, device=mask.device)
        cands = Candidates(
            relevance=relevance.to(dtype).masked_fill(~mask, 0),
            mask=mask,
            target=mask & (position < layout.group_size),
            position=position,
            num_real=mask.sum(dim=1),
        )
        # Padded scores may be anything, NaN included: zeroing them keeps both the forward and the
        # gradient (exactly 0 on padded entries) of every loss independent of them.
        return self.compute([torch.where(mask, s.to(dtype), 0) for s in scores], cands)

    def compute(self, scores: list[torch.Tensor], cands: Candidates) -> LossOutput:
        """The loss itself.

        Args:
            scores: one [B, N] tensor per stage, in cascade order: at least float32, 0 on padded items.
            cands: the label view of the batch.

        Returns:
            LossOutput built with `output`.
        """
        raise NotImplementedError

    @classmethod
    def option_names(cls) -> list[str]:
        """Keyword options `build_loss` accepts for this loss."""
        params = inspect.signature(cls.__init__).parameters
        return [name for name in params if name not in ("self", "num_stages")]


def output(total: torch.Tensor, parts: dict[str, torch.Tensor]) -> LossOutput:
    """LossOutput with detached parts (kept as tensors: logging them needs no host sync here)."""
    return LossOutput(total=total, parts={name: value.detach() for name, value in parts.items()})


def request_mean(values: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
    """Mean of each request's selected entries.

    Args:
        values: [B, ...] per-item or per-pair values.
        where: bool, broadcastable to `values`: the entries that count.

    Returns:
        [B] means; 0 for a request with no selected entry.
    """
    where = where.expand_as(values)
    dims = tuple(range(1, values.dim()))
    # torch.where, not a product: a non-finite value at a padded entry must not leak into the sum.
    total = torch.where(where, values, 0).sum(dims)
    return total / where.sum(dims).clamp(min=1)


def batch_mean(per_request: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Mean over the valid requests (dim 0); 0 where none is valid.

    Args:
        per_request: [B] or [B, ...] per-request values.
        valid: bool of the same shape.

    Returns:
        The mean over dim 0 (a scalar for [B] input).
    """
    return torch.where(valid, per_request, 0).sum(0) / valid.sum(0).clamp(min=1)


def pairwise_logistic(scores: torch.Tensor) -> torch.Tensor:
    """RankNet loss of every ordered pair: entry (i, j) = −log σ(s_i − s_j), i.e. "i should beat j".

    Args:
        scores: [B, N].

    Returns:
        [B, N, N].
    """
    return F.softplus(scores.unsqueeze(1) - scores.unsqueeze(2))  # [B, i, j] = softplus(s_j − s_i)


def real_pairs(mask: torch.Tensor) -> torch.Tensor:
    """[B, N, N] bool: both items of pair (i, j) are real."""
    return mask.unsqueeze(2) & mask.unsqueeze(1)


def uncertainty_term(
    loss: torch.Tensor, weight: torch.Tensor, log: Callable[[torch.Tensor], torch.Tensor] = torch.log
) -> torch.Tensor:
    """Uncertainty weighting of one task: loss / (2 w²) + log w.

    log |w| instead of log w: identical wherever the research code is defined (w > 0), and an optimiser
    step that crosses zero cannot turn the loss into NaN.
    """
    return loss / (2 * weight.square()) + log(weight.abs())
