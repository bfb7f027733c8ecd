"""Sasha-WSI-v0: construction, spaces, dynamics, rewards, illegal actions, errors, rendering."""

from __future__ import annotations

import dataclasses

import gymnasium as gym
import numpy as np
import pytest
import torch

import sasha_env  # noqa: F401 - registers Sasha-WSI-v0
from envkit import hand_models, reference_episode
from sasha_env.envs.render import GRID_RGB, UPDATED_RGB, ZOOMED_RGB
from sasha_env.envs.wsi import SashaWSIEnv, episode_budget, observation_nbytes
from sasha_env.features.store import StoreError
from sasha_env.testing import (
    CELL_PX,
    SLIDE_RGB,
    SlideSpec,
    check_env,
    lattice_cells,
    random_models,
    random_slides,
    write_workdir,
)

D = 8


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """Six random slides (4 train), d = 8, random-init HAFED and TSU (tau 0.9)."""
    hafed, tsu = random_models(D, tau=0.9)
    return write_workdir(tmp_path_factory.mktemp("env_wd"), random_slides(d=D), hafed, tsu)


def make(workdir, **kw) -> SashaWSIEnv:
    kw.setdefault("frac", 0.5)
    return gym.make("Sasha-WSI-v0", workdir=workdir, **kw).unwrapped


# ------------------------------------------------------------------ construction, spaces
def test_make_from_workdir_and_spaces(workdir):
    env = gym.make("Sasha-WSI-v0", workdir=workdir, split="train", frac=0.1)
    raw = env.unwrapped
    assert isinstance(raw, SashaWSIEnv)
    train = [s for s in random_slides(d=D) if s.split == "train"]
    P = max(len(s.z) for s in random_slides(d=D))  # the default max_patches="cohort"
    assert raw.max_patches == P and raw.d == D
    assert raw.slide_ids == [s.slide_id for s in train]
    assert env.action_space == gym.spaces.Discrete(P)
    obs, info = env.reset(seed=0)
    assert env.observation_space.contains(obs)
    assert obs["features"].shape == (P, D) and obs["features"].dtype == np.float32
    assert obs["coords"].shape == (P, 2) and obs["visited"].dtype == np.int8
    n = info["n_patches"]
    assert obs["valid"].sum() == n and not obs["visited"].any()
    np.testing.assert_array_equal(info["action_mask"], raw.action_masks())
    a = int(np.flatnonzero(info["action_mask"])[0])
    _, _, _, _, step_info = env.step(a)
    assert not step_info["action_mask"][a] and step_info["action_mask"].sum() == n - 1
    obs, info = env.reset(seed=0)
    assert np.all(obs["features"][n:] == 0) and np.all(obs["coords"] <= 1)
    assert info["budget"] == episode_budget(0.1, n) == 1
    assert raw.action_masks().dtype == bool and raw.action_masks().sum() == n
    assert observation_nbytes(P, D) == sum(v.nbytes for v in obs.values())


def test_make_from_explicit_sources(workdir):
    paths = {
        "store": workdir / "features.zarr",
        "manifest": workdir / "manifest.csv",
        "hafed": workdir / "models" / "hafed" / "model.pt",
        "tsu": workdir / "models" / "tsu" / "model.pt",
    }
    env = gym.make("Sasha-WSI-v0", split="val", frac=0.2, **paths).unwrapped
    assert env.slide_ids == ["slide04"] and env.tau == pytest.approx(0.9)
    hafed, tsu = random_models(D, tau=0.9)
    env2 = SashaWSIEnv(
        split="val", store=paths["store"], manifest=paths["manifest"], hafed=hafed, tsu=tsu, tau=0.5
    )
    assert env2.tau == 0.5 and env2.hafed is hafed
    obs1, _ = env.reset(seed=1)
    obs2, _ = env2.reset(seed=1)
    np.testing.assert_array_equal(obs1["features"], obs2["features"])


