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


def onednn_cpu(x: torch.Tensor) -> bool:
    """Whether linear layers on `x` run through oneDNN (OneDNNLinear): float32 on CPU, outside tracing.

    Traced code (torch.compile, the serving export) keeps aten's product, so exported programs hold aten
    and fbgemm ops only.
    """
    return (ONEDNN_LINEAR is not None and x.device.type == "cpu" and x.dtype == torch.float32
            and not torch.compiler.is_compiling())


def _onednn(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, relu: bool) -> torch.Tensor:
    # The weight made contiguous: oneDNN given a column slice of a weight took 57 s for a 0.07 s product.
    return ONEDNN_LINEAR(x, weight.contiguous(), bias, "relu" if relu else "none", [], "")


def _image(t: torch.Tensor) -> torch.Tensor:
    """A [M, C] matrix with rows C apart as the [1, C, 1, M] image it is in channels-last layout (a view)."""
    return t.t()[None, :, None, :]


def _weight_grad(grad: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Σ_m grad[m]ᵀ·x[m], [N, K], by oneDNN: the weight gradient of a 1x1 convolution over the M rows, whose
    input and output gradient are x's and grad's own memory read as channels-last images (nothing copied)."""
    n, k = grad.shape[1], x.shape[1]
    # Read for its shape and layout only; channels-last, or the convolution reorders both images (4-6x slower).
    weight = torch.empty((n, k, 1, 1), dtype=x.dtype, device=x.device, memory_format=torch.channels_last)
    _, grad_weight, _ = torch.ops.aten.convolution_backward(
        _image(grad), _image(x), weight, None, [1, 1], [0, 0], [1, 1], False, [0, 0], 1, [False, True, False])
    return grad_weight.view(n, k)


class OneDNNLinear(torch.autograd.Function):
    """x·Wᵀ (+ b) (then ReLU) for a [M, K] `x` by oneDNN's linear, which writes the product with its bias and
    ReLU applied, once; its backward gives the input's gradient by oneDNN's linear too and the weight's by
    oneDNN's convolution backward (_weight_grad).

    Why: this torch's aten products call MKL, which on an AMD CPU runs its AVX2 code where oneDNN runs
    AVX-512: on the 2-vCPU AMD EPYC development VM, float32 4096-cubes 175 vs 395 GFLOP/s, the towers'
    [40960 x 128] x [128 x 128] products 130 vs 246, their input gradients 105 vs 216. The weight's
    gradient is a product over the M = B·N rows, for which oneDNN's linear needs both operands transposed
    (89 vs MKL's 101 GFLOP/s); as a 1x1 convolution's weight gradient it needs none: recflow-2stage's
    weight gradients of one step took 24.1 ms against MKL's 34.4. A training step of recflow-2stage (batch
    1,024, 2 threads) took 0.83x the time with oneDNN's linear, then 0.95x with the convolution backward
    (medians of 8 alternating in-process rounds each). Same products: values agree with aten's to float32
    rounding.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, relu):
        out = _onednn(x, weight, bias, relu)
        ctx.relu = relu
        ctx.save_for_backward(x, weight, out if relu else None)
        return out

    @staticmethod
    def backward(ctx, grad):
        x, weight, out = ctx.saved_tensors
        grad = torch.ops.aten.threshold_backward(grad, out, 0) if ctx.relu else grad.contiguous()
        grad_x = _onednn(grad, weight.t(), None, False) if ctx.needs_input_grad[0] else None
        grad_weight = _weight_grad(grad, x) if ctx.needs_input_grad[1] else None
        grad_bias = grad.sum(0) if ctx.needs_input_grad[2] else None
        return grad_x, grad_weight, grad_bias, None


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, relu: bool = False) -> torch.Tensor:
    """x·Wᵀ (+ b) (then ReLU) over the last dimension of `x`: by OneDNNLinear on CPU (onednn_cpu), else aten.

    oneDNN also writes the product with its bias and ReLU applied, once, where aten's addmm first fills the
    output with the broadcast bias, accumulates the product into it and the ReLU passes over it again.
    """
    if onednn_cpu(x):
        return OneDNNLinear.apply(x.reshape(-1, x.shape[-1]), weight, bias, relu).view(*x.shape[:-1], -1)
    out = x @ weight.T
    if bias is not None:
        out = out + bias
    return out.relu_() if relu else out


class MLP(nn.Sequential):
    """An nn.Sequential of Linear and in-place ReLU layers over the last dimension of its input.

    On CPU (onednn_cpu) each Linear, and the ReLU after it, is one `linear`. Elsewhere, inputs with more
    than two dimensions ([B, N, C]) run through the layers as one [B·N, C] matrix, so every Linear returns
    a fresh matrix rather than a view of one: a ReLU working in place on a view makes autograd copy the
    whole gradient of the view's base in the backward (CopySlices, AsStrided), more time than the in-place
    ReLU saves (a training step of recflow-2stage on CPU took 0.89x-0.96x the time run this way).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if onednn_cpu(x):
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
