"""Every loss against a slow reference written with explicit loops over requests and items.

The references work on plain Python floats, request by request, on the real items only (padding removed
by hand), and follow METHOD.md's formulas plus each module's stated choices (per-request means, then
means over the valid requests). Small layouts (group_size 4) keep the loops fast; one case runs at the
default size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch

from lcron_dist.data import schema
from lcron_dist.losses import LOSSES, build_loss
from lcron_dist.losses.sorting import neural_sort

STAGES = [2, 3]
EPS = 1e-6


# ------------------------------------------------------------------------------------------------
# Cases
# ------------------------------------------------------------------------------------------------


@dataclass
class Case:
    scores: list[torch.Tensor]  # T x [B, N] float64
    relevance: torch.Tensor  # [B, N]
    mask: torch.Tensor  # [B, N] bool
    group_size: int

    def request(self, b: int) -> tuple[list[int], list[float], list[bool], list[list[float]]]:
        """Real positions, their relevance, their y and each stage's scores, for request b."""
        real = [j for j in range(self.mask.shape[1]) if self.mask[b, j]]
        rel = [self.relevance[b, j].item() for j in real]
        y = [j < self.group_size for j in real]
        stage_scores = [[s[b, j].item() for j in real] for s in self.scores]
        return real, rel, y, stage_scores

    def call(self, loss: torch.nn.Module):
        return loss(scores=self.scores, relevance=self.relevance, mask=self.mask)


def make_case(
    num_stages: int, padded: bool, seed: int = 0, group_size: int = 4, batch: int = 4, scale: float = 4.0
) -> Case:
    """Graded labels as the converter writes them; padding anywhere, one request nearly empty."""
    gen = torch.Generator().manual_seed(seed)
    groups = schema.GROUPS[num_stages]
    n = group_size * len(groups)
    relevance = torch.zeros(batch, n, dtype=torch.float64)
    for b in range(batch):
        relevance[b, :group_size] = 30.0 - (torch.randperm(20, generator=gen)[:group_size] + 1)
    for g, name in enumerate(groups[1:], start=1):
        relevance[:, g * group_size : (g + 1) * group_size] = schema.NEGATIVE_LABEL[name]
    mask = torch.ones(batch, n, dtype=torch.bool)
    if padded:
        mask = torch.rand(batch, n, generator=gen) > 0.25
        mask[0] = False
        mask[0, [0, 1, n - 1]] = True  # fewer real items than any cut: excluded where a loss says so
        mask[1] = True
    relevance = relevance * mask
    scores = [
        (torch.randn(batch, n, generator=gen, dtype=torch.float64) * scale).requires_grad_() for _ in range(num_stages)
    ]
    return Case(scores, relevance, mask, group_size)


# ------------------------------------------------------------------------------------------------
# Reference helpers (plain Python)
# ------------------------------------------------------------------------------------------------


def _softmax(row: list[float]) -> list[float]:
    top = max(row)
    exps = [math.exp(v - top) for v in row]
    return [e / sum(exps) for e in exps]


def ref_sort(op: str, s: list[float], tau: float) -> list[list[float]]:
    n = len(s)
    if op == "neuralsort":
        spread = [sum(abs(si - sl) for sl in s) for si in s]
        return [_softmax([((n + 1 - 2 * k) * s[i] - spread[i]) / tau for i in range(n)]) for k in range(1, n + 1)]
    ordered = sorted(s, reverse=True)
    return [_softmax([-abs(ordered[k] - s[i]) / tau for i in range(n)]) for k in range(n)]


def ref_label_perm(rel: list[float]) -> list[list[float]]:
    ordered = sorted(rel, reverse=True)
    rows = []
    for k in range(len(rel)):
        tied = [j for j in range(len(rel)) if rel[j] == ordered[k]]
        rows.append([1 / len(tied) if j in tied else 0.0 for j in range(len(rel))])
    return rows


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x)) if x >= 0 else math.exp(x) / (1 + math.exp(x))


def softplus(x: float) -> float:
    return max(x, 0.0) + math.log1p(math.exp(-abs(x)))


def bce(logit: float, label: float) -> float:
    return softplus(logit) - logit * label


def mean(values: list[float]) -> float:
    return sum(values) / len(values)


