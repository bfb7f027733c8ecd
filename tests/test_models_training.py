"""End-to-end training through ``train_model``: HAFED on a planted-instance toy, checkpoints."""

import copy
import csv

import lightning as L
import pytest
import torch

from sasha_models.data import BagDataModule
from sasha_models.hafed import HAFED, HAFEDConfig
from sasha_models.lit import (
    HAFEDModule,
    MILModule,
    check_feature_dim,
    load_checkpoint,
    load_model,
    predict_probs,
    train_model,
)
from sasha_models.metrics import classification_metrics
from sasha_models.toy import planted_bags

D = 16


@pytest.fixture(scope="module")
def toy():
    return planted_bags(n_slides=60, d=D, k=4, n_patches=(20, 40), seed=0)


@pytest.fixture(scope="module")
def hafed_run(toy, tmp_path_factory):
    source, _ = toy
    out = tmp_path_factory.mktemp("hafed")
    cfg = HAFEDConfig(d_in=D, d_hidden=32, lr=5e-3, max_epochs=15)
    path = train_model(
        HAFEDModule(cfg, seed=0),
        BagDataModule(source, "highres"),
        out,
        seed=0,
        progress=False,
        cpu_threads=1,
    )
    return path, cfg


def test_hafed_learns_planted_instance(toy, hafed_run):
    source, planted = toy
    path, _ = hafed_run
    model = load_model(path)
    assert isinstance(model, HAFED) and not model.training
    ids, probs, labels = predict_probs(model, source, "test", "highres")
    assert probs.shape == (len(ids), 2) and labels.shape == (len(ids),)
    assert classification_metrics(probs, labels)["auc"] == 1.0
    hits = positives = 0
    with torch.no_grad():
        for sid in ids:
            if planted[sid] < 0:
                continue
            out = model(torch.as_tensor(source.features(sid, "highres")))
            positives += 1
            hits += int(out["attention"].mean(0).argmax() == planted[sid])
    assert hits / positives > 0.5, f"attention found the planted patch in {hits}/{positives}"


