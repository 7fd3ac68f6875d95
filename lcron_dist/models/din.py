"""DIN ranking model: target attention of every candidate over the user's history.

The attention MLP sees [history item ‖ target item]. Its first layer is linear, so
W·[h ‖ t] + b = W_h·h + (W_t·t + b): the history part is computed once per request ([B, L, A]) and the
target part once per candidate ([B, N, A]); they meet only inside ReLU(h + t), which torch.compile can
fuse with the second layer so the [B, N, L, A] tensor is never stored (AttentionLogits, whose backward
needs two passes over it instead of autograd's three). The head's first layer is split the same way:
its user part is computed once per request ([B, H]), not once per candidate.
"""

from __future__ import annotations

import torch
from torch import nn

from lcron_dist.models.embeddings import StageInputs
from lcron_dist.models.layers import build_mlp, linear


MASKED_LOGIT = -1e9
"""The logit of a padded history position: finite, so an all-padding history gives no NaN (its weights are
then zeroed by the mask), and exp(MASKED_LOGIT − max) is exactly 0 beside any valid position."""


def attention_logits(
    history_part: torch.Tensor, target_part: torch.Tensor, out_weight: torch.Tensor, out_bias: torch.Tensor,
    history_mask: torch.Tensor,
) -> torch.Tensor:
    """Attention MLP output for every (candidate, history position) pair, MASKED_LOGIT at padded positions.

    With masked_grad_sums, the only place the [B, N, L, A] hidden tensor exists: the functions worth
    compiling (fused, forward + backward at B=1024, N=40, L=50, A=80 take ~0.11 s on one CPU thread
    instead of over 1 s eager; compiling the softmax with them made the backward 4x slower).

    Args:
        history_part: [B, L, A] first attention layer applied to the history items (no bias).
        target_part: [B, N, A] first attention layer applied to the candidates (with bias).
        out_weight: [A] second attention layer; out_bias: [] its bias.
        history_mask: [B, L] bool, valid positions (the fill is fused into the compiled product: no pass of its own).

    Returns:
        [B, N, L] logits.
    """
    hidden = torch.relu(history_part.unsqueeze(1) + target_part.unsqueeze(2))  # [B, N, L, A]
    return (hidden @ out_weight + out_bias).masked_fill(~history_mask.unsqueeze(1), MASKED_LOGIT)


