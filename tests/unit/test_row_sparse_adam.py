"""The CPU row-sparse Adam kernel against a plain-torch reference of fbgemm's CUDA update."""

from __future__ import annotations

import pytest
import torch
from fbgemm_gpu.split_embedding_configs import EmbOptimType
from fbgemm_gpu.split_table_batched_embeddings_ops_common import EmbeddingLocation, PoolingMode
from fbgemm_gpu.split_table_batched_embeddings_ops_training import ComputeDevice

from lcron_dist.distributed.row_sparse_adam import RowSparseAdamEmbeddingBags

ROWS_DIMS = [(40, 8), (25, 4), (12, 8)]  # two widths: the kernel's per-width passes
FEATURE_TABLES = [0, 1, 0, 2]  # feature 2 shares table 0 with feature 0
LR, B1, B2, EPS = 0.05, 0.9, 0.999, 1e-8


def build(optimizer: EmbOptimType, pooling: PoolingMode, weight_decay: float) -> RowSparseAdamEmbeddingBags:
    specs = [(rows, dim, EmbeddingLocation.HOST, ComputeDevice.CPU) for rows, dim in ROWS_DIMS]
    module = RowSparseAdamEmbeddingBags(embedding_specs=specs, feature_table_map=FEATURE_TABLES, optimizer=optimizer,
                                        pooling_mode=pooling, learning_rate=LR, eps=EPS, beta1=B1, beta2=B2,
                                        weight_decay=weight_decay)
    generator = torch.Generator().manual_seed(0)
    for weight in module.split_embedding_weights():
        weight.copy_(torch.rand(weight.shape, generator=generator) - 0.5)
    return module


def random_batch(generator: torch.Generator, batch: int, weighted: bool):
    """Bags of 0-4 ids per feature, ids drawn from a few rows so they repeat within and across bags."""
    lengths = torch.randint(0, 5, (len(FEATURE_TABLES) * batch,), generator=generator)
    lengths[0] = 3  # a non-empty first bag
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
    values = []
    for f, table in enumerate(FEATURE_TABLES):
        n = int(lengths[f * batch:(f + 1) * batch].sum())
        values.append(torch.randint(0, min(6, ROWS_DIMS[table][0]), (n,), generator=generator))
    indices = torch.cat(values)
    weights = torch.rand(indices.numel(), generator=generator) + 0.5 if weighted else None
    return indices, offsets, weights


class Reference:
    """fbgemm's CUDA Adam written out per row with plain torch, tables as [rows, D] tensors."""

    def __init__(self, module: RowSparseAdamEmbeddingBags, rowwise: bool, weight_decay: float) -> None:
        self.w = [w.clone() for w in module.split_embedding_weights()]
        self.m = [torch.zeros_like(w) for w in self.w]
        self.v = [torch.zeros(w.shape[0], 1) if rowwise else torch.zeros_like(w) for w in self.w]
        self.rowwise, self.weight_decay, self.t = rowwise, weight_decay, 0

    def step(self, indices, offsets, weights, mean: bool, batch: int, coefficients: torch.Tensor) -> torch.Tensor:
        """Pooled output of the batch, then the update from the gradient of (output · coefficients).sum()."""
        self.t += 1
        dims = [ROWS_DIMS[t][1] for t in FEATURE_TABLES]
        out = torch.zeros(batch, sum(dims))
        grads = [torch.zeros_like(w) for w in self.w]
        touched = [set() for _ in self.w]
        column = 0
        for f, table in enumerate(FEATURE_TABLES):
            for b in range(batch):
                lo, hi = int(offsets[f * batch + b]), int(offsets[f * batch + b + 1])
                for i in range(lo, hi):
                    scale = (float(weights[i]) if weights is not None else 1.0) / ((hi - lo) if mean else 1)
                    row = int(indices[i])
                    out[b, column:column + dims[f]] += scale * self.w[table][row]
                    grads[table][row] += scale * coefficients[b, column:column + dims[f]]
                    touched[table].add(row)
            column += dims[f]
        for table, rows in enumerate(touched):
            for row in sorted(rows):
                g, w = grads[table][row], self.w[table][row]
                self.m[table][row] = B1 * self.m[table][row] + (1 - B1) * g
                squared = (g * g).mean(0, keepdim=True) if self.rowwise else g * g
                self.v[table][row] = B2 * self.v[table][row] + (1 - B2) * squared
                m_hat = self.m[table][row] / (1 - B1 ** self.t)
                v_hat = self.v[table][row] / (1 - B2 ** self.t)
                self.w[table][row] = w - LR * (m_hat / (v_hat.sqrt() + EPS) + self.weight_decay * w)
        return out


