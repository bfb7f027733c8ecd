"""Agent ensembles (``agents.ensemble``): K agents of one budget acting on their summed logits,
trained as K cached units, evaluated, calibrated and predicted as one agent."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
import yaml

from sasha_models.ensemble import ActorEnsemble, PolicyEnsemble
from sasha_models.policy import SashaActorCriticPolicy, SashaPPOPolicy
from sasha_models.spaces import action_space, observation_space

P, D = 7, 8


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)  # conftest's _torch_threads_kept restores the count


def _policy(seed: int, cls=SashaActorCriticPolicy, stop: bool = False):
    torch.manual_seed(seed)
    return cls(observation_space(P, D), action_space(P, stop=stop), lambda _: 1e-3, d_hidden=16)


def _obs(rng: np.random.Generator) -> dict[str, np.ndarray]:
    visited = (rng.random(P) < 0.4).astype(np.int8)
    valid = np.ones(P, np.int8)
    valid[-2:] = 0  # padding
    return {
        "features": rng.normal(size=(P, D)).astype(np.float32),
        "visited": visited,
        "valid": valid,
        "coords": rng.random((P, 2)).astype(np.float32),
    }


def test_the_ensemble_zooms_the_patch_of_highest_mean_log_probability():
    """The argmax of the summed logits is that of the members' mean masked log-probability,
    always a legal patch, and one member alone acts as itself."""
    members = [_policy(s) for s in (0, 1, 2)]
    ensemble = PolicyEnsemble(members)
    alone = PolicyEnsemble(members[:1])
    rng = np.random.default_rng(0)
    disagreements = 0
    for _ in range(40):
        obs = _obs(rng)
        legal = (obs["valid"] > 0) & (obs["visited"] == 0)
        if not legal.any():
            continue
        masks = legal.copy()
        with torch.no_grad():
            logps = []
            for m in members:
                obs_t, _ = m.obs_to_tensor(obs)
                logps.append(m.get_distribution(obs_t, action_masks=masks).distribution.logits)
            mean = torch.stack(logps).mean(0)[0]
        action, _ = ensemble.predict(obs, action_masks=masks, deterministic=True)
        assert legal[int(action)]
        assert int(action) == int(mean.argmax())
        own = [int(m.predict(obs, action_masks=masks, deterministic=True)[0]) for m in members]
        disagreements += len(set(own)) > 1
        assert int(alone.predict(obs, action_masks=masks, deterministic=True)[0]) == own[0]
        sampled, _ = ensemble.predict(obs, action_masks=masks, deterministic=False)
        assert legal[int(sampled)]
    assert disagreements > 5  # the members differ, so the test tells a sum from one member


def test_the_summed_actor_is_row_by_row_as_predict_needs():
    """``sasha predict`` re-scores only the rows a zoom changed: the ensemble's logit of a row
    must depend on that row alone and equal the sum of the members' logits."""
    nets = [_policy(s).net for s in (3, 4)]
    actor = ActorEnsemble(nets)
    g = torch.Generator().manual_seed(0)
    feats, visited = torch.randn(P, D, generator=g), (torch.rand(P, generator=g) < 0.5).float()
    coords = torch.rand(P, 2, generator=g)
    with torch.no_grad():
        (full,) = actor.actor_outputs(feats, visited, coords)
        rows = torch.tensor([1, 4, 5])
        (part,) = actor.actor_outputs(feats[rows], visited[rows], coords[rows])
        summed = sum(n.actor_outputs(feats, visited, coords)[0] for n in nets)
    torch.testing.assert_close(part, full[rows], rtol=0, atol=1e-6)
    torch.testing.assert_close(full, summed, rtol=0, atol=0)
    assert actor.use_coords and not actor.stop_action and actor.projection is None


