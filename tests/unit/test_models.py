"""The towers: DIN's split attention and head equal the concatenated form; DSSM/MLP compute what they claim;
the embedding slot split equals the per-feature layout."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import pytest
import torch
from torchrec.sparse.jagged_tensor import KeyedTensor

from lcron_dist.components.profiling import flop_counter
from lcron_dist.config.job_config import ModelConfig
from lcron_dist.data import schema
from lcron_dist.data.reader import LocalReader
from lcron_dist.losses import build_loss
from lcron_dist.models import Cascade, layers
from lcron_dist.models.din import DIN, MASKED_LOGIT, attention_logits, attention_pool
from lcron_dist.models.dssm import DSSM
from lcron_dist.data.batch import Batch
from lcron_dist.models.embeddings import SlotSplit, StageEmbeddings, StageInputs, TowerInputs, table_configs
from lcron_dist.models.layers import build_mlp


def _inputs(b: int = 3, n: int = 7, length: int = 6, d: int = 4, seed: int = 0) -> StageInputs:
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(b, length, generator=g) > 0.4
    mask[0] = False  # a request without history
    return StageInputs(
        user=torch.randn(b, len(schema.USER_FEATURES) * d, generator=g),
        item=torch.randn(b, n, len(schema.ITEM_FEATURES) * d, generator=g),
        history=torch.randn(b, length, len(schema.HISTORY_FEATURES) * d, generator=g),
        history_mask=mask,
    )


def _din(d: int = 4) -> DIN:
    return DIN(len(schema.USER_FEATURES) * d, len(schema.HISTORY_FEATURES) * d, len(schema.ITEM_FEATURES) * d,
               attention_hidden=6, hidden=[8, 4])


def _din_concatenated(model: DIN, x: StageInputs) -> torch.Tensor:
    """DIN as written in the paper: the attention MLP on the materialised [history ‖ target] pairs."""
    b, n, _ = x.item.shape
    length = x.history.shape[1]
    target = x.item[..., : model.history_dim]
    pairs = torch.cat([x.history.unsqueeze(1).expand(b, n, length, -1),
                       target.unsqueeze(2).expand(b, n, length, -1)], dim=-1)  # [B, N, L, 2E]
    logits = model.attention_out(torch.relu(model.attention_in(pairs))).squeeze(-1)  # [B, N, L]
    interest = torch.zeros(b, n, x.history.shape[-1])
    for i in range(b):
        valid = x.history_mask[i]
        if valid.any():
            weights = torch.softmax(logits[i][:, valid], dim=-1)  # [N, valid]
            interest[i] = weights @ x.history[i][valid]
    user = x.user.unsqueeze(1).expand(-1, n, -1)
    return model.head(torch.cat([user, interest, x.item], dim=-1)).squeeze(-1)


def _backward_nodes(output: torch.Tensor) -> set[str]:
    """The type names of every node in `output`'s autograd graph."""
    seen, stack = set(), [output.grad_fn]
    while stack:
        node = stack.pop()
        if node is not None and node not in seen:
            seen.add(node)
            stack += [parent for parent, _ in node.next_functions]
    return {type(node).__name__ for node in seen}


IN_PLACE_ON_VIEW = {"CopySlices", "AsStridedBackward0"}
"""Backward nodes of an in-place op on a view: they copy the whole gradient of the view's base."""


def test_din_split_attention_equals_the_concatenated_form() -> None:
    torch.manual_seed(0)
    model, x = _din(), _inputs()
    torch.testing.assert_close(model(x), _din_concatenated(model, x), rtol=1e-5, atol=1e-6)


