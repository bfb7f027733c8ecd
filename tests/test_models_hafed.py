"""HAFED and its level-2 classifier: shapes, masking, the incremental decomposition, losses."""

import pytest
import torch

from sasha_models.hafed import (
    HAFED,
    AttentionMILClassifier,
    HAFEDConfig,
    acmil_loss,
    diversity_loss,
    hafed_loss,
    partial_state,
)

D = 16


@pytest.fixture
def model():
    torch.manual_seed(0)
    return HAFED(HAFEDConfig(d_in=D, d_hidden=8, n_branches=3, top_k=4, top_k_l1=4, mask_drop=0.5))


def test_paper_defaults():
    cfg = HAFEDConfig()
    assert (cfg.d_in, cfg.d_hidden, cfg.n_branches, cfg.n_branches_l1) == (384, 128, 5, 1)
    assert (cfg.top_k, cfg.top_k_l1, cfg.mask_drop) == (20, 10, 0.24)
    assert (cfg.lr, cfg.weight_decay, cfg.max_epochs) == (4.14e-4, 1e-5, 50)
    assert HAFEDConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError):
        HAFEDConfig(n_classes=1)


def test_shapes_single_and_batched(model):
    model.eval()
    hi = torch.randn(12, 4, D)
    out = model(hi)
    assert out["v"].shape == (12, D) and out["attention_l1"].shape == (12, 1, 4)
    assert out["slide_logits"].shape == (2,) and out["branch_logits"].shape == (3, 2)
    assert out["attention"].shape == (3, 12)
    assert all(t.dtype == torch.float32 for t in out.values())
    torch.testing.assert_close(out["attention"].sum(-1), torch.ones(3))

    batch = torch.zeros(2, 15, 4, D)
    batch[0, :12] = hi
    batch[1] = torch.randn(15, 4, D)
    valid = torch.zeros(2, 15, dtype=torch.bool)
    valid[0, :12] = True
    valid[1] = True
    bout = model(batch, valid)
    assert bout["slide_logits"].shape == (2, 2) and bout["attention"].shape == (2, 3, 15)
    # Padding changes nothing and gets exactly zero attention.
    torch.testing.assert_close(bout["slide_logits"][0], out["slide_logits"])
    assert torch.equal(bout["attention"][0, :, 12:], torch.zeros(3, 3))


def test_distilled_vector_is_convex_combination_of_raw_subpatches(model):
    model.eval()
    hi = torch.randn(5, 4, D)
    v, attn = model.distill_with_attention(hi)
    torch.testing.assert_close(v, torch.einsum("nk,nkd->nd", attn.mean(1), hi))
    sub_mask = torch.ones(5, 4, dtype=torch.bool)
    sub_mask[0, 1:] = False
    v2 = model.distill(hi, sub_mask)
    torch.testing.assert_close(v2[0], hi[0, 0])  # only one valid sub-patch
    assert model.distill(hi).shape == (5, D)


def test_classify_equals_pool_of_instance_scores_and_rows_are_local(model):
    model.eval()
    S = torch.randn(20, D)
    valid = torch.rand(20) > 0.2
    a, h = model.instance_scores(S)
    assert a.shape == (20, 3) and h.shape == (20, D)
    torch.testing.assert_close(model.classify(S, valid), model.pool(a, h, valid)[0])
    # Changing one row changes only that row's instance scores.
    S2 = S.clone()
    S2[7] = torch.randn(D)
    a2, h2 = model.instance_scores(S2)
    rows = torch.arange(20) != 7
    assert torch.equal(a2[rows], a[rows]) and torch.equal(h2[rows], h[rows])
    assert not torch.equal(a2[7], a[7])
    # Re-scoring only the changed row reproduces the full evaluation.
    a_inc, h_inc = a.clone(), h.clone()
    a_inc[7:8], h_inc[7:8] = model.instance_scores(S2[7:8])
    torch.testing.assert_close(model.pool(a_inc, h_inc, valid)[0], model.classify(S2, valid))


def test_masked_rows_get_zero_attention(model):
    model.eval()
    S = torch.randn(10, D)
    valid = torch.ones(10, dtype=torch.bool)
    valid[[2, 5]] = False
    _, _, attn = model.pool(*model.instance_scores(S), valid)
    assert torch.equal(attn[:, [2, 5]], torch.zeros(3, 2))
    # Masked rows do not influence the prediction at all.
    S2 = S.clone()
    S2[[2, 5]] = 1e3
    torch.testing.assert_close(model.classify(S2, valid), model.classify(S, valid))


