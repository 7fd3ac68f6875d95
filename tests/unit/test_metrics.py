"""Cascade metrics against brute force written here with explicit loops over requests and items.

The references work on plain Python values, request by request, on the real items only, and follow
METHOD.md section 7: joint recall through the serving quotas, per-stage Recall@10@m on all candidates and
NDCG@10 (linear gain = relevance label, log2 discount). Scores are distinct within a request, so ties (and
thus the random tie-break) cannot change the brute-force answer; ties are tested on their own.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from lcron_dist.data import schema
from lcron_dist.distributed.process_group import RendezvousStore
from ranks import run_ranks  # tests/ is on sys.path (conftest.py's folder)
from lcron_dist.metrics import CascadeMetrics, joint_recall, ndcg_at_k, stage_recall, top_m_mask

HUGE = 1.0e6  # score and label of padded items: selecting or counting one would show at once


# ------------------------------------------------------------------------------------------------
# Cases and brute-force references
# ------------------------------------------------------------------------------------------------


@dataclass
class Case:
    scores: list[torch.Tensor]  # T x [B, N] float32, distinct per request
    relevance: torch.Tensor  # [B, N] int64
    mask: torch.Tensor  # [B, N] bool
    target: torch.Tensor  # [B, N] bool (may include padded items: they must not count)

    @property
    def batch(self) -> int:
        return self.mask.shape[0]

    def rows(self, b: int) -> tuple[list[int], list[list[float]], list[float], set[int]]:
        """Real positions, each stage's scores, the labels and the real targets of request b."""
        real = [j for j in range(self.mask.shape[1]) if self.mask[b, j]]
        scores = [[s[b, j].item() for j in range(s.shape[1])] for s in self.scores]
        labels = [self.relevance[b, j].item() for j in range(self.mask.shape[1])]
        targets = {j for j in real if self.target[b, j]}
        return real, scores, labels, targets

    def select(self, rows: slice) -> Case:
        return Case([s[rows] for s in self.scores], self.relevance[rows], self.mask[rows], self.target[rows])


def distinct_scores(batch: int, n: int, g: torch.Generator) -> torch.Tensor:
    """[B, N] float32 scores, distinct within each request (a permutation plus a small jitter)."""
    ranks = torch.stack([torch.randperm(n, generator=g) for _ in range(batch)]).float()
    return ranks + 0.5 * torch.rand(batch, n, generator=g)


