"""Agent-side checks of ``--preset paper`` against the official SASHA code (issue 21).

``checks(official, fixtures, write)`` (run by ``experiments/official_parity.py``) compares:

- ``agent.actor.logits`` / ``agent.actor.acting`` / ``agent.critic.value``: the official
  ``Actor``, ``Agent.get_action`` (masked acting: log-probability and entropy of the sampled
  action, and the argmax of ``is_eval``) and ``Critic`` (``rl_algorithms/ppo.py``) against
  our ``policy_arch: official`` network with the official weights copied in, read through our
  padded ``Dict`` observation (5 padding rows);
- ``agent.ppo_update.*``: one official update (``step6_rl_training.train_one_epoch`` on one
  slide: two episodes, GAE, four full-batch clipped epochs, two AdamW clipped per network)
  against our ``protocol: paper`` agent (``agents.train._algorithm``, ``SlideOrderedPPO``,
  its row-pooled buffer) updated on the same rollout: the loss terms of every epoch and the
  updated actor and critic parameters. The update runs at lr 1e-3, not the official 1e-5: at
  1e-5 four AdamW steps move a weight by at most 4e-5, too little for a 1e-5 tolerance to
  tell updates apart. The same update with our ``masked_update`` is printed as an ``info``
  line: by how much ours differs on purpose;
- ``agent.paper.*``: every agent-side value of ``--preset paper`` (lr and its schedule,
  epochs, episodes per update, update epochs, clip and λ at f = 0.1, γ, entropy coefficient
  and sign, gradient clipping per network, weight decay, the network's sizes) against
  ``config/camelyon_rl_config.yml`` and ``step6_rl_training.py`` as read from the checkout.

Rows have d = 16 features so that the fixtures stay small (the official networks take
``D_feat`` from their config, so the same code runs as at d = 384); the attention width is the
official one, 128 (the default ``D=128`` of ``Actor``/``Critic``, not ``D_inner``).
"""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import numpy as np

from parity_common import Check, compare, official_or_fixture

D, H, N, PAD, N_BASES = 16, 128, 40, 5, 10
SEED = 21
FRAC = 0.1
UPDATE_LR = 1e-3

# --------------------------------------------------------------------------- official side
# These scripts call the official modules and return numbers; they contain no official code.

_NETWORKS = """
from types import SimpleNamespace
from rl_algorithms.ppo import Actor, Agent, Critic

conf = SimpleNamespace(D_feat=int(inputs["d"]), D_inner=int(inputs["h"]), dim_reduction=False)
torch.manual_seed(int(inputs["seed"]))
actor, critic = Actor(conf), Critic(conf)
agent = Agent(actor, critic, conf)
for prefix, net in (("actor.", actor), ("critic.", critic)):
    for k, v in net.state_dict().items():
        if not k.startswith("dimreduction."):  # built but unused (dim_reduction False)
            outputs[prefix + k] = v.numpy()
x = torch.from_numpy(inputs["states"])
acts, logps, ents, argmax = [], [], [], []
with torch.no_grad():
    outputs["logits"] = actor(x).numpy()  # (B, 1, N)
    outputs["values"] = critic(x).numpy()  # (B, 1, 1)
    for b in range(x.shape[0]):
        visited = np.flatnonzero(inputs["visited"][b]).tolist()
        torch.manual_seed(1000 + b)
        a, lp, ent = agent.get_action(x[b : b + 1], visited, is_eval=False)
        acts.append(int(a)); logps.append(float(lp)); ents.append(float(ent))
        argmax.append(int(agent.get_action(x[b : b + 1], visited, is_eval=True)[0]))
outputs["actions"], outputs["log_probs"] = np.array(acts), np.array(logps, np.float32)
outputs["entropies"], outputs["argmax"] = np.array(ents, np.float32), np.array(argmax)
"""

