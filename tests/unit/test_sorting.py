"""Differentiable sorting: exact formulas, hard limits, per-item masking, gradients, label permutation."""

from __future__ import annotations

import math

import pytest
import torch

from lcron_dist.losses.sorting import SORT_OPS, get_sort_op, label_permutation, neural_sort, soft_sort

OPS = sorted(SORT_OPS)


def _reference(op: str, scores: list[float], tau: float) -> list[list[float]]:
    """METHOD.md section 2, one request of real items only, with explicit loops."""
    n = len(scores)
    if op == "neuralsort":
        spread = [sum(abs(si - sl) for sl in scores) for si in scores]
        logits = [[((n + 1 - 2 * k) * scores[i] - spread[i]) / tau for i in range(n)] for k in range(1, n + 1)]
    else:
        ordered = sorted(scores, reverse=True)
        logits = [[-abs(ordered[k] - scores[i]) / tau for i in range(n)] for k in range(n)]
    rows = []
    for row in logits:
        top = max(row)
        exps = [math.exp(v - top) for v in row]
        rows.append([e / sum(exps) for e in exps])
    return rows


def _case(batch: int = 3, n: int = 7, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Distinct float64 scores and a mask with padding in arbitrary places (one request unpadded)."""
    gen = torch.Generator().manual_seed(seed)
    scores = torch.randn(batch, n, generator=gen, dtype=torch.float64) * 3
    mask = torch.rand(batch, n, generator=gen) > 0.35
    mask[0] = True
    mask[:, 1] = True
    return scores, mask


@pytest.mark.parametrize("op", OPS)
def test_matches_reference_loop_with_padding(op: str) -> None:
    scores, mask = _case()
    tau = 0.7
    perm = SORT_OPS[op](scores, tau, mask)
    for b in range(scores.shape[0]):
        real = [j for j in range(scores.shape[1]) if mask[b, j]]
        ref = _reference(op, [scores[b, j].item() for j in real], tau)
        expected = torch.zeros_like(perm[b])
        for k in range(len(real)):
            for idx, j in enumerate(real):
                expected[k, j] = ref[k][idx]
        torch.testing.assert_close(perm[b], expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("op", OPS)
def test_small_tau_gives_the_hard_permutation(op: str) -> None:
    scores, mask = _case(seed=1)
    perm = SORT_OPS[op](scores, 1e-3, mask)
    for b in range(scores.shape[0]):
        real = [j for j in range(scores.shape[1]) if mask[b, j]]
        order = sorted(real, key=lambda j: -scores[b, j].item())
        hard = torch.zeros_like(perm[b])
        hard[torch.arange(len(order)), torch.tensor(order)] = 1
        torch.testing.assert_close(perm[b], hard, rtol=0, atol=1e-6)


@pytest.mark.parametrize("op", OPS)
def test_real_rows_sum_to_one_and_padding_gets_nothing(op: str) -> None:
    scores, mask = _case(seed=2)
    perm = SORT_OPS[op](scores, 2.0, mask)
    n_real = mask.sum(dim=1)
    for b in range(scores.shape[0]):
        rows = perm[b].sum(dim=1)
        torch.testing.assert_close(rows[: n_real[b]], torch.ones(int(n_real[b]), dtype=rows.dtype))
        assert torch.all(rows[n_real[b] :] == 0)
        assert torch.all(perm[b][:, ~mask[b]] == 0)
    # Columns need not sum to 1 (section 2), and they don't here.
    assert not torch.allclose(perm[0].sum(dim=0), torch.ones(scores.shape[1], dtype=perm.dtype))


@pytest.mark.parametrize("op", OPS)
def test_padding_leaves_the_real_block_as_if_deleted(op: str) -> None:
    scores, mask = _case(seed=3)
    garbage = scores.masked_fill(~mask, float("nan"))  # padded scores must not matter, not even NaN
    perm = SORT_OPS[op](garbage, 1.5, mask)
    assert torch.isfinite(perm).all()
    for b in range(scores.shape[0]):
        real = mask[b].nonzero().squeeze(1)
        alone = SORT_OPS[op](scores[b, real].unsqueeze(0), 1.5)[0]  # the request without its padded items
        torch.testing.assert_close(perm[b][: len(real)][:, real], alone, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("op", OPS)
def test_request_without_real_items_is_all_zero(op: str) -> None:
    scores = torch.randn(2, 5, dtype=torch.float64)
    mask = torch.tensor([[False] * 5, [True] * 5])
    perm = SORT_OPS[op](scores, 1.0, mask)
    assert torch.all(perm[0] == 0)
    torch.testing.assert_close(perm[1].sum(dim=1), torch.ones(5, dtype=perm.dtype))


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("padded", [False, True], ids=["full", "padded"])
def test_gradcheck(op: str, padded: bool) -> None:
    scores, mask = _case(batch=2, n=5, seed=4)
    scores = scores.clone().requires_grad_()
    mask = mask if padded else None
    assert torch.autograd.gradcheck(lambda s: SORT_OPS[op](s, 0.8, mask), (scores,))


@pytest.mark.parametrize("op", OPS)
def test_whole_requests_skip_the_masking_bit_for_bit(op: str, op_log) -> None:
    """Without padding the operators do less work and give the bits of the masked computation: the same
    requests computed in a batch that also holds a padded request (which takes the masked path)."""
    scores, mask = _case(batch=4, n=9, seed=5)
    mask[:3] = True  # requests 0-2 whole, request 3 padded
    sort = get_sort_op(op)
    results = []
    for rows in (slice(0, 3), slice(0, 4)):
        leaf = scores[rows].float().clone().requires_grad_(True)
        with op_log() as log:
            perm = sort(leaf, 0.7, mask[rows])
            (perm * torch.linspace(-1, 1, 9)).sum().backward()
        results.append((perm[:3].detach(), leaf.grad[:3], log.ops))
    (whole, whole_grad, whole_ops), (masked, masked_grad, masked_ops) = results
    assert torch.equal(whole, masked) and torch.equal(whole_grad, masked_grad)
    assert "aten::masked_fill.Scalar" in masked_ops and "aten::masked_fill.Scalar" not in whole_ops
    assert len(whole_ops) < len(masked_ops) - 3


def test_label_permutation_is_neuralsort_at_tiny_tau_with_ties_and_padding() -> None:
    rel = torch.tensor(
        [[29.0, 12.0, 7.0, 7.0, 7.0, 6.0, 6.0, 5.0], [25.0, 0.0, 8.0, 8.0, 0.0, 5.0, 5.0, 5.0]], dtype=torch.float64
    )
    mask = torch.tensor([[True] * 8, [True, False, True, True, False, True, True, True]])
    exact = label_permutation(rel, mask, torch.float64)
    torch.testing.assert_close(exact, neural_sort(rel, 1e-4, mask), rtol=0, atol=1e-12)
    # Tie blocks are uniform: the three 7s share rows 2..4 of request 0 with 1/3 each.
    torch.testing.assert_close(exact[0, 2:5, 2:5], torch.full((3, 3), 1 / 3, dtype=torch.float64))
    assert torch.all(exact[1, :, ~mask[1]] == 0) and torch.all(exact[1, 6:] == 0)


def test_label_permutation_by_reference_loop() -> None:
    gen = torch.Generator().manual_seed(5)
    rel = torch.randint(0, 4, (3, 9), generator=gen).double()  # many ties
    mask = torch.rand(3, 9, generator=gen) > 0.3
    exact = label_permutation(rel, mask, torch.float64)
    for b in range(3):
        real = [j for j in range(9) if mask[b, j]]
        ordered = sorted((rel[b, j].item() for j in real), reverse=True)
        for k in range(9):
            for j in range(9):
                if k < len(real) and j in real and rel[b, j].item() == ordered[k]:
                    tied = sum(rel[b, i].item() == ordered[k] for i in real)
                    assert exact[b, k, j].item() == pytest.approx(1 / tied)
                else:
                    assert exact[b, k, j].item() == 0


def test_label_permutation_without_ties_is_the_argsort_one_hot() -> None:
    rel = torch.tensor([[3.0, 9.0, 1.0, 7.0]])
    exact = label_permutation(rel)
    assert exact.dtype == torch.float32
    assert torch.equal(exact[0].argmax(dim=1), rel[0].argsort(descending=True))
    assert torch.equal(exact.sum(dim=1), torch.ones(1, 4))


def test_unknown_sort_is_rejected() -> None:
    assert get_sort_op("softsort") is soft_sort
    with pytest.raises(ValueError, match="neuralsort"):
        get_sort_op("quicksort")