def test_eval_deterministic_train_masks_topk(model):
    hi = torch.randn(30, 4, D)
    model.eval()
    first = model(hi)
    second = model(hi)
    for key in first:
        assert torch.equal(first[key], second[key])
    assert (first["attention"] > 0).all()
    model.train()
    torch.manual_seed(3)
    out = model(hi)
    zeros = (out["attention"] == 0).sum(-1)
    assert (zeros == 2).all()  # floor(top_k 4 * mask_drop 0.5) per branch
    assert ((out["attention_l1"] == 0).sum(-1) == 2).all()
    # The dropped rows are among the top-4 of each branch's logits.
    a, _ = model.instance_scores(out["v"])
    top4 = a.detach().T.topk(4, dim=-1).indices
    for m in range(3):
        dropped = (out["attention"][m] == 0).nonzero().squeeze(-1)
        assert set(dropped.tolist()) <= set(top4[m].tolist())


def test_losses(model):
    model.train()
    hi = torch.randn(25, 4, D, requires_grad=False)
    out = model(hi)
    total, parts = hafed_loss(out, torch.tensor(1), model.cfg)
    assert total.ndim == 0 and set(parts) == {"slide_ce", "branch_ce", "diversity"}
    expected = parts["slide_ce"] + parts["branch_ce"] + parts["diversity"]
    torch.testing.assert_close(total.detach(), expected)
    total.backward()
    assert all(p.grad is not None for p in model.parameters())


def test_diversity_loss():
    same = torch.softmax(torch.randn(1, 10), -1).repeat(3, 1)
    torch.testing.assert_close(diversity_loss(same), torch.tensor(1.0))
    disjoint = torch.eye(4)[:3]
    assert diversity_loss(disjoint) == 0
    assert diversity_loss(torch.rand(1, 9)) == 0  # M = 1


def test_single_branch_uses_slide_head_only():
    clf = AttentionMILClassifier(D, 3, d_hidden=8, n_branches=1).eval()
    out = clf(torch.randn(9, D))
    assert len(clf.branch_heads) == 0
    torch.testing.assert_close(out["branch_logits"][0], out["slide_logits"])
    loss, parts = acmil_loss(out, torch.tensor([2]))
    assert parts["branch_ce"] == 0 and torch.isfinite(loss)


def test_three_classes_batched_loss():
    model = HAFED(HAFEDConfig(d_in=D, n_classes=3, d_hidden=8, n_branches=2))
    out = model(torch.randn(4, 10, 4, D), torch.ones(4, 10, dtype=torch.bool))
    assert out["slide_logits"].shape == (4, 3) and out["branch_logits"].shape == (4, 2, 3)
    loss, _ = hafed_loss(out, torch.tensor([0, 1, 2, 1]), model.cfg)
    assert torch.isfinite(loss)