def test_din_gradients_match_the_concatenated_form() -> None:
    torch.manual_seed(1)
    model, x = _din(), _inputs(seed=1)
    model(x).sum().backward()
    split = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    _din_concatenated(model, x).sum().backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(split[name], p.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_padded_history_positions_get_the_masked_logit_and_no_gradient() -> None:
    """AttentionLogits' backward masks nothing: it relies on attention_pool giving padded logits zero gradient,
    also in a request whose history is all padding."""
    torch.manual_seed(8)
    x = _inputs(b=4, n=5, length=6, seed=8)
    parts = torch.randn(4, 6, 3), torch.randn(4, 5, 3)
    logits = attention_logits(*parts, torch.randn(3), torch.randn(()), x.history_mask).requires_grad_(True)
    padded = ~x.history_mask.unsqueeze(1).expand_as(logits)
    assert padded[0].all() and (logits[padded] == MASKED_LOGIT).all() and (logits[~padded] != MASKED_LOGIT).all()
    interest = attention_pool(logits, x.history, x.history_mask)
    assert torch.equal(interest[0], torch.zeros_like(interest[0]))  # request 0 has no history
    (interest * torch.randn_like(interest)).sum().backward()
    assert (logits.grad[padded] == 0).all() and (logits.grad[~padded] != 0).any()


def test_din_attends_to_the_history() -> None:
    torch.manual_seed(2)
    model, x = _din(), _inputs(seed=2)
    changed = StageInputs(x.user, x.item, x.history.clone(), x.history_mask)
    changed.history[1, x.history_mask[1]] += 1.0
    scores, other = model(x), model(changed)
    assert not torch.allclose(scores[1], other[1]), "the history moves request 1's scores"
    torch.testing.assert_close(scores[0], other[0])  # request 0 has no valid history


def test_dssm_is_a_dot_product_of_towers_with_masked_mean_history() -> None:
    torch.manual_seed(3)
    d = 4
    model = DSSM(len(schema.USER_FEATURES) * d, len(schema.HISTORY_FEATURES) * d, len(schema.ITEM_FEATURES) * d, [8, 5])
    x = _inputs(seed=3)
    scores = model(x)
    for i in range(x.user.shape[0]):
        valid = x.history_mask[i]
        pooled = x.history[i][valid].mean(0) if valid.any() else torch.zeros(x.history.shape[-1])
        user = model.user_tower(torch.cat([x.user[i], pooled]))
        torch.testing.assert_close(scores[i], model.item_tower(x.item[i]) @ user)


@pytest.mark.parametrize("stages", [2, 3])
def test_cascade_scores_every_candidate_once_per_stage(stages: int, tiny_raw: Path, tmp_path: Path) -> None:
    from lcron_dist.data import convert

    out = tmp_path / "ds"
    convert.convert(tiny_raw, out, num_stages=stages, progress=False)
    reader = LocalReader(out, batch_size=8)
    batch = next(reader.iter_day(reader.meta.day_list[-1], shuffle=False))  # last day: histories exist
    assert batch.hist_len.sum() > 0
    config = ModelConfig(num_stages=stages, dssm_hidden=[8, 4], mlp_hidden=[8], din_attention_hidden=4, din_hidden=[8])
    model = Cascade(config, reader.meta.vocab_sizes, build_loss("lcron", num_stages=stages), device="cpu")
    out_loss, scores = model(batch)
    assert len(scores) == stages and all(s.shape == (batch.size, reader.meta.num_candidates) for s in scores)
    assert not _backward_nodes(out_loss.total) & IN_PLACE_ON_VIEW
    out_loss.total.backward()
    sparse = {n: p for n, p in model.named_parameters() if n.startswith("sparse.")}
    assert {n.split(".")[1] for n in sparse} == set(schema.STAGE_NAMES[stages]), "each stage has its own tables"
    for name, p in model.named_parameters():  # one backward reaches every table, tower and loss weight
        # DIN's attention output bias shifts all of a softmax's logits: its gradient is 0 up to rounding.
        assert p.grad is not None and (name.endswith("attention_out.bias") or p.grad.abs().sum() > 0), name


def _random_batch(b: int, n: int, length: int, vocab: int, seed: int) -> Batch:
    g = torch.Generator().manual_seed(seed)

    def ids(*shape: int) -> torch.Tensor:
        return torch.randint(1, vocab, shape, generator=g)

    history = ids(len(schema.HISTORY_FEATURES), b, length)
    history[:, 0] = 0  # request 0 without history
    mask = torch.ones(b, n, dtype=torch.bool)
    return Batch(request_id=torch.arange(b), user=ids(len(schema.USER_FEATURES), b),
                 item=ids(len(schema.ITEM_FEATURES), b, n), history=history,
                 hist_len=(history[0] > 0).sum(-1), label=torch.zeros(b, n, dtype=torch.long), mask=mask,
                 target=torch.zeros(b, n, dtype=torch.bool))


def _looked_up(tables: dict[str, torch.Tensor], batch: Batch) -> StageInputs:
    """StageInputs by indexing each kind's table [rows, D] (by kind) with the batch's ids directly."""

    def group(names: tuple[str, ...], ids: torch.Tensor) -> torch.Tensor:
        return torch.cat([tables[name][ids[i]] for i, name in enumerate(names)], dim=-1)

    return StageInputs(user=group(schema.USER_FEATURES, batch.user), item=group(schema.ITEM_FEATURES, batch.item),
                       history=group(schema.HISTORY_FEATURES, batch.history), history_mask=batch.history[0] > 0)


def _loss_weights(b: int, n: int, length: int, dim: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, len(schema.USER_FEATURES) * dim, generator=g),
            torch.randn(b, n, len(schema.ITEM_FEATURES) * dim, generator=g),
            torch.randn(b, length, len(schema.HISTORY_FEATURES) * dim, generator=g)]