def mean_valid(values: list[float | None]) -> float:
    """Mean over the requests that count (None = excluded); 0 if none does."""
    kept = [v for v in values if v is not None]
    return mean(kept) if kept else 0.0


def col_sums(perm: list[list[float]]) -> list[float]:
    return [sum(row[j] for row in perm) for j in range(len(perm))]


def above(perm: list[list[float]], j: int, cut: int) -> float:
    return sum(perm[k][j] for k in range(min(cut, len(perm))))


def below(perm: list[list[float]], j: int, cut: int) -> float:
    return sum(perm[k][j] for k in range(cut, len(perm)))


def assert_value(actual: torch.Tensor, expected: float) -> None:
    assert actual.item() == pytest.approx(expected, rel=1e-5, abs=1e-7)


def assert_output(out, expected_parts: dict[str, float], expected_total: float) -> None:
    assert set(out.parts) == set(expected_parts)
    for name, value in expected_parts.items():
        assert_value(out.parts[name], value), name
    assert_value(out.total, expected_total)
    assert all(not p.requires_grad for p in out.parts.values())


# ------------------------------------------------------------------------------------------------
# LCRON
# ------------------------------------------------------------------------------------------------


def ref_lcron(
    case: Case, names: tuple[str, ...], tau: float, q: list[int], k: int, op: str, quirk: bool = False
) -> dict[str, float]:
    e2e, singles = [], [[] for _ in names]
    for b in range(case.mask.shape[0]):
        _, rel, y, stage_scores = case.request(b)
        n = len(y)
        perms = [ref_sort(op, s, tau) for s in stage_scores]
        cols = [col_sums(p) for p in perms]
        if n > min(q):
            terms = []
            for j in range(n):
                survive = math.prod(above(p, j, cut) / (c[j] + EPS) for p, c, cut in zip(perms, cols, q))
                kept = math.prod(1 - below(p, j, cut) / (c[j] + EPS) for p, c, cut in zip(perms, cols, q))
                terms.append(-math.log(survive + EPS) if y[j] else -math.log(1 - kept + EPS))
            e2e.append(mean(terms))
        else:
            e2e.append(None)
        if quirk:
            blocks = [[1.0 if v > 0 else 0.0 for v in row] for row in ref_label_perm(rel)]
            up_w = [sum(blocks[r][j] for r in range(min(k, n))) for j in range(n)]
            down_w = [sum(blocks[r][j] for r in range(k, n)) for j in range(n)]
        else:
            up_w = [float(v) for v in y]
            down_w = [1.0 - v for v in up_w]
        for i, (p, c) in enumerate(zip(perms, cols)):
            if n <= k:
                singles[i].append(None)
                continue
            terms = [
                -up_w[j] * math.log(above(p, j, k) / (c[j] + EPS) + EPS)
                - down_w[j] * math.log(below(p, j, k) / (c[j] + EPS) + EPS)
                for j in range(n)
            ]
            singles[i].append(mean(terms))
    parts = {"e2e": mean_valid(e2e)}
    parts.update({f"single/{name}": mean_valid(v) for name, v in zip(names, singles)})
    return parts


@pytest.mark.parametrize("num_stages", STAGES)
@pytest.mark.parametrize("padded", [False, True], ids=["full", "padded"])
@pytest.mark.parametrize("sort", ["neuralsort", "softsort"])
def test_lcron_matches_reference(num_stages: int, padded: bool, sort: str) -> None:
    case = make_case(num_stages, padded, seed=num_stages)
    q = [4, 6, 5][:num_stages]
    loss = build_loss("lcron", num_stages, tau=3.0, q=q, sort=sort, group_size=4)
    out = case.call(loss)
    parts = ref_lcron(case, loss.stage_names, 3.0, q, 4, sort)
    # UWL at initialisation (w = 1): L = L_e2e + ½ Σ L_single.
    total = parts["e2e"] + 0.5 * sum(v for name, v in parts.items() if name != "e2e")
    assert_output(out, parts, total)


def test_lcron_defaults_at_full_size() -> None:
    case = make_case(2, padded=False, seed=7, group_size=10, batch=2, scale=20.0)
    loss = build_loss("lcron", 2)
    assert (loss.tau, loss.q, loss.k) == (50.0, (10, 10), 10)
    out = case.call(loss)
    parts = ref_lcron(case, ("retrieval", "ranking"), 50.0, [10, 10], 10, "neuralsort")
    assert_output(out, parts, parts["e2e"] + 0.5 * (parts["single/retrieval"] + parts["single/ranking"]))