_UPDATE = """
import os
from types import SimpleNamespace

import yaml
import step6_rl_training as s6
from architecture.transformer import HAFED
from modules.fglobal_mlp import FGlobal
from rl_algorithms.ppo import Actor, Agent, Critic

root = os.path.dirname(os.path.abspath(s6.__file__))
with open(os.path.join(root, "config", "camelyon_rl_config.yml")) as f:
    rl = yaml.safe_load(f)
d, h = int(inputs["d"]), int(inputs["h"])
conf = SimpleNamespace(**rl)
conf.device, conf.logs = torch.device("cpu"), "disabled"
conf.D_feat, conf.D_inner, conf.lr = d, h, float(inputs["learning_rate"])

torch.manual_seed(int(inputs["seed"]))
hafed_conf = SimpleNamespace(D_feat=d, D_inner=h, n_class=2, n_token_1=1, dim_reduction=False)
classifier = HAFED(hafed_conf, n_token_1=1, n_token_2=5, n_masked_patch_1=10,
                   n_masked_patch_2=20, mask_drop=0.24).eval()
fglobal = FGlobal(ip_dim=3 * d, op_dim=d, hidden_dim=2 * d).eval()
actor, critic = Actor(conf), Critic(conf)
agent = Agent(actor, critic, conf)
for prefix, net in (("before.actor.", actor), ("before.critic.", critic)):
    for k, v in net.state_dict().items():
        if not k.startswith("dimreduction."):  # built but unused (dim_reduction False)
            outputs[prefix + k] = v.numpy().copy()

rollout = {"states": [], "visited": [], "actions": [], "log_probs": [], "rewards": [],
           "dones": []}
get_action = agent.get_action

def recording_get_action(x, visited, *args, **kwargs):
    a, lp, ent = get_action(x, visited, *args, **kwargs)
    rollout["states"].append(x[0].numpy().copy())
    mask = np.zeros(x.shape[1], bool); mask[list(visited)] = True
    rollout["visited"].append(mask)
    rollout["actions"].append(int(a)); rollout["log_probs"].append(float(lp))
    return a, lp, ent

agent.get_action = recording_get_action

class RecordingEnv(s6.WSICosineObservationEnv):
    def step(self, *args, **kwargs):
        S, r, done = super().step(*args, **kwargs)
        rollout["rewards"].append(float(r)); rollout["dones"].append(bool(done))
        return S, r, done

s6.WSICosineObservationEnv = RecordingEnv
losses = []

class RecordingAdamW(torch.optim.AdamW):
    def zero_grad(self, *args, **kwargs):
        caller = sys._getframe(1).f_locals  # train_one_epoch's loss terms, before backward
        if caller.get("actor_optimizer") is self:
            losses.append([float(caller["actor_loss"]), float(caller["critic_loss"]),
                           float(caller["entropy_loss"])])
        return super().zero_grad(*args, **kwargs)

actor_opt = RecordingAdamW(actor.parameters(), lr=conf.lr, weight_decay=conf.wd)
critic_opt = RecordingAdamW(critic.parameters(), lr=conf.lr, weight_decay=conf.wd)
slide = {"hr": torch.from_numpy(inputs["hr"])[None], "lr": torch.from_numpy(inputs["lr_features"])[None],
         "label": torch.tensor([int(inputs["label"])])}
torch.manual_seed(int(inputs["seed"]) + 1)
s6.train_one_epoch(agent, fglobal, classifier, [slide], actor_opt, critic_opt, "cpu", 0, conf)
for k, v in rollout.items():
    outputs["rollout." + k] = np.array(v)
with torch.no_grad():  # the updated networks on the rollout's states
    x = torch.from_numpy(outputs["rollout.states"])
    outputs["after_outputs.log_softmax"] = torch.log_softmax(actor(x)[:, 0], dim=-1).numpy()
    outputs["after_outputs.values"] = critic(x)[:, 0, 0].numpy()
outputs["losses"] = np.array(losses, np.float32)  # (epochs, 3): actor (with -coef H), critic, H
for prefix, net in (("after.actor.", actor), ("after.critic.", critic)):
    for k, v in net.state_dict().items():
        if not k.startswith("dimreduction."):  # built but unused (dim_reduction False)
            outputs[prefix + k] = v.numpy()
"""