def test_fold_temperature_divides_the_slide_logits_and_keeps_attention_and_distillation(model):
    model.eval()
    torch.manual_seed(1)
    hi, S = torch.randn(12, 4, D), torch.randn(12, D)
    before = model(hi)
    logits, attention = model.classify(S), model.instance_scores(S)[0]
    model.fold_temperature(0.25)
    after = model(hi)
    torch.testing.assert_close(model.classify(S), logits / 0.25)
    torch.testing.assert_close(after["slide_logits"], before["slide_logits"] / 0.25)
    torch.testing.assert_close(after["branch_logits"], before["branch_logits"] / 0.25)
    torch.testing.assert_close(model.instance_scores(S)[0], attention)  # attention untouched
    torch.testing.assert_close(after["v"], before["v"])  # level 1 untouched
    for bad in (0.0, -1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
            model.fold_temperature(bad)


def test_partial_state_keeps_v_on_a_random_share_of_rows_per_bag():
    g = torch.Generator().manual_seed(0)
    v, z = torch.randn(400, 60, 4), torch.randn(400, 60, 4)
    state = partial_state(v, z, 1.0, generator=g)
    from_v, from_z = (state == v).all(-1), (state == z).all(-1)
    assert bool((from_v | from_z).all())  # every row is its v or its z, whole
    share = from_v.float().mean(-1)  # per bag: c ~ U(0, 1)
    assert 0.4 < float(share.mean()) < 0.6 and float(share.min()) < 0.1 and float(share.max()) > 0.9
    assert torch.equal(partial_state(v, z, 0.0), v)
    half = partial_state(v, z, 0.5, generator=g)
    untouched = float((half == v).all(-1).all(-1).float().mean())
    assert 0.4 < untouched < 0.6  # about half the bags stay full high-res
    with pytest.raises(ValueError, match="same shape"):
        partial_state(v, z[:, :10])
    with pytest.raises(ValueError, match="partial_states"):
        HAFEDConfig(partial_states=1.5)


def test_training_classifies_partial_states_and_evaluation_full_ones():
    """With ``partial_states`` level 2 sees rows of z in training (when given them), never in
    evaluation or without them, and the returned v is the full distillation either way."""
    torch.manual_seed(0)
    model = HAFED(HAFEDConfig(d_in=D, d_hidden=8, n_branches=3, partial_states=1.0))
    seen: list[torch.Tensor] = []
    model.level2.register_forward_hook(lambda m, args, out: seen.append(args[0]))
    hi, z = torch.randn(2, 40, 4, D), torch.randn(2, 40, D)
    out = model(hi, lowres=z)
    v = model.distill(hi)
    assert torch.equal(out["v"], v)
    rows_z = (seen[-1] == z).all(-1)
    assert bool(((seen[-1] == v).all(-1) | rows_z).all()) and bool(rows_z.any())
    model(hi)  # no low-res rows: v
    assert torch.equal(seen[-1], v)
    model.eval()
    model(hi, lowres=z)
    assert torch.equal(seen[-1], v)
    # official default: never partial
    plain = HAFED(HAFEDConfig(d_in=D, d_hidden=8, n_branches=3))
    plain.level2.register_forward_hook(lambda m, args, out: seen.append(args[0]))
    plain(hi, lowres=z)
    assert torch.equal(seen[-1], plain.distill(hi))


def test_attended_partial_states_keep_the_highest_scored_rows():
    g = torch.Generator().manual_seed(0)
    v, z = torch.randn(50, 12, 4), torch.randn(50, 12, 4)
    scores = torch.randn(50, 12)
    scores[:, 9:] = float("-inf")  # padding: never kept, not counted in n
    keep = (partial_state(v, z, 1.0, generator=g, scores=scores) == v).all(-1)
    order = scores.argsort(-1, descending=True)
    for b in range(50):
        m = int(keep[b].sum())
        assert m <= 9 and set(order[b, :m].tolist()) == set(
            torch.nonzero(keep[b]).flatten().tolist()
        )
    assert 0 < float(keep.float().sum(-1).mean()) / 9 < 1
    with pytest.raises(ValueError, match="partial_rows"):
        HAFEDConfig(partial_rows="tumour")


def test_attended_partial_states_in_training_keep_level_twos_most_attended_rows():
    torch.manual_seed(0)
    cfg = HAFEDConfig(d_in=D, d_hidden=8, n_branches=3, partial_states=1.0, partial_rows="attended")
    model = HAFED(cfg)
    seen: list[torch.Tensor] = []
    model.level2.register_forward_hook(lambda m, args, out: seen.append(args[0]))
    hi, z = torch.randn(4, 30, 4, D), torch.randn(4, 30, D)
    model(hi, lowres=z)
    v = model.distill(hi)
    with torch.no_grad():
        attended = model.level2.instance_scores(v)[0].mean(-1).argsort(-1, descending=True)
    kept = (seen[-1] == v).all(-1)
    for b in range(4):
        m = int(kept[b].sum())
        assert set(attended[b, :m].tolist()) == set(torch.nonzero(kept[b]).flatten().tolist())


def test_row_norm_makes_level_two_blind_to_a_rows_scale():
    """With ``row_norm`` a row scaled up (a large-norm distilled row) keeps its attention and
    value, so the slide logits do not move; level 2 on raw rows moves."""
    torch.manual_seed(0)
    S = torch.randn(12, D)
    big = S.clone()
    big[3] *= 8.0
    raw = AttentionMILClassifier(D, 2, d_hidden=8, n_branches=3).eval()
    torch.manual_seed(0)
    normed = AttentionMILClassifier(D, 2, d_hidden=8, n_branches=3, row_norm=True).eval()
    with torch.no_grad():
        torch.testing.assert_close(normed.classify(big), normed.classify(S), atol=1e-4, rtol=0)
        assert (raw.classify(big) - raw.classify(S)).abs().max() > 1e-2
        # Rows stay local: the values are each row layer-normalised, the attention scores them.
        a, h = normed.instance_scores(S)
        torch.testing.assert_close(h, torch.nn.functional.layer_norm(S, (D,)))
        torch.testing.assert_close(a, normed.attention(h))


def test_row_norm_round_trips_through_an_export_and_old_exports_still_load(tmp_path):
    from sasha_models.checkpoint import export_dict, load_model, save_export

    torch.manual_seed(0)
    cfg = HAFEDConfig(d_in=D, d_hidden=8, n_branches=3, row_norm=True)
    model = HAFED(cfg).eval()
    with torch.no_grad():
        model.level2.row_norm.weight.mul_(2.0)  # a trained gain, not the initial one
    save_export(tmp_path / "new.pt", export_dict(model, "hafed", cfg.to_dict()))
    back = load_model(tmp_path / "new.pt")
    S = torch.randn(9, D)
    torch.testing.assert_close(back.classify(S), model.classify(S))
    # An export written before the option existed (no row_norm key) reads back as raw rows.
    old_cfg = HAFEDConfig(d_in=D, d_hidden=8, n_branches=3).to_dict()
    del old_cfg["row_norm"]
    old = HAFED(HAFEDConfig(**old_cfg)).eval()
    save_export(tmp_path / "old.pt", export_dict(old, "hafed", old_cfg))
    back_old = load_model(tmp_path / "old.pt")
    assert isinstance(back_old.level2.row_norm, torch.nn.Identity)
    torch.testing.assert_close(back_old.classify(S), old.classify(S))
