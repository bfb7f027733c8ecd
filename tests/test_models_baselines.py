"""MIL baselines: shapes, padding invariance, and learning a toy problem."""

import pytest
import torch

from sasha_models.baselines import BASELINES, MIL_MODELS, build_baseline
from sasha_models.data import BagDataModule
from sasha_models.lit import MILModule, load_checkpoint, load_model, predict_probs, train_model
from sasha_models.metrics import classification_metrics
from sasha_models.toy import planted_bags

D = 16
SMALL = {"d_model": 32}
KW = {"abmil": SMALL, "meanmil": SMALL, "maxmil": SMALL, "transmil": {"d_model": 32, "n_heads": 4}}


@pytest.fixture(scope="module")
def toy():
    # Several planted sub-patches per positive slide, so mean pooling can see them too.
    return planted_bags(n_slides=60, d=D, n_planted=8, seed=0)[0]


def test_registry():
    assert set(BASELINES) == {"abmil", "meanmil", "maxmil", "transmil"}
    assert set(BASELINES) < set(MIL_MODELS) and "attention_mil" in MIL_MODELS
    with pytest.raises(ValueError, match="unknown MIL model"):
        build_baseline("nope", D, 2)


@pytest.mark.parametrize("name", sorted(MIL_MODELS))
def test_shapes_and_padding_invariance(name):
    torch.manual_seed(0)
    model = build_baseline(name, D, 3, **KW.get(name, {})).eval()
    x = torch.randn(11, D)
    single = model(x)
    single = single["slide_logits"] if isinstance(single, dict) else single
    assert single.shape == (3,) and single.dtype == torch.float32
    batch = torch.zeros(2, 14, D)
    batch[0, :11] = x
    batch[0, 11:] = 50.0  # garbage in the padding must not matter
    batch[1] = torch.randn(14, D)
    mask = torch.ones(2, 14, dtype=torch.bool)
    mask[0, 11:] = False
    out = model(batch, mask)
    out = out["slide_logits"] if isinstance(out, dict) else out
    assert out.shape == (2, 3)
    torch.testing.assert_close(out[0], single, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", BASELINES)
def test_baseline_learns_toy(name, toy, tmp_path):
    module = MILModule(name, D, 2, lr=1e-3, seed=0, **KW[name])
    assert module.lr == 1e-3 and MILModule(name, D, 2).lr == 1e-4  # official default
    path = train_model(
        module,
        BagDataModule(toy, "highres", flatten_highres=True),
        tmp_path,
        max_epochs=8,
        progress=False,
        cpu_threads=1,
    )
    assert load_checkpoint(path)["kind"] == f"mil:{name}"
    ids, probs, labels = predict_probs(load_model(path), toy, "test", "highres")
    auc = classification_metrics(probs, labels)["auc"]
    assert auc > 0.75, f"{name}: test AUC {auc:.2f}"


# ----------------------------------------------------------------------------- Nyström attention


def _exact(q, k, v, valid):
    return torch.nn.functional.scaled_dot_product_attention(
        q, k, v, attn_mask=valid[:, None, None, :]
    )


def test_nystrom_with_a_landmark_per_token_is_exact_attention():
    from sasha_models.baselines import nystrom_attention

    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 2, 40, 8, dtype=torch.float64) for _ in range(3))
    valid = torch.ones(2, 40, dtype=torch.bool)
    valid[1, 30:] = False  # padding
    out = nystrom_attention(q, k, v, valid, landmarks=40)
    exact = _exact(q, k, v, valid)
    torch.testing.assert_close(out[0], exact[0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out[1, :, :30], exact[1, :, :30], atol=1e-4, rtol=1e-4)


def test_nystrom_ignores_padding_and_approximates_with_few_landmarks():
    from sasha_models.baselines import nystrom_attention

    torch.manual_seed(1)
    n, m = 512, 64
    # tokens in raster order come in runs of similar patches (here 8 runs of 64): low rank
    x = torch.randn(8, 16)[torch.arange(n) // 64] * 1.5 + 0.1 * torch.randn(n, 16)
    q = k = x[None, None].repeat(1, 2, 1, 1)
    v = torch.randn(1, 2, n, 16)
    valid = torch.ones(1, n, dtype=torch.bool)
    valid[:, 480:] = False
    out = nystrom_attention(q, k, v, valid, landmarks=m)
    k2, v2 = k.clone(), v.clone()
    k2[..., 480:, :], v2[..., 480:, :] = 100.0, -100.0  # garbage in the padding changes nothing
    again = nystrom_attention(q, k2, v2, valid, landmarks=m)
    torch.testing.assert_close(again[..., :480, :], out[..., :480, :], atol=1e-4, rtol=1e-4)
    exact = _exact(q, k, v, valid)[..., :480, :]
    err = (out[..., :480, :] - exact).norm() / exact.norm()
    assert err < 0.05  # 8 landmarks per run of similar tokens: close to exact attention


def test_transmil_runs_on_a_camelyon_sized_bag_with_nystrom_attention():
    torch.manual_seed(0)
    model = build_baseline("transmil", 8, 2, d_model=16, n_heads=2, exact_max=4096, landmarks=64)
    model.eval()
    bag = torch.randn(40_000, 8)  # ~2,500 patches x 16 sub-patches; exact maps: ~25 GB
    with torch.no_grad():
        logits = model(bag)
    assert logits.shape == (2,) and torch.isfinite(logits).all()
    small = torch.randn(300, 8)  # exact below exact_max, so short bags are unchanged
    model.layer1.exact_max = model.layer2.exact_max = 4096
    with torch.no_grad():
        a = model(small)
        model.layer1.exact_max = model.layer2.exact_max = 0  # force Nyström, m = 64 < 301
        b = model(small)
    assert not torch.allclose(a, b)  # two paths, and the exact one is the default for small bags