def make_case(num_stages: int, batch: int, n: int, seed: int, *, graded: bool = False) -> Case:
    """Random scores per stage, padding with huge scores and labels, ground truth = first 10 items.

    graded=False: distinct labels (a permutation of 0..N-1), padding anywhere.
    graded=True: RecFlow-like labels (positives 30 - index, negatives 8..5 with ties), the ground-truth
    group always real so its 10 items are the unambiguous top-10 by label.
    """
    g = torch.Generator().manual_seed(seed)
    scores = [distinct_scores(batch, n, g) for _ in range(num_stages)]
    mask = torch.rand(batch, n, generator=g) > 0.15
    if graded:
        k = schema.GROUP_SIZE
        relevance = torch.zeros(batch, n, dtype=torch.int64)
        for b in range(batch):
            index = torch.randperm(schema.MAX_POSITIVE_INDEX, generator=g)[:k] + 1
            relevance[b, :k] = schema.MAX_LABEL - index
        negatives = list(schema.NEGATIVE_LABEL.values())[-(n // k - 1):]
        for i, label in enumerate(negatives):
            relevance[:, k * (i + 1): k * (i + 2)] = label
        mask[:, :k] = True
    else:
        relevance = torch.stack([torch.randperm(n, generator=g) for _ in range(batch)])
    mask[0, :] = True  # one request with no padding at all
    target = torch.zeros(batch, n, dtype=torch.bool)
    target[:, : schema.TOP_K] = True
    for s in scores:
        s.masked_fill_(~mask, HUGE)
    relevance = relevance.masked_fill(~mask, int(HUGE))
    return Case(scores, relevance, mask, target)


def ref_top(items: list[int], key: list[float], m: int) -> list[int]:
    """The m items with the highest key (keys are distinct, so no tie-break is needed)."""
    return sorted(items, key=lambda j: -key[j])[:m]


def ref_joint_recall(case: Case, quotas: list[int]) -> list[float]:
    out = []
    for b in range(case.batch):
        real, scores, _, targets = case.rows(b)
        kept = list(real)
        for stage_scores, quota in zip(scores, quotas):
            kept = ref_top(kept, stage_scores, quota)
        out.append(len(set(kept) & targets) / len(targets) if targets else 0.0)
    return out


def ref_stage_recall(case: Case, stage: int, m: int, k: int = 10) -> list[float]:
    out = []
    for b in range(case.batch):
        real, scores, labels, _ = case.rows(b)
        relevant = set(ref_top(real, [float(v) for v in labels], k))
        kept = set(ref_top(real, scores[stage], m))
        out.append(len(kept & relevant) / len(relevant))
    return out


def ref_ndcg(case: Case, stage: int, k: int = 10) -> list[float]:
    out = []
    for b in range(case.batch):
        real, scores, labels, _ = case.rows(b)
        ranked = ref_top(real, scores[stage], k)
        dcg = sum(labels[j] / math.log2(i + 2) for i, j in enumerate(ranked))
        ideal_labels = sorted((labels[j] for j in real), reverse=True)[:k]
        idcg = sum(v / math.log2(i + 2) for i, v in enumerate(ideal_labels))
        out.append(dcg / idcg if idcg > 0 else 0.0)
    return out


def ref_means(case: Case) -> dict[str, float]:
    """What CascadeMetrics should report: plain means over requests of every brute-force metric."""
    num_stages = len(case.scores)
    quotas = list(schema.SERVING_QUOTAS[num_stages])
    columns = {"joint_recall": ref_joint_recall(case, quotas)}
    for i, (name, m) in enumerate(zip(schema.STAGE_NAMES[num_stages], quotas)):
        columns[f"{name}/recall"] = ref_stage_recall(case, i, m)
        columns[f"{name}/ndcg@10"] = ref_ndcg(case, i)
    return {key: sum(v) / len(v) for key, v in columns.items()}


SETTINGS = [(2, 40), (3, 50)]  # (num_stages, N) of RecFlow's 2- and 3-stage layouts


# ------------------------------------------------------------------------------------------------
# top_m_mask
# ------------------------------------------------------------------------------------------------


def test_top_m_mask_toy_and_padding() -> None:
    scores = torch.tensor([[0.9, 0.1, 0.5, 0.7, 0.3], [1.0, 2.0, 3.0, 99.0, 4.0]])
    eligible = torch.tensor([[True] * 5, [True, True, True, False, True]])
    kept = top_m_mask(scores, eligible, 2)
    assert kept.tolist() == [[True, False, False, True, False], [False, False, True, False, True]]
    # Fewer eligible items than m: keep exactly the eligible ones, never a padded one.
    few = torch.tensor([[True, False, False, True, False], [False, True, False, False, True]])
    assert top_m_mask(scores, few, 3).tolist() == [[True, False, False, True, False], [False, True, False, False, True]]
    # m >= N keeps every eligible item.
    assert torch.equal(top_m_mask(scores, eligible, 5), eligible)
    assert torch.equal(top_m_mask(scores, eligible, 9), eligible)


@pytest.mark.parametrize("num_stages,n", SETTINGS)
def test_top_m_mask_matches_sort(num_stages: int, n: int) -> None:
    case = make_case(num_stages, 12, n, seed=1)
    for m in (1, 10, 20, 30):
        kept = top_m_mask(case.scores[0], case.mask, m)
        for b in range(case.batch):
            real, scores, _, _ = case.rows(b)
            expected = set(ref_top(real, scores[0], m))
            assert {j for j in range(n) if kept[b, j]} == expected


# ------------------------------------------------------------------------------------------------
# joint recall
# ------------------------------------------------------------------------------------------------


def test_joint_recall_toy_by_hand() -> None:
    # 6 items, target = items 0 and 1; quotas (4, 2). Stage 1 keeps {0, 2, 3, 4} (drops 1 and 5),
    # stage 2 ranks those by its own scores: 0 (0.2) is beaten by 3 (0.9) and 4 (0.8) -> kept {3, 4}.
    stage1 = torch.tensor([[0.9, 0.1, 0.8, 0.7, 0.6, 0.2]])
    stage2 = torch.tensor([[0.2, 1.0, 0.1, 0.9, 0.8, 0.7]])  # item 1 would win, but stage 1 dropped it
    target = torch.tensor([[True, True, False, False, False, False]])
    mask = torch.ones(1, 6, dtype=torch.bool)
    assert joint_recall([stage1, stage2], target, mask, [4, 2]).tolist() == [0.0]
    # A stage-2 order that favours item 0 among stage 1's survivors: 1 hit of 2.
    stage2b = torch.tensor([[0.95, 1.0, 0.1, 0.9, 0.8, 0.7]])
    assert joint_recall([stage1, stage2b], target, mask, [4, 2]).tolist() == [0.5]
    # Padding item 2 frees a stage-1 slot for item 5, which stage 2 (stage2b) still ranks below 0 and 3.
    padded = mask.clone()
    padded[0, 2] = False
    assert joint_recall([stage1, stage2b], target, padded, [4, 2]).tolist() == [0.5]
    # No real target item: recall 0, not NaN.
    assert joint_recall([stage1, stage2b], torch.zeros_like(target), mask, [4, 2]).tolist() == [0.0]
    with pytest.raises(ValueError, match="quotas"):
        joint_recall([stage1, stage2], target, mask, [4])


@pytest.mark.parametrize("num_stages,n", SETTINGS)
def test_joint_recall_matches_brute_force(num_stages: int, n: int) -> None:
    case = make_case(num_stages, 16, n, seed=2)
    quotas = list(schema.SERVING_QUOTAS[num_stages])
    got = joint_recall(case.scores, case.target, case.mask, quotas, torch.Generator().manual_seed(0))
    expected = ref_joint_recall(case, quotas)
    assert got.tolist() == pytest.approx(expected, abs=1e-6)
    assert len(set(expected)) > 1  # the case is not degenerate


def test_joint_recall_padded_huge_scores_never_kept() -> None:
    # Every stage gives padded items the top score; a padded target must not count either.
    n, quotas = 40, [30, 20]
    g = torch.Generator().manual_seed(3)
    scores = [distinct_scores(4, n, g) for _ in quotas]
    mask = torch.ones(4, n, dtype=torch.bool)
    mask[:, 5:25] = False  # 20 real items: 5 targets + 15 others; stage 2 keeps all 20 real ones
    for s in scores:
        s[~mask] = HUGE
    target = torch.zeros(4, n, dtype=torch.bool)
    target[:, :10] = True  # items 5..9 are padded targets
    got = joint_recall(scores, target, mask, quotas)
    assert got.tolist() == [1.0] * 4  # 5 of 5 real targets, not 5 of 10 and not pushed out by padding
    # With only 12 real items and quota 10 at stage 2, the kept set is exactly brute force's.
    mask2 = torch.zeros(4, n, dtype=torch.bool)
    mask2[:, [0, 1, 2, 3, 10, 11, 12, 13, 14, 15, 16, 17]] = True
    case = Case([s.masked_fill(~mask2, HUGE) for s in scores], torch.zeros(4, n, dtype=torch.int64), mask2, target)
    got2 = joint_recall(case.scores, target, mask2, [30, 10])
    assert got2.tolist() == pytest.approx(ref_joint_recall(case, [30, 10]), abs=1e-6)


# ------------------------------------------------------------------------------------------------
# per-stage Recall@10@m and NDCG@10
# ------------------------------------------------------------------------------------------------


def test_stage_recall_and_ndcg_toy_by_hand() -> None:
    scores = torch.tensor([[0.1, 0.9, 0.5, 0.7, 99.0]])
    relevance = torch.tensor([[3, 1, 2, 0, 50]])
    mask = torch.tensor([[True, True, True, True, False]])
    # top-2 by label among real items: {0, 2}; top-2 by score: {1, 3} -> 0; top-3 by score: {1, 3, 2} -> 1/2.
    assert stage_recall(scores, relevance, mask, m=2, k=2).tolist() == [0.0]
    assert stage_recall(scores, relevance, mask, m=3, k=2).tolist() == [0.5]
    # NDCG@3: ranking 1, 3, 2 -> gains 1, 0, 2; ideal 3, 2, 1.
    dcg = 1 / math.log2(2) + 0 / math.log2(3) + 2 / math.log2(4)
    idcg = 3 / math.log2(2) + 2 / math.log2(3) + 1 / math.log2(4)
    assert ndcg_at_k(scores, relevance, mask, k=3).tolist() == pytest.approx([dcg / idcg], rel=1e-6)
    # k beyond the 4 real items: the padded item (label 50) must add no gain to either DCG.
    dcg = 1 / math.log2(2) + 0 / math.log2(3) + 2 / math.log2(4) + 3 / math.log2(5)
    idcg = 3 / math.log2(2) + 2 / math.log2(3) + 1 / math.log2(4) + 0 / math.log2(5)
    assert ndcg_at_k(scores, relevance, mask, k=10).tolist() == pytest.approx([dcg / idcg], rel=1e-6)
    # The perfect order scores 1.
    perfect = relevance.float().masked_fill(~mask, 1e9)
    assert ndcg_at_k(perfect, relevance, mask, k=10).tolist() == pytest.approx([1.0], rel=1e-6)
    # No relevant item at all: 0, not NaN.
    zeros = torch.zeros_like(relevance)
    assert ndcg_at_k(scores, zeros, mask, k=3).tolist() == [0.0]


@pytest.mark.parametrize("graded", [False, True], ids=["distinct", "graded"])
@pytest.mark.parametrize("num_stages,n", SETTINGS)
def test_stage_metrics_match_brute_force(num_stages: int, n: int, graded: bool) -> None:
    case = make_case(num_stages, 16, n, seed=4, graded=graded)
    g = torch.Generator().manual_seed(0)
    for i, m in enumerate(schema.SERVING_QUOTAS[num_stages]):
        recall = stage_recall(case.scores[i], case.relevance, case.mask, m, schema.TOP_K, g)
        expected = ref_stage_recall(case, i, m)
        assert recall.tolist() == pytest.approx(expected, abs=1e-6)
        ndcg = ndcg_at_k(case.scores[i], case.relevance, case.mask, schema.TOP_K, g)
        assert ndcg.tolist() == pytest.approx(ref_ndcg(case, i), rel=1e-5)
        assert ((ndcg >= 0) & (ndcg <= 1 + 1e-6)).all()
    assert len(set(ref_stage_recall(case, 0, 20))) > 1


# ------------------------------------------------------------------------------------------------
# random tie-break
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_stages,n,expected", [(2, 40, 0.5), (3, 50, 0.4)])
def test_ties_broken_at_random(num_stages: int, n: int, expected: float) -> None:
    batch = 4000  # standard error of the mean ~0.0022
    quotas = list(schema.SERVING_QUOTAS[num_stages])
    scores = [torch.zeros(batch, n) for _ in range(num_stages)]
    mask = torch.ones(batch, n, dtype=torch.bool)
    target = torch.zeros(batch, n, dtype=torch.bool)
    target[:, :10] = True  # a first-come (non-random) tie-break would keep every target: recall 1
    got = joint_recall(scores, target, mask, quotas, torch.Generator().manual_seed(7))
    assert got.mean().item() == pytest.approx(expected, abs=0.01)
    assert got.std().item() > 0.05  # per-request variation, not one fixed subset for every request
    # Per-stage Recall@10@m of a constant model is m / N.
    relevance = torch.arange(n).flip(0).expand(batch, n)
    recall = stage_recall(scores[0], relevance, mask, quotas[0], 10, torch.Generator().manual_seed(8))
    assert recall.mean().item() == pytest.approx(quotas[0] / n, abs=0.01)
    # Reproducible for a fixed generator seed; another seed gives another draw.
    again = joint_recall(scores, target, mask, quotas, torch.Generator().manual_seed(7))
    other = joint_recall(scores, target, mask, quotas, torch.Generator().manual_seed(8))
    assert torch.equal(got, again)
    assert not torch.equal(got, other)


def test_distinct_scores_do_not_depend_on_seed() -> None:
    case = make_case(3, 8, 50, seed=5)
    quotas = list(schema.SERVING_QUOTAS[3])
    a = joint_recall(case.scores, case.target, case.mask, quotas, torch.Generator().manual_seed(1))
    b = joint_recall(case.scores, case.target, case.mask, quotas, torch.Generator().manual_seed(2))
    assert torch.equal(a, b)


# ------------------------------------------------------------------------------------------------
# CascadeMetrics
# ------------------------------------------------------------------------------------------------


def metrics_over(case: Case, sizes: list[int], seed: int = 0) -> CascadeMetrics:
    stages = schema.STAGE_NAMES[len(case.scores)]
    metrics = CascadeMetrics(stages, torch.device("cpu"), seed=seed)
    start = 0
    for size in sizes:
        part = case.select(slice(start, start + size))
        metrics.update(part.scores, part.relevance, part.mask, part.target)
        start += size
    assert start == case.batch
    return metrics


@pytest.mark.parametrize("num_stages,n", SETTINGS)
def test_cascade_metrics_batches_equal_one_batch(num_stages: int, n: int) -> None:
    case = make_case(num_stages, 37, n, seed=6, graded=True)
    whole = metrics_over(case, [37]).compute()
    batched = metrics_over(case, [1, 5, 13, 18]).compute()  # a mean of batch means would differ
    assert batched == whole  # exact: sums then one division
    assert whole["requests"] == 37
    stages = schema.STAGE_NAMES[num_stages]
    assert set(whole) == {"joint_recall", "requests"} | {f"{s}/{m}" for s in stages for m in ("recall", "ndcg@10")}
    expected = ref_means(case)
    for key, value in expected.items():
        assert whole[key] == pytest.approx(value, abs=1e-6), key
    # A mean of batch means really is different here, so the equality above tests something.
    joint = ref_joint_recall(case, list(schema.SERVING_QUOTAS[num_stages]))
    parts = [joint[:1], joint[1:6], joint[6:19], joint[19:]]
    assert sum(sum(p) / len(p) for p in parts) / len(parts) != pytest.approx(whole["joint_recall"], abs=1e-6)


def test_cascade_metrics_empty_and_compute_is_pure() -> None:
    metrics = CascadeMetrics(schema.STAGE_NAMES[2], torch.device("cpu"))
    empty = metrics.compute()
    assert empty["requests"] == 0 and empty["joint_recall"] == 0.0
    case = make_case(2, 5, 40, seed=8)
    metrics.update(case.scores, case.relevance, case.mask, case.target)
    first = metrics.compute()
    assert first == metrics.compute()  # compute() does not consume the sums
    assert first["requests"] == 5


def test_cascade_metrics_reproducible_with_ties() -> None:
    case = make_case(2, 20, 40, seed=9)
    case.scores = [torch.zeros_like(s) for s in case.scores]  # all ties: the seed decides
    a = metrics_over(case, [20], seed=3).compute()
    b = metrics_over(case, [20], seed=3).compute()
    c = metrics_over(case, [20], seed=4).compute()
    assert a == b
    assert a != c


# ------------------------------------------------------------------------------------------------
# Cross-rank reduction: 2 gloo processes
# ------------------------------------------------------------------------------------------------

DIST_CASE = dict(num_stages=3, batch=41, n=50, seed=11, graded=True)
DIST_SPLIT = 15  # rank 0 gets requests [0, 15), rank 1 [15, 41): unequal halves



def _dist_worker(rank: int, world_size: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        case = make_case(DIST_CASE["num_stages"], DIST_CASE["batch"], DIST_CASE["n"], DIST_CASE["seed"],
                         graded=DIST_CASE["graded"])
        rows = slice(0, DIST_SPLIT) if rank == 0 else slice(DIST_SPLIT, case.batch)
        part = case.select(rows)
        metrics = CascadeMetrics(schema.STAGE_NAMES[DIST_CASE["num_stages"]], torch.device("cpu"), seed=rank)
        metrics.update(part.scores, part.relevance, part.mask, part.target)
        local = metrics.sums.clone()
        result = metrics.compute()
        assert torch.equal(metrics.sums, local)  # the all-reduce works on a copy
        Path(out).with_suffix(f".rank{rank}.json").write_text(json.dumps(result))
    finally:
        dist.barrier()
        dist.destroy_process_group()


def test_cascade_metrics_all_reduce_two_ranks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The spawned ranks inherit this environment.
    rendezvous = RendezvousStore()
    for key, value in {**rendezvous.env, "OMP_NUM_THREADS": "1"}.items():
        monkeypatch.setenv(key, value)
    out = str(tmp_path / "result")
    run_ranks(_dist_worker, (2, out), nprocs=2)
    case = make_case(DIST_CASE["num_stages"], DIST_CASE["batch"], DIST_CASE["n"], DIST_CASE["seed"],
                     graded=DIST_CASE["graded"])
    single = metrics_over(case, [case.batch]).compute()
    for rank in (0, 1):
        got = json.loads(Path(out).with_suffix(f".rank{rank}.json").read_text())
        assert got["requests"] == DIST_CASE["batch"]
        assert got.keys() == single.keys()
        for key, value in single.items():
            assert got[key] == pytest.approx(value, rel=1e-12, abs=1e-12), key
    # Not just rank 0's own half: its local means differ from the all-ranks means.
    half = metrics_over(case.select(slice(0, DIST_SPLIT)), [DIST_SPLIT]).compute()
    assert half["requests"] == DIST_SPLIT
    assert any(half[k] != pytest.approx(single[k], abs=1e-6) for k in single if k != "requests")
