"""SashaVecEnv: E envs stepped as one vectorised operation, equal to E single envs step by step.

Floats are compared within :data:`RTOL` relative (batched products round differently in the
last bits); everything discrete (episode ends, masks, illegal and frozen steps, slides, zoomed
and updated patches, predictions) exactly.
"""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium.vector import AutoresetMode
from stable_baselines3.common.monitor import Monitor
from stable_baselines3.common.vec_env import DummyVecEnv

import sasha_env
from sasha_env import SashaVecEnv, SashaVectorEnv
from sasha_env.agents.config import AgentConfig
from sasha_env.agents.envs import training_env
from sasha_env.envs.vector import UnsupportedOption
from sasha_env.envs.wsi import SashaWSIEnv
from sasha_env.testing import random_models, random_slides, write_workdir
from sasha_models.incremental import IncrementalClassifier
from sasha_models.incremental_batch import BatchedIncrementalClassifier, segment_outer
from sasha_models.projection import fit_obs_projection
from sasha_models.stopping import StopRule

D = 8
E = 3
RTOL, ATOL = 1e-5, 1e-6
KEYS = ("features", "visited", "valid", "coords")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """Eight random slides (6 train, N from 5 to 12: padding matters), d = 8, TSU tau 0.9."""
    hafed, tsu = random_models(D, tau=0.9)
    slides = random_slides(n_slides=8, d=D, splits=("train",) * 3 + ("val",) + ("train",) * 3)
    return write_workdir(tmp_path_factory.mktemp("vec_wd"), slides, hafed, tsu, tiffs=False)


def _dummy(workdir, n, **kw):
    """What the agents stage trained on before: Monitor-wrapped single envs in a DummyVecEnv."""
    return DummyVecEnv([lambda: Monitor(SashaWSIEnv(workdir, **kw)) for _ in range(n)])


def _assert_obs(got, want, msg=""):
    np.testing.assert_allclose(got["features"], want["features"], RTOL, ATOL, err_msg=msg)
    for key in KEYS[1:]:
        np.testing.assert_array_equal(got[key], want[key], err_msg=f"{msg} {key}")


def _assert_info(got, want, msg=""):
    assert set(got) == set(want), msg
    for key, value in want.items():
        if key == "terminal_observation":
            _assert_obs(got[key], value, f"{msg} {key}")
        elif key == "probabilities":
            np.testing.assert_allclose(got[key], value, RTOL, ATOL, err_msg=msg)
        elif key == "episode":
            assert got[key]["l"] == value["l"], msg
            assert got[key]["r"] == pytest.approx(value["r"], rel=RTOL, abs=1e-5), msg
        elif isinstance(value, np.ndarray):
            np.testing.assert_array_equal(got[key], value, err_msg=f"{msg} {key}")
        else:
            assert got[key] == value, f"{msg} {key}: {got[key]!r} != {value!r}"


def _actions(rng, masks, n_patches, illegal=0.25):
    """A legal action per env, or now and then an illegal one: a zoomed patch, padding, or out
    of range."""
    out = []
    for mask, n in zip(masks, n_patches, strict=True):
        if rng.random() < illegal or not mask.any():
            visited = np.flatnonzero(~mask[:n])
            choices = [-1, len(mask) + 3, *([n] if n < len(mask) else []), *visited[:1]]
            out.append(int(rng.choice(choices)))
        else:
            out.append(int(rng.choice(np.flatnonzero(mask))))
    return np.array(out)