def _weighted_sum(x: StageInputs, weights: list[torch.Tensor]) -> torch.Tensor:
    return sum((part * w).sum() for part, w in zip((x.user, x.item, x.history), weights))


@pytest.mark.parametrize("n, length", [(7, 5), (4, 9)])
def test_stage_embeddings_equal_direct_table_lookups(n: int, length: int) -> None:
    """The two collections and SlotSplit give each tower input exactly its ids' rows, and each table the
    gradient of indexing it directly."""
    vocab, dim = 30, 3
    torch.manual_seed(4)
    module = StageEmbeddings("ranking", {kind: vocab for kind in {*schema.USER_FEATURES, *schema.ITEM_FEATURES}}, dim,
                             device="cpu")
    batch = _random_batch(5, n, length, vocab, seed=4)
    weights = _loss_weights(5, n, length, dim, seed=4)
    params = {name.split(".")[-2].split("__")[1]: p for name, p in module.named_parameters()}
    assert len(params) == 16
    copies = {kind: p.detach().clone().requires_grad_() for kind, p in params.items()}
    expected = _looked_up(copies, batch)
    _weighted_sum(expected, weights).backward()
    got = module(batch)
    _weighted_sum(got, weights).backward()
    for field in ("user", "item", "history", "history_mask"):
        assert torch.equal(getattr(got, field), getattr(expected, field)), field
    for kind, p in params.items():
        assert p.grad.abs().sum() > 0, kind
        torch.testing.assert_close(p.grad, copies[kind].grad, rtol=1e-6, atol=1e-6, msg=kind)


@pytest.mark.parametrize("seed", range(3))
def test_slot_split_views_and_scatters_as_slicing(seed: int) -> None:
    """Candidates are the first B·N rows, history the last B·L rows' leading columns: views of the
    pooled rows, whose gradient is what slicing gives (zero in the columns the history does not use)."""
    g = torch.Generator().manual_seed(seed)
    b, n, length, columns = 3, (6, 1, 4)[seed], (3, 6, 2)[seed], 8
    width = (5, 8, 1)[seed]  # history columns: some, all or one of the item columns
    pooled = torch.randn(b * (n + length), columns, generator=g, requires_grad=True)
    expected = [pooled[: b * n].reshape(b, n, columns), pooled[b * n:, :width].reshape(b, length, width)]
    got = SlotSplit.apply(pooled, b, n, width)
    weights = [torch.randn(e.shape, generator=g) for e in expected]
    grads = [torch.autograd.grad(sum((o * w).sum() for o, w in zip(outs, weights)), pooled)[0]
             for outs in (expected, got)]
    for e, o in zip(expected, got):
        assert torch.equal(o, e) and o.untyped_storage().data_ptr() == pooled.untyped_storage().data_ptr()
    assert torch.equal(grads[1], grads[0])