@pytest.mark.parametrize("padded", [False, True], ids=["full", "padded"])
def test_lcron_binarized_label_quirk(padded: bool) -> None:
    case = make_case(3, padded, seed=11)
    quirky = case.call(build_loss("lcron", 3, tau=3.0, binarized_labels=True, group_size=4))
    parts = ref_lcron(case, ("retrieval", "prerank", "ranking"), 3.0, [4, 4, 4], 4, "neuralsort", quirk=True)
    for name, value in parts.items():
        assert_value(quirky.parts[name], value)
    # The quirk multiplies each negative's down term by its tie group's size (4 here): L_single grows.
    plain = case.call(build_loss("lcron", 3, tau=3.0, group_size=4))
    assert_value(quirky.parts["e2e"], plain.parts["e2e"].item())
    assert quirky.parts["single/ranking"] > 1.5 * plain.parts["single/ranking"]


def _hand_lcron(scores: list[torch.Tensor], y: torch.Tensor, tau: float, cut: int, detach: bool) -> torch.Tensor:
    """LCRON on full groups written out directly, with or without the stop-gradient on c_j."""
    perms = [neural_sort(s, tau) for s in scores]
    cols = [p.sum(dim=1).detach() if detach else p.sum(dim=1) for p in perms]
    ups = [p[:, :cut].sum(dim=1) / (c + EPS) for p, c in zip(perms, cols)]
    downs = [p[:, cut:].sum(dim=1) / (c + EPS) for p, c in zip(perms, cols)]
    e2e = -y * torch.log(math.prod(ups) + EPS) - (1 - y) * torch.log(1 - math.prod(1 - d for d in downs) + EPS)
    singles = [(-y * torch.log(u + EPS) - (1 - y) * torch.log(d + EPS)).mean() for u, d in zip(ups, downs)]
    return e2e.mean() + 0.5 * sum(singles)


def test_lcron_column_sums_are_stop_gradient() -> None:
    case = make_case(2, padded=False, seed=5, scale=6.0)
    out = case.call(build_loss("lcron", 2, tau=2.0, group_size=4))
    grads = torch.autograd.grad(out.total, case.scores)
    y = case.mask.new_zeros(case.mask.shape, dtype=torch.float64)
    y[:, :4] = 1
    for detach, should_match in [(True, True), (False, False)]:
        hand = torch.autograd.grad(_hand_lcron(case.scores, y, 2.0, 4, detach), case.scores)
        for g, h in zip(grads, hand):
            assert torch.allclose(g, h, rtol=1e-8, atol=1e-10) == should_match
    hand_value = _hand_lcron(case.scores, y, 2.0, 4, detach=True)
    assert_value(out.total, hand_value.item())


def test_lcron_weighting_formulas_and_gradients() -> None:
    case = make_case(3, padded=True, seed=13)
    w = torch.tensor([0.7, 1.3, 0.9])
    research = build_loss("lcron", 3, tau=3.0, group_size=4)
    paper = build_loss("lcron", 3, tau=3.0, weighting="uwl_paper", group_size=4)
    with torch.no_grad():
        research.stage_weights.copy_(w)
        paper.stage_weights.copy_(w)
        paper.e2e_weight.fill_(0.8)
    out = case.call(research)
    singles = [out.parts[f"single/{n}"].item() for n in research.stage_names]
    e2e = out.parts["e2e"].item()
    expected = e2e + sum(s / (2 * wi**2) for s, wi in zip(singles, w.tolist())) + math.log(math.prod(w.tolist()))
    assert_value(out.total, expected)
    paper_out = case.call(paper)
    expected_paper = (
        e2e / (2 * 0.8**2)
        + sum(s / (2 * wi**2) for s, wi in zip(singles, w.tolist()))
        + math.log2(0.8 * math.prod(w.tolist()))
    )
    assert_value(paper_out.total, expected_paper)
    # One backward reaches every stage's scores and every learned weight.
    out.total.backward()
    for s in case.scores:
        assert s.grad is not None and s.grad.abs().sum() > 0
        assert torch.all(s.grad[~case.mask] == 0)
    expected_grad = [-s / wi**3 + 1 / wi for s, wi in zip(singles, w.tolist())]  # d/dw of s/(2w²) + ln w
    torch.testing.assert_close(research.stage_weights.grad, torch.tensor(expected_grad), rtol=1e-5, atol=1e-6)
    paper_out.total.backward()
    assert paper.e2e_weight.grad.abs() > 0 and torch.all(paper.stage_weights.grad != 0)