def drive(vec, ref, steps, seed=0, illegal=0.25):
    """Step both vector envs with the same actions and compare everything; returns counts."""
    rng = np.random.default_rng(seed)
    vec.seed(seed)
    ref.seed(seed)
    obs, want = vec.reset(), ref.reset()
    _assert_obs(obs, want, "reset")
    for e in range(vec.num_envs):
        _assert_info(vec.reset_infos[e], ref.reset_infos[e], f"reset info {e}")
    seen = {"done": 0, "illegal": 0, "frozen": 0, "updated": 0, "stopped": 0}
    for t in range(steps):
        masks = np.stack(vec.env_method("action_masks"))
        np.testing.assert_array_equal(masks, np.stack(ref.env_method("action_masks")))
        np.testing.assert_array_equal(masks, vec.action_masks())
        actions = _actions(rng, masks, [s.n for s in vec.get_attr("slide")], illegal)
        obs, rewards, dones, infos = vec.step(actions)
        want, want_rewards, want_dones, want_infos = ref.step(actions)
        msg = f"step {t}, actions {actions}"
        np.testing.assert_array_equal(dones, want_dones, err_msg=msg)
        assert rewards.dtype == want_rewards.dtype == np.float32
        np.testing.assert_allclose(rewards, want_rewards, RTOL, ATOL, err_msg=msg)
        _assert_obs(obs, want, msg)
        for e in range(vec.num_envs):
            _assert_info(infos[e], want_infos[e], f"{msg} env {e}")
            if dones[e]:
                _assert_info(vec.reset_infos[e], ref.reset_infos[e], f"{msg} reset {e}")
                seen["updated"] += len(infos[e]["updated"])
        changed = ref.get_attr("changed_rows")
        for e, rows in enumerate(vec.get_attr("changed_rows")):
            if not dones[e]:
                np.testing.assert_array_equal(rows, changed[e], err_msg=msg)
        seen["done"] += int(dones.sum())
        seen["illegal"] += sum(info["illegal_action"] for info in infos)
        seen["frozen"] += sum(info["frozen"] for info in infos)
        seen["stopped"] += sum(info.get("stopped") == "learned" for info in infos)
    return seen


CASES = {
    "default": {},
    "delta, bonus, lowres anchor": {"reward": "delta", "correct_bonus": 0.5, "anchor": "lowres"},
    "frozen when covered": {"frac": 0.9, "tau": 0.5, "freeze_covered": True},
    "full re-scoring": {"incremental": False, "illegal_penalty": -2.0},
    "max_patches 16": {"max_patches": 16, "reward": "delta"},
    "learned stop": {"stop_action": True, "zoom_cost": 0.05},
    "learned stop, delta": {"stop_action": True, "zoom_cost": 0.02, "reward": "delta"},
}


@pytest.mark.parametrize("case", list(CASES))
def test_equals_single_envs_in_a_dummy_vec_env(workdir, case):
    """Same actions (legal, zoomed, padding, out of range) → the same observations, rewards,
    episode ends, auto-resets, masks, changed rows and infos as Monitor-wrapped single envs in
    SB3's DummyVecEnv (the agents stage's vector env before)."""
    kw = {"split": "train", "frac": 0.5, **CASES[case]}
    vec, ref = SashaVecEnv(E, workdir, **kw), _dummy(workdir, E, **kw)
    seen = drive(vec, ref, steps=40, seed=len(case))
    assert seen["done"] >= 2 * E and seen["illegal"] > 0 and seen["updated"] > 0, seen
    if kw.get("freeze_covered"):
        assert seen["frozen"] > 0, seen
    if kw.get("stop_action"):
        assert seen["stopped"] > 0 and vec.action_space.n == vec.get_attr("max_patches")[0] + 1
    # a padded, unequal cohort: episodes ran on slides of different N
    assert len({info["n_patches"] for info in vec.reset_infos}) > 1 or seen["done"] > E


@pytest.mark.parametrize("copy_obs", [True, False])
def test_projection_and_copies(workdir, copy_obs):
    """Observations through a projection, handed out fresh or from two alternating buffers:
    with ``copy_obs=False`` an observation stays as it was through the next step (SB3 stores
    it after stepping)."""
    rows = np.concatenate([s.z for s in random_slides(n_slides=8, d=D)])
    proj = fit_obs_projection(rows, 3)
    kw = {"split": "train", "frac": 0.5, "obs_projection": proj}
    vec = SashaVecEnv(E, workdir, copy_obs=copy_obs, **kw)
    ref = _dummy(workdir, E, **kw)
    assert vec.observation_space["features"].shape == (vec.get_attr("max_patches")[0], 3)
    drive(vec, ref, steps=12, seed=1)
    vec.seed(0)
    last = vec.reset()
    kept = {key: value.copy() for key, value in last.items()}
    for _ in range(6):
        obs, _, _, _ = vec.step(np.stack([np.flatnonzero(m)[0] for m in vec.action_masks()]))
        for key in KEYS:  # the previous observation, untouched by this step
            np.testing.assert_array_equal(last[key], kept[key])
        assert (obs is last) is False
        last, kept = obs, {key: value.copy() for key, value in obs.items()}


