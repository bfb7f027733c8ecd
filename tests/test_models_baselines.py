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