def test_lcron_computes_each_stage_cut_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """L_e2e (at q) and L_single (at K) share a stage's cut probabilities where q = K: one computation per
    stage and cut used, not one per term (their values are test_lcron_matches_reference's)."""
    from lcron_dist.losses import lcron

    cuts: list[int] = []
    computed = lcron.cut_probabilities
    monkeypatch.setattr(lcron, "cut_probabilities", lambda perm, mass, cut: cuts.append(cut) or computed(perm, mass, cut))
    case = make_case(2, padded=False, seed=17)
    for options, expected in (({}, [4, 4]), ({"q": [6, 4]}, [4, 4, 6]), ({"use_single": False, "q": 6}, [6, 6])):
        cuts.clear()
        case.call(build_loss("lcron", 2, tau=3.0, group_size=4, **options))
        assert sorted(cuts) == expected, options


def test_lcron_ablations_and_fixed_weights() -> None:
    case = make_case(2, padded=False, seed=17)
    full = case.call(build_loss("lcron", 2, tau=3.0, group_size=4))
    singles = {k: v for k, v in full.parts.items() if k.startswith("single/")}

    no_e2e_loss = build_loss("lcron", 2, tau=3.0, use_e2e=False, group_size=4)
    no_e2e = case.call(no_e2e_loss)
    assert set(no_e2e.parts) == set(singles)
    assert_value(no_e2e.total, 0.5 * sum(v.item() for v in singles.values()))

    no_single_loss = build_loss("lcron", 2, tau=3.0, use_single=False, group_size=4)
    no_single = case.call(no_single_loss)
    assert set(no_single.parts) == {"e2e"} and list(no_single_loss.parameters()) == []
    assert_value(no_single.total, full.parts["e2e"].item())

    fixed_loss = build_loss("lcron", 2, tau=3.0, weighting="fixed", fixed_weights=[2.0, 0.25, 3.0], group_size=4)
    fixed = case.call(fixed_loss)
    assert list(fixed_loss.parameters()) == []
    expected = 2.0 * full.parts["e2e"] + 0.25 * singles["single/retrieval"] + 3.0 * singles["single/ranking"]
    assert_value(fixed.total, expected.item())
    with pytest.raises(ValueError):
        build_loss("lcron", 2, use_e2e=False, use_single=False)
    with pytest.raises(ValueError):
        build_loss("lcron", 2, fixed_weights=[1.0, 1.0, 1.0])


# ------------------------------------------------------------------------------------------------
# Baselines
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_stages", STAGES)
@pytest.mark.parametrize("padded", [False, True], ids=["full", "padded"])
def test_bce_matches_reference(num_stages: int, padded: bool) -> None:
    case = make_case(num_stages, padded, seed=21)
    loss = build_loss("bce", num_stages, group_size=4)
    seen = {2: [16, 8], 3: [20, 16, 8]}[num_stages]  # all, first 4 groups, first 2 groups
    parts = {}
    for i, name in enumerate(loss.stage_names):
        per_request = []
        for b in range(case.mask.shape[0]):
            real, _, y, stage_scores = case.request(b)
            terms = [bce(stage_scores[i][idx], float(y[idx])) for idx, j in enumerate(real) if j < seen[i]]
            per_request.append(mean(terms) if terms else None)
        parts[f"bce/{name}"] = mean_valid(per_request)
    assert_output(case.call(loss), parts, sum(parts.values()))


