"""sasha predict --batch-slides: slides zoomed in lockstep give the records of one at a time."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from conftest import CMU_SVS
from sasha_env.agents.config import agent_name
from sasha_env.predict import Predictor, SlideRequest
from sasha_env.slides.manifest import read_manifest
from sasha_env.workdir import Workdir
from test_predict import _with_zeroed_tiles

#: what may differ between a lockstep record and the one-at-a-time record of the same slide
TIMING = "seconds"
FLOATS = ("probabilities", "probabilities_raw", "confidence")


def _slides(tiny_workdir):
    """The tiny test slides and the vendored Aperio SVS: several N (the SVS has > 100)."""
    records = read_manifest(Workdir(tiny_workdir).manifest).records
    return [r.path for r in records if r.split == "test"] + [CMU_SVS]


def _assert_same_record(got: dict, want: dict) -> None:
    """Equal apart from timing; probabilities to float rounding (the backbone's rounding
    depends on the batch an image is in)."""
    assert set(got) == set(want)
    for key in set(want) - {TIMING, "geojson", *FLOATS}:
        assert got[key] == want[key], key
    if "geojson" in want:  # written to another folder
        assert Path(got["geojson"]).name == Path(want["geojson"]).name
    for key in set(FLOATS) & set(want):
        a, b = got[key], want[key]
        if isinstance(b, dict):
            assert a.keys() == b.keys()
            a, b = list(a.values()), list(b.values())
        np.testing.assert_allclose(a, b, atol=1e-5, err_msg=key)


def _chunks(n: int, size: int) -> list[int]:
    """The sizes of ``n`` images cut into batches of ``size``."""
    return [size] * (n // size) + ([n % size] if n % size else [])


class _Counting:
    """Wraps a method of a predictor: the number of images of every call."""

    def __init__(self, predictor: Predictor, name: str):
        self.method, self.sizes = getattr(predictor, name), []
        setattr(predictor, name, self)

    def __call__(self, pixels, *args):
        self.sizes.append(len(pixels))
        return self.method(pixels, *args)


def _with_stop_threshold(workdir: Path, out: Path, frac: float, threshold: float) -> Path:
    """A copy of ``workdir`` whose budget-``frac`` agent stops at ``threshold``: the tiny run's
    own rule, fitted on 8 val slides, stops every slide after its first zoom."""
    shutil.copytree(workdir, out)
    path = Workdir(out).agent_dir(agent_name(frac)) / "adaptive.json"
    rule = json.loads(path.read_text())
    path.write_text(json.dumps({**rule, "threshold": threshold}))
    return out


@pytest.mark.parametrize("adaptive", [False, True], ids=["fixed", "adaptive"])
def test_lockstep_records_equal_one_slide_at_a_time(tiny_workdir, tmp_path, adaptive):
    frac = 0.2 if adaptive else 0.1
    paths = _slides(tiny_workdir)
    if adaptive:  # slides that stop at different steps, some confident and some at the cap
        tiny_workdir = _with_stop_threshold(tiny_workdir, tmp_path / "wd", frac, 0.9)
    alone = Predictor(tiny_workdir, frac=frac, adaptive=adaptive)
    want = [alone.predict(p, geojson=tmp_path / "alone") for p in paths]
    assert len({r["n_patches"] for r in want}) >= 3  # different sizes: ragged ends
    assert len({len(r["zoomed_coords"]) for r in want}) >= 2
    if adaptive:  # stops after 1 to 80 zooms, all before the cap
        assert len({len(r["zoomed_coords"]) for r in want}) >= 3
        assert any(r["stopped"] == "confident" for r in want)

    batched = Predictor(tiny_workdir, frac=frac, adaptive=adaptive, batch_size=256)
    zooms, forwards = _Counting(batched, "_embed_zooms"), _Counting(batched, "_embed")
    got = list(batched.predict_many(paths, geojson=tmp_path / "lockstep", batch_slides=3))
    assert [r["slide_id"] for r in got] == [r["slide_id"] for r in want]  # input order
    for g, w in zip(got, want, strict=True):
        _assert_same_record(g, w)  # zooms, bytes read, stops, fraction read
        assert g["seconds"]["total"] == pytest.approx(sum(g["seconds"].values()) / 2, abs=1e-3)
        name = f"{w['slide_id']}.geojson"
        a = json.loads((tmp_path / "lockstep" / name).read_text())
        b = json.loads((tmp_path / "alone" / name).read_text())
        assert [f["geometry"] for f in a["features"]] == [f["geometry"] for f in b["features"]]
        assert [f["properties"].get("name") for f in a["features"]] == [
            f["properties"].get("name") for f in b["features"]
        ]

    # the zooms of several slides went through the backbone together, each image once
    k = batched.grid_cfg.zoom**2
    n_zooms = sum(len(r["zoomed_coords"]) for r in want)
    assert sum(zooms.sizes) == n_zooms * k
    assert max(zooms.sizes) == 3 * k  # steps with three slides' zooms in one forward
    assert len(zooms.sizes) < n_zooms  # fewer forwards than zooms
    # the other forwards are the low-res passes, 256 images at a time; a step's forward is
    # padded to k, 2k or 3k (= B·k) images, whatever the number of slides in the step
    lowres = Counter(b for r in want for b in _chunks(r["n_patches"], 256))
    steps = Counter(forwards.sizes) - lowres
    assert steps.total() == len(zooms.sizes) and set(steps) <= {k, 2 * k, 3 * k}


def test_a_bad_slide_among_good_ones_is_reported_and_the_others_finish(
    tiny_workdir, tmp_path, capsys
):
    """One unreadable file, one whose high-res tiles break mid-episode: both get error
    records in their place, and the good slides zoomed beside them are unaffected."""
    from sasha_env.cli import main

    good = _slides(tiny_workdir)[:3]
    (tmp_path / "text.svs").write_text("not a slide")
    corrupt = _with_zeroed_tiles(good[0], tmp_path / "corrupt.tiff", level=0)  # fails at a zoom
    inputs = [good[0], tmp_path / "text.svs", corrupt, good[1], good[2]]
    code = main(["predict", "--workdir", str(tiny_workdir), "--batch-slides", "4",
                 *map(str, inputs)])  # fmt: skip
    assert code == 1
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line]
    assert [r["slide"] for r in records] == list(map(str, inputs))
    assert "not a readable whole-slide image" in records[1]["error"]
    assert "corrupt.tiff: cannot read region" in records[2]["error"]
    assert set(records[2]) == {"slide", "slide_id", "error"}
    alone = Predictor(tiny_workdir, frac=0.1)
    for record, path in zip([records[0], *records[3:]], good, strict=True):
        assert "error" not in record
        _assert_same_record(record, alone.predict(path))


def test_more_slots_than_slides(tiny_workdir):
    paths = _slides(tiny_workdir)[:2]
    predictor = Predictor(tiny_workdir, frac=0.1)
    want = [predictor.predict(p) for p in paths]
    got = list(predictor.predict_many([SlideRequest(p) for p in paths], batch_slides=16))
    for g, w in zip(got, want, strict=True):
        _assert_same_record(g, w)
    assert len(predictor._idle_envs) == 1  # the slides' buffers are not kept after the run


def test_batch_slides_below_one_is_a_usage_error(tiny_workdir, capsys):
    from sasha_env.cli import main

    slide = str(_slides(tiny_workdir)[0])
    with pytest.raises(SystemExit) as exit_:
        main(["predict", "--workdir", str(tiny_workdir), "--batch-slides", "0", slide])
    assert exit_.value.code == 2
    assert "--batch-slides: must be at least 1, got 0" in capsys.readouterr().err
    with pytest.raises(ValueError, match="batch_slides must be at least 1"):
        list(Predictor(tiny_workdir, frac=0.1).predict_many([slide], batch_slides=0))


# ------------------------------------------------------------------ the scheduler alone
D = 8  # feature dimension of the synthetic slides


class _Job:
    """A slide for :func:`run_lockstep` without pixels: records the patches it is asked to read
    (``bad_at``: its read number ``bad_at`` fails)."""

    def __init__(self, env, sid: str, reads: list, bad_at: int | None = None):
        from dataclasses import replace
        from types import SimpleNamespace

        from sasha_env.agents.lockstep import PhaseTimer, ZoomEpisode, ZoomRows

        self.sid, self.reads, self.bad_at, self.closed = sid, reads, bad_at, False
        env.reset(options={"slide_id": sid})
        data = replace(env.slide, v=ZoomRows())
        agent = SimpleNamespace(use_coords=False, actor_outputs=lambda f, visited: (f[:, 0],))
        self.episode = ZoomEpisode(env, agent, data, PhaseTimer(), scores=False)

    def read_zoom(self, a: int) -> np.ndarray:
        self.reads.append(a)
        if len(self.reads) == self.bad_at:
            raise OSError(f"{self.sid}: tile {a} unreadable")
        return np.full((1, 2, 2, 3), a, np.uint8)  # k = 1 sub-patch of 2 x 2 px

    def finish(self):
        self.closed = True
        return self.episode.result()

    def close(self) -> None:
        self.closed = True


def _lockstep(root, slides: list[str], batch_slides: int, bad: dict | None = None):
    """``({slide: EpisodeResult or exception}, {slide: patches read})``."""
    import torch

    from sasha_env.agents.lockstep import run_lockstep
    from sasha_env.envs.wsi import SashaWSIEnv

    reads: dict[str, list] = {s: [] for s in slides}
    jobs = []

    def start(sid):
        env = SashaWSIEnv(root, split=None, frac=0.5, copy_obs=False)
        jobs.append(_Job(env, sid, reads[sid], (bad or {}).get(sid)))
        return jobs[-1]

    def embed(pixels):  # (m, 2, 2, 3) uint8 → (m, D): patch a's v is a · ones
        return torch.from_numpy(pixels[:, 0, 0, :1].astype(np.float32)).expand(-1, D).clone()

    out = dict(run_lockstep(slides, start, embed, lambda f: f.mean(1), batch_slides))
    assert len(jobs) == len(slides) and all(job.closed for job in jobs)
    return {slides[i]: r for i, r in out.items()}, reads


def test_frozen_steps_read_nothing_and_a_failed_read_stops_one_slide(tmp_path):
    """With ``freeze_covered``, a slide whose first zoom covers every patch reads no other
    patch, in lockstep as alone; a read that fails mid-episode ends only its slide."""
    from sasha_env.testing import SlideSpec, lattice_cells, random_models, write_workdir

    rng = np.random.default_rng(0)
    hafed, tsu = random_models(D, tau=0.9)
    tsu.cfg.freeze_covered = True
    rows = {  # "one": collinear rows (one zoom covers them all); the others: random rows
        "one": np.outer(np.linspace(0.5, 2, 10), rng.standard_normal(D)),
        "two": rng.standard_normal((12, D)),
        "three": rng.standard_normal((6, D)),
    }
    specs = [
        SlideSpec(sid, ("tumor", "normal")[i % 2], "train", z.astype(np.float32),
                  z.astype(np.float32), lattice_cells(len(z)))
        for i, (sid, z) in enumerate(rows.items())
    ]  # fmt: skip
    root = write_workdir(tmp_path, specs, hafed, tsu, tiffs=False)
    slides = list(rows)
    alone, alone_reads = _lockstep(root, slides, batch_slides=1)
    together, reads = _lockstep(root, slides, batch_slides=3)
    assert reads == alone_reads
    assert len(reads["one"]) == 1 and len(together["one"].trace["step_probabilities"]) == 5
    assert len({len(r) for r in reads.values()}) == 3  # ragged ends
    for sid in slides:
        assert together[sid].zoomed == alone[sid].zoomed
        assert together[sid].n_read == len(reads[sid]) == len(together[sid].zoomed)
        np.testing.assert_allclose(together[sid].probabilities, alone[sid].probabilities)
    out, reads = _lockstep(root, slides, batch_slides=3, bad={"two": 2})
    assert isinstance(out["two"], OSError) and len(reads["two"]) == 2
    for sid in ("one", "three"):
        assert out[sid].zoomed == alone[sid].zoomed


def test_predict_makes_openmp_threads_wait_passively_unless_told(tmp_path, thread_policy_unset):
    """Set before torch loads OpenMP (a spinning wait made predict 10-35x slower on a shared
    CPU); a value the user set is kept, and ``SASHA_PASSIVE_THREADS=0`` turns it off."""
    import os

    from sasha_env.cli import main

    monkeypatch = thread_policy_unset
    args = ["predict", "--workdir", str(tmp_path / "none"), "slide.tiff"]
    assert main(args) == 2  # no workdir: a usage error, after the setting
    assert os.environ["OMP_WAIT_POLICY"] == "PASSIVE"
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    assert main(args) == 2
    assert os.environ["OMP_WAIT_POLICY"] == "ACTIVE"
    monkeypatch.delenv("OMP_WAIT_POLICY")
    monkeypatch.setenv("SASHA_PASSIVE_THREADS", "0")  # switched off: OpenMP's own policy
    assert main(args) == 2
    assert "OMP_WAIT_POLICY" not in os.environ