def test_stage_embeddings_put_permuted_features_back_in_schema_order() -> None:
    """A sharding plan may return a collection's features in another order: the blocks are permuted back."""
    module = TowerInputs(2)
    names = list(schema.USER_FEATURES)
    blocks = {name: torch.full((3, 2), float(i)) for i, name in enumerate(names)}
    for keys in (names, names[::-1]):
        pooled = KeyedTensor.from_tensor_list(keys, [blocks[k] for k in keys])
        assert torch.equal(module._in_order(pooled, schema.USER_FEATURES), torch.cat([blocks[k] for k in names], dim=1))


@pytest.mark.parametrize("shape", [(30, 12), (3, 10, 12)])
def test_mlp_in_place_relu_equals_the_functional_form(shape: tuple[int, ...], monkeypatch) -> None:
    """The aten path (CUDA, or a build without oneDNN): exactly the functional form, no in-place op on a view."""
    monkeypatch.setattr(layers, "ONEDNN_LINEAR", None)
    torch.manual_seed(6)
    mlp = build_mlp(12, [8, 6], out_dim=1)
    x = torch.randn(*shape, requires_grad=True)
    linears = [m for m in mlp if isinstance(m, torch.nn.Linear)]
    reference = x
    for i, layer in enumerate(linears):
        reference = torch.nn.functional.linear(reference, layer.weight, layer.bias)
        reference = torch.relu(reference) if i < len(linears) - 1 else reference
    expected = torch.autograd.grad(reference.square().sum(), [x, *mlp.parameters()])
    got = mlp(x)
    assert got.shape == (*shape[:-1], 1)
    assert torch.equal(got, reference)
    assert not _backward_nodes(got) & IN_PLACE_ON_VIEW
    for a, b in zip(torch.autograd.grad(got.square().sum(), [x, *mlp.parameters()]), expected):
        assert torch.equal(a, b)