@pytest.mark.parametrize("num_stages", STAGES)
@pytest.mark.parametrize("padded", [False, True], ids=["full", "padded"])
@pytest.mark.parametrize("graded", [True, False], ids=["graded", "binary"])
def test_icc_matches_reference(num_stages: int, padded: bool, graded: bool) -> None:
    case = make_case(num_stages, padded, seed=23, scale=0.5)
    sigma, scales = 0.3, [1.0, 2.0, 4.0][:num_stages]
    loss = build_loss("icc", num_stages, sigma=sigma, stage_scales=scales, graded=graded, group_size=4)
    cutoffs = {2: [12, 8], 3: [16, 12, 8]}[num_stages]
    per_request = []
    for b in range(case.mask.shape[0]):
        _, rel, y, stage_scores = case.request(b)
        n = len(y)
        fused, passed = [0.0] * n, [1.0] * n
        for i, (s, cut, scale) in enumerate(zip(stage_scores, cutoffs, scales)):
            kappa = sorted(s, reverse=True)[cut - 1] if n >= cut else -math.inf
            for j in range(n):
                ind = sigmoid((s[j] - kappa) / sigma)
                share = ind if i == num_stages - 1 else 1 - ind
                fused[j] += scale * passed[j] * share * s[j]
                passed[j] *= ind
        label = rel if graded else [float(v) for v in y]
        terms = [softplus(fused[l] - fused[j]) for j in range(n) for l in range(n) if label[j] > label[l]]
        per_request.append(mean(terms) if terms else None)
    expected = mean_valid(per_request)
    assert_output(case.call(loss), {"pairwise": expected}, expected)


@pytest.mark.parametrize("num_stages", STAGES)
@pytest.mark.parametrize("padded", [False, True], ids=["full", "padded"])
def test_fs_ranknet_matches_reference(num_stages: int, padded: bool) -> None:
    case = make_case(num_stages, padded, seed=29)
    loss = build_loss("fs_ranknet", num_stages, group_size=4)
    num_groups = num_stages + 2
    parts = {}
    for i, name in enumerate(loss.stage_names):
        total = 0.0
        for g in range(num_groups):
            per_request = []
            for b in range(case.mask.shape[0]):
                real, _, _, stage_scores = case.request(b)
                s = stage_scores[i]
                terms = [
                    softplus(s[l] - s[j])
                    for j, pj in enumerate(real)
                    for l, pl in enumerate(real)
                    if pj // 4 == g and pl // 4 > g
                ]
                per_request.append(mean(terms) if terms else None)
            total += mean_valid(per_request)
        parts[f"ranknet/{name}"] = total
    assert_output(case.call(loss), parts, sum(parts.values()))


@pytest.mark.parametrize("num_stages", STAGES)
@pytest.mark.parametrize("padded", [False, True], ids=["full", "padded"])
def test_fs_lambdaloss_matches_reference(num_stages: int, padded: bool) -> None:
    case = make_case(num_stages, padded, seed=31)
    mu, topn = 0.8, 7
    loss = build_loss("fs_lambdaloss", num_stages, smooth_fraction=mu, topn=topn, group_size=4)

    def disc(r: float) -> float:
        return 1 / math.log(1 + r)

    parts = {}
    for i, name in enumerate(loss.stage_names):
        per_request = []
        for b in range(case.mask.shape[0]):
            _, rel, _, stage_scores = case.request(b)
            s, n = stage_scores[i], len(rel)
            order = sorted(range(n), key=lambda j: -s[j])
            rank = {j: order.index(j) + 1 for j in range(n)}
            idcg = sum(r / math.log(2 + pos) for pos, r in enumerate(sorted(rel, reverse=True)))
            gain = [r / idcg for r in rel]
            total = 0.0
            for a in range(n):
                for c in range(n):
                    gap = abs(rank[a] - rank[c])
                    near = rank[a] <= topn or rank[c] <= topn
                    u = abs(disc(gap) - disc(gap + 1)) if gap > 0 and near else 0.0
                    da = disc(rank[a]) if rank[a] <= topn else 0.0
                    dc = disc(rank[c]) if rank[c] <= topn else 0.0
                    weight = abs(gain[a] - gain[c]) * ((1 - mu) * u + mu * abs(da - dc))
                    total += weight * bce(s[a] - s[c], 1.0 if rel[a] > rel[c] else 0.0)
            per_request.append(total if n else None)
        parts[f"lambda/{name}"] = mean_valid(per_request)
    assert_output(case.call(loss), parts, sum(parts.values()))


