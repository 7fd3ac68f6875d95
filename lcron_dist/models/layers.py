"""Building blocks shared by the towers."""

from __future__ import annotations

import torch
from torch import nn


def _onednn_linear():
    """oneDNN's linear with a fused epilogue (the op Inductor's CPU code calls), or None where this build lacks it."""
    if not torch.backends.mkldnn.is_available():
        return None
    try:
        return torch.ops.mkldnn._linear_pointwise.default
    except (AttributeError, RuntimeError):
        return None


ONEDNN_LINEAR = _onednn_linear()


def onednn_inference(x: torch.Tensor) -> bool:
    """Whether linear layers on `x` run through oneDNN: float32 on CPU, without autograd, outside tracing.

    Inference only: the op has no backward. Traced code (torch.compile, the serving export) keeps aten's
    product, so exported programs hold aten and fbgemm ops only.
    """
    return (ONEDNN_LINEAR is not None and x.device.type == "cpu" and x.dtype == torch.float32
            and not torch.is_grad_enabled() and not torch.compiler.is_compiling())


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, relu: bool = False) -> torch.Tensor:
    """x·Wᵀ (+ b) (then ReLU) over the last dimension of `x`.

    In CPU inference (onednn_inference) oneDNN writes the product with its bias and ReLU applied, once,
    where aten's addmm first fills the output with the broadcast bias, accumulates the product into it and
    the ReLU passes over it again: an evaluation batch of recflow-2stage (4,096 requests, the towers'
    [163,840 x 104..128] products) took 478 -> 422 ms (medians of 8 alternating rounds, 1.08x by the median
    pair; 2 CPU threads). Same products, so the scores agree to float32 rounding (3e-8 on those batches).
    The weight is made contiguous first: oneDNN given a column slice of a weight took 57 s for a product
    that takes 0.07 s.
    """
    if onednn_inference(x):
        flat = ONEDNN_LINEAR(x.reshape(-1, x.shape[-1]), weight.contiguous(), bias, "relu" if relu else "none", [], "")
        return flat.view(*x.shape[:-1], -1)
    out = x @ weight.T
    if bias is not None:
        out = out + bias
    return out.relu_() if relu else out


class MLP(nn.Sequential):
    """An nn.Sequential of Linear and in-place ReLU layers over the last dimension of its input.

    Inputs with more than two dimensions ([B, N, C]) run through the layers as one [B·N, C] matrix, so
    every Linear returns a fresh matrix rather than a view of one: a ReLU working in place on a view
    makes autograd copy the whole gradient of the view's base in the backward (CopySlices, AsStrided),
    more time than the in-place ReLU saves. With the towers' MLPs run this way, a training step of
    recflow-2stage (batch 1,024, CPU) took 0.89x-0.96x the time (two same-process A/B runs, medians of
    eight alternating rounds). In CPU inference each Linear (and the ReLU after it) is one oneDNN `linear`.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if onednn_inference(x):
            layers = list(self)
            for i, layer in enumerate(layers):
                if isinstance(layer, nn.Linear):
                    relu = i + 1 < len(layers) and isinstance(layers[i + 1], nn.ReLU)
                    x = linear(x, layer.weight, layer.bias, relu)
            return x
        if x.dim() <= 2:
            return super().forward(x)
        return super().forward(x.reshape(-1, x.shape[-1])).view(*x.shape[:-1], -1)


def build_mlp(in_dim: int, sizes: list[int], out_dim: int | None = None) -> MLP:
    """Linear + ReLU for each hidden size, then an optional linear output layer (no activation).

    Without `out_dim` the last hidden layer is the output and carries no activation, so a tower's
    embedding (DSSM) is not clipped at zero. The ReLUs work in place on their Linear's fresh output
    (the Linear's backward does not need it): an MLP of [B·N, 168] -> 128 -> 64 -> 32 -> 1 took 0.92x
    the time forward + backward at B·N = 40,960 and 0.96x forward only at 163,840, with the same values
    (CPU, allocator as the trainer sets it).
    """
    layers: list[nn.Module] = []
    dims = [in_dim, *sizes]
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
        layers.append(nn.Linear(a, b))
        if out_dim is not None or i < len(sizes) - 1:
            layers.append(nn.ReLU(inplace=True))
    if out_dim is not None:
        layers.append(nn.Linear(dims[-1], out_dim))
    return MLP(*layers)