def test_budget():
    assert episode_budget(0.07, 100) == 7  # not 8: 0.07 * 100 = 7.000000000000001
    assert episode_budget(0.1, 150) == 15
    assert episode_budget(0.1, 5) == 1
    assert episode_budget(0.2, 11) == 3
    assert episode_budget(1.0, 7) == 7


def test_budget_equals_the_official_ceil_at_the_paper_budgets():
    """The official env's episode length is ``ceil(N·f)`` (envs/WSI_cosine_env.py, 6385fe6)."""
    n = np.arange(1, 20_001)
    for frac in (0.1, 0.2):
        ours = np.array([episode_budget(frac, int(k)) for k in n])
        np.testing.assert_array_equal(ours, np.ceil(n * frac).astype(int))


def test_env_checkers(workdir):
    """Gymnasium's and SB3's checkers pass; any warning but the documented ones is an error."""
    check_env(gym.make("Sasha-WSI-v0", workdir=workdir, frac=0.5))


# ------------------------------------------------------------------ dynamics
# A slide built so that the similar sets and the state are computable by hand (d = 4, tau 0.9).
Z = np.array(
    [[1, 0, 0, 0], [2, 0, 0, 0], [-1, 0.01, 0, 0], [0, 1, 0, 0], [0, 1, 0.2, 0], [0, 0, 0, 1]],
    np.float32,
)
V = np.array(
    [
        [0.5, 0.5, 0, 0],
        [0, 0.5, 0.5, 0],
        [0, 0, 0.5, 0.5],
        [0.5, 0, 0, 0.5],
        [1, 1, 1, 1],
        [-1, 0, 1, 0],
    ],
    np.float32,
)
C = np.array([0, 0, 0.1, 1], np.float32)  # the hand TSU's output, whatever its input
W = np.array([[1, 0, -1, 0], [0, 1, 0.5, 1]], np.float32)  # slide logits = W @ mean(S) + B
B = np.array([0.0, 0.1], np.float32)
ACTIONS = [0, 1, 3]
# cos(z0, z1) = 1 and |cos(z0, z2)| ≈ 0.99995: zooming 0 updates 1 and 2. Row 1 then holds C,
# and cos(C, z5) ≈ 0.995: zooming 1 updates 5 when the anchor is the state row S[1] (official
# code) but not when it is z1 (cos(z1, z5) = 0). cos(z3, z4) ≈ 0.98: zooming 3 updates 4.
EXPECTED = {
    "state": (
        [
            [V[0], C, C, Z[3], Z[4], Z[5]],
            [V[0], V[1], C, Z[3], Z[4], C],
            [V[0], V[1], C, V[3], C, C],
        ],
        [[1, 2], [2, 5], [2, 4, 5]],
    ),
    "lowres": (
        [
            [V[0], C, C, Z[3], Z[4], Z[5]],
            [V[0], V[1], C, Z[3], Z[4], Z[5]],
            [V[0], V[1], C, V[3], C, Z[5]],
        ],
        [[1, 2], [2], [2, 4]],
    ),
}


def neg_ce(S: np.ndarray, label: int = 1) -> float:
    logits = W.astype(np.float64) @ np.asarray(S, np.float64).mean(0) + B
    return float(logits[label] - np.log(np.exp(logits).sum()))


@pytest.fixture(scope="module")
def hand_workdir(tmp_path_factory):
    hafed, tsu = hand_models(4, W, B, C, tau=0.9)
    hand = SlideSpec("hand", "tumor", "train", Z, V, lattice_cells(6, cols=3))
    other = SlideSpec("other", "normal", "test", Z[:2], V[:2], lattice_cells(2))
    return write_workdir(tmp_path_factory.mktemp("hand_wd"), [hand, other], hafed, tsu)