@pytest.mark.skipif(layers.ONEDNN_LINEAR is None, reason="this torch build has no oneDNN")
def test_cpu_runs_the_towers_linear_layers_through_onednn_with_aten_scores_and_gradients(op_log, monkeypatch) -> None:
    """Training and inference on CPU: oneDNN's linear forward and for the inputs' gradients, its convolution
    backward for the weights'; scores and every gradient as with aten's products alone."""
    torch.manual_seed(7)
    d = 4
    towers = {"din": _din(d), "dssm": DSSM(len(schema.USER_FEATURES) * d, len(schema.HISTORY_FEATURES) * d,
                                           len(schema.ITEM_FEATURES) * d, [8, 5])}
    x = _inputs(b=5, n=6, length=7, seed=7)
    for name, model in towers.items():
        inputs = [t.clone().requires_grad_() for t in (x.user, x.item, x.history)]
        x_grad = StageInputs(*inputs, history_mask=x.history_mask)
        names, params = zip(*[("user", inputs[0]), ("item", inputs[1]), ("history", inputs[2]), *model.named_parameters()])
        with op_log() as forward:
            scores = model(x_grad)
        with op_log() as backward:
            grads = torch.autograd.grad(scores.square().sum(), params)
        with torch.no_grad(), op_log() as inference:
            inferred = model(x)
        with monkeypatch.context() as aten:
            aten.setattr(layers, "ONEDNN_LINEAR", None)
            expected = model(x_grad)
            expected_grads = torch.autograd.grad(expected.square().sum(), params)
        for ops in (forward.ops, backward.ops, inference.ops):
            assert "mkldnn::_linear_pointwise" in ops, name
        # The weights' gradients by oneDNN's convolution backward. Left to aten: DIN's per-request part of the
        # head, a [B, U] x [U, H] addmm (and its backward's mm).
        assert "aten::convolution_backward" in backward.ops, name
        assert {"aten::addmm", "aten::mm"} & set(forward.ops) == ({"aten::addmm"} if name == "din" else set()), name
        assert backward.ops.count("aten::mm") == (2 if name == "din" else 0), name
        torch.testing.assert_close(scores, expected, rtol=1e-5, atol=1e-6, msg=name)
        torch.testing.assert_close(inferred, expected.detach(), rtol=1e-5, atol=1e-6, msg=name)
        assert not _backward_nodes(scores) & IN_PLACE_ON_VIEW, name
        for param, got, want in zip(names, grads, expected_grads):  # the softmax ignores a shift of its logits
            assert param == "attention_out.bias" or want.abs().sum() > 0, (name, param)
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5, msg=f"{name}: {param}")
    with torch.no_grad():  # traced code (torch.compile, the serving export) keeps aten's products
        program = torch.export.export(towers["dssm"].item_tower, (x.item,), strict=False)
    ops = {str(node.target) for node in program.graph.nodes if node.op == "call_function"}
    assert not any("mkldnn" in op for op in ops) and "aten.linear.default" in ops, ops


def test_flop_counter_counts_onednn_linear_layers_as_aten_products(monkeypatch) -> None:
    torch.manual_seed(9)
    mlp, x = build_mlp(12, [8, 6], out_dim=1), torch.randn(3, 10, 12, requires_grad=True)
    counts = []
    for onednn in (layers.ONEDNN_LINEAR, None):
        monkeypatch.setattr(layers, "ONEDNN_LINEAR", onednn)
        with flop_counter() as counter:
            mlp(x).sum().backward()
        counts.append(counter.get_total_flops())
    # Forward, input gradient, weight gradient: 3 products of [30, in] x [in, out] per layer.
    assert counts[0] == counts[1] == 3 * 2 * 30 * (12 * 8 + 8 * 6 + 6 * 1), counts