_VALUES = """
import inspect, os, re
import yaml
import step6_rl_training as s6

root = os.path.dirname(os.path.abspath(s6.__file__))
with open(os.path.join(root, "config", "camelyon_rl_config.yml")) as f:
    rl = yaml.safe_load(f)
for key in ("lr", "min_lr", "wd", "train_epoch", "num_envs", "gamma", "clip", "lam",
            "entropy_coef", "max_grad_norm", "num_epochs_on_single_roll_out", "frac_visit",
            "D_feat", "D_inner"):
    outputs["config." + key] = float(rl[key])
for key in ("use_entropy_loss", "use_gae", "only_ce_as_reward", "dim_reduction"):
    outputs["config." + key] = float(bool(rl[key]))
lines = [l.strip() for l in inspect.getsource(s6.train_one_epoch).splitlines()]
code = [l for l in lines if l and not l.startswith("#")]
# the learning-rate schedule: calls of adjust_learning_rate that are not commented out
outputs["step6.lr_schedule_calls"] = float(sum("adjust_learning_rate(" in l for l in code))
# the entropy term's sign in the actor loss: -1 = a bonus (the loss decreases with entropy)
bonus = any(re.fullmatch(r"actor_loss\\s*-=\\s*conf\\.entropy_coef\\s*\\*\\s*entropy_loss", l)
            for l in code)
penalty = any(re.fullmatch(r"actor_loss\\s*\\+=\\s*conf\\.entropy_coef\\s*\\*\\s*entropy_loss", l)
              for l in code)
outputs["step6.entropy_sign"] = -1.0 if bonus and not penalty else (1.0 if penalty else 0.0)
# gradient clipping per network: one clip of the actor's and one of the critic's parameters
outputs["step6.clip_actor"] = float(any("clip_grad_norm_(model.actor.parameters()" in l
                                        for l in code))
outputs["step6.clip_critic"] = float(any("clip_grad_norm_(model.critic.parameters()" in l
                                         for l in code))
main = [l.strip() for l in inspect.getsource(s6.main).splitlines()]
from rl_algorithms.ppo import Actor, Critic
outputs["ppo.actor_D"] = float(inspect.signature(Actor).parameters["D"].default)
outputs["ppo.critic_D"] = float(inspect.signature(Critic).parameters["D"].default)
outputs["step6.adamw_optimizers"] = float(sum("torch.optim.AdamW(" in l and not l.startswith("#")
                                              for l in main))
"""