@pytest.mark.parametrize("anchor", ["state", "lowres", "from-tsu"])
@pytest.mark.parametrize("reward", ["ce", "delta"])
def test_hand_computed_episode(hand_workdir, anchor, reward):
    if anchor == "from-tsu":  # a TSU trained with tsu.anchor: lowres carries it to every env
        from sasha_models.checkpoint import load_model

        tsu = load_model(hand_workdir / "models" / "tsu" / "model.pt")
        tsu.cfg = dataclasses.replace(tsu.cfg, anchor="lowres")
        env = make(hand_workdir, frac=0.5, tsu=tsu, reward=reward, correct_bonus=0.25)
        assert env.anchor == "lowres"
        anchor = "lowres"
    else:
        env = make(hand_workdir, frac=0.5, anchor=anchor, reward=reward, correct_bonus=0.25)
    obs, info = env.reset(seed=0)
    assert info["slide_id"] == "hand" and info["budget"] == 3 and info["label"] == 1
    np.testing.assert_allclose(env.probabilities[1], np.exp(neg_ce(Z)), rtol=1e-6)
    states, updated = EXPECTED[anchor]
    prev = neg_ce(Z)
    for t, a in enumerate(ACTIONS):
        obs, r, terminated, truncated, info = env.step(a)
        np.testing.assert_allclose(obs["features"], np.asarray(states[t], np.float32), atol=1e-6)
        assert env.updated == updated[t]
        assert obs["visited"].tolist() == [int(i in ACTIONS[: t + 1]) for i in range(6)]
        now = neg_ce(states[t])
        expected = now if reward == "ce" else now - prev
        prev = now
        if t == len(ACTIONS) - 1:
            assert terminated
            probs = np.exp([neg_ce(states[t], 0), now])
            expected += 0.25 * (int(np.argmax(probs)) == 1)
            np.testing.assert_allclose(info["probabilities"], probs, rtol=1e-5)
            assert info["zoomed"] == ACTIONS and info["updated"] == updated[t]
            assert info["zoomed_coords"] == [[0, 0], [CELL_PX, 0], [0, CELL_PX]]
            assert info["slide_id"] == "hand" and info["label"] == 1
            assert info["prediction"] == int(np.argmax(probs))
        else:
            assert not terminated
        assert not truncated and not info["illegal_action"]
        assert r == pytest.approx(expected, rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("anchor", ["state", "lowres"])
@pytest.mark.parametrize("reward", ["ce", "delta"])
def test_matches_numpy_reference(workdir, anchor, reward):
    """Random weights: states, updated sets and rewards equal a plain float64 re-implementation."""
    hafed, tsu = random_models(D, tau=0.9)  # the same weights as the workdir's checkpoints
    env = make(workdir, frac=0.6, anchor=anchor, reward=reward)
    rng = np.random.default_rng(0)
    slides = {s.slide_id: s for s in random_slides(d=D)}
    n_updates = n_updated_zooms = 0
    for sid in env.slide_ids:
        _, info = env.reset(options={"slide_id": sid})
        actions, rewards, states, sets = [], [], [], []
        for _ in range(info["budget"]):
            # zoom a TSU-updated patch when there is one: that is where the anchors differ
            updated = env.updated
            a = (
                int(rng.choice(updated))
                if updated
                else int(rng.choice(np.flatnonzero(env.action_masks())))
            )
            n_updated_zooms += bool(updated)
            _, r, *_ = env.step(a)
            actions.append(a)
            rewards.append(r)
            states.append(env.state())
            sets.append(env.updated)
        s = slides[sid]
        label = ["normal", "tumor"].index(s.label)
        ref_states, ref_sets, ref_rewards = reference_episode(
            s.z, s.v, label, actions, hafed, tsu, 0.9, anchor, reward
        )
        for t in range(len(actions)):
            np.testing.assert_allclose(states[t], ref_states[t], atol=2e-5)
            assert sets[t] == sorted(ref_sets[t] - set(actions[: t + 1]))
            n_updates += len(ref_sets[t])
        np.testing.assert_allclose(rewards, ref_rewards, rtol=1e-5, atol=1e-6)
    assert n_updates > 0 and n_updated_zooms > 0  # the TSU path was exercised


def test_incremental_equals_full(tmp_path):
    """Cached re-scoring gives the same rewards and probabilities as full recomputation."""
    d, n = 16, 300
    rng = np.random.default_rng(3)
    centres = rng.normal(size=(20, d))
    z = (centres[rng.integers(0, 20, n)] + 0.2 * rng.normal(size=(n, d))).astype(np.float32)
    v = (z + rng.normal(size=(n, d))).astype(np.float32)
    slides = [
        SlideSpec("big", "tumor", "train", z, v, lattice_cells(n, cols=20)),
        SlideSpec("small", "normal", "test", z[:3], v[:3], lattice_cells(3)),
    ]
    hafed, tsu = random_models(d, tau=0.95, seed=1, n_branches=5)
    write_workdir(tmp_path, slides, hafed, tsu, tiffs=False)
    envs = [make(tmp_path, frac=0.3, reward="delta", incremental=f) for f in (True, False)]
    assert envs[0].incremental and not envs[1].incremental
    for env in envs:
        env.reset(seed=0)
    n_rows = 0
    for _ in range(envs[0].budget):
        a = int(rng.choice(np.flatnonzero(envs[0].action_masks())))
        out = [env.step(a) for env in envs]
        assert out[0][1] == pytest.approx(out[1][1], rel=1e-5, abs=1e-6)
        np.testing.assert_allclose(envs[0].probabilities, envs[1].probabilities, rtol=1e-5)
        np.testing.assert_array_equal(out[0][0]["features"], out[1][0]["features"])
        n_rows += len(envs[0].updated)
    assert out[0][2] and out[1][2] and n_rows > 0
    np.testing.assert_allclose(out[0][4]["probabilities"], out[1][4]["probabilities"], rtol=1e-5)


def test_incremental_classifier_long_run():
    """IncrementalClassifier against classify() over many in-place row changes."""
    from sasha_models.hafed import HAFED, HAFEDConfig
    from sasha_models.incremental import IncrementalClassifier

    torch.manual_seed(0)
    hafed = HAFED(HAFEDConfig(d_in=12, n_classes=3, d_hidden=16)).eval()
    S = torch.randn(200, 12)
    inc = IncrementalClassifier(hafed)
    with torch.inference_mode():
        inc.reset(S)
        for t in range(120):
            rows = torch.randperm(200)[: 1 + t % 25]
            S[rows] = torch.randn(len(rows), 12) * (1 + 4 * (t % 7 == 0))
            got, ref = inc.update(S, rows), hafed.classify(S)
            torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))
    with pytest.raises(RuntimeError, match="eval"):
        IncrementalClassifier(hafed.train()).reset(S)