def test_seeds_and_slide_draws_match_single_envs(workdir):
    """Env e draws the slides of a single env reset with seed + e, reset after reset."""
    vec = SashaVecEnv(E, workdir, frac=1.0)
    singles = [SashaWSIEnv(workdir, frac=1.0) for _ in range(E)]
    vec.seed(7)
    vec.reset()
    drawn = [[info["slide_id"]] for info in vec.reset_infos]
    want = [[env.reset(seed=7 + e)[1]["slide_id"]] for e, env in enumerate(singles)]
    for _ in range(3):
        for e in range(E):
            vec.reset_infos[e] = vec.reset_env(e)
            drawn[e].append(vec.reset_infos[e]["slide_id"])
            want[e].append(singles[e].reset()[1]["slide_id"])
    assert drawn == want
    assert len({s for ids in drawn for s in ids}) > 1
    vec.set_options({"slide_id": "slide02"})
    vec.reset()
    assert [info["slide_id"] for info in vec.reset_infos] == ["slide02"] * E


def test_sb3_vec_env_api(workdir):
    vec = SashaVecEnv(2, workdir, frac=0.5)
    vec.seed(0)
    obs = vec.reset()
    P = vec.action_space.n
    assert vec.observation_space.contains({k: v[0] for k, v in obs.items()})
    assert obs["features"].shape == (2, P, D) and obs["visited"].dtype == np.int8
    assert vec.env_is_wrapped(Monitor) == [True, True]
    assert vec.env_is_wrapped(gym.wrappers.TimeLimit) == [False, False]
    assert vec.get_attr("frac") == [0.5, 0.5] and vec.has_attr("action_masks")
    assert not vec.has_attr("no_such_thing")
    assert vec.get_attr("slide", indices=1)[0].slide_id == vec.reset_infos[1]["slide_id"]
    np.testing.assert_array_equal(
        vec.env_method("state", indices=0)[0], obs["features"][0][: vec.reset_infos[0]["n_patches"]]
    )
    vec.set_attr("illegal_penalty", -3.0)
    _, rewards, _, infos = vec.step(np.array([-1, -1]))
    assert all(info["illegal_action"] for info in infos) and list(rewards) == [-3.0, -3.0]
    with pytest.raises(ValueError, match="shared"):
        vec.set_attr("tau", 0.5, indices=0)
    with pytest.raises(ValueError, match="fixed"):
        vec.set_attr("max_patches", 4)
    vec.set_attr("note", "x", indices=1)
    assert vec.get_attr("note", indices=1) == ["x"]
    vec.close()


def test_unsupported_options_raise(workdir):
    with pytest.raises(UnsupportedOption, match="render_mode"):
        SashaVecEnv(2, workdir, render_mode="rgb_array")
    with pytest.raises(ValueError, match="stop_rule"):
        SashaVecEnv(2, workdir, stop_rule=StopRule(0.9))
    vec = SashaVecEnv(2, workdir)
    with pytest.raises(UnsupportedOption, match="slide_data"):
        vec.reset_env(0, options={"slide_data": object()})
    with pytest.raises(RuntimeError, match="reset"):
        vec.step(np.array([0, 0]))


def test_maskable_ppo_learns_on_it(workdir):
    """MaskablePPO with the SASHA policy trains on it and acts only on legal patches."""
    from sb3_contrib import MaskablePPO
    from stable_baselines3.common.callbacks import BaseCallback

    from sasha_models.policy import SashaActorCriticPolicy

    class Illegal(BaseCallback):
        count = 0

        def _on_step(self) -> bool:
            Illegal.count += sum(info["illegal_action"] for info in self.locals["infos"])
            return True

    vec = SashaVecEnv(4, workdir, frac=0.5, copy_obs=False)
    model = MaskablePPO(
        SashaActorCriticPolicy, vec, n_steps=32, batch_size=64, n_epochs=2, seed=0,
        policy_kwargs={"d_hidden": 16},
    )  # fmt: skip
    model.learn(total_timesteps=320, callback=Illegal())
    assert model.num_timesteps >= 320 and Illegal.count == 0
    assert len(model.ep_info_buffer) > 0  # Monitor's statistics reached SB3's logger


