"""Row-sparse Adam for TorchRec's model-parallel tables on CPU, with fbgemm's CUDA update.

fbgemm trains sharded tables with Adam fused in the backward, but only on CUDA: its CPU module refuses
Adam and partial row-wise Adam. `RowSparseAdamEmbeddingBags` is fbgemm's table-batched module on CPU
(same weights, same forward kernel, same optimizer state buffers, so TorchRec's fused optimizer exposes
m and v as `momentum1` / `exp_avg_sq` ShardedTensors and checkpoints them like any fused state) whose
backward applies the CUDA kernel's update to the batch's rows only:

    per touched row (the gradients of its occurrences summed first, scaled by per-sample weights and
    by 1/length under mean pooling), with t the module's step count (fbgemm's `iter`):
    m <- b1·m + (1-b1)·g
    v <- b2·v + (1-b2)·g²            (partial row-wise: one v per row, from the row's mean of g²)
    w <- w - lr·( m/(1-b1^t) / (sqrt(v/(1-b2^t)) + eps) + weight_decay·w )

Rows not in the batch keep weight, m and v as they are. `row_sparse_adam_kernels` makes TorchRec build
this module for its fused CPU kernels; CUDA keeps fbgemm's own.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
import torchrec.distributed.batched_embedding_kernel as torchrec_kernels
from fbgemm_gpu.split_embedding_configs import EmbOptimType
from fbgemm_gpu.split_table_batched_embeddings_ops_common import PoolingMode
from fbgemm_gpu.split_table_batched_embeddings_ops_training import (
    SplitTableBatchedEmbeddingBagsCodegen,
    construct_split_state,
)
from torch import Tensor

ROW_SPARSE_ADAM = (EmbOptimType.ADAM, EmbOptimType.PARTIAL_ROWWISE_ADAM)


class RowSparseAdamEmbeddingBags(SplitTableBatchedEmbeddingBagsCodegen):
    """fbgemm's table-batched embedding bags on CPU, trained by (partial row-wise) Adam in the backward.

    Takes fbgemm's constructor arguments. fbgemm's CPU constructor accepts only the optimizers it has CPU
    kernels for, so the module is built for exact Adagrad (whose per-element `momentum1` is Adam's m)
    and gets Adam's `momentum2` (per element, or one per row) and persistent step counter after.
    """

    def __init__(self, **kwargs) -> None:
        optimizer = kwargs.pop("optimizer")
        if optimizer not in ROW_SPARSE_ADAM:
            raise ValueError(f"RowSparseAdamEmbeddingBags runs {', '.join(o.name for o in ROW_SPARSE_ADAM)}, "
                             f"not {optimizer}")
        super().__init__(optimizer=EmbOptimType.EXACT_ADAGRAD, **kwargs)
        if not self.use_cpu or self.pooling_mode == PoolingMode.NONE:
            raise ValueError("RowSparseAdamEmbeddingBags is the CPU kernel of pooled tables")
        if self.weights_host.dtype != torch.float32 or self.optimizer_args.gradient_clipping:
            raise ValueError("RowSparseAdamEmbeddingBags keeps fp32 weights and does not clip gradients")
        self.optimizer = optimizer
        rowwise = optimizer == EmbOptimType.PARTIAL_ROWWISE_ADAM
        self._apply_split(construct_split_state(self.embedding_specs, rowwise=rowwise, cacheable=False),
                          prefix="momentum2", dtype=torch.float32)
        self.register_buffer("iter", self.iter, persistent=True)  # fbgemm checkpoints Adam's step count
        # Per feature: where its table's rows start in the flat weights, which must be where its m (and
        # Adam's v) start too: the backward addresses them with one index.
        same = [self.momentum1_offsets] + ([] if rowwise else [self.momentum2_offsets])
        if not all(torch.equal(self.weights_offsets, offsets) for offsets in same):
            raise ValueError("weights and optimizer state are laid out differently")
        # Every table row and pooled feature starts at a multiple of the widths' gcd: the update reads and
        # writes the flat buffers as rows of that many elements.
        self._unit = math.gcd(*(self.D_offsets[1:] - self.D_offsets[:-1]).tolist())
        self._key_dtype = torch.int32 if self.weights_host.numel() // self._unit < 2**31 else torch.int64

    def forward(self, indices: Tensor, offsets: Tensor, per_sample_weights: Tensor | None = None,
                feature_requires_grad: Tensor | None = None,
                batch_size_per_feature_per_rank: list[list[int]] | None = None) -> Tensor:
        """Pooled embeddings [B, total_D] of every feature's bags, as fbgemm's forward returns them."""
        if batch_size_per_feature_per_rank is not None:
            raise NotImplementedError("RowSparseAdamEmbeddingBags takes one batch size for every feature")
        indices, offsets, per_sample_weights, _ = self.prepare_inputs(
            indices, offsets, per_sample_weights, None, force_cast_input_types=True)
        # fbgemm's step counting: every forward advances t; a step set by set_optimizer_step (a resume)
        # is taken up by the first forward.
        if self.iter_cpu.item() == 0:
            self.iter_cpu.fill_(self.iter.item())
        step = int(self.iter_cpu.add_(1).item())
        self.iter.add_(1)
        return _RowSparseAdamLookup.apply(self.placeholder_autograd_tensor, per_sample_weights, self, indices,
                                          offsets, feature_requires_grad, step)

    def _pooled(self, indices: Tensor, offsets: Tensor, per_sample_weights: Tensor | None) -> Tensor:
        return torch.ops.fbgemm.split_embedding_codegen_forward_cpu(
            self.weights_host, self.weights_offsets, self.D_offsets, self.total_D, self.hash_size_cumsum,
            indices, offsets, int(self.pooling_mode), per_sample_weights, self.output_dtype)

    @torch.no_grad()
    def apply_update(self, grad_output: Tensor, indices: Tensor, offsets: Tensor,
                     per_sample_weights: Tensor | None, step: int) -> None:
        """Adam on the rows `indices` touched, from the pooled gradient grad_output [B, total_D].

        Every occurrence is located by unit rows (`self._unit` elements) of the flat buffers: where its
        bag's gradient starts in grad_output, and where its table row starts in the weights and m.
        """
        unit, features = self._unit, self.D_offsets.numel() - 1
        lengths = offsets[1:] - offsets[:-1]  # [F·B], feature-major bags
        batch = lengths.numel() // features
        per_feature = offsets[torch.arange(features + 1) * batch].diff()  # [F] occurrences
        bag_source = ((torch.arange(batch) * (self.total_D // unit)).repeat(features)
                      + (self.D_offsets[:-1] // unit).repeat_interleave(batch))
        source = bag_source.repeat_interleave(lengths, output_size=indices.numel())
        dims = self.D_offsets[1:] - self.D_offsets[:-1]  # [F]
        first = (self.weights_offsets // unit).repeat_interleave(per_feature, output_size=indices.numel())
        scale = per_sample_weights.float() if per_sample_weights is not None else None
        if self.pooling_mode == PoolingMode.MEAN:
            inverse_length = (1.0 / lengths.clamp(min=1).float()).repeat_interleave(lengths, output_size=indices.numel())
            scale = inverse_length if scale is None else scale * inverse_length
        row_keys = None
        if self.optimizer == EmbOptimType.PARTIAL_ROWWISE_ADAM:  # v's position: one per table row
            row_keys = self.momentum2_offsets.repeat_interleave(per_feature, output_size=indices.numel()) + indices
        grad_units = grad_output.float().contiguous().view(-1, unit)
        widths = dims.unique().tolist()
        if len(widths) == 1:
            first += indices * (widths[0] // unit)
            self._update_rows(grad_units, widths[0], source, first, scale, row_keys, step)
            return
        feature = torch.arange(features).repeat_interleave(per_feature, output_size=indices.numel())
        first += indices * (dims // unit)[feature]
        for dim in widths:  # one pass per embedding width
            chosen = torch.nonzero(dims[feature] == dim).squeeze(1)
            self._update_rows(grad_units, dim, source[chosen], first[chosen],
                              None if scale is None else scale[chosen],
                              None if row_keys is None else row_keys[chosen], step)

    def _update_rows(self, grad_units: Tensor, dim: int, source: Tensor, first: Tensor, scale: Tensor | None,
                     row_keys: Tensor | None, step: int) -> None:
        """Adam on the rows of `dim`-wide tables, from each occurrence's gradient unit `source`, its row's
        first unit `first`, its scale (per-sample weight, 1/length) and its row's position in a row-wise v.

        Occurrences are sorted by row; each row's gradient is then the sum of its occurrences' pooled
        gradients, which embedding_bag computes reading them in place (a bag per distinct row).
        """
        k = dim // self._unit
        if k > 1:  # rows of `dim` are not rows of the unit view: copy them out
            grads = grad_units.index_select(0, self._spread(source, k)).view(-1, dim)
            source = torch.arange(source.numel())
        else:
            grads = grad_units
        first, order = torch.sort(first.to(self._key_dtype))  # int32 sorts in half the time of int64
        keys, counts = torch.unique_consecutive(first, return_counts=True)
        bags = counts.cumsum(0) - counts
        g = F.embedding_bag(source.index_select(0, order), grads, bags, mode="sum",
                            per_sample_weights=None if scale is None else scale.index_select(0, order))  # [U, D]
        self._adam(g, self._spread(keys.long(), k), None if row_keys is None else row_keys[order[bags]], step)

    @staticmethod
    def _spread(first: Tensor, k: int) -> Tensor:
        """Unit rows first, first + 1, ..., first + k - 1 of every entry, flattened."""
        return first if k == 1 else (first.unsqueeze(1) + torch.arange(k)).view(-1)

    def _adam(self, g: Tensor, units: Tensor, row_keys: Tensor | None, step: int) -> None:
        """fbgemm's Adam on the rows whose units of the flat buffers are `units`; g [U, D] their gradients."""
        args = self.optimizer_args
        b1, b2, eps, decay = args.beta1, args.beta2, args.eps, args.weight_decay
        lr = self.get_learning_rate()
        shape = g.shape

        def read(buffer: Tensor) -> Tensor:
            return buffer.view(-1, self._unit).index_select(0, units).view(shape)

        def write(buffer: Tensor, value: Tensor) -> None:
            buffer.view(-1, self._unit).index_copy_(0, units, value.view(-1, self._unit))

        m = read(self.momentum1_host).mul_(b1).add_(g, alpha=1 - b1)
        write(self.momentum1_host, m)
        if row_keys is None:
            v = read(self.momentum2_host).mul_(b2).addcmul_(g, g, value=1 - b2)
            write(self.momentum2_host, v)
        else:
            v = self.momentum2_host.index_select(0, row_keys).mul_(b2).add_(g.square().mean(1), alpha=1 - b2)
            self.momentum2_host.index_copy_(0, row_keys, v)
            v = v.unsqueeze(1)
        denominator = (v / (1.0 - b2 ** step)).sqrt_().add_(eps)
        w = read(self.weights_host)
        update = (m / (1.0 - b1 ** step)).div_(denominator)
        if decay:
            update.add_(w, alpha=decay)
        write(self.weights_host, w.sub_(update, alpha=lr))


class _RowSparseAdamLookup(torch.autograd.Function):
    """fbgemm's CPU forward; the backward updates the tables in place and returns no table gradient."""

    @staticmethod
    def forward(ctx, placeholder: Tensor, per_sample_weights: Tensor | None, module: RowSparseAdamEmbeddingBags,
                indices: Tensor, offsets: Tensor, feature_requires_grad: Tensor | None, step: int) -> Tensor:
        ctx.module, ctx.step, ctx.feature_requires_grad = module, step, feature_requires_grad
        ctx.save_for_backward(indices, offsets, per_sample_weights)
        return module._pooled(indices, offsets, per_sample_weights)

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        indices, offsets, per_sample_weights = ctx.saved_tensors
        module: RowSparseAdamEmbeddingBags = ctx.module
        grad_weights = None
        if ctx.needs_input_grad[1]:  # against the weights before this step's update
            features = module.D_offsets.numel() - 1
            requires = ctx.feature_requires_grad
            if requires is None:
                requires = torch.ones(features, dtype=torch.int32)
            grad_weights = torch.ops.fbgemm.split_embedding_codegen_grad_indice_weights_cpu(
                grad_output.float().contiguous(), module.weights_host, module.weights_offsets, module.D_offsets,
                indices, offsets, requires)
        module.apply_update(grad_output, indices, offsets, per_sample_weights, ctx.step)
        return None, grad_weights, None, None, None, None, None


@contextlib.contextmanager
def row_sparse_adam_kernels() -> Iterator[None]:
    """TorchRec builds RowSparseAdamEmbeddingBags for the fused kernels it creates inside the block.

    TorchRec's fused kernel (BatchedFusedEmbeddingBag) constructs fbgemm's module by this one name; the
    block is DistributedModelParallel's construction on CPU with an Adam-family table optimizer.
    """
    original = torchrec_kernels.SplitTableBatchedEmbeddingBagsCodegen
    torchrec_kernels.SplitTableBatchedEmbeddingBagsCodegen = RowSparseAdamEmbeddingBags
    try:
        yield
    finally:
        torchrec_kernels.SplitTableBatchedEmbeddingBagsCodegen = original