def test_same_seed_same_episode(workdir):
    def episode(seed):
        env = make(workdir, frac=0.5)
        obs, info = env.reset(seed=seed)
        env.action_space.seed(seed)
        trace = [info["slide_id"], obs["features"]]
        done = False
        while not done:
            a = env.action_space.sample(mask=env.action_masks().astype(np.int8))
            obs, r, done, _, info = env.step(a)
            trace += [a, r, obs["features"]]
        return trace

    a, b = episode(7), episode(7)
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)
    assert len({tuple(episode(s)[:1]) for s in range(8)}) > 1  # the seed picks the slide


# ------------------------------------------------------------------ illegal actions
def test_illegal_actions_end_cleanly(workdir):
    env = make(workdir, frac=0.5, illegal_penalty=-2.5)
    sizes = {s.slide_id: len(s.z) for s in random_slides(d=D) if s.split == "train"}
    obs, info = env.reset(options={"slide_id": min(sizes, key=sizes.get)})
    n, P = info["n_patches"], env.max_patches
    assert n < P
    probs0 = env.probabilities
    for t in range(info["budget"]):
        action = [P - 1, -3, 10**6][t % 3]  # padding, negative, out of range
        obs, r, terminated, truncated, info = env.step(action)
        assert r == -2.5 and info["illegal_action"] and not truncated
        assert not obs["visited"].any()
    assert terminated and info["zoomed"] == [] and info["updated"] == []
    np.testing.assert_allclose(info["probabilities"], probs0)
    with pytest.raises(RuntimeError, match="reset"):
        env.step(0)


