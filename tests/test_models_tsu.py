"""The targeted state updater: shapes, pair sampling, and learning on a synthetic problem."""

import torch

from sasha_models.data import TSUPairDataModule, TSUPairDataset
from sasha_models.lit import TSUModule, load_checkpoint, load_model, train_model
from sasha_models.toy import tsu_problem
from sasha_models.tsu import TSU, TSUConfig, sample_tsu_pairs, similar_mask


def test_paper_defaults_and_shapes():
    cfg = TSUConfig()
    assert (cfg.d, cfg.tau, cfg.n_anchors, cfg.lr, cfg.weight_decay) == (384, 0.95, 1, 4e-5, 4e-4)
    tsu = TSU(TSUConfig(d=8))
    layers = [m for m in tsu.net]
    assert layers[0].in_features == 24 and layers[0].out_features == 16
    assert isinstance(layers[1], torch.nn.GELU) and isinstance(layers[3], torch.nn.LayerNorm)
    out = tsu(torch.randn(8), torch.randn(8), torch.randn(5, 8))  # one anchor, 5 targets
    assert out.shape == (5, 8) and out.dtype == torch.float32
    assert tsu(torch.randn(3, 8), torch.randn(3, 8), torch.randn(3, 8)).shape == (3, 8)


def test_sample_pairs_respects_threshold_and_excludes_anchor():
    torch.manual_seed(0)
    base = torch.randn(2, 6)
    z = torch.cat([base[0].expand(7, 6), base[1:].expand(3, 6)]) + 0.01 * torch.randn(10, 6)
    z[5:7] *= -1  # anti-parallel to the first cluster
    v = torch.randn(10, 6)
    for seed in range(10):
        v_a, z_a, z_j, v_j = sample_tsu_pairs(z, v, 0.95, torch.Generator().manual_seed(seed), 3)
        assert v_a.shape == z_a.shape == z_j.shape == v_j.shape and v_a.shape[1] == 6
        cos = torch.nn.functional.cosine_similarity(z_a, z_j, dim=-1)
        assert (cos.abs() >= 0.95).all()
        assert not (z_a == z_j).all(-1).any()  # j != a
        for i in range(len(v_a)):
            a = (z == z_a[i]).all(-1).nonzero()[0, 0]
            j = (z == z_j[i]).all(-1).nonzero()[0, 0]
            assert torch.equal(v_a[i], v[a]) and torch.equal(v_j[i], v[j])
    assert similar_mask(z, 0, 0.95)[:7].all()  # anti-parallel rows count (|cos|)
    empty = sample_tsu_pairs(torch.eye(4), torch.eye(4), 0.95)
    assert empty[0].shape == (0, 4)


def test_pair_dataset_fixed_for_validation():
    source = tsu_problem(n_slides=4, d=8, n_patches=20)
    fixed = TSUPairDataset(source, None, 0.95, n_anchors=2, resample=False, seed=1)
    assert all(torch.equal(a, b) for a, b in zip(fixed[0], fixed[0], strict=True))


def test_tsu_beats_identity_on_held_out_pairs(tmp_path):
    source = tsu_problem(n_slides=40, d=16, seed=0)
    cfg = TSUConfig(d=16, n_anchors=4, lr=3e-3, max_epochs=20)
    path = train_model(
        TSUModule(cfg, seed=0),
        TSUPairDataModule(source, tau=cfg.tau, n_anchors=cfg.n_anchors),
        tmp_path,
        progress=False,
        cpu_threads=1,
    )
    blob = load_checkpoint(path)
    assert blob["kind"] == "tsu" and blob["meta"]["monitor"] == "val/loss"
    tsu = load_model(path)
    test = TSUPairDataModule(source, tau=cfg.tau, eval_anchors=8, seed=123)
    test.setup()
    v_a, z_a, z_j, v_j = (torch.cat(t) for t in zip(*test.datasets["test"], strict=True))
    assert len(v_j) > 50
    with torch.no_grad():
        mse = torch.nn.functional.mse_loss(tsu(v_a, z_a, z_j), v_j).item()
    identity = torch.nn.functional.mse_loss(z_j, v_j).item()
    assert mse < 0.5 * identity, (mse, identity)
    rows = (tmp_path / "logs" / "version_0" / "metrics.csv").read_text()
    assert "val/identity_loss" in rows and "val/loss" in rows


def test_residual_tsu_starts_at_identity_and_has_no_output_norm():
    cfg = TSUConfig(d=6, residual=True)
    tsu = TSU(cfg)
    z_j = torch.randn(5, 6) * 3 + 1
    out = tsu(torch.randn(6), torch.randn(6), z_j)
    torch.testing.assert_close(out, z_j)  # zero-initialised correction
    assert not any(isinstance(m, torch.nn.LayerNorm) for m in tsu.modules())


def test_one_anchor_many_targets_equals_the_anchor_repeated_per_target():
    torch.manual_seed(0)
    for residual in (False, True):
        tsu = TSU(TSUConfig(d=12, residual=residual))
        if residual:  # a zero head would make both paths trivially equal
            torch.nn.init.normal_(tsu.net[2].weight)
        v_a, z_a, z_j = torch.randn(12), torch.randn(12), torch.randn(7, 12)
        repeated = tsu(v_a.expand(7, 12), z_a.expand(7, 12), z_j)  # one row per pair
        torch.testing.assert_close(tsu(v_a, z_a, z_j), repeated)
        torch.testing.assert_close(tsu(v_a, z_a, z_j[:1]), repeated[:1])