@pytest.mark.parametrize("optimizer", [EmbOptimType.ADAM, EmbOptimType.PARTIAL_ROWWISE_ADAM])
@pytest.mark.parametrize("pooling,weighted", [(PoolingMode.SUM, False), (PoolingMode.SUM, True),
                                              (PoolingMode.MEAN, False)])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_kernel_equals_the_reference_over_several_steps(optimizer, pooling, weighted, weight_decay) -> None:
    module = build(optimizer, pooling, weight_decay)
    rowwise = optimizer == EmbOptimType.PARTIAL_ROWWISE_ADAM
    reference = Reference(module, rowwise, weight_decay)
    generator = torch.Generator().manual_seed(1)
    batch = 5
    for _ in range(4):
        indices, offsets, weights = random_batch(generator, batch, weighted)
        coefficients = torch.randn(batch, int(module.total_D), generator=generator)
        out = module(indices, offsets, weights)
        expected = reference.step(indices, offsets, weights, pooling == PoolingMode.MEAN, batch, coefficients)
        torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)
        (out * coefficients).sum().backward()
        states = module.split_optimizer_states()
        for table, weight in enumerate(module.split_embedding_weights()):
            torch.testing.assert_close(weight, reference.w[table], rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(states[table][0], reference.m[table], rtol=1e-6, atol=1e-6)
            v = states[table][1]
            torch.testing.assert_close(v.view(reference.v[table].shape), reference.v[table], rtol=1e-6, atol=1e-9)
    assert int(module.iter) == 4
    assert states[0][1].dim() == (1 if rowwise else 2)


@pytest.mark.parametrize("optimizer", [EmbOptimType.ADAM, EmbOptimType.PARTIAL_ROWWISE_ADAM])
def test_rows_not_in_the_batch_keep_weight_and_state_bit_identical(optimizer) -> None:
    module = build(optimizer, PoolingMode.SUM, weight_decay=0.1)
    generator = torch.Generator().manual_seed(2)
    indices, offsets, _ = random_batch(generator, 5, weighted=False)
    module(indices, offsets).sum().backward()  # every state of the touched rows is now non-zero
    for state in module.split_optimizer_states():
        state[0].add_(0.01)
        state[1].add_(0.02)
    before = ([w.clone() for w in module.split_embedding_weights()],
              [[s.clone() for s in states] for states in module.split_optimizer_states()])
    indices, offsets, _ = random_batch(generator, 5, weighted=False)
    module(indices, offsets).pow(2).sum().backward()
    touched = [set() for _ in ROWS_DIMS]
    batch = 5
    for f, table in enumerate(FEATURE_TABLES):
        touched[table].update(indices[offsets[f * batch]:offsets[(f + 1) * batch]].tolist())
    for table, weight in enumerate(module.split_embedding_weights()):
        untouched = torch.tensor([r for r in range(ROWS_DIMS[table][0]) if r not in touched[table]])
        changed = torch.tensor(sorted(touched[table]))
        assert torch.equal(weight[untouched], before[0][table][untouched])
        for state, old in zip(module.split_optimizer_states()[table], before[1][table]):
            assert torch.equal(state[untouched], old[untouched])
            assert not torch.equal(state[changed], old[changed])
        assert not torch.equal(weight[changed], before[0][table][changed])


def test_per_sample_weights_get_their_gradient() -> None:
    module = build(EmbOptimType.ADAM, PoolingMode.SUM, weight_decay=0.0)
    tables = [w.clone() for w in module.split_embedding_weights()]
    generator = torch.Generator().manual_seed(3)
    indices, offsets, weights = random_batch(generator, 4, weighted=True)
    weights.requires_grad_(True)
    coefficients = torch.randn(4, int(module.total_D), generator=generator)
    (module(indices, offsets, weights) * coefficients).sum().backward()
    expected = torch.zeros_like(weights)
    dims = [ROWS_DIMS[t][1] for t in FEATURE_TABLES]
    columns = [sum(dims[:f]) for f in range(len(dims))]
    for f, table in enumerate(FEATURE_TABLES):
        for b in range(4):
            for i in range(int(offsets[f * 4 + b]), int(offsets[f * 4 + b + 1])):
                row = tables[table][int(indices[i])]  # the weights before the step's update
                expected[i] = (row * coefficients[b, columns[f]:columns[f] + dims[f]]).sum()
    torch.testing.assert_close(weights.grad, expected, rtol=1e-5, atol=1e-6)


def test_only_adam_and_only_cpu() -> None:
    specs = [(10, 8, EmbeddingLocation.HOST, ComputeDevice.CPU)]
    with pytest.raises(ValueError, match="not exact_sgd"):
        RowSparseAdamEmbeddingBags(embedding_specs=specs, optimizer=EmbOptimType.EXACT_SGD)