def test_changed_rows_name_every_row_a_step_changed_and_views_track_the_state(workdir):
    """``changed_rows`` is exactly the rows whose observation changed; with ``copy_obs=False``
    the observation is the env's buffer (changed in place), with the default a fresh copy."""
    env = make(workdir, frac=1.0)
    viewing = make(workdir, frac=1.0, copy_obs=False)
    obs, info = env.reset(seed=3)
    view, _ = viewing.reset(options={"slide_id": info["slide_id"]})
    n = info["n_patches"]
    np.testing.assert_array_equal(env.changed_rows, np.arange(n))
    rng = np.random.default_rng(0)
    for _ in range(info["budget"]):
        before = {k: v.copy() for k, v in view.items()}
        action = int(rng.choice(np.flatnonzero(env.action_masks())))
        new, *_ = env.step(action)
        view_after, _, terminated, *_ = viewing.step(action)
        # the same buffer, updated in place; the terminal observation is a copy (vector envs
        # keep it in the info past the reset)
        assert (view_after["features"] is view["features"]) != terminated
        np.testing.assert_array_equal(new["features"], view_after["features"])
        assert new["features"] is not obs["features"]
        changed = np.flatnonzero(
            (before["features"] != view["features"]).any(1) | (before["visited"] != view["visited"])
        )
        assert set(changed) <= set(env.changed_rows) and action in env.changed_rows
        np.testing.assert_array_equal(env.changed_rows, viewing.changed_rows)
        obs = new
    env.reset(options={"slide_id": info["slide_id"]})
    env.step(env.max_patches - 1 if n < env.max_patches else -1)  # illegal: nothing changes
    assert env.changed_rows.size == 0


def test_zooming_twice_is_illegal(workdir):
    env = make(workdir, frac=0.5)
    env.reset(options={"slide_id": "slide01"})
    _, r1, _, _, info1 = env.step(2)
    state = env.state()
    _, r2, _, _, info2 = env.step(2)
    assert not info1["illegal_action"] and info2["illegal_action"] and r2 == -1.0
    np.testing.assert_array_equal(env.state(), state)
    assert env.zoomed == [2] and not env.action_masks()[2]


# ------------------------------------------------------------------ errors
def test_missing_checkpoints_name_the_stage(tmp_path):
    hafed, tsu = random_models(D)
    write_workdir(tmp_path / "a", random_slides(d=D), hafed, tsu, models=(), tiffs=False)
    with pytest.raises(
        FileNotFoundError, match=r"models/hafed/model\.pt is missing: run the 'hafed' stage first"
    ):
        gym.make("Sasha-WSI-v0", workdir=tmp_path / "a")
    write_workdir(tmp_path / "b", random_slides(d=D), hafed, tsu, models=("hafed",), tiffs=False)
    with pytest.raises(
        FileNotFoundError, match=r"models/tsu/model\.pt is missing: run the 'tsu' stage first"
    ):
        gym.make("Sasha-WSI-v0", workdir=tmp_path / "b")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        gym.make("Sasha-WSI-v0", workdir=tmp_path / "nowhere")


def test_missing_distilled_names_the_stage(tmp_path):
    hafed, tsu = random_models(D)
    write_workdir(tmp_path, random_slides(d=D), hafed, tsu, distilled=False, tiffs=False)
    with pytest.raises(StoreError, match="no 'distilled' array: run the 'distill' stage first"):
        gym.make("Sasha-WSI-v0", workdir=tmp_path)


def test_bad_arguments(workdir):
    hafed16, _ = random_models(16)
    with pytest.raises(ValueError, match="d=8 but checkpoint"):
        make(workdir, hafed=hafed16)
    with pytest.raises(ValueError, match="manifest"):
        SashaWSIEnv(store=workdir / "features.zarr", hafed=hafed16, tsu=hafed16)
    with pytest.raises(ValueError, match="frac"):
        make(workdir, frac=0.0)
    with pytest.raises(ValueError, match="reward"):
        make(workdir, reward="auc")
    with pytest.raises(ValueError, match="max_patches"):
        make(workdir, max_patches=3)
    env = make(workdir)
    with pytest.raises(KeyError, match="nope"):
        env.reset(options={"slide_id": "nope"})
    with pytest.raises(RuntimeError, match="reset"):
        make(workdir).step(0)