def test_members_that_cannot_act_together_are_refused():
    with pytest.raises(ValueError, match="at least one member"):
        PolicyEnsemble([])
    with pytest.raises(ValueError, match="stop action"):
        PolicyEnsemble([_policy(0, stop=True), _policy(1, stop=True)])
    other = SashaActorCriticPolicy(
        observation_space(P + 1, D), action_space(P + 1), lambda _: 1e-3, d_hidden=16
    )
    with pytest.raises(ValueError, match="other spaces"):
        PolicyEnsemble([_policy(0), other])
    with pytest.raises(ValueError, match="SASHA policies"):
        PolicyEnsemble([_policy(0), object()])
    unmasked = SashaActorCriticPolicy(
        observation_space(P, D), action_space(P), lambda _: 1e-3, d_hidden=16, mask_actions=False
    )
    with pytest.raises(ValueError, match="unmasked"):
        PolicyEnsemble([_policy(0), unmasked])
    ppo = _policy(2, cls=SashaPPOPolicy)  # plain PPO's SASHA policy is a member like any other
    assert len(PolicyEnsemble([ppo, _policy(3, cls=SashaPPOPolicy)])) == 2


def test_the_config_checks_the_ensemble_size():
    from sasha_env.agents.config import AgentConfig, member_name, member_seed
    from sasha_env.config import load_config
    from sasha_env.pipeline.schema import ConfigError, validate_config

    assert AgentConfig.from_dict(None).ensemble == 1
    assert member_name(0.1, "maskable_ppo", 0) == "sasha-0.1"
    assert member_name(0.2, "ppo", 2) == "ppo-0.2-m3"
    assert [member_seed(7, k) for k in range(3)] == [7, 1007, 2007]
    for bad, match in (
        ({"algo": "dqn", "ensemble": 2}, "not dqn's"),
        ({"algo": "ppo_unmasked", "ensemble": 2}, "not ppo_unmasked's"),
        ({"obs_dim": 4, "ensemble": 2}, "obs_dim is not supported"),
        ({"ensemble": 0}, "at least 1"),
    ):
        with pytest.raises(ValueError, match=match):  # before any agent trains
            AgentConfig.from_dict(bad)
    with pytest.raises(ConfigError, match="agents.ensemble"):
        validate_config(load_config("tiny", overrides={"agents": {"ensemble": 0}}))