# ----------------------------------------------------------------------------- inputs
def _slide(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Low-res rows ``(N, D)`` in ``N_BASES`` groups of near-parallel rows (so the official
    env's TSU fires) and their high-res vectors."""
    bases = rng.normal(size=(N_BASES, D))
    group = np.repeat(np.arange(N_BASES), N // N_BASES)
    sign = rng.choice([-1.0, 1.0], size=(N, 1))
    z = sign * bases[group] * rng.uniform(0.5, 2.0, size=(N, 1))
    z = z + 0.05 * rng.normal(size=(N, D))
    v = z + 0.5 * rng.normal(size=(N, D))
    return z.astype(np.float32), v.astype(np.float32)


def _network_inputs() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(SEED)
    z, v = _slide(rng)
    states, visited = [], []
    for b in range(6):  # 0..5 patches zoomed: their rows hold v
        zoomed = rng.choice(N, size=b, replace=False)
        s = z.copy()
        s[zoomed] = v[zoomed]
        mask = np.zeros(N, bool)
        mask[zoomed] = True
        states.append(s)
        visited.append(mask)
    return {
        "d": np.array(D),
        "h": np.array(H),
        "seed": np.array(SEED),
        "states": np.stack(states),
        "visited": np.stack(visited),
    }


def _update_inputs() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(SEED + 1)
    z, v = _slide(rng)
    return {
        "d": np.array(D),
        "h": np.array(H),
        "seed": np.array(SEED),
        "learning_rate": np.array(UPDATE_LR),
        "lr_features": z,
        "hr": v,
        "label": np.array(1),
    }


# ------------------------------------------------------------------------------ our side
def _obs(states: np.ndarray, visited: np.ndarray) -> dict[str, np.ndarray]:
    """Our padded observation: ``PAD`` zero rows after the ``N`` real ones (valid 0)."""
    b = states.shape[0]
    feats = np.zeros((b, N + PAD, D), np.float32)
    feats[:, :N] = states
    vis = np.zeros((b, N + PAD), np.int8)
    vis[:, :N] = visited
    valid = np.zeros((b, N + PAD), np.int8)
    valid[:, :N] = 1
    coords = np.zeros((b, N + PAD, 2), np.float32)
    return {"features": feats, "visited": vis, "valid": valid, "coords": coords}


def _official_to_ours(arrays: dict[str, np.ndarray], prefix: str) -> dict[str, Any]:
    """The official actor's and critic's weights (``{prefix}actor.*``, ``{prefix}critic.*``) as
    a state dict of our ``arch="official"`` network (the unused ``dimreduction`` dropped)."""
    import torch  # lazy: this module is imported by the driver before any check runs

    names = {
        "attention.attention_V.0": "attn.V",
        "attention.attention_U.0": "attn.U",
        "attention.attention_weights": "attn.w",
    }
    state = {}
    for net in ("actor", "critic"):
        for theirs, ours in names.items():
            for p in ("weight", "bias"):
                state[f"{net}_{ours}.{p}"] = torch.from_numpy(arrays[f"{prefix}{net}.{theirs}.{p}"])
    for p in ("weight", "bias"):
        state[f"value_head.{p}"] = torch.from_numpy(arrays[f"{prefix}critic.final_layer.fc.{p}"])
    return state


def _ours_to_official(net: Any) -> dict[str, np.ndarray]:
    """Our network's parameters under the official names (``actor.*``, ``critic.*``)."""
    sd = {k: v.detach().numpy() for k, v in net.state_dict().items()}
    out = {}
    for net_name in ("actor", "critic"):
        out[f"{net_name}.attention.attention_V.0.weight"] = sd[f"{net_name}_attn.V.weight"]
        out[f"{net_name}.attention.attention_V.0.bias"] = sd[f"{net_name}_attn.V.bias"]
        out[f"{net_name}.attention.attention_U.0.weight"] = sd[f"{net_name}_attn.U.weight"]
        out[f"{net_name}.attention.attention_U.0.bias"] = sd[f"{net_name}_attn.U.bias"]
        out[f"{net_name}.attention.attention_weights.weight"] = sd[f"{net_name}_attn.w.weight"]
        out[f"{net_name}.attention.attention_weights.bias"] = sd[f"{net_name}_attn.w.bias"]
    out["critic.final_layer.fc.weight"] = sd["value_head.weight"]
    out["critic.final_layer.fc.bias"] = sd["value_head.bias"]
    return out


class _SpacesOnly:
    """A Gymnasium env that only declares the observation and action spaces (never stepped):
    our PPO is built on it and its rollout buffer is filled with the official rollout."""

    def __new__(cls) -> Any:
        import gymnasium as gym  # lazy: as above

        from sasha_models import spaces

        class Env(gym.Env):
            observation_space = spaces.observation_space(N + PAD, D)
            action_space = spaces.action_space(N + PAD)

            def reset(self, *, seed=None, options=None):  # noqa: ANN001
                raise RuntimeError("not stepped: the rollout is the official one")

            def step(self, action):  # noqa: ANN001
                raise RuntimeError("not stepped: the rollout is the official one")

        return Env()


def paper_agent_config(**overrides: Any) -> Any:
    """``--preset paper``'s ``agents`` section as an :class:`AgentConfig` (resolved)."""
    from sasha_env.agents.config import AgentConfig
    from sasha_env.config import load_config

    section = dict(load_config("paper")["agents"])
    section.update(overrides)
    return AgentConfig.from_dict(section).resolved()


def _paper_model(lr: float, **overrides: Any) -> Any:
    """Our ``protocol: paper`` agent at f = 0.1 for the small sizes, lr ``lr``."""
    from sasha_env.agents.train import _algorithm

    cfg = paper_agent_config(d_hidden=H, learning_rate=lr, **overrides)
    return _algorithm(cfg, _SpacesOnly(), 0, "cpu", FRAC)


def _our_update(official: dict[str, np.ndarray], masked_update: bool) -> dict[str, np.ndarray]:
    """Our paper agent, with the official initial weights, updated once on the official rollout.

    Returns the loss terms per epoch (``losses``: actor loss with the entropy bonus, critic
    loss, mean entropy) and the updated weights under the official names (``after.*``).
    """
    import torch  # lazy: as above
    from stable_baselines3.common.logger import Logger

    model = _paper_model(UPDATE_LR, masked_update=masked_update)
    model.set_logger(Logger(None, []))
    policy = model.policy
    policy.net.load_state_dict(_official_to_ours(official, "before."))
    states = official["rollout.states"]
    obs = _obs(states, official["rollout.visited"])
    actions = official["rollout.actions"].astype(np.int64)
    rewards, dones = official["rollout.rewards"], official["rollout.dones"]
    steps = len(actions)
    buf = model.rollout_buffer
    buf.buffer_size = steps
    buf.reset()
    model.n_steps = model.batch_size = steps
    policy.set_training_mode(False)
    start = True
    with torch.no_grad():
        for t in range(steps):
            o = {k: v[t : t + 1] for k, v in obs.items()}
            masks = (o["valid"] > 0) & (o["visited"] == 0)
            ot = {k: torch.as_tensor(v) for k, v in o.items()}
            dist = policy.get_distribution(ot, action_masks=masks)
            value = policy.predict_values(ot)
            log_prob = dist.log_prob(torch.as_tensor(actions[t : t + 1]))
            buf.add(o, actions[t : t + 1, None], rewards[t : t + 1], np.array([start]), value,
                    log_prob, action_masks=masks)  # fmt: skip
            start = bool(dones[t])
        buf.compute_returns_and_advantage(last_values=torch.zeros(1, 1), dones=np.array([True]))
    losses: list[list[float]] = []
    optimizer = policy.optimizer
    zero_grad = optimizer.zero_grad

    def recording_zero_grad(*args: Any, **kwargs: Any) -> None:
        import sys

        caller = sys._getframe(1).f_locals  # SB3's train(): the loss terms, before backward
        entropy = -float(caller["entropy_loss"].detach())
        actor = float(caller["policy_loss"].detach()) - model.ent_coef * entropy
        losses.append([actor, float(caller["value_loss"].detach()), entropy])
        zero_grad(*args, **kwargs)

    optimizer.zero_grad = recording_zero_grad
    model.train()
    out = {"losses": np.array(losses, np.float32)}
    policy.set_training_mode(False)
    with torch.no_grad():
        logits, values = policy.net.forward_obs({k: torch.as_tensor(v) for k, v in obs.items()})
    out["after_outputs.log_softmax"] = torch.log_softmax(logits[:, :N], dim=-1).numpy()
    out["after_outputs.values"] = values[:, 0].numpy()
    out.update({f"after.{k}": v for k, v in _ours_to_official(policy.net).items()})
    return out


def _network_checks(official: dict[str, np.ndarray], inputs: dict[str, np.ndarray]) -> list[Check]:
    import torch  # lazy: as above

    model = _paper_model(1e-5)
    policy = model.policy
    policy.net.load_state_dict(_official_to_ours(official, ""))
    policy.set_training_mode(False)
    obs = {k: torch.as_tensor(v) for k, v in _obs(inputs["states"], inputs["visited"]).items()}
    with torch.no_grad():
        logits, values = policy.net.forward_obs(policy.extract_features(obs))
        dist = policy.get_distribution(obs)
        actions = torch.as_tensor(official["actions"])
        log_probs, entropy = dist.log_prob(actions), dist.entropy()
        argmax = dist.get_actions(deterministic=True)
    note = f"{len(actions)} states, 0-5 patches zoomed, {PAD} padding rows on our side"
    return [
        compare("agent.actor.logits", logits[:, :N].numpy(), official["logits"][:, 0], note=note),
        compare(
            "agent.actor.acting",
            {"log_prob": log_probs.numpy(), "entropy": entropy.numpy()},
            {"log_prob": official["log_probs"], "entropy": official["entropies"]},
            note="masked acting: log-prob of the sampled action and entropy (get_action)",
        ),
        compare(
            "agent.actor.argmax",
            argmax.numpy().astype(np.float64),
            official["argmax"].astype(np.float64),
            tol=0.0,
            note="is_eval=True: argmax of the masked distribution (patch index)",
        ),
        compare("agent.critic.value", values[:, 0].numpy(), official["values"][:, 0, 0]),
    ]


# The gated attention's output bias shifts every row's score alike, so neither the actor's
# softmax nor the critic's pooling depends on it: its gradient is 0 up to float rounding, which
# AdamW normalises into steps of arbitrary size (official and ours alike). It is compared
# through the updated networks' outputs instead.
_SHIFT_ONLY = "attention.attention_weights.bias"


def _params(arrays: dict[str, np.ndarray], net: str) -> dict[str, np.ndarray]:
    return {
        k: v
        for k, v in arrays.items()
        if k.startswith(f"after.{net}.") and not k.endswith(_SHIFT_ONLY)
    }


def _update_checks(official: dict[str, np.ndarray]) -> list[Check]:
    ours = _our_update(official, masked_update=False)
    steps = len(official["rollout.actions"])
    note = f"one slide, 2 episodes, {steps} steps; 4 epochs at lr {UPDATE_LR:g}"
    outs = ("after_outputs.log_softmax", "after_outputs.values")
    checks = [
        compare("agent.ppo_update.loss_terms", ours["losses"], official["losses"], note=note),
        compare(
            "agent.ppo_update.actor_params",
            _params(ours, "actor"),
            _params(official, "actor"),
            note="all but the attention's output bias (shift-only: see the outputs)",
        ),
        compare(
            "agent.ppo_update.critic_params",
            _params(ours, "critic"),
            _params(official, "critic"),
            note="as above",
        ),
        compare(
            "agent.ppo_update.outputs",
            {k: ours[k] for k in outs},
            {k: official[k] for k in outs},
            note="updated networks on the rollout's states: log-softmax and values",
        ),
    ]
    masked = _our_update(official, masked_update=True)
    keys = ["losses", *outs]
    mine = {k: masked[k] for k in keys} | _params(masked, "actor") | _params(masked, "critic")
    theirs = {k: official[k] for k in keys} | _params(official, "actor")
    diff = compare("", mine, theirs | _params(official, "critic"))
    checks.append(
        Check(
            "agent.ppo_update.masked_update (ours)",
            diff.max_abs_diff,
            ok=True,
            counted=False,
            note=f"ours differs by {diff.max_abs_diff:.3g} on purpose (masked log-probs and "
            "entropy in the update)",
        )
    )
    return checks


def paper_values(frac: float = FRAC) -> dict[str, float]:
    """Our ``--preset paper`` agent's values at budget ``frac``, read off the built agent."""
    import torch  # lazy: as above

    from sasha_env.agents.train import _algorithm

    cfg = paper_agent_config()
    model = _algorithm(cfg, _SpacesOnly(), 0, "cpu", frac)
    opt = model.policy.optimizer
    opts = getattr(opt, "optimizers", {"joint": opt})
    groups = [g for o in opts.values() for g in o.param_groups]
    return {
        "lr": float(model.lr_schedule(1.0)),
        "lr_constant": float(model.lr_schedule(0.0) == model.lr_schedule(1.0)),
        "wd": float(groups[0]["weight_decay"]),
        "adamw": float(all(type(o) is torch.optim.AdamW for o in opts.values())),
        "optimizers": float(len(opts)),
        "train_epoch": float(cfg.epochs),
        "num_envs": float(cfg.episodes_per_slide),
        "gamma": float(model.gamma),
        "clip": float(model.clip_range(1.0)),
        "lam": float(model.gae_lambda),
        "entropy_coef": float(model.ent_coef),
        "max_grad_norm": float(model.max_grad_norm),
        "num_epochs_on_single_roll_out": float(model.n_epochs),
        "D_inner": float(cfg.d_hidden),
        "masked_update": float(model.policy.masked_update),
        "official_arch": float(model.policy.net.arch == "official"),
    }


def _value_checks(official: dict[str, np.ndarray]) -> list[Check]:
    ours = paper_values(FRAC)
    cfg = {k[7:]: float(v) for k, v in official.items() if k.startswith("config.")}
    src = {k[6:]: float(v) for k, v in official.items() if k.startswith("step6.")}
    ppo = {k[4:]: float(v) for k, v in official.items() if k.startswith("ppo.")}
    rows = [  # (name, ours, official, where)
        ("lr", ours["lr"], cfg["lr"], "rl_config:7"),
        ("lr_schedule", ours["lr_constant"], float(src["lr_schedule_calls"] == 0),
         "constant: adjust_learning_rate commented out, step6:316-317"),
        ("weight_decay", ours["wd"], cfg["wd"], "rl_config:6, AdamW step6:228-229"),
        ("optimizers", ours["optimizers"] * ours["adamw"], src["adamw_optimizers"],
         "two AdamW, actor and critic, step6:228-229"),
        ("epochs", ours["train_epoch"], cfg["train_epoch"], "train_epoch, rl_config:2"),
        ("episodes_per_update", ours["num_envs"], cfg["num_envs"], "num_envs, rl_config:3"),
        ("update_epochs", ours["num_epochs_on_single_roll_out"],
         cfg["num_epochs_on_single_roll_out"], "rl_config:19"),
        ("gamma", ours["gamma"], cfg["gamma"], "rl_config:13"),
        ("clip_f0.1", ours["clip"], cfg["clip"], "rl_config:15 (f = 0.2: unset; ours 0.1)"),
        ("gae_lambda_f0.1", ours["lam"], cfg["lam"], "rl_config:23 (f = 0.2: unset; ours 0.95)"),
        ("entropy_coef", ours["entropy_coef"], cfg["entropy_coef"] * cfg["use_entropy_loss"],
         "rl_config:16-17"),
        ("entropy_sign", -1.0, src["entropy_sign"],
         "-1 = bonus: actor_loss -= coef * H, step6:390; SB3's ent_coef is a bonus"),
        ("max_grad_norm", ours["max_grad_norm"], cfg["max_grad_norm"], "rl_config:18"),
        ("clip_per_network", float(ours["optimizers"] == 2),
         src["clip_actor"] * src["clip_critic"], "step6:395, 401"),
        ("d_hidden", ours["D_inner"], ppo["actor_D"] if ppo["actor_D"] == ppo["critic_D"] else -1,
         "attention width: default D=128 of Actor/Critic, ppo.py:57,81"),
        ("unmasked_update", 1.0 - ours["masked_update"], 1.0, "ppo.py:209-211"),
        ("arch_official", ours["official_arch"], 1.0 - cfg["dim_reduction"],
         "gated attention on the raw rows (dim_reduction False), ppo.py:56-97"),
    ]  # fmt: skip
    return [compare(f"agent.paper.{n}", o, t, note=w) for n, o, t, w in rows]


def _script(parts: dict[str, str]) -> str:
    """One official-side script running each part in turn, its outputs prefixed ``part.``
    (one subprocess: importing the official modules takes most of the time)."""
    out = ["_all = {}"]
    for name, script in parts.items():
        out += [
            "outputs = {}",
            textwrap.dedent(script),
            f"_all.update({{'{name}.' + k: v for k, v in outputs.items()}})",
        ]
    out.append("outputs = _all")
    return "\n".join(out)


def checks(official: Path | None, fixtures: Path, write: bool) -> list[Check]:
    """The agent-side parity checks (see the module docstring)."""
    import torch  # lazy: as above

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        net_in, upd_in = _network_inputs(), _update_inputs()
        parts = {"net": _NETWORKS, "upd": _UPDATE, "val": _VALUES}
        out = official_or_fixture(
            official, fixtures, write, "agent", _script(parts), net_in | upd_in
        )
        part = {
            p: {k[len(p) + 1 :]: v for k, v in out.items() if k.startswith(p + ".")} for p in parts
        }
        return (
            _network_checks(part["net"], net_in)
            + _update_checks(part["upd"])
            + _value_checks(part["val"])
        )
    finally:
        torch.set_num_threads(threads)