# ------------------------------------------------------------------ rendering
def test_render_colours(workdir):
    env = make(workdir, frac=0.5, render_mode="rgb_array")
    _, info = env.reset(options={"slide_id": "slide02"})
    spec = next(s for s in random_slides(d=D) if s.slide_id == "slide02")
    for _ in range(info["budget"]):
        a = int(np.flatnonzero(env.action_masks())[0])
        *_, terminated, _, info = env.step(a)
        if env.updated:
            break
    img = env.render()
    rows, cols = spec.shape
    assert img.shape == (rows * CELL_PX, cols * CELL_PX, 3) and img.dtype == np.uint8

    def centre(i):
        r, c = spec.cells[i]
        return img[r * CELL_PX + CELL_PX // 2, c * CELL_PX + CELL_PX // 2].astype(int)

    def corner(i):
        r, c = spec.cells[i]
        return img[r * CELL_PX, c * CELL_PX].tolist()

    def blend(rgb):
        return np.rint(0.5 * np.array(SLIDE_RGB) + 0.5 * np.array(rgb)).astype(int)

    zoomed, updated = env.zoomed, env.updated
    assert zoomed and updated
    for i in zoomed:
        assert np.abs(centre(i) - blend(ZOOMED_RGB)).max() <= 1 and corner(i) == list(ZOOMED_RGB)
    for i in updated:
        assert np.abs(centre(i) - blend(UPDATED_RGB)).max() <= 1 and corner(i) == list(UPDATED_RGB)
    rest = [i for i in range(len(spec.z)) if i not in zoomed and i not in updated]
    for i in rest:
        assert centre(i).tolist() == list(SLIDE_RGB) and corner(i) == list(GRID_RGB)
    assert len(env._thumbs._cache) == 1
    env.render()
    assert len(env._thumbs._cache) == 1  # the thumbnail is read once per slide


def test_cohort_max_patches_shares_spaces(workdir):
    sizes = {s.slide_id: len(s.z) for s in random_slides(d=D)}
    train = make(workdir, split="train")  # max_patches="cohort" is the default
    test = make(workdir, split="test")
    assert train.max_patches == test.max_patches == max(sizes.values())
    assert train.observation_space == test.observation_space
    _, info = train.reset(options={"slide_id": "slide05"})  # a test slide, by id
    assert info["n_patches"] == sizes["slide05"]


def test_residual_tsu_matches_reference(workdir):
    """The residual TSU variant (z_j + MLP, no output LayerNorm) goes through the same path."""
    from sasha_models.tsu import TSU, TSUConfig

    hafed, _ = random_models(D, tau=0.9)
    torch.manual_seed(5)
    tsu = TSU(TSUConfig(d=D, tau=0.9, residual=True)).eval()
    with torch.no_grad():
        tsu.net[2].weight.normal_(0, 0.3)  # the head starts at zero: make it do something
    env = SashaWSIEnv(
        split="train",
        frac=0.5,
        store=workdir / "features.zarr",
        manifest=workdir / "manifest.csv",
        hafed=hafed,
        tsu=tsu,
    )
    s = next(s for s in random_slides(d=D) if s.slide_id == "slide02")
    _, info = env.reset(options={"slide_id": s.slide_id})
    actions = []
    for _ in range(info["budget"]):
        actions.append(int(np.flatnonzero(env.action_masks())[-1]))
        env.step(actions[-1])
    states, sets, _ = reference_episode(s.z, s.v, 0, actions, hafed, tsu, 0.9)
    np.testing.assert_allclose(env.state(), states[-1], atol=2e-5)
    assert env.updated == sorted(sets[-1] - set(actions)) and sets[-1]