def masked_grad_sums(
    grad: torch.Tensor, history_part: torch.Tensor, target_part: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The logits' gradient through the ReLU, summed over candidates and over history positions.

    Args:
        grad: [B, N, L] gradient of the logits; history_part, target_part: as for attention_logits.

    Returns:
        (P [B, L, A], Q [B, N, A]): P[b,l,a] = Σ_n grad[b,n,l]·1[h[b,l,a] + t[b,n,a] > 0], Q the
        same summed over l.
    """
    masked = grad.unsqueeze(-1) * (history_part.unsqueeze(1) + target_part.unsqueeze(2) > 0)  # [B, N, L, A]
    return masked.sum(1), masked.sum(2)


class AttentionLogits(torch.autograd.Function):
    """attention_logits with its backward from two sums over the hidden tensor instead of three.

    With P, Q from masked_grad_sums and w the second layer: ∂h = P·w, ∂t = Q·w, and since
    ReLU(h + t) = (h + t)·1[h + t > 0], ∂w = Σ_{b,n,l} grad·ReLU(h + t) = Σ_{b,l} h·P + Σ_{b,n} t·Q:
    the third pass over [B, N, L, A] that autograd makes for ∂w becomes two small products.
    `logits` and `sums` are attention_logits and masked_grad_sums, compiled or not. The gradient of a
    padded position's logit is zero without a fill (attention_pool's softmax gives it weight 0, or, for
    a request without history, the mask zeroes every weight's gradient), so the backward masks nothing.
    """

    @staticmethod
    def forward(ctx, history_part, target_part, out_weight, out_bias, history_mask, logits, sums):
        ctx.sums = sums
        ctx.save_for_backward(history_part, target_part, out_weight)
        # Detached, the inputs look as they do in evaluation (no requires_grad), so one compiled graph serves
        # training and evaluation: torch.compile guards on requires_grad and compiled again for evaluation.
        return logits(*(t.detach() for t in (history_part, target_part, out_weight, out_bias)), history_mask)

    @staticmethod
    def backward(ctx, grad):
        history_part, target_part, out_weight = ctx.saved_tensors
        p, q = ctx.sums(grad, history_part, target_part)
        weight_grad = (history_part * p).sum((0, 1)) + (target_part * q).sum((0, 1))
        return p * out_weight, q * out_weight, weight_grad, grad.sum(), None, None, None


def attention_pool(logits: torch.Tensor, history: torch.Tensor, history_mask: torch.Tensor) -> torch.Tensor:
    """Softmax over the valid history positions, then the weighted sum of the history.

    Args:
        logits: [B, N, L] from attention_logits (MASKED_LOGIT at padded positions); history: [B, L, E];
            history_mask: [B, L] bool, valid positions.

    Returns:
        [B, N, E] interest vector per candidate; zeros for a request without history.
    """
    weights = torch.softmax(logits, dim=-1) * history_mask.unsqueeze(1)  # an all-padding row: uniform, then zeroed
    return weights @ history  # [B, N, E]


def batch_dynamic(compiled):
    """`compiled` with only the batch dimension of its [B, ...] arguments (the history mask's too) symbolic.

    The candidate, history and hidden sizes stay constants of the generated code, which vectorises
    better (the compiled forward at B=1024 took 20 ms instead of 40 with every size symbolic, two
    CPU threads); a day's last, smaller batch reuses the code instead of recompiling.
    """

    def call(*args):
        for arg in args:
            if arg.dim() >= 2:
                torch._dynamo.maybe_mark_dynamic(arg, 0)
        return compiled(*args)

    return call


class DIN(nn.Module):
    """Target attention over the history, then an MLP head on [user ‖ interest ‖ item].

    Args:
        user_dim, item_dim: widths of the embedded user and candidate inputs.
        history_dim: width of one embedded history position (also the candidate part it attends with).
        attention_hidden: hidden width of the attention MLP.
        hidden: head sizes (a 1-unit output layer follows).
        compile: run attention_logits and masked_grad_sums under torch.compile.
    """

    def __init__(self, user_dim: int, history_dim: int, item_dim: int, attention_hidden: int, hidden: list[int],
                 compile: bool = False) -> None:
        super().__init__()
        if not hidden:
            raise ValueError("DIN's head needs at least one hidden layer (its first layer is split by input)")
        self.user_dim, self.history_dim = user_dim, history_dim
        self.attention_in = nn.Linear(2 * history_dim, attention_hidden)  # on [history ‖ target]
        self.attention_out = nn.Linear(attention_hidden, 1)
        self.head = build_mlp(user_dim + history_dim + item_dim, hidden, out_dim=1)
        functions = (attention_logits, masked_grad_sums)
        self.attention_functions = tuple(batch_dynamic(torch.compile(f)) for f in functions) if compile else functions

    def split_attention_input(self, x: StageInputs) -> tuple[torch.Tensor, torch.Tensor]:
        """The first attention layer, split into its history part [B, L, A] and target part [B, N, A]."""
        w_history, w_target = self.attention_in.weight.split(self.history_dim, dim=1)
        target = x.item[..., : self.history_dim]  # candidate fields of the same kinds as the history
        return linear(x.history, w_history), linear(target, w_target, self.attention_in.bias)

    def forward(self, x: StageInputs) -> torch.Tensor:
        history_part, target_part = self.split_attention_input(x)
        logits = AttentionLogits.apply(history_part, target_part, self.attention_out.weight.view(-1),
                                       self.attention_out.bias.view(()), x.history_mask, *self.attention_functions)
        interest = attention_pool(logits, x.history, x.history_mask)
        # head[1], the ReLU, applied here to the fresh [B, N, H] tensor: the MLP runs on a [B·N, H] view
        # of its input, and a ReLU in place on a view costs two whole-gradient copies in the backward.
        hidden = self.head_input_layer(x.user, interest, x.item).relu_()
        return self.head[2:](hidden).squeeze(-1)  # [B, N]

    def head_input_layer(self, user: torch.Tensor, interest: torch.Tensor, item: torch.Tensor) -> torch.Tensor:
        """The head's first linear layer on [user ‖ interest ‖ item], its user part once per request.

        Returns:
            [B, N, H] pre-activations, equal to head[0](cat([user expanded to N, interest, item])).
        """
        first = self.head[0]
        w_user, w_rest = first.weight.split([self.user_dim, first.in_features - self.user_dim], dim=1)
        per_request = torch.addmm(first.bias, user, w_user.T)  # [B, H]
        # Not added in place: the product is a view of oneDNN's [B·N, H] output (an in-place op on a view
        # costs autograd two whole-gradient copies in the backward).
        return linear(torch.cat([interest, item], dim=-1), w_rest) + per_request.unsqueeze(1)