def test_agents_stage_uses_it_by_default(workdir, monkeypatch):
    """``agents.vec_env`` defaults to ``sasha``: the same slides for the same seed as the
    ``dummy`` it replaces; an option it cannot batch falls back to DummyVecEnv."""
    cfg = AgentConfig(n_envs=2)
    assert cfg.vec_env == "sasha"
    vec, frac, _, _ = training_env(workdir, 0.5, cfg, seed=3)
    dummy, _, _, _ = training_env(workdir, 0.5, AgentConfig(n_envs=2, vec_env="dummy"), seed=3)
    assert isinstance(vec, SashaVecEnv) and isinstance(dummy, DummyVecEnv) and frac == 0.5
    assert vec.copy_obs is False
    drive(vec, dummy, steps=15, seed=3, illegal=0.0)
    stop_cfg = AgentConfig(n_envs=2, stop="learned", zoom_cost=0.05)
    vec, _, _, _ = training_env(workdir, 0.5, stop_cfg, seed=3, learned_stop=True)
    dummy, _, _, _ = training_env(
        workdir, 0.5, AgentConfig(n_envs=2, vec_env="dummy", stop="learned", zoom_cost=0.05),
        seed=3, learned_stop=True,
    )  # fmt: skip
    assert isinstance(vec, SashaVecEnv) and vec.get_attr("stop_action") == [True, True]
    drive(vec, dummy, steps=15, seed=3, illegal=0.0)

    def refuse(*args, **kwargs):
        raise UnsupportedOption("SashaVecEnv does not batch this")

    monkeypatch.setattr("sasha_env.agents.envs.SashaVecEnv", refuse)
    with pytest.warns(UserWarning, match="DummyVecEnv instead"):
        fallback, _, _, _ = training_env(workdir, 0.5, cfg, seed=3)
    assert isinstance(fallback, DummyVecEnv)
    with pytest.raises(ValueError, match="vec_env"):
        AgentConfig.from_dict({"vec_env": "threads"})


def test_train_agent_on_it_matches_dummy(workdir, tmp_path):
    """The agents stage's training on the default vector env follows the same episodes as on
    DummyVecEnv: same slides in the same order, returns equal to float rounding."""
    from sasha_env import train_agent

    episodes = {}
    for vec_env in ("sasha", "dummy"):
        cfg = AgentConfig(
            n_envs=2, n_steps=16, batch_size=32, n_epochs=1, total_timesteps=96,
            d_hidden=16, vec_env=vec_env,
        )  # fmt: skip
        out = tmp_path / vec_env
        train_agent(workdir, 0.5, cfg, seed=0, out_dir=out, progress=False)
        rows = (out / "episodes.csv").read_text().splitlines()[1:]
        episodes[vec_env] = [row.split(",") for row in rows]
    sasha, dummy = episodes["sasha"], episodes["dummy"]
    assert [r[3] for r in sasha] == [r[3] for r in dummy] and len(sasha) > 4  # slide ids
    assert [r[0] for r in sasha] == [r[0] for r in dummy]  # when each episode ended
    np.testing.assert_allclose([float(r[1]) for r in sasha], [float(r[1]) for r in dummy], 1e-4)