def test_the_agents_stage_trains_the_members_and_every_stage_acts_with_them(tiny_workdir, tmp_path):
    """``agents.ensemble: 2`` keeps the agent trained before as member 1, trains member 2 with
    its own seed, and evaluation and ``sasha predict`` zoom as the two together do."""
    from sasha_env.agents.adaptive import read_stop_rule
    from sasha_env.agents.config import AgentConfig
    from sasha_env.agents.envs import load_agent
    from sasha_env.agents.episodes import agent_policy, run_episodes
    from sasha_env.pipeline.runner import Pipeline
    from sasha_env.predict import Predictor
    from sasha_env.slides.manifest import read_manifest
    from sasha_env.workdir import Workdir

    root = tmp_path / "wd"
    shutil.copytree(tiny_workdir, root)
    wd = Workdir(root)
    config = yaml.safe_load(wd.config.read_text())
    fracs = [float(f) for f in config["agents"]["fracs"]]
    before = {f: (wd.agent_dir(f"sasha-{f:g}") / "policy.pt").read_bytes() for f in fracs}
    seed = int(config["seed"])
    messages: list[str] = []
    agents = {**config["agents"], "ensemble": 2}
    pipe = Pipeline(
        root, preset="tiny", overrides={"agents": agents}, progress=False, log=messages.append
    )
    from sasha_env.pipeline.stages import _agent_unit_names

    top = f"sasha-{max(fracs):g}"
    assert _agent_unit_names(pipe)[:2] == [top, f"{top}-m2"]  # what --jobs spreads: members too
    pipe.run()
    for f in fracs:
        first, second = wd.agent_dir(f"sasha-{f:g}"), wd.agent_dir(f"sasha-{f:g}-m2")
        assert (first / "policy.pt").read_bytes() == before[f]  # kept, not retrained
        assert json.loads((second / "agent.json").read_text())["seed"] == seed + 1000
        assert (second / "policy.pt").read_bytes() != before[f]
        assert f"[agents] f={f:g} member 1 of 2: trained earlier, kept" in messages, "\n".join(
            m for m in messages if "agents" in m
        )
    marker = json.loads((root / "stages" / "agents.json").read_text())["outputs"]
    assert set(marker["members"]) == {f"{f:g}" for f in fracs}
    cfg = AgentConfig.from_dict(agents)
    test_ids = [r.slide_id for r in read_manifest(wd.manifest).records if r.split == "test"]
    differs = 0
    for f in fracs:
        agent = load_agent(wd, f, ensemble=2)
        assert isinstance(agent.policy, PolicyEnsemble) and len(agent.policy) == 2
        online = run_episodes(agent.make_env(wd, "test", cfg), agent_policy(agent.policy), test_ids)
        saved = json.loads((root / "episodes" / f"sasha-{f:g}.json").read_text())
        assert [e["zoomed"] for e in saved] == [o["zoomed"] for o in online]  # evaluated as one
        first = load_agent(wd, f)
        alone = run_episodes(first.make_env(wd, "test", cfg), agent_policy(first.policy), test_ids)
        differs += sum(a["zoomed"] != o["zoomed"] for a, o in zip(alone, online, strict=True))
        assert read_stop_rule(agent.path).info["members"] == 2  # calibrated on the ensemble
        predictor = Predictor(root, frac=f)
        for record in read_manifest(wd.manifest).records:
            if record.split != "test":
                continue
            out = predictor.predict(record.path)
            zoomed = next(e["zoomed"] for e in saved if e["slide_id"] == record.slide_id)
            coords = wd_coords(wd, record.slide_id)
            assert out["zoomed_coords"] == coords[zoomed].tolist()
    assert differs > 0  # member 1 alone zooms elsewhere: the checks above tell them apart
    with pytest.raises(FileNotFoundError, match="sasha-.*-m3"):
        load_agent(wd, fracs[0], ensemble=3)
    # a stop rule fitted on another ensemble size is refused, not applied to this one
    rule_path = wd.agent_dir(f"sasha-{fracs[0]:g}") / "adaptive.json"
    rule = json.loads(rule_path.read_text())
    rule_path.write_text(json.dumps({**rule, "members": 1}))
    with pytest.raises(ValueError, match="fitted on an agent of 1 member"):
        Predictor(root, frac=fracs[0], adaptive=True)
    # so is a calibration (temperature and bias) fitted on another ensemble size
    rule_path.write_text(json.dumps(rule))
    calibration = json.loads(wd.calibration.read_text())
    for f in fracs:
        assert calibration["methods"][f"sasha@{f:g}"]["members"] == 2
    calibration["methods"][f"sasha@{fracs[0]:g}"]["members"] = 1
    wd.calibration.write_text(json.dumps(calibration))
    with pytest.raises(ValueError, match="calibration of sasha@.* fitted on an agent of 1 member"):
        Predictor(root, frac=fracs[0])
    assert Predictor(root, frac=fracs[0], calibration=None).calibration is None  # uncalibrated
    del calibration["methods"][f"sasha@{fracs[0]:g}"]["members"]  # a file from before the key
    wd.calibration.write_text(json.dumps(calibration))
    with pytest.raises(ValueError, match="does not record the ensemble size"):
        Predictor(root, frac=fracs[0])
    with pytest.raises(ValueError, match=r"--force calibrate\)$"):  # no --calibration none advice
        Predictor(root, frac=fracs[0], adaptive=True)


def wd_coords(wd, slide_id: str) -> np.ndarray:
    from sasha_env.features.store import FeatureStore

    return FeatureStore(wd.store).read(slide_id, "coords")


def test_the_experiment_compares_each_member_with_the_whole(tmp_path, capsys):
    """``experiments/agent_ensemble.py``: members evaluated alone and together; an ensemble of
    one agent twice zooms as that agent, and the table pairs them over workdirs."""
    from conftest import load_experiment
    from sasha_env.testing import make_workdir

    script = load_experiment("agent_ensemble")
    outs = []
    for seed in (0, 1):
        made = make_workdir(tmp_path / f"wd{seed}", n_slides=8, fracs=(0.5,), seed=seed)
        agent = str(made.root / "agents" / "sasha-0.5")
        out = tmp_path / f"e{seed}.json"
        assert script.main(["run", "--workdir", str(made.root), "--frac", "0.5",
                            "--members", agent, agent, "--out", str(out)]) == 0  # fmt: skip
        result = json.loads(out.read_text())
        member, whole = result["member_results"][0], result["ensemble"]
        assert whole["zoomed"] == member["zoomed"] and whole["auc"] == member["auc"]
        outs.append(str(out))
    assert script.main(["table", *outs]) == 0
    table = capsys.readouterr().out
    assert "### f = 0.5: 2 seeds, 2 members each" in table
    assert "ensemble − mean member, paired over seeds: +0.000" in table