def test_export_format_and_logs(hafed_run):
    path, cfg = hafed_run
    blob = torch.load(path, map_location="cpu", weights_only=True)
    assert blob["kind"] == "hafed" and blob["config"] == cfg.to_dict()
    meta = blob["meta"]
    assert meta["monitor"] == "val/score" and meta["best_score"] is not None
    assert meta["class_names"] == ["negative", "class1"] and meta["feature_kind"] == "highres"
    with open(path.parent / "logs" / "version_0" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    logged = {k for r in rows for k, v in r.items() if v}
    assert {"val/auc", "val/f1", "val/acc", "val/ece", "val/loss", "val/score"} <= logged
    assert {"train/loss", "train/slide_ce", "train/branch_ce", "train/diversity"} <= logged


def test_checkpoint_round_trip_identical_outputs(hafed_run):
    path, cfg = hafed_run
    a, b = load_model(path), load_model(path)
    hi = torch.randn(17, 4, D)
    with torch.no_grad():
        oa, ob = a(hi), b(hi)
    for key in oa:
        assert torch.equal(oa[key], ob[key])
    # And identical to the exported state dict loaded into a fresh model.
    fresh = HAFED(cfg)
    fresh.load_state_dict(load_checkpoint(path)["state_dict"])
    with torch.no_grad():
        assert torch.equal(fresh.eval()(hi)["slide_logits"], oa["slide_logits"])


def test_check_feature_dim(hafed_run):
    path, cfg = hafed_run
    check_feature_dim(path, D)
    check_feature_dim(cfg, D)
    check_feature_dim(load_model(path), D)
    with pytest.raises(ValueError) as err:
        check_feature_dim(path, 1280)
    msg = str(err.value)
    assert f"feature store has d=1280 but checkpoint {path} expects d={D};" in msg
    assert "re-extract" in msg and "retrain" in msg
    with pytest.raises(ValueError, match="expects d=384"):
        check_feature_dim(HAFEDConfig(), 1280)


def test_three_class_hafed_trains(tmp_path):
    source, _ = planted_bags(n_slides=60, d=D, n_classes=3, seed=1)
    cfg = HAFEDConfig(d_in=D, n_classes=3, d_hidden=32, lr=5e-3)
    path = train_model(
        HAFEDModule(cfg, seed=0),
        BagDataModule(source, "highres"),
        tmp_path,
        max_epochs=15,
        progress=False,
        cpu_threads=1,
    )
    ids, probs, labels = predict_probs(load_model(path), source, "test", "highres")
    assert probs.shape == (len(ids), 3)
    torch.testing.assert_close(torch.as_tensor(probs).sum(1), torch.ones(len(ids)))
    m = classification_metrics(probs, labels)
    assert m["auc"] > 0.8 and m["accuracy"] > 0.6, m  # chance: 0.5 and 1/3


def test_lowres_classifier_and_wandb_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_MODE", "offline")
    source, _ = planted_bags(n_slides=24, d=D, n_planted=8, seed=2)
    module = MILModule("attention_mil", D, 2, lr=3e-3, seed=0, d_hidden=16)
    path = train_model(
        module,
        BagDataModule(source, "lowres"),
        tmp_path,
        max_epochs=2,
        progress=False,
        cpu_threads=1,
        wandb={"mode": "offline", "project": "sasha-tests"},
    )
    assert load_checkpoint(path)["kind"] == "mil:attention_mil"
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert runs and any(runs[0].rglob("*.wandb"))
    ids, probs, _ = predict_probs(load_model(path), source, "test", "lowres")
    assert probs.shape == (len(ids), 2)


def test_same_seeds_reproduce_the_run(tmp_path):
    source, _ = planted_bags(n_slides=12, d=D, seed=3)
    cfg = HAFEDConfig(d_in=D, d_hidden=8, n_branches=2, lr=1e-3)
    paths = [
        train_model(
            HAFEDModule(cfg, seed=7),
            BagDataModule(source, "highres"),
            tmp_path / name,
            max_epochs=2,
            seed=7,
            progress=False,
            cpu_threads=1,
        )
        for name in ("a", "b")
    ]
    a, b = (load_checkpoint(p)["state_dict"] for p in paths)
    assert all(torch.equal(a[k], b[k]) for k in a)


def _val_epochs(path):
    """(epoch, val/score, val/loss) of every validated epoch, from the run's CSV log."""
    with open(path.parent / "logs" / "version_0" / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r["val/score"]]
    return [(int(r["epoch"]), float(r["val/score"]), float(r["val/loss"])) for r in rows]


@pytest.fixture(scope="module")
def tie_runs(tmp_path_factory):
    """One HAFED run per ``select_ties`` rule, same seed: a toy whose val split saturates."""
    source, _ = planted_bags(n_slides=40, d=D, k=4, n_patches=(20, 40), seed=1)
    cfg = HAFEDConfig(d_in=D, d_hidden=32, lr=5e-3, max_epochs=12)
    out = tmp_path_factory.mktemp("ties")
    return source, {
        rule: train_model(
            HAFEDModule(cfg, seed=0),
            BagDataModule(source, "highres"),
            out / rule,
            seed=0,
            select_ties=rule,
            progress=False,
            cpu_threads=1,
        )
        for rule in ("loss", "first")
    }


def test_ties_in_val_score_go_to_the_lowest_val_loss(tie_runs):
    source, paths = tie_runs
    epochs = _val_epochs(paths["loss"])
    assert epochs == _val_epochs(paths["first"]), "the rule must not change the training itself"
    best = max(score for _, score, _ in epochs)
    tied = [(loss, epoch) for epoch, score, loss in epochs if score == best]
    assert len(tied) >= 3, f"the toy must saturate for the test to mean anything: {epochs}"
    first_epoch = min(epoch for _, epoch in tied)
    lowest_loss, lowest_epoch = min(tied)
    assert lowest_epoch != first_epoch, "the lowest loss must come after the first tie here"

    meta = {rule: torch.load(p, weights_only=True)["meta"] for rule, p in paths.items()}
    assert meta["loss"]["select_ties"] == "loss" and meta["first"]["select_ties"] == "first"
    assert meta["loss"]["best_epoch"] == lowest_epoch
    assert meta["first"]["best_epoch"] == first_epoch  # the official rule
    assert meta["loss"]["best_tie_value"] == pytest.approx(lowest_loss, rel=1e-5)

    # the exported weights are the kept epoch's: their val CE is the one logged for it
    ids, probs, labels = predict_probs(load_model(paths["loss"]), source, "val", "highres")
    ce = -torch.log(torch.as_tensor(probs)[torch.arange(len(ids)), torch.as_tensor(labels)])
    assert float(ce.mean()) == pytest.approx(lowest_loss, rel=1e-4)


def test_patience_stops_after_that_many_epochs_without_improvement(tie_runs, tmp_path):
    """Early stopping: the same fit as without it up to the stop, which comes after exactly
    ``patience`` validated epochs without a strict improvement of val AUC + F1; the kept
    epoch is the best of those trained; the schedule still spans ``max_epochs``."""
    source, paths = tie_runs
    full = _val_epochs(paths["loss"])  # every epoch, no early stopping
    patience = 2
    path = train_model(
        HAFEDModule(HAFEDConfig(d_in=D, d_hidden=32, lr=5e-3, max_epochs=12), seed=0),
        BagDataModule(source, "highres"),
        tmp_path / "early",
        seed=0,
        patience=patience,
        progress=False,
        cpu_threads=1,
    )
    best, since = -1.0, 0
    expected_stop = None
    for epoch, score, _ in full:
        best, since = (score, 0) if score > best else (best, since + 1)
        if since == patience:
            expected_stop = epoch
            break
    assert expected_stop is not None and expected_stop < len(full) - 1, "the toy must stop early"
    stopped = _val_epochs(path)
    assert [e for e, _, _ in stopped] == list(range(expected_stop + 1))
    assert stopped == full[: expected_stop + 1]  # the same training, cut short
    meta = torch.load(path, weights_only=True)["meta"]
    assert meta["patience"] == patience and meta["epochs_trained"] == expected_stop + 1
    tied = [
        (loss, epoch) for epoch, score, loss in stopped if score == max(s for _, s, _ in stopped)
    ]
    assert meta["best_epoch"] == min(tied)[1]
    with pytest.raises(ValueError, match="patience must be >= 1"):
        train_model(
            HAFEDModule(HAFEDConfig(d_in=D, d_hidden=8), seed=0),
            BagDataModule(source, "highres"),
            tmp_path / "bad",
            patience=0,
            progress=False,
        )


def test_a_fit_stopped_early_leaves_no_resume_point_at_its_last_epoch(
    tie_runs, tmp_path, monkeypatch
):
    """A resume point written at the epoch early stopping ends would not hold the stop: a fit
    killed before its export would resume and train on, past the unkilled run's end."""
    source, _ = tie_runs
    saved_at: list[int] = []
    save = L.Trainer.save_checkpoint

    def spy(self, filepath, *args, **kwargs):
        if "resume" in str(filepath):
            saved_at.append(int(self.current_epoch))
        return save(self, filepath, *args, **kwargs)

    monkeypatch.setattr(L.Trainer, "save_checkpoint", spy)
    path = train_model(
        HAFEDModule(HAFEDConfig(d_in=D, d_hidden=32, lr=5e-3, max_epochs=12), seed=0),
        BagDataModule(source, "highres"),
        tmp_path / "early",
        seed=0,
        patience=2,
        resume_key="k",
        resume_every_s=0,  # a resume point after every epoch
        progress=False,
        cpu_threads=1,
    )
    trained = torch.load(path, weights_only=True)["meta"]["epochs_trained"]
    assert trained < 12, "the toy must stop early"
    assert saved_at == list(range(trained - 1))  # every epoch but the one it stopped at


def test_select_ties_is_checked(tmp_path):
    source, _ = planted_bags(n_slides=12, d=D, seed=3)
    with pytest.raises(ValueError, match="select_ties must be one of"):
        train_model(
            HAFEDModule(HAFEDConfig(d_in=D, d_hidden=8), seed=0),
            BagDataModule(source, "highres"),
            tmp_path,
            select_ties="last",
            progress=False,
        )


def test_fused_adamw_takes_the_loops_steps():
    """The modules' optimiser: torch's fused AdamW on the CPU, the same update as the
    per-tensor loop (to float rounding), and the loop where a parameter has no fused kernel."""
    from sasha_models.lit import fused_adamw

    torch.manual_seed(0)
    nets = [torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 3))]
    nets.append(copy.deepcopy(nets[0]))
    start = copy.deepcopy(nets[0])
    opts = [
        fused_adamw(list(nets[0].parameters()), 1e-2, 1e-3),
        torch.optim.AdamW(nets[1].parameters(), lr=1e-2, weight_decay=1e-3),
    ]
    assert opts[0].defaults["fused"] is True
    x, y = torch.randn(32, 8), torch.randint(0, 3, (32,))
    for _ in range(20):
        for net, opt in zip(nets, opts, strict=True):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(net(x), y).backward()
            opt.step()
    for a, b in zip(nets[0].parameters(), nets[1].parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert (nets[0][0].weight - start[0].weight).abs().max() > 1e-2  # 20 steps of 1e-2 moved it
    other = torch.nn.Parameter(torch.zeros(3, device="meta"))  # no fused kernel there
    assert not fused_adamw([other], 1e-3, 0.0).defaults["fused"]