# ------------------------------------------------------------------ Gymnasium's vector API
@pytest.mark.parametrize("mode", [AutoresetMode.NEXT_STEP, AutoresetMode.SAME_STEP])
def test_gymnasium_vector_api_equals_sync_vector_env(workdir, mode):
    kw = {"workdir": workdir, "split": "train", "frac": 0.5}
    envs = gym.make_vec("Sasha-WSI-v0", num_envs=E, autoreset_mode=mode, **kw)
    assert isinstance(envs.unwrapped, SashaVectorEnv)
    assert envs.metadata["autoreset_mode"] == mode
    ref = gym.vector.SyncVectorEnv(
        [lambda: gym.make("Sasha-WSI-v0", **kw)] * E, autoreset_mode=mode
    )
    assert envs.observation_space == ref.observation_space
    assert envs.action_space == ref.action_space
    obs, info = envs.reset(seed=11)
    want, want_info = ref.reset(seed=11)
    _assert_obs(obs, want)
    assert list(info["slide_id"]) == list(want_info["slide_id"])
    rng = np.random.default_rng(0)
    ends = 0
    for t in range(30):
        masks = np.stack(envs.call("action_masks"))
        np.testing.assert_array_equal(masks, envs.unwrapped.action_masks())
        actions = _actions(rng, masks, [s.n for s in envs.get_attr("slide")], illegal=0.1)
        obs, rewards, terminated, truncated, info = envs.step(actions)
        want, want_rewards, want_term, want_trunc, want_info = ref.step(actions)
        msg = f"step {t}"
        _assert_obs(obs, want, msg)
        np.testing.assert_allclose(rewards, want_rewards, RTOL, ATOL, err_msg=msg)
        np.testing.assert_array_equal(terminated, want_term, err_msg=msg)
        np.testing.assert_array_equal(truncated, want_trunc, err_msg=msg)
        assert set(info) == set(want_info), msg
        for key in ("_slide_id", "_probabilities", "illegal_action", "action_mask"):
            if key in want_info:
                np.testing.assert_array_equal(info[key], want_info[key], err_msg=f"{msg} {key}")
        if mode == AutoresetMode.SAME_STEP and terminated.any():
            for e in np.flatnonzero(terminated):
                _assert_obs(info["final_obs"][e], want_info["final_obs"][e], msg)
                assert info["final_info"]["zoomed"][e] == want_info["final_info"]["zoomed"][e]
        ends += int(terminated.sum())
    assert ends >= E
    envs.close()
    ref.close()


def test_gymnasium_disabled_autoreset_and_sync_mode(workdir):
    envs = SashaVectorEnv(2, workdir, frac=1.0, autoreset_mode="Disabled")
    envs.reset(seed=0)
    n = min(envs.get_attr("budget"))
    for _ in range(n):
        obs, _, terminated, _, _ = envs.step(
            np.stack([np.flatnonzero(m)[0] for m in envs.action_masks()])
        )
    assert terminated.any()
    with pytest.raises(RuntimeError, match="reset_mask"):
        envs.step(np.zeros(2, np.int64))
    _, info = envs.reset(options={"reset_mask": terminated})
    assert list(info["_slide_id"]) == list(terminated)
    sync = gym.make_vec("Sasha-WSI-v0", 2, vectorization_mode="sync", workdir=workdir)
    assert isinstance(sync, gym.vector.SyncVectorEnv)  # the single envs are still there


@pytest.mark.parametrize("case", ["default", "delta, bonus, lowres anchor", "frozen when covered"])
def test_the_gpu_layout_on_the_cpu(workdir, case):
    """The code path a GPU runs (states apart from the host's buffers, changed rows copied
    back, one batched similarity product over every row) gives the same results."""
    kw = {"split": "train", "frac": 0.5, **CASES[case]}
    vec = SashaVecEnv(E, workdir, layout="device", **kw)
    assert vec.batch.S.data_ptr() != vec.batch.features.ctypes.data
    seen = drive(vec, _dummy(workdir, E, **kw), steps=30, seed=4)
    assert seen["updated"] > 0


def test_train_agent_puts_the_envs_on_its_device(workdir, monkeypatch):
    """``train_agent(device=...)`` (the agents stage passes ``cuda`` on a GPU) builds the
    training ``SashaVecEnv`` on that device, not only the policy."""
    from sasha_env import train_agent

    device, seen = torch.device("cpu"), {}

    class Built(Exception):
        pass

    def spy(*args, **kwargs):
        seen.update(kwargs)
        raise Built

    monkeypatch.setattr("sasha_env.agents.envs.SashaVecEnv", spy)
    with pytest.raises(Built):
        train_agent(workdir, 0.5, AgentConfig(n_envs=2), device=device, progress=False)
    assert seen["device"] is device


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")
def test_on_a_gpu_equals_the_cpu(workdir):
    cpu, gpu = SashaVecEnv(E, workdir, frac=0.5), SashaVecEnv(E, workdir, frac=0.5, device="cuda")
    assert gpu.batch.S.is_cuda
    drive(gpu, cpu, steps=30, seed=2)