@pytest.mark.parametrize("num_stages", STAGES)
@pytest.mark.parametrize("padded", [False, True], ids=["full", "padded"])
@pytest.mark.parametrize("rank_weight", [None, 0.7])
def test_rankflow_matches_reference(num_stages: int, padded: bool, rank_weight: float | None) -> None:
    case = make_case(num_stages, padded, seed=37)
    loss = build_loss("rankflow", num_stages, rank_weight=rank_weight, distill_weight=0.5, group_size=4)
    alpha = {2: 0.0, 3: 1.0}[num_stages] if rank_weight is None else rank_weight
    quotas = {2: [12, 8], 3: [16, 12, 8]}[num_stages]
    names = loss.stage_names
    collected: dict[str, list[float | None]] = {}
    for b in range(case.mask.shape[0]):
        _, _, y, stage_scores = case.request(b)
        selected = list(range(len(y)))
        for i, s in enumerate(stage_scores):
            if i > 0:
                prev = stage_scores[i - 1]
                selected = sorted(selected, key=lambda j: -prev[j])[: quotas[i - 1]]
                collected.setdefault(f"distill/{names[i - 1]}", []).append(
                    mean([(prev[j] - s[j]) ** 2 for j in selected]) if selected else None
                )
                top = sorted(selected, key=lambda j: -s[j])[: quotas[i]]
                rest = [j for j in selected if j not in top]
                gap = mean([prev[j] for j in top]) - mean([prev[j] for j in rest]) if top and rest else None
                collected.setdefault(f"rank/{names[i - 1]}", []).append(None if gap is None else softplus(-gap))
            collected.setdefault(f"bce/{names[i]}", []).append(
                mean([bce(s[j], float(y[j])) for j in selected]) if selected else None
            )
    parts = {name: mean_valid(values) for name, values in collected.items()}
    if not alpha:
        parts = {name: v for name, v in parts.items() if not name.startswith("rank/")}
    weights = {"bce": 1.0, "distill": 0.5, "rank": alpha}
    total = sum(weights[n.split("/")[0]] * v for n, v in parts.items())
    assert_output(case.call(loss), parts, total)


def test_rankflow_distillation_only_teaches_the_earlier_stage() -> None:
    case = make_case(2, padded=True, seed=39)
    grads = {}
    for weight in (0.0, 1.0):
        out = case.call(build_loss("rankflow", 2, distill_weight=weight, group_size=4))
        grads[weight] = torch.autograd.grad(out.total, case.scores)
    retrieval, ranking = 0, 1
    torch.testing.assert_close(grads[0.0][ranking], grads[1.0][ranking])  # sg(s_ranking): the teacher is not moved
    assert not torch.allclose(grads[0.0][retrieval], grads[1.0][retrieval])


def ref_permutation_ce(perm: list[list[float]], label: list[list[float]]) -> float:
    n = len(perm)
    return mean([-label[k][j] * math.log(perm[k][j] + EPS) for k in range(n) for j in range(n)])


@pytest.mark.parametrize("num_stages", STAGES)
@pytest.mark.parametrize("padded", [False, True], ids=["full", "padded"])
@pytest.mark.parametrize("name", ["arf", "arf_v2"])
def test_arf_matches_reference(num_stages: int, padded: bool, name: str) -> None:
    case = make_case(num_stages, padded, seed=41)
    tau = 2.0
    loss = build_loss(name, num_stages, tau=tau, group_size=4)
    quotas = {2: [12, 8], 3: [16, 12, 8]}[num_stages]  # the serving quotas at 4 per group
    w = torch.tensor([0.8, 1.1, 1.4][:num_stages])
    with torch.no_grad():
        loss.global_weights.copy_(w)
    parts, total = {}, 0.0
    for i, stage in enumerate(loss.stage_names):
        relax, glob = [], []
        for b in range(case.mask.shape[0]):
            _, rel, y, stage_scores = case.request(b)
            n, m = len(y), quotas[i]
            perm = ref_sort("neuralsort", stage_scores[i], tau)
            glob.append(ref_permutation_ce(perm, ref_label_perm(rel)) if n else None)
            if n <= m:
                relax.append(None)
            elif name == "arf":
                relax.append(mean([-float(y[j]) * math.log(above(perm, j, m) / m + EPS) for j in range(n)]))
            else:
                c = col_sums(perm)
                relax.append(mean([
                    -math.log((above(perm, j, m) if y[j] else below(perm, j, m)) / (c[j] + EPS) + EPS)
                    for j in range(n)
                ]))
        parts[f"relax/{stage}"], parts[f"global/{stage}"] = mean_valid(relax), mean_valid(glob)
        wi = w[i].item()
        total += parts[f"global/{stage}"] / (2 * wi**2) + math.log(wi) + parts[f"relax/{stage}"]
    out = case.call(loss)
    assert_output(out, parts, total)
    out.total.backward()
    assert torch.all(loss.global_weights.grad != 0)