def test_din_compiled_equals_eager() -> None:
    torch.manual_seed(5)
    eager = _din()
    compiled = DIN(eager.user_dim, eager.history_dim, len(schema.ITEM_FEATURES) * 4, attention_hidden=6, hidden=[8, 4],
                   compile=True)
    compiled.load_state_dict(eager.state_dict())
    x = _inputs(b=5, n=6, length=7, seed=5)
    results = []
    for model in (eager, compiled):
        scores = model(x)
        scores.square().sum().backward()
        results.append((scores.detach(), {name: p.grad for name, p in model.named_parameters()}))
    (scores, grads), (compiled_scores, compiled_grads) = results
    torch.testing.assert_close(compiled_scores, scores, rtol=1e-5, atol=1e-6)
    for name, grad in grads.items():  # the softmax ignores a shift of its logits: no gradient for their bias
        assert name == "attention_out.bias" or grad.abs().sum() > 0, name
        torch.testing.assert_close(compiled_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_training_and_evaluation_share_the_compiled_attention() -> None:
    """One compiled graph per attention function: evaluation (no autograd) reuses training's, no recompile.
    Sizes no other test uses, so the graphs counted are this test's own."""
    torch.manual_seed(6)
    model = DIN(len(schema.USER_FEATURES) * 4, len(schema.HISTORY_FEATURES) * 4, len(schema.ITEM_FEATURES) * 4,
                attention_hidden=9, hidden=[8, 4], compile=True)
    x = _inputs(b=4, n=5, length=11, seed=6)
    graphs = lambda: torch._dynamo.utils.counters["stats"]["unique_graphs"]  # noqa: E731
    before = graphs()
    model(x).sum().backward()
    trained = graphs()
    assert trained == before + 2, "training compiles the logits (forward) and the gradient sums (backward)"
    with torch.no_grad():
        model(_inputs(b=3, n=5, length=11, seed=7))
    assert graphs() == trained, "evaluation compiled the attention again"


def test_data_parallel_table_gradients_equal_embedding_bag_and_the_warning_is_silenced() -> None:
    """On CPU, data-parallel tables backpropagate through fbgemm's dense lookup, of which torch warns that
    no autograd kernel is registered: its table gradients equal torch.nn.EmbeddingBag's."""
    from lcron_dist.config import load_config
    from lcron_dist.distributed.process_group import init_distributed, teardown
    from lcron_dist.distributed.sharding import (
        DENSE_LOOKUP_WARNING,
        apply_sharding,
        apply_table_init,
        silence_dense_lookup_warning,
    )
    from torch.nn.parallel import DistributedDataParallel
    from torchrec.distributed.embeddingbag import ShardedEmbeddingBagCollection

    init_distributed()
    try:
        config = load_config(None, ["--model.emb_dim=3", "--model.dssm_hidden=4", "--model.din_hidden=4",
                                    "--model.din_attention_hidden=4"])
        vocab = {kind: 30 for kind in {*schema.USER_FEATURES, *schema.ITEM_FEATURES}}
        batch = _random_batch(6, 7, 5, 30, seed=6)
        model = Cascade(config.model, vocab, build_loss("lcron", num_stages=2), device="meta")
        dmp, _ = apply_sharding(model, config, torch.device("cpu"), 1, batch.num_slots)
        apply_table_init(dmp, seed=0)
        stage = model.sparse["ranking"]
        weights = _loss_weights(6, 7, 5, 3, seed=6)

        def loss(x: StageInputs) -> torch.Tensor:
            return _weighted_sum(x, weights)

        tables = {name.split(".")[-2].split("__")[1]: p for name, p in dmp.named_parameters()
                  if name.startswith("sparse.ranking.")}
        assert len(tables) == 16 and all(p.grad is None for p in tables.values())
        reference = {kind: p.detach().clone().requires_grad_() for kind, p in tables.items()}
        loss(_looked_up(reference, batch)).backward()

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            loss(stage(batch)).backward()  # the DMP-sharded (data-parallel) module
            assert any(re.search(DENSE_LOOKUP_WARNING, str(w.message)) for w in caught), "the warning this silences"
            for p in tables.values():
                p.grad = None
            silence_dense_lookup_warning()
            caught.clear()
            loss(stage(batch)).backward()
            assert not any(re.search(DENSE_LOOKUP_WARNING, str(w.message)) for w in caught)
        lookups = [lookup for m in stage.modules() if isinstance(m, ShardedEmbeddingBagCollection) for lookup in m._lookups]
        assert len(lookups) == 2 and not any(isinstance(m, DistributedDataParallel) for m in lookups), \
            "in a world of one the lookups (whose gradients are checked below) run without DDP"
        for name, p in tables.items():
            assert p.grad.abs().sum() > 0, name
            torch.testing.assert_close(p.grad, reference[name].grad, rtol=1e-5, atol=1e-6, msg=name)
    finally:
        teardown()


def test_features_come_in_the_order_of_the_tables(tiny_dataset: Path) -> None:
    """TorchRec takes a KeyedJaggedTensor without permuting it when its keys follow the tables' features."""
    reader = LocalReader(tiny_dataset, batch_size=4)
    batch = next(reader.iter_day(reader.meta.day_list[0], shuffle=False))
    features = batch.features
    for kjt, kinds in ((features.user, schema.USER_FEATURES), (features.item, schema.ITEM_FEATURES)):
        tables = table_configs("ranking", kinds, reader.meta.vocab_sizes, 4)
        assert kjt.keys() == [name for table in tables for name in table.feature_names]
