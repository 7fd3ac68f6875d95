"""Row-sparse Adam for TorchRec's model-parallel tables on CPU, with fbgemm's CUDA update.

fbgemm trains sharded tables with Adam fused in the backward, but only on CUDA: its CPU module refuses
Adam and partial row-wise Adam. `RowSparseAdamEmbeddingBags` is fbgemm's table-batched module on CPU
(same weights, same forward kernel, same optimizer state buffers, so TorchRec's fused optimizer exposes
`momentum1` / `momentum2` as ShardedTensors and checkpoints them like any fused state) whose backward
applies the CUDA kernel's update to the batch's rows only:

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
from collections.abc import Iterator

import torch
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
        # Per feature: where its table's rows start in the flat weights, which must be where its m
        # starts too: the backward addresses both with one index.
        if not torch.equal(self.weights_offsets, self.momentum1_offsets):
            raise ValueError("weights and momentum1 are laid out differently")

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
        """Adam on the rows `indices` touched, from the pooled gradient grad_output [B, total_D]."""
        features = self.D_offsets.numel() - 1
        lengths = offsets[1:] - offsets[:-1]  # [F·B], feature-major bags
        batch = lengths.numel() // features
        bag = torch.repeat_interleave(torch.arange(lengths.numel()), lengths, output_size=indices.numel())
        feature = bag // batch
        scale = per_sample_weights.float() if per_sample_weights is not None else None
        if self.pooling_mode == PoolingMode.MEAN:
            inverse_length = 1.0 / lengths[bag].float()
            scale = inverse_length if scale is None else scale * inverse_length
        dims = self.D_offsets[1:] - self.D_offsets[:-1]  # [F]
        grad_flat = grad_output.float().contiguous().view(-1)
        for dim in dims.unique().tolist():  # one pass per embedding width, usually one
            chosen = dims[feature] == dim
            if chosen.all():
                chosen = None
            pick = (lambda t: t) if chosen is None else (lambda t: t[chosen])
            f, rows = pick(feature), pick(indices)
            columns = torch.arange(dim)
            # Every occurrence's gradient row, summed per distinct table row (keyed by its first weight).
            start = (pick(bag) % batch) * self.total_D + self.D_offsets[f]
            grads = grad_flat[start.unsqueeze(1) + columns]  # [n, D]
            if scale is not None:
                grads.mul_(pick(scale).unsqueeze(1))
            keys, inverse = torch.unique(self.weights_offsets[f] + rows * dim, return_inverse=True)
            g = grads.new_zeros(keys.numel(), dim).index_add_(0, inverse, grads)  # [U, D]
            positions = keys.unsqueeze(1) + columns  # [U, D] into weights and momentum1 alike
            if self.optimizer == EmbOptimType.PARTIAL_ROWWISE_ADAM:
                row_keys = keys.new_empty(keys.numel()).scatter_(0, inverse, self.momentum2_offsets[f] + rows)
            else:
                row_keys = None
            self._adam(g, positions, row_keys, step)

    def _adam(self, g: Tensor, positions: Tensor, row_keys: Tensor | None, step: int) -> None:
        args = self.optimizer_args
        b1, b2, eps, decay = args.beta1, args.beta2, args.eps, args.weight_decay
        lr = self.get_learning_rate()
        m = self.momentum1_host[positions].mul_(b1).add_(g, alpha=1 - b1)
        self.momentum1_host[positions] = m
        if row_keys is None:
            v = self.momentum2_host[positions].mul_(b2).addcmul_(g, g, value=1 - b2)
            self.momentum2_host[positions] = v
        else:
            v = self.momentum2_host[row_keys].mul_(b2).add_(g.square().mean(1), alpha=1 - b2)
            self.momentum2_host[row_keys] = v
            v = v.unsqueeze(1)
        denominator = (v / (1.0 - b2 ** step)).sqrt_().add_(eps)
        w = self.weights_host[positions]
        update = (m / (1.0 - b1 ** step)).div_(denominator)
        if decay:
            update.add_(w, alpha=decay)
        self.weights_host[positions] = w.sub_(update, alpha=lr)


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