@pytest.mark.parametrize("num_stages", STAGES)
@pytest.mark.parametrize("padded", [False, True], ids=["full", "padded"])
@pytest.mark.parametrize("name", ["neuralsort_only", "softsort_only"])
def test_sort_only_matches_reference(num_stages: int, padded: bool, name: str) -> None:
    case = make_case(num_stages, padded, seed=43)
    loss = build_loss(name, num_stages, tau=1.5, group_size=4)
    op = name.removesuffix("_only")
    parts = {}
    for i, stage in enumerate(loss.stage_names):
        per_request = []
        for b in range(case.mask.shape[0]):
            _, rel, _, stage_scores = case.request(b)
            perm = ref_sort(op, stage_scores[i], 1.5)
            per_request.append(ref_permutation_ce(perm, ref_label_perm(rel)) if rel else None)
        parts[f"ce/{stage}"] = mean_valid(per_request)
    assert_output(case.call(loss), parts, sum(parts.values()))


# ------------------------------------------------------------------------------------------------
# Every loss: masking, gradients, registry
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(LOSSES))
def test_padded_scores_never_count(name: str) -> None:
    case = make_case(3, padded=True, seed=47)
    loss = build_loss(name, 3, group_size=4)
    out = case.call(loss)
    garbage = [s.detach().masked_fill(~case.mask, float("nan")).requires_grad_() for s in case.scores]
    noisy = loss(scores=garbage, relevance=case.relevance, mask=case.mask)
    assert_value(noisy.total, out.total.item())
    noisy.total.backward()
    for s in garbage:
        assert torch.isfinite(s.grad).all() and torch.all(s.grad[~case.mask] == 0)
    assert any(s.grad.abs().sum() > 0 for s in garbage)


def test_registry_and_option_errors() -> None:
    assert list(LOSSES) == [
        "lcron", "bce", "icc", "rankflow", "fs_ranknet", "fs_lambdaloss", "arf", "arf_v2",
        "neuralsort_only", "softsort_only",
    ]
    with pytest.raises(ValueError, match="fs_lambdaloss"):
        build_loss("listnet", 2)
    with pytest.raises(ValueError, match="tau"):
        build_loss("lcron", 2, temperature=1.0)
    with pytest.raises(ValueError, match="softsort"):
        build_loss("lcron", 2, sort="bitonic")
    with pytest.raises(ValueError, match="uwl_paper"):
        build_loss("lcron", 2, weighting="dwa")
    with pytest.raises(ValueError, match="one value per stage"):
        build_loss("lcron", 3, q=[10, 10])
    with pytest.raises(ValueError, match="num_stages"):
        build_loss("bce", 4)
    loss = build_loss("bce", 2)
    scores = [torch.zeros(2, 40), torch.zeros(2, 40)]
    with pytest.raises(ValueError, match="2 score tensors"):
        loss(scores=scores[:1], relevance=torch.zeros(2, 40), mask=torch.ones(2, 40, dtype=torch.bool))
    with pytest.raises(ValueError, match="N"):
        loss(scores=[torch.zeros(2, 50)] * 2, relevance=torch.zeros(2, 50), mask=torch.ones(2, 50, dtype=torch.bool))


def test_default_layout_options() -> None:
    assert build_loss("arf", 2).m == (30, 20) and build_loss("arf_v2", 3).m == (40, 30, 20)
    assert build_loss("arf", 2).tau == 200.0
    assert build_loss("bce", 3).seen_items == (50, 40, 20)
    assert build_loss("icc", 3).cutoffs == (40, 30, 20)
    assert build_loss("rankflow", 2).quotas == (30, 20) and build_loss("rankflow", 2).rank_weight == 0.0
    assert build_loss("lcron", 3).q == (10, 10, 10)
    assert build_loss("lcron", 3).stage_names == ("retrieval", "prerank", "ranking")
