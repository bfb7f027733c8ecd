"""sasha predict: the same zooms and probabilities as the cached-feature evaluation, bad input."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile

from conftest import CMU_SVS, tissue_image, write_single_level_tiff
from sasha_env.features.store import FeatureStore
from sasha_env.predict import Predictor
from sasha_env.slides.manifest import read_manifest
from sasha_env.slides.slide import Slide, SlideError
from sasha_env.workdir import Workdir
from sasha_models.calibration import read_calibrations

SASHA = [sys.executable, "-m", "sasha_env.cli"]


def _test_slides(wd: Workdir):
    return [r for r in read_manifest(wd.manifest).records if r.split == "test"]


def test_predict_matches_cached_evaluation(tiny_workdir):
    wd = Workdir(tiny_workdir)
    store = FeatureStore(wd.store)
    episodes = {
        e["slide_id"]: e for e in json.loads((wd.root / "episodes" / "sasha-0.1.json").read_text())
    }
    predictor = Predictor(wd.root, frac=0.1)
    calibration = read_calibrations(wd.calibration, "temperature+bias")["sasha@0.1"]  # default
    for record in _test_slides(wd):
        out = predictor.predict(record.path)
        ep = episodes[record.slide_id]
        coords = store.read(record.slide_id, "coords")
        assert out["zoomed_coords"] == coords[ep["zoomed"]].tolist()  # the same patches, in order
        raw = [out["probabilities_raw"][c] for c in predictor.class_names]
        np.testing.assert_allclose(raw, ep["probabilities"], atol=1e-4)
        probs = [out["probabilities"][c] for c in predictor.class_names]  # val-calibrated
        assert out["calibrated"] and out["calibration"]["temperature"] == calibration.temperature
        np.testing.assert_allclose(probs, calibration.apply(np.array(raw)), atol=1e-5)
        assert out["label"] == predictor.class_names[int(np.argmax(probs))]
        assert out["frac_read"] == pytest.approx(len(ep["zoomed"]) / out["n_patches"])
        assert out["n_patches"] == store.slide_info(record.slide_id).n_patches
        assert {
            "tissue",
            "read_lowres",
            "embed_lowres",
            "read_highres",
            "embed_highres",
            "agent",
        } <= set(out["seconds"])


def test_full_mode_matches_hafed_on_stored_features(tiny_workdir):
    import torch

    from sasha_models.checkpoint import load_model

    wd = Workdir(tiny_workdir)
    hafed = load_model(wd.model("hafed"))
    store = FeatureStore(wd.store)
    predictor = Predictor(wd.root, full=True, calibration=None)
    record = _test_slides(wd)[0]
    out = predictor.predict(record.path)
    with torch.inference_mode():
        logits = hafed(torch.from_numpy(store.read(record.slide_id, "highres")).unsqueeze(0))[
            "slide_logits"
        ][0]
    expected = torch.softmax(logits, -1).numpy()
    np.testing.assert_allclose(
        [out["probabilities"][c] for c in predictor.class_names], expected, atol=1e-4
    )
    assert out["frac_read"] == 1.0 and out["zoomed_coords"] == []
    assert not out["calibrated"] and "probabilities_raw" not in out
    kind = "temperature+bias"
    calibrated = Predictor(wd.root, full=True, calibration=kind).predict(record.path)
    hafed_cal = read_calibrations(wd.calibration, kind)["hafed@1"]
    np.testing.assert_allclose(
        [calibrated["probabilities"][c] for c in predictor.class_names],
        hafed_cal.apply(expected),
        atol=1e-5,
    )


def test_a_learned_stop_agent_stops_where_its_evaluation_stops(tiny_workdir, tmp_path, capsys):
    """``--learned-stop``: the agent's own stop logit (pooled actor rows and the fraction
    read), computed row by row from the kept outputs, ends each slide where the evaluation's
    full forward on stored features does, with the same zooms, stop kinds and calibration."""
    import torch
    import yaml

    from sasha_env.agents.config import AgentConfig
    from sasha_env.agents.envs import load_agent
    from sasha_env.agents.episodes import agent_policy, run_episodes
    from sasha_env.agents.export import POLICY_WEIGHTS
    from sasha_env.agents.train import train_agent
    from sasha_env.cli import main
    from sasha_env.pipeline.calibrate import calibrate_workdir

    root = tmp_path / "wd"
    shutil.copytree(tiny_workdir, root)
    wd = Workdir(root)
    slide = _test_slides(wd)[0].path
    # no learned-stop agent yet: the error says how to train one
    assert main(["predict", "--workdir", str(root), "--learned-stop", str(slide)]) == 2
    assert "agents: {stop: learned}" in capsys.readouterr().err
    assert (
        main(["predict", "--workdir", str(root), "--learned-stop", "--adaptive", str(slide)]) == 2
    )
    assert "not go with --adaptive" in capsys.readouterr().err

    config = yaml.safe_load(wd.config.read_text())
    config["agents"] = {**config["agents"], "stop": "learned", "zoom_cost": 0.02}
    cfg = AgentConfig.from_dict(config["agents"])
    train_agent(wd, 0.5, cfg, seed=0, progress=False, learned_stop=True)
    agent = load_agent(wd, 0.5, learned_stop=True)
    net = agent.policy.net  # stop near 30 % read, moved by the rows its attention picks
    head = net.actor_stop
    with torch.no_grad():
        net.actor_stop_attn.w.weight.mul_(200.0)  # a peaked pooling, not the near-uniform start
        head.weight[0, :-1] = torch.randn(
            head.weight.shape[1] - 1, generator=torch.Generator().manual_seed(0)
        )
        head.weight[0, -1] = 40.0
        head.bias.fill_(-40.0 * 0.3)
    torch.save(agent.policy.state_dict(), agent.path / POLICY_WEIGHTS)
    calibrate_workdir(
        wd, {**config, "agents": {**config["agents"], "fracs": [0.5]}}, log=lambda m: None
    )

    stopper = load_agent(wd, 0.5, learned_stop=True)
    ids = [r.slide_id for r in _test_slides(wd)]
    episodes = run_episodes(stopper.make_env(wd, "test", cfg), agent_policy(stopper.policy), ids)
    store = FeatureStore(wd.store)
    predictor = Predictor(wd.root, frac=0.5, learned_stop=True)
    calibration = read_calibrations(wd.calibration, "temperature+bias")["sasha_learned_stop@0.5"]
    for record, ep in zip(_test_slides(wd), episodes, strict=True):
        out = predictor.predict(record.path)
        coords = store.read(record.slide_id, "coords")
        assert out["zoomed_coords"] == coords[ep["zoomed"]].tolist()
        assert out["stopped"] == ep["stopped"] and "referred" not in out
        assert out["mode"] == "sasha-learned-stop-0.5"
        assert out["frac_read"] == pytest.approx(len(ep["zoomed"]) / out["n_patches"])
        raw = [out["probabilities_raw"][c] for c in predictor.class_names]
        np.testing.assert_allclose(raw, ep["probabilities"], atol=1e-4)
        assert out["calibration"]["temperature"] == calibration.temperature
    stops = [ep["stopped"] for ep in episodes]
    assert "learned" in stops  # the stop logit decided, on slides of different sizes
    assert len({len(ep["zoomed"]) / ep["n_patches"] for ep in episodes}) > 1


def test_predict_runs_the_workdirs_algorithm_and_any_sb3_network(tiny_workdir, tmp_path):
    """A workdir trained with ``agents.algo: dqn``: predict takes ``agents/dqn-<f>`` (not the
    default algorithm's folder) and its Q-network, which acts on the whole observation at
    every step, zooms where the evaluation's episodes do."""
    import yaml

    from sasha_env.agents.config import AgentConfig
    from sasha_env.agents.envs import load_agent
    from sasha_env.agents.episodes import agent_policy, run_episodes
    from sasha_env.agents.train import train_agent

    root = tmp_path / "wd"
    shutil.copytree(tiny_workdir, root)
    wd = Workdir(root)
    config = yaml.safe_load(wd.config.read_text())
    config["agents"] = {**config["agents"], "algo": "dqn", "total_timesteps": 256}
    wd.config.write_text(yaml.safe_dump(config))
    cfg = AgentConfig.from_dict(config["agents"])
    train_agent(wd, 0.1, cfg, seed=0, progress=False)
    shutil.rmtree(wd.agent_dir("sasha-0.1"))  # only the DQN agent is left to take
    agent = load_agent(wd, 0.1, "dqn")
    records = _test_slides(wd)[:3]
    episodes = run_episodes(
        agent.make_env(wd, "test", cfg), agent_policy(agent.policy), [r.slide_id for r in records]
    )
    store = FeatureStore(wd.store)
    predictor = Predictor(wd.root, frac=0.1, calibration=None)
    assert predictor.policy is not None and not hasattr(predictor.policy, "actor_outputs")
    for record, ep in zip(records, episodes, strict=True):
        out = predictor.predict(record.path)
        assert out["zoomed_coords"] == store.read(record.slide_id, "coords")[ep["zoomed"]].tolist()
        probs = [out["probabilities"][c] for c in predictor.class_names]
        np.testing.assert_allclose(probs, ep["probabilities"], atol=1e-4)
    # its input has a fixed size: a slide with more patches is refused, saying why
    with pytest.raises(ValueError, match="more than the .* dqn agent's network reads"):
        predictor.predict(CMU_SVS)
    # a DQN learned-stop agent (its policy has no stop_action of its own): the env's stop
    stop_cfg = AgentConfig.from_dict({**config["agents"], "stop": "learned"})
    train_agent(wd, 0.5, stop_cfg, seed=0, progress=False, learned_stop=True)
    stopper = load_agent(wd, 0.5, "dqn", learned_stop=True)
    ids = [r.slide_id for r in records]
    episodes = run_episodes(
        stopper.make_env(wd, "test", stop_cfg), agent_policy(stopper.policy), ids
    )
    learned = Predictor(wd.root, frac=0.5, calibration=None, learned_stop=True)
    for record, ep in zip(records, episodes, strict=True):
        out = learned.predict(record.path)
        assert out["zoomed_coords"] == store.read(record.slide_id, "coords")[ep["zoomed"]].tolist()
        assert out["stopped"] == ep["stopped"]


def test_predict_on_a_real_aperio_slide(tiny_workdir, tmp_path):
    """The vendored CC0 CMU SVS: a scanner's file, not one ``sasha synth`` wrote."""
    wd = Workdir(tiny_workdir)
    sasha = Predictor(wd.root, frac=0.1).predict(CMU_SVS, picture=tmp_path / "cmu.png")
    full = Predictor(wd.root, full=True).predict(CMU_SVS)
    assert sasha["n_patches"] == full["n_patches"] > 100  # more than any training slide had
    n_zoomed = len(sasha["zoomed_coords"])
    assert n_zoomed == int(np.ceil(0.1 * sasha["n_patches"]))
    assert sasha["frac_read"] == pytest.approx(n_zoomed / sasha["n_patches"])
    assert len({tuple(c) for c in sasha["zoomed_coords"]}) == n_zoomed  # no patch twice
    with Slide(CMU_SVS) as slide:
        width, height = slide.dimensions
    for x, y in sasha["zoomed_coords"]:
        assert 0 <= x < width and 0 <= y < height
    for record in (sasha, full):
        assert sum(record["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
    assert (tmp_path / "cmu.png").stat().st_size > 0


def _probs(record, predictor):
    return [record["probabilities"][c] for c in predictor.class_names]


@pytest.mark.parametrize("mode", [dict(frac=0.1), dict(full=True)], ids=["sasha", "full"])
def test_records_depend_neither_on_batch_size_nor_on_earlier_slides(tiny_workdir, mode):
    wd = Workdir(tiny_workdir)
    first, second = (r.path for r in _test_slides(wd)[:2])
    fresh = Predictor(wd.root, batch_size=256, **mode)
    ref = fresh.predict(first)
    reused = Predictor(wd.root, batch_size=3, **mode)  # batches straddle patches (k = 4)
    reused.predict(second)
    out = reused.predict(first)
    np.testing.assert_allclose(_probs(out, reused), _probs(ref, fresh), atol=1e-5)
    assert out["zoomed_coords"] == ref["zoomed_coords"]
    assert out["frac_read"] == ref["frac_read"]
    # the baseline reads no low-res view; SASHA reads it once per patch
    assert ("read_lowres" in out["seconds"]) == ("frac" in mode)


def test_a_batch_size_below_one_is_refused(tiny_workdir, capsys):
    from sasha_env.cli import main

    slide = _test_slides(Workdir(tiny_workdir))[0].path
    assert main(["predict", "--workdir", str(tiny_workdir), "--batch-size", "0", str(slide)]) == 2
    assert "batch_size must be at least 1, got 0" in capsys.readouterr().err


@pytest.mark.parametrize("frac", ["0", "-0.1", "1.5", "ten"])
def test_a_zoom_budget_outside_0_1_is_a_usage_error(frac, tmp_path, capsys):
    """Refused while parsing, naming the value, before any workdir or slide is read."""
    from sasha_env.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["predict", "--workdir", str(tmp_path / "none"), "--frac", frac, "slide.tiff"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "--frac" in err and frac in err
    assert "missing" not in err  # not "agents/sasha-... is missing"


def test_slide_ids_are_unique_across_the_inputs():
    from sasha_env.predict import unique_slide_ids

    paths = [Path("a/slide.tiff"), Path("b/slide.tiff"), Path("one.svs"), Path("x/two.tiff")]
    assert unique_slide_ids(paths) == ["a_slide", "b_slide", "one", "two"]
    assert unique_slide_ids([Path("d/s.tif"), Path("d/s.tiff")]) == ["d_s", "d_s-2"]
    # a manifest's id is kept as given; a file named like it gets a prefix instead
    assert unique_slide_ids([Path("m/s.tif"), Path("n/s.tif")], ["s", None]) == ["s", "n_s"]


def test_two_slides_with_one_file_name_keep_their_own_outputs(tiny_workdir, tmp_path, capsys):
    """`a/slide.tiff` and `b/slide.tiff` get their own id, GeoJSON and picture."""
    from sasha_env.cli import main

    source = _test_slides(Workdir(tiny_workdir))[0].path
    inputs = []
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        inputs.append(tmp_path / folder / "slide.tiff")
        shutil.copy(source, inputs[-1])
    geo, pics = tmp_path / "geojson", tmp_path / "pictures"
    code = main(["predict", "--workdir", str(tiny_workdir), *map(str, inputs),
                 "--geojson", str(geo), "--pictures", str(pics)])  # fmt: skip
    assert code == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line]
    assert [r["slide_id"] for r in records] == ["a_slide", "b_slide"]
    assert sorted(p.name for p in geo.iterdir()) == ["a_slide.geojson", "b_slide.geojson"]
    assert sorted(p.name for p in pics.iterdir()) == ["a_slide.png", "b_slide.png"]


def test_default_batch_size_keeps_a_cpu_batch_in_cache():
    import torch

    from sasha_env.predict import default_batch_size

    assert default_batch_size(224, torch.device("cpu")) == 4
    assert default_batch_size(32, torch.device("cpu")) == 196  # 49x smaller images
    assert default_batch_size(16, torch.device("cpu")) == 256  # clipped
    assert default_batch_size(448, torch.device("cpu")) == 4
    assert default_batch_size(224, torch.device("cuda")) == 256


def test_slide_at_another_mpp_is_read_at_the_cohort_resolution(tiny_workdir, tmp_path):
    wd = Workdir(tiny_workdir)
    record = _test_slides(wd)[0]
    with Slide(record.path) as s:
        img = s.read_rect(0, 0, *s.dimensions, 1.0)
    big = np.repeat(np.repeat(img, 2, axis=0), 2, axis=1)  # the same tissue scanned at 0.25 um/px
    path = write_single_level_tiff(tmp_path / "hires.tif", big, mpp=0.25)
    predictor = Predictor(wd.root, frac=0.1)
    out = predictor.predict(path)
    assert "note" not in out  # the grid is fixed in um/px: nothing to adjust
    assert out["n_patches"] == pytest.approx(
        FeatureStore(wd.store).slide_info(record.slide_id).n_patches, rel=0.2
    )
    # the same file without mpp metadata: an error naming --mpp; with --mpp, the same grid
    bare = write_single_level_tiff(tmp_path / "bare.tif", big, mpp=None)
    with pytest.raises(SlideError, match=r"bare.tif: no usable mpp metadata.*--mpp"):
        predictor.predict(bare)
    assumed = Predictor(wd.root, frac=0.1, mpp=0.25).predict(bare)
    assert assumed["n_patches"] == out["n_patches"]
    assert assumed["note"] == "slide read as 0.25 um/px at level 0 (assumed)"
    assert predictor.predict(bare, mpp=0.25)["zoomed_coords"] == assumed["zoomed_coords"]


def _with_zeroed_tiles(src, dst, level: int):
    """A copy of ``src`` whose pyramid level ``level`` has every tile's bytes zeroed."""
    data = bytearray(src.read_bytes())
    with tifffile.TiffFile(src) as tif:
        page = tif.series[0].levels[level].keyframe
        for offset, count in zip(page.dataoffsets, page.databytecounts, strict=True):
            data[offset : offset + count] = bytes(count)
    dst.write_bytes(bytes(data))
    return dst


def test_bad_slides_get_error_records_and_the_batch_goes_on(tiny_workdir, tmp_path):
    wd = Workdir(tiny_workdir)
    good = _test_slides(wd)[0].path
    (tmp_path / "text.svs").write_text("not a slide")
    blank = write_single_level_tiff(tmp_path / "blank.tif", np.full((256, 256, 3), 241, np.uint8))
    small = write_single_level_tiff(tmp_path / "small.tif", np.full((20, 20, 3), 120, np.uint8))
    bare = write_single_level_tiff(tmp_path / "bare.tif", tissue_image(256, 256), mpp=None)
    corrupt = _with_zeroed_tiles(good, tmp_path / "corrupt.tiff", level=0)
    cmd = [
        *SASHA,
        "predict",
        "--workdir",
        str(wd.root),
        str(tmp_path / "text.svs"),
        str(blank),
        str(small),
        str(corrupt),
        str(bare),
        str(good),
    ]
    cmd += ["--pictures", str(tmp_path / "pics")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr[-2000:]
    records = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(records) == 6
    assert "not a readable whole-slide image" in records[0]["error"]
    assert "no tissue" in records[1]["error"]
    assert "smaller than one low-res patch" in records[2]["error"]
    assert "corrupt.tiff: cannot read region" in records[3]["error"]
    assert "level 0" in records[3]["error"]
    assert "bare.tif: no usable mpp metadata" in records[4]["error"]  # never a silent guess
    assert "--mpp" in records[4]["error"]
    assert "error" not in records[5] and records[5]["label"] in ("normal", "tumor")
    assert (tmp_path / "pics" / f"{good.stem}.png").is_file()


def test_bytes_read_counts_the_compressed_tiles_the_reader_fetched(tmp_path):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (256, 256, 3), dtype=np.uint8)
    path = write_single_level_tiff(tmp_path / "s.tiff", image)  # 64 px tiles, zlib
    counts = tifffile.TiffFile(path).pages[0].databytecounts  # 4 x 4 tiles, row-major
    with Slide(path) as slide:
        assert slide.bytes_read > 0  # the TIFF's structure, read on opening
        before = slide.bytes_read
        slide.read_rect(32, 32, 64, 64, 1.0)  # touches tiles (0,0) (0,1) (1,0) (1,1)
        assert slide.bytes_read - before == sum(counts[i] for i in (0, 1, 4, 5))
        before = slide.bytes_read
        slide.read_rect(130, 0, 120, 70, 1.0)  # rows 0-1, columns 2-3
        assert slide.bytes_read - before == sum(counts[i] for i in (2, 3, 6, 7))


def test_adaptive_predict_stops_as_evaluation_did_and_reads_fewer_bytes(tiny_workdir):
    wd = Workdir(tiny_workdir)
    saved = {
        e["slide_id"]: e
        for e in json.loads((wd.root / "episodes" / "sasha_adaptive-0.2.json").read_text())
    }
    adaptive = Predictor(wd.root, frac=0.2, adaptive=True)
    records = _test_slides(wd)
    for record in records:
        a = adaptive.predict(record.path)
        ep = saved[record.slide_id]
        assert a["mode"] == "sasha-adaptive-0.2"
        assert (a["stopped"], a["referred"]) == (ep["stopped"], ep["referred"])
        assert len(a["zoomed_coords"]) == len(ep["zoomed"])
        assert a["fraction_read"] == pytest.approx(ep["frac_read"])
    # bytes: the same low-res pass, fewer high-res tiles than the fixed budget, than --full
    f = Predictor(wd.root, frac=0.2).predict(records[0].path)
    h = Predictor(wd.root, full=True).predict(records[0].path)
    for r in (a, f, h):
        assert r["bytes_read"] == sum(r["bytes_read_phases"].values()) > 0
    a = adaptive.predict(records[0].path)
    assert a["bytes_read_phases"]["lowres"] == f["bytes_read_phases"]["lowres"]
    assert a["bytes_read_phases"]["highres"] <= f["bytes_read_phases"]["highres"]
    assert f["bytes_read_phases"]["highres"] < h["bytes_read_phases"]["highres"]
    assert "stopped" not in f and "stopped" not in h


def test_adaptive_needs_a_stop_rule_and_refuses_full(tiny_workdir, tmp_path):
    wd = tmp_path / "wd"
    shutil.copytree(tiny_workdir, wd)
    (wd / "agents" / "sasha-0.2" / "adaptive.json").unlink()
    with pytest.raises(FileNotFoundError, match="calibrate"):
        Predictor(wd, frac=0.2, adaptive=True)
    with pytest.raises(ValueError, match="--full"):
        Predictor(wd, full=True, adaptive=True)