# ------------------------------------------------------------------ the batched parts
def test_tsu_forward_anchors_equals_one_anchor_at_a_time():
    _, tsu = random_models(D, tau=0.9)
    g = torch.Generator().manual_seed(0)
    v_a, z_a = torch.randn(3, D, generator=g), torch.randn(3, D, generator=g)
    z_j = torch.randn(7, D, generator=g)
    owner = torch.tensor([0, 0, 2, 2, 2, 1, 0])
    with torch.inference_mode():
        got = tsu.forward_anchors(v_a, z_a, z_j, owner)
        want = torch.cat([tsu(v_a[o], z_a[o], z_j[i : i + 1]) for i, o in enumerate(owner)])
    torch.testing.assert_close(got, want, rtol=RTOL, atol=ATOL)


def test_segment_outer():
    g = torch.Generator().manual_seed(1)
    seg = torch.tensor([2, 0, 2, 2])
    w, h = torch.randn(4, 3, generator=g), torch.randn(4, 5, generator=g)
    out = segment_outer(seg, w, h, 4)
    want = torch.zeros(4, 3, 5)
    for i, s in enumerate(seg):
        want[s] += torch.outer(w[i], h[i])
    torch.testing.assert_close(out, want)
    assert segment_outer(seg[:0], w[:0], h[:0], 4).abs().sum() == 0


@pytest.mark.parametrize("incremental", [True, False])
def test_batched_classifier_equals_single_ones(incremental, monkeypatch):
    """E states of different N, rows changed in place step after step (attention logits spread
    over hundreds, so a new row can rise far above a state's shift or a removed one can take
    most of its sum: the state is rebuilt): the batched logits equal E single classifiers'."""
    hafed, _ = random_models(D, tau=0.9, n_branches=3)
    with torch.no_grad():
        hafed.level2.attention.w.weight.mul_(300.0)
    rebuilds = []
    rebuild = BatchedIncrementalClassifier._rebuild
    monkeypatch.setattr(
        BatchedIncrementalClassifier,
        "_rebuild",
        lambda self, e: rebuilds.append(e) or rebuild(self, e),
    )
    g = torch.Generator().manual_seed(2)
    sizes, P = [5, 9, 7], 9
    S = torch.zeros(len(sizes), P, D)
    batched = BatchedIncrementalClassifier(hafed, len(sizes), P, incremental)
    singles = [IncrementalClassifier(hafed) for _ in sizes]
    with torch.inference_mode():
        for e, n in enumerate(sizes):
            S[e, :n] = torch.randn(n, D, generator=g)
            torch.testing.assert_close(
                batched.reset(e, S[e, :n]), singles[e].reset(S[e, :n].clone())
            )
        for step in range(12):
            env, row = [], []
            for e, n in enumerate(sizes):
                if step % 3 == e:
                    continue  # not every state changes at every step
                rows = torch.randperm(n, generator=g)[: 1 + step % 3]
                scale = 40.0 if step == 5 else 1.0  # logits far above the shift: rebuilt
                S[e, rows] = scale * torch.randn(len(rows), D, generator=g)
                env += [e] * len(rows)
                row += rows.tolist()
            logits = batched.update(S, torch.tensor(env), torch.tensor(row))
            for e, n in enumerate(sizes):
                rows = torch.tensor([r for x, r in zip(env, row, strict=True) if x == e])
                want = singles[e].update(S[e, :n].clone(), rows) if len(rows) else singles[e].logits
                torch.testing.assert_close(logits[e], want, rtol=RTOL, atol=ATOL)
    if incremental:
        assert len(rebuilds) > len(sizes)  # beyond the resets


def test_exported_from_the_package():
    assert sasha_env.SashaVecEnv is SashaVecEnv and "SashaVecEnv" in sasha_env.__all__
