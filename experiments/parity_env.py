"""Parity of the environment, the TSU, HAFED and the ``paper`` preset's env/TSU/HAFED values
with the official SASHA code at 6385fe6 (issue 21). Run through ``official_parity.py``.

Checks (official side in a subprocess, :func:`parity_common.run_official`; weights are ours,
copied across under the official names):

* ``env.budget``: episode lengths ``⌈f·N⌉`` for N = 1..3000, f = 0.1 and 0.2.
* ``env.episode.*``: whole episodes (reset state, the state after every step, rewards,
  terminations, budget) of ``Sasha-WSI-v0`` against ``envs/WSI_cosine_env.py`` on features
  built as ± scaled copies of a few base vectors plus small noise (so that ``|cos| ≥ τ`` holds
  within a group, by sign too, and no pair is near τ), with the same actions, HAFED and TSU:
  several N and f, a TSU-updated patch zoomed later, and the all-covered freeze.
* ``tsu.forward*``: the TSU against ``modules/fglobal_mlp.py`` ``FGlobal``.
* ``tsu.train_step``: one training step (loss, learning rate, updated weights) of ours with
  ``anchor_in_target`` against ``step5_tsu_training.train_one_epoch`` on one slide whose anchor
  comes from a seeded ``np.random``.
* ``tsu.validation_loss``: the loss of ``validation="official"`` against step5's ``evaluate``
  on the same anchors.
* ``hafed.*``: level 1 (``get_hr_fa``), the eval-mode forward and ``classify`` against
  ``architecture/transformer.py`` ``HAFED``.
* ``preset.*``: every env/TSU/HAFED value of ``--preset paper`` against the official
  ``config/camelyon_rl_config.yml``, ``camelyon_tsu_config.yml`` and ``camelyon_config.yml``.

Informational lines (``info``, not counted) show by how much our defaults differ where they
differ on purpose (no freeze, anchor left out of its targets).
"""

from __future__ import annotations

import hashlib
import inspect
import math
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch

from parity_common import Check, compare, load_fixture, run_official, save_fixture
from sasha_env.config import load_config
from sasha_env.envs.wsi import SashaWSIEnv, episode_budget
from sasha_env.pipeline.stages import fit_settings, tsu_configs
from sasha_env.testing import CLASS_NAMES, SlideSpec, lattice_cells, write_workdir
from sasha_models.hafed import HAFED, HAFEDConfig
from sasha_models.lit import TSUModule
from sasha_models.tsu import TSU, TSUConfig, sample_tsu_pairs

TAU = 0.95

# ------------------------------------------------------------------ weights under official names


def official_hafed_state(hafed: HAFED) -> dict[str, np.ndarray]:
    """Our HAFED's weights under ``architecture/transformer.py`` ``HAFED``'s names (its unused
    ``dimreduction`` layers are left at their initial values)."""
    out = {}
    gated = {"V": "attention_V.0", "U": "attention_U.0", "w": "attention_weights"}
    for name, t in hafed.state_dict().items():
        parts = name.split(".")
        if parts[0] == "level1":
            key = f"attention_1.{gated[parts[1]]}.{parts[2]}"
        elif parts[1] == "attention":
            key = f"attention_2.{gated[parts[2]]}.{parts[3]}"
        elif parts[1] == "slide_head":
            key = f"Slide_classifier.fc.{parts[2]}"
        elif parts[1] == "branch_heads":
            key = f"classifier.{parts[2]}.fc.{parts[3]}"
        else:
            raise KeyError(f"no official name for HAFED weight {name}")
        out[key] = t.detach().numpy().copy()
    return out


def official_tsu_state(tsu: TSU) -> dict[str, np.ndarray]:
    """Our TSU's weights under ``modules/fglobal_mlp.py`` ``FGlobal``'s names."""
    names = {"net.0": "fc1", "net.2": "fc2", "net.3": "layer_norm"}
    return {
        f"{names[k.rsplit('.', 1)[0]]}.{k.rsplit('.', 1)[1]}": t.detach().numpy().copy()
        for k, t in tsu.state_dict().items()
    }


def _prefixed(prefix: str, state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {f"{prefix}{k}": v for k, v in state.items()}


# What every official-side script starts with: build the official modules from weights passed
# in ``inputs`` under ``<prefix><official name>``.
_OFFICIAL_MODELS = """
from types import SimpleNamespace
from architecture.transformer import HAFED as OfficialHAFED
from modules.fglobal_mlp import FGlobal

def load(model, prefix):
    sd = {k[len(prefix):]: torch.from_numpy(v) for k, v in inputs.items() if k.startswith(prefix)}
    missing, unexpected = model.load_state_dict(sd, strict=False)
    assert not unexpected and all(m.startswith("dimreduction") for m in missing), (missing, unexpected)
    return model

def official_hafed(d, hidden):
    conf = SimpleNamespace(D_feat=d, D_inner=hidden, n_class=2, n_token_1=1, dim_reduction=False)
    model = OfficialHAFED(conf, D=hidden, n_token_1=1, n_token_2=5, n_masked_patch_1=10,
                          n_masked_patch_2=20, mask_drop=0.24)
    return load(model, "hafed.").eval()

def official_tsu(d):
    return load(FGlobal(ip_dim=3 * d, op_dim=d, hidden_dim=2 * d), "tsu.").eval()
"""


def _digest(inputs: dict[str, np.ndarray]) -> str:
    h = hashlib.sha256()
    for k in sorted(inputs):
        a = np.ascontiguousarray(inputs[k])
        h.update(k.encode() + str(a.dtype).encode() + str(a.shape).encode() + a.tobytes())
    return h.hexdigest()


def _official(
    official: Path | None,
    fixtures: Path,
    write: bool,
    name: str,
    script: str,
    inputs: dict[str, np.ndarray],
) -> dict[str, np.ndarray]:
    """The official outputs: run now (and saved when ``write``), or read from fixture
    ``name``. Fixtures hold the outputs and a digest of the inputs (not the inputs, which
    include whole weight matrices); a digest that differs means a stale fixture."""
    digest = _digest(inputs)
    if official is not None:
        out = run_official(official, _OFFICIAL_MODELS + script, inputs)
        if write:
            save_fixture(fixtures, name, {**out, "_inputs_sha256": np.array(digest)})
        return out
    blob = load_fixture(fixtures, name)
    if str(blob.pop("_inputs_sha256", "")) != digest:
        raise ValueError(
            f"parity fixture {name}.npz was recorded from other inputs; re-record it with "
            "`python experiments/official_parity.py --official DIR --write-fixtures`"
        )
    return blob


def _seeded(seed: int, build):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


# ------------------------------------------------------------------------------ features


def grouped_features(
    rng: np.random.Generator, groups: list[int], d: int, signs: bool = False, noise: float = 0.03
) -> np.ndarray:
    """Rows ``(sum(groups), d)`` float32: group g holds scaled copies of its own random base
    vector (times ±1 with ``signs``) plus small noise, so ``|cos|`` is ≈ 1 within a group and
    ≈ 0 between groups (far from τ = 0.95 either way); rows are shuffled."""
    rows = []
    for size in groups:
        base = rng.standard_normal(d)
        for _ in range(size):
            sign = rng.choice([-1.0, 1.0]) if signs else 1.0
            scale = rng.uniform(0.5, 2.0)
            rows.append(sign * scale * (base + noise * rng.standard_normal(d)))
    out = np.array(rows, np.float32)
    return out[rng.permutation(len(out))]


def _cos_margin(z: np.ndarray) -> float:
    """Smallest ``| |cos(z_i, z_j)| − τ |`` over all pairs (how far every test is from a tie)."""
    u = z / np.linalg.norm(z, axis=1, keepdims=True)
    return float(np.abs(np.abs(u @ u.T) - TAU).min())


# (name, groups, f, signed, freeze, actions: first ones given, the rest in row order)
ENV_CASES = [
    ("N20_f0.2_all_covered_frozen", [20], 0.2, False, True, [3]),
    ("N20_f0.2_all_covered_signs_frozen", [20], 0.2, True, True, [0]),
    ("N30_f0.1_signs", [6, 6, 6, 4, 4, 2, 1, 1], 0.1, True, False, []),
    ("N30_f0.2_signs", [6, 6, 6, 4, 4, 2, 1, 1], 0.2, True, False, []),
    ("N37_f0.1_zoom_updated", [8, 8, 5, 5, 3, 3, 2, 1, 1, 1], 0.1, False, False, []),
    ("N37_f0.2_zoom_updated", [8, 8, 5, 5, 3, 3, 2, 1, 1, 1], 0.2, True, False, []),
    ("N12_f0.5_covered_then_frozen", [5, 4, 3], 0.5, False, True, []),
]
D_ENV, H_ENV = 32, 16


def _env_inputs() -> tuple[list[dict], HAFED, TSU]:
    rng = np.random.default_rng(21)
    cases = []
    for i, (name, groups, frac, signed, freeze, first) in enumerate(ENV_CASES):
        z = grouped_features(rng, groups, D_ENV, signs=signed)
        v = (z + 0.5 * rng.standard_normal(z.shape)).astype(np.float32)
        n = len(z)
        if not first and "zoom_updated" in name:
            # zoom a row, then another row of its group (TSU-updated by then): the anchor of
            # the second zoom is a TSU output (official: the current state row)
            u = z / np.linalg.norm(z, axis=1, keepdims=True)
            mates = np.flatnonzero(np.abs(u @ u[0]) >= TAU)
            first = [0, int(mates[1])]
        elif not first and "covered_then_frozen" in name:
            # one row of each group covers everything after 3 zooms; the rest are frozen
            u = z / np.linalg.norm(z, axis=1, keepdims=True)
            left, first = set(range(n)), []
            while left:
                a = min(left)
                first.append(a)
                left -= set(np.flatnonzero(np.abs(u @ u[a]) >= TAU).tolist())
        rest = [j for j in rng.permutation(n).tolist() if j not in first]
        actions = np.array(first + rest, np.int64)
        cases.append(
            dict(name=name, z=z, v=v, label=i % 2, frac=frac, freeze=freeze, actions=actions)
        )
    hafed = _seeded(
        1, lambda: HAFED(HAFEDConfig(d_in=D_ENV, n_classes=2, d_hidden=H_ENV, n_branches=5))
    ).eval()
    tsu = _seeded(2, lambda: TSU(TSUConfig(d=D_ENV, tau=TAU))).eval()
    return cases, hafed, tsu


_ENV_SCRIPT = """
import math
from envs.WSI_cosine_env import WSICosineObservationEnv
clf = official_hafed(int(inputs["d"]), int(inputs["hidden"]))
fg = official_tsu(int(inputs["d"]))
for i in range(int(inputs["n_cases"])):
    z, v = inputs[f"c{i}.z"], inputs[f"c{i}.v"]
    conf = SimpleNamespace(device=torch.device("cpu"), frac_visit=float(inputs[f"c{i}.frac"]),
                           cosine_threshold=float(inputs["tau"]), only_ce_as_reward=True)
    env = WSICosineObservationEnv(lr_features=torch.from_numpy(z)[None].clone(),
                                  hr_features=torch.from_numpy(v),
                                  label=torch.tensor([int(inputs[f"c{i}.label"])]), conf=conf)
    env.reset()
    states, rewards, dones, covered = [env.current_state[0].clone()], [], [], []
    done, t = False, 0
    while not done:
        covered.append(float(env.visited_all_patches))
        a = torch.tensor(int(inputs[f"c{i}.actions"][t]))
        S, r, done = env.step(action=a, state_update_net=fg, classifier_net=clf, device="cpu")
        states.append(S[0].clone()); rewards.append(r); dones.append(float(done)); t += 1
    outputs[f"c{i}.states"] = torch.stack(states).numpy()
    outputs[f"c{i}.rewards"] = np.array(rewards, np.float64)
    outputs[f"c{i}.dones"] = np.array(dones)
    outputs[f"c{i}.frozen"] = np.array(covered)
    outputs[f"c{i}.budget"] = np.array(env.max_time_steps)
ns = np.arange(1, 3001)
for f in (0.1, 0.2):
    conf = SimpleNamespace(device=torch.device("cpu"), frac_visit=f, cosine_threshold=0.95,
                           only_ce_as_reward=True)
    outputs[f"budget.{f}"] = np.array([
        WSICosineObservationEnv(torch.zeros(1, int(n), 1), torch.zeros(int(n), 1),
                                torch.tensor([0]), conf).max_time_steps for n in ns])
"""


def _our_episode(root: Path, case: dict, idx: int, freeze: bool) -> dict[str, np.ndarray]:
    env = SashaWSIEnv(
        root,
        split=None,
        frac=case["frac"],
        tau=TAU,
        anchor="state",
        freeze_covered=freeze,
        max_patches="split",
    )
    obs, info = env.reset(options={"slide_id": f"case{idx}"})
    n = info["n_patches"]
    states, rewards, dones, frozen = [obs["features"][:n].copy()], [], [], []
    terminated, t = False, 0
    while not terminated:
        obs, r, terminated, _, info = env.step(int(case["actions"][t]))
        assert not info["illegal_action"], (case["name"], t)
        states.append(obs["features"][:n].copy())
        rewards.append(float(r))
        dones.append(float(terminated))
        frozen.append(float(info["frozen"]))
        t += 1
    return {
        "states": np.stack(states),
        "rewards": np.array(rewards),
        "dones": np.array(dones),
        "frozen": np.array(frozen),
        "budget": np.array(env.budget),
    }


def env_checks(official: Path | None, fixtures: Path, write: bool) -> list[Check]:
    cases, hafed, tsu = _env_inputs()
    inputs: dict[str, np.ndarray] = {
        "d": np.array(D_ENV),
        "hidden": np.array(H_ENV),
        "tau": np.array(TAU),
        "n_cases": np.array(len(cases)),
        **_prefixed("hafed.", official_hafed_state(hafed)),
        **_prefixed("tsu.", official_tsu_state(tsu)),
    }
    for i, c in enumerate(cases):
        for key in ("z", "v", "label", "frac", "actions"):
            inputs[f"c{i}.{key}"] = np.asarray(c[key])
    theirs = _official(official, fixtures, write, "env", _ENV_SCRIPT, inputs)

    ns = np.arange(1, 3001)
    checks = [
        compare(
            "env.budget",
            {f"{f}": [episode_budget(f, int(n)) for n in ns] for f in (0.1, 0.2)},
            {f"{f}": theirs[f"budget.{f}"] for f in (0.1, 0.2)},
            note="⌈f·N⌉, N = 1..3000, f = 0.1, 0.2",
        )
    ]
    with tempfile.TemporaryDirectory(prefix="sasha-parity-env-") as tmp:
        slides = [
            SlideSpec(
                f"case{i}",
                CLASS_NAMES[c["label"]],
                "train",
                c["z"],
                c["v"],
                lattice_cells(len(c["z"])),
            )
            for i, c in enumerate(cases)
        ]
        root = write_workdir(Path(tmp), slides, hafed, tsu, tiffs=False)
        for i, c in enumerate(cases):
            ours = _our_episode(root, c, i, freeze=True)  # the paper preset's setting
            ref = {k: theirs[f"c{i}.{k}"] for k in ("states", "rewards", "dones", "budget")}
            margin = _cos_margin(c["z"])
            n_frozen = int(ours["frozen"].sum())
            checks.append(
                compare(
                    f"env.episode.{c['name']}",
                    {k: ours[k] for k in ref},
                    ref,
                    note=f"{len(ours['rewards'])} steps, {n_frozen} frozen, ||cos|-tau| >= {margin:.2f}",
                )
            )
            if c["freeze"]:
                checks.append(
                    compare(
                        f"env.frozen_steps.{c['name']}",
                        ours["frozen"],
                        theirs[f"c{i}.frozen"],
                        note="which steps are frozen (official: visited_all_patches)",
                    )
                )
                free = _our_episode(root, c, i, freeze=False)
                checks.append(
                    compare(
                        f"env.episode.{c['name']}.ours_default",
                        {k: free[k] for k in ref},
                        ref,
                        note="freeze_covered off (demo default): zooms go on",
                        counted=False,
                    )
                )
    return checks


# ------------------------------------------------------------------------------ TSU, HAFED

_NETS_SCRIPT = """
clf = official_hafed(384, 128)
fg = official_tsu(384)
with torch.no_grad():
    va, za, zj = (torch.from_numpy(inputs[k]) for k in ("va", "za", "zj"))
    n = zj.shape[0]
    outputs["tsu"] = fg(torch.cat([va.repeat(n, 1), za.repeat(n, 1), zj], dim=1)).numpy()
    x = torch.from_numpy(inputs["x"])
    outputs["distill"] = clf.get_hr_fa(x).numpy()
    sub, slide, a1, a2, afeat, raw = clf(x[None])
    outputs.update(branch=sub.numpy(), slide=slide[0].numpy(), attention=a2.numpy(),
                   attention_l1=a1.numpy(), v=afeat.numpy())
    logits, a2c = clf.classify(torch.from_numpy(inputs["S"])[None])
    outputs["classify"] = logits[0].numpy()
    outputs["classify_attention"] = a2c.numpy()
"""


def nets_checks(official: Path | None, fixtures: Path, write: bool) -> list[Check]:
    rng = np.random.default_rng(5)
    d = 384
    hafed = _seeded(3, lambda: HAFED(HAFEDConfig(d_in=d, n_classes=2))).eval()
    tsu = _seeded(4, lambda: TSU(TSUConfig(d=d))).eval()
    inputs = {
        "va": rng.standard_normal(d).astype(np.float32),
        "za": rng.standard_normal(d).astype(np.float32),
        "zj": rng.standard_normal((6, d)).astype(np.float32),
        "x": rng.standard_normal((12, 16, d)).astype(np.float32),
        "S": rng.standard_normal((30, d)).astype(np.float32),
        **_prefixed("hafed.", official_hafed_state(hafed)),
        **_prefixed("tsu.", official_tsu_state(tsu)),
    }
    theirs = _official(official, fixtures, write, "nets", _NETS_SCRIPT, inputs)
    t = {k: torch.from_numpy(v) for k, v in inputs.items() if not k.startswith(("hafed.", "tsu."))}
    with torch.no_grad():
        one = tsu(t["va"], t["za"], t["zj"]).numpy()
        rows = tsu(t["va"].expand(6, d), t["za"].expand(6, d), t["zj"]).numpy()
        distill = hafed.distill(t["x"]).numpy()
        out = hafed(t["x"])
        classify = hafed.classify(t["S"]).numpy()
        a, _ = hafed.instance_scores(t["S"])
        attention_c = torch.softmax(a, dim=0).T.numpy()
    return [
        compare("tsu.forward", rows, theirs["tsu"], note="FGlobal, d = 384, 6 rows"),
        compare("tsu.forward_one_anchor", one, theirs["tsu"], note="the env's one-anchor path"),
        compare("hafed.distill", distill, theirs["distill"], note="level 1 (get_hr_fa), eval"),
        compare(
            "hafed.forward",
            {
                "slide": out["slide_logits"].numpy(),
                "branch": out["branch_logits"].numpy(),
                "attention": out["attention"].numpy(),
                "attention_l1": out["attention_l1"].numpy(),
                "v": out["v"].numpy(),
            },
            {k: theirs[k] for k in ("slide", "branch", "attention", "attention_l1", "v")},
            note="eval: slide, branch logits, both attentions, v",
        ),
        compare(
            "hafed.classify",
            {"logits": classify, "attention": attention_c},
            {"logits": theirs["classify"], "attention": theirs["classify_attention"]},
            note="the env's reward classifier, eval",
        ),
    ]


_TSU_STEP_SCRIPT = """
import step5_tsu_training as step5
fg = load(FGlobal(ip_dim=3 * int(inputs["d"]), op_dim=int(inputs["d"]), hidden_dim=2 * int(inputs["d"])), "tsu.")
losses = []

class Recorded(torch.nn.MSELoss):
    def forward(self, a, b):
        loss = super().forward(a, b)
        losses.append(loss.item())
        return loss

opt = torch.optim.AdamW(filter(lambda p: p.requires_grad, fg.parameters()), lr=0.001,
                        weight_decay=float(inputs["reg"]))
conf = SimpleNamespace(lr=float(inputs["lr"]), min_lr=0.0, warmup_epoch=0,
                       train_epoch=int(inputs["epochs"]), cosine_threshold=float(inputs["tau"]),
                       logs="disabled")
loader = [{"hr": torch.from_numpy(inputs["v"])[None], "lr": torch.from_numpy(inputs["z"])[None]}]
np.random.seed(int(inputs["seed"]))
step5.train_one_epoch(fg, Recorded(), loader, opt, "cpu", 0, conf)
np.random.seed(int(inputs["seed"]))
outputs["anchor"] = np.array(np.random.choice(list(range(inputs["z"].shape[0]))))
outputs["loss"] = np.array(losses)
outputs["lr_used"] = np.array(opt.param_groups[0]["lr"])
for k, p in fg.state_dict().items():
    outputs["w." + k] = p.numpy()
"""


def tsu_step_checks(official: Path | None, fixtures: Path, write: bool) -> list[Check]:
    d, seed = 32, 7
    rng = np.random.default_rng(8)
    z = grouped_features(rng, [6, 5, 4, 3, 2, 1, 1], d, signs=True)
    v = (z + 0.5 * rng.standard_normal(z.shape)).astype(np.float32)
    cfg = TSUConfig(d=d, tau=TAU, anchor_in_target=True, max_epochs=200)
    init = _seeded(9, lambda: TSU(cfg))
    inputs = {
        "d": np.array(d),
        "z": z,
        "v": v,
        "seed": np.array(seed),
        "lr": np.array(cfg.lr),
        "reg": np.array(cfg.weight_decay),
        "epochs": np.array(cfg.max_epochs),
        "tau": np.array(TAU),
        **_prefixed("tsu.", official_tsu_state(init)),
    }
    theirs = _official(official, fixtures, write, "tsu_step", _TSU_STEP_SCRIPT, inputs)
    anchor = int(theirs["anchor"])

    def our_step(include_anchor: bool) -> dict[str, np.ndarray]:
        module = TSUModule(cfg)
        module.model.load_state_dict(init.state_dict())
        module.train()
        batch = sample_tsu_pairs(
            torch.from_numpy(z),
            torch.from_numpy(v),
            TAU,
            anchors=torch.tensor([anchor]),
            include_anchor=include_anchor,
        )
        # the optimiser of TSUModule.configure_optimizers, whose cosine schedule starts at lr
        opt = torch.optim.AdamW(module.parameters(), lr=module.lr, weight_decay=module.weight_decay)
        with warnings.catch_warnings():  # self.log outside a Trainer: a warning, no-op
            warnings.simplefilter("ignore")
            loss = module.training_step(batch, 0)
        opt.zero_grad()
        loss.backward()
        opt.step()
        out = {"loss": np.array([loss.item()]), "lr_used": np.array(opt.param_groups[0]["lr"])}
        out.update({f"w.{k}": w for k, w in official_tsu_state(module.model).items()})
        return out

    ref = {k: theirs[k] for k in theirs if k == "loss" or k == "lr_used" or k.startswith("w.")}
    n_pairs = int(
        sample_tsu_pairs(
            torch.from_numpy(z), torch.from_numpy(v), TAU, anchors=torch.tensor([anchor]),
            include_anchor=True,
        )[3].shape[0]
    )  # fmt: skip
    return [
        compare(
            "tsu.train_step",
            our_step(include_anchor=True),
            ref,
            note=f"anchor_in_target: loss, lr, weights after one AdamW step ({n_pairs} pairs)",
        ),
        compare(
            "tsu.train_step.ours_default",
            our_step(include_anchor=False),
            ref,
            note="anchor left out of its targets (demo default)",
            counted=False,
        ),
    ]


_TSU_VAL_SCRIPT = """
import step5_tsu_training as step5
d = int(inputs["d"])
fg = load(FGlobal(ip_dim=3 * d, op_dim=d, hidden_dim=2 * d), "tsu.")
conf = SimpleNamespace(cosine_threshold=float(inputs["tau"]), logs="disabled")
n_slides = int(inputs["n_slides"])
loader = [{"hr": torch.from_numpy(inputs[f"v{i}"])[None], "lr": torch.from_numpy(inputs[f"z{i}"])[None]}
          for i in range(n_slides)]
np.random.seed(int(inputs["seed"]))
outputs["loss"] = np.array(step5.evaluate(fg, torch.nn.MSELoss(), loader, "cpu", conf, "Val", 0))
np.random.seed(int(inputs["seed"]))
outputs["anchors"] = np.array([np.random.choice(list(range(inputs[f"z{i}"].shape[0])))
                               for i in range(n_slides)])
"""


def tsu_validation_checks(official: Path | None, fixtures: Path, write: bool) -> list[Check]:
    """The TSU's validation loss with ``validation="official"`` against step5's ``evaluate``
    on the same anchors (one per slide, from a seeded ``np.random``)."""
    d, seed = 32, 11
    rng = np.random.default_rng(12)
    slides = [
        grouped_features(rng, groups, d, signs=True) for groups in ([5, 3, 1], [2, 2, 4, 1, 1], [7])
    ]
    vs = [(z + 0.5 * rng.standard_normal(z.shape)).astype(np.float32) for z in slides]
    cfg = TSUConfig(d=d, tau=TAU, anchor_in_target=True, validation="official")
    init = _seeded(13, lambda: TSU(cfg))
    inputs: dict[str, np.ndarray] = {
        "d": np.array(d),
        "tau": np.array(TAU),
        "seed": np.array(seed),
        "n_slides": np.array(len(slides)),
        **_prefixed("tsu.", official_tsu_state(init)),
    }
    for i, (z, v) in enumerate(zip(slides, vs, strict=True)):
        inputs[f"z{i}"], inputs[f"v{i}"] = z, v
    theirs = _official(official, fixtures, write, "tsu_validation", _TSU_VAL_SCRIPT, inputs)

    def our_loss(mode: str) -> float:
        module = TSUModule(TSUConfig(d=d, tau=TAU, validation=mode), seed=0)
        module.model.load_state_dict(init.state_dict())
        module.eval()
        module.on_validation_epoch_start()
        with torch.no_grad():
            for i, (z, v) in enumerate(zip(slides, vs, strict=True)):
                a = torch.tensor([int(theirs["anchors"][i])])
                batch = sample_tsu_pairs(
                    torch.from_numpy(z), torch.from_numpy(v), TAU, anchors=a, include_anchor=True
                )
                module.validation_step(batch, i)
        sums = module._val_sums
        return float(sums[0] / sums[2])

    return [
        compare(
            "tsu.validation_loss",
            our_loss("official"),
            theirs["loss"],
            note=f"validation official: mean of per-slide MSE, {len(slides)} slides",
        ),
        compare(
            "tsu.validation_loss.ours_default",
            our_loss("fixed"),
            theirs["loss"],
            note="pooled over pairs (demo default; same anchors here)",
            counted=False,
        ),
    ]


# ------------------------------------------------------------------------------ preset values

_PRESET_SCRIPT = """
import re, yaml
from pathlib import Path
root = Path(sys.path[0])
rl = yaml.safe_load((root / "config/camelyon_rl_config.yml").read_text())
tsu_text = (root / "config/camelyon_tsu_config.yml").read_text()
tsu = yaml.safe_load(tsu_text)
hafed = yaml.safe_load((root / "config/camelyon_config.yml").read_text())
rl_text = (root / "config/camelyon_rl_config.yml").read_text()
# the f = 0.2 budget and the f = 0.1 TSU epochs are stated as commented lines at 6385fe6
other_frac = float(re.search(r"^#\\s*frac_visit:\\s*([0-9.]+)", rl_text, re.M).group(1))
epochs_01 = int(re.search(r"^#\\s*train_epoch:\\s*(\\d+)\\s*#.*0\\.1", tsu_text, re.M).group(1))
assert "0.2" in re.search(r"^train_epoch:.*$", tsu_text, re.M).group(0)
fg = FGlobal()
outputs.update({
    "env.fracs": np.array(sorted([float(rl["frac_visit"]), other_frac])),
    "env.tau": np.array(rl["cosine_threshold"]),
    "env.reward_ce": np.array(float(rl["only_ce_as_reward"])),
    "tsu.tau": np.array(tsu["cosine_threshold"]),
    "tsu.epochs_f0.1": np.array(epochs_01),
    "tsu.epochs_f0.2": np.array(tsu["train_epoch"]),
    "tsu.lr": np.array(tsu["lr"]),
    "tsu.weight_decay": np.array(tsu["reg"]),
    "tsu.batch_slides": np.array(tsu["B"]),
    "tsu.hidden": np.array(fg.fc1.out_features),
    "hafed.epochs": np.array(hafed["train_epoch"]),
    "hafed.lr": np.array(hafed["lr"]),
    "hafed.weight_decay": np.array(hafed["wd"]),
    "hafed.hidden": np.array(hafed["D_inner"]),
    "hafed.branches_l1": np.array(hafed["n_token_1"]),
    "hafed.branches_l2": np.array(hafed["n_token_2"]),
    "hafed.top_k_l1": np.array(hafed["n_masked_patch_1"]),
    "hafed.top_k_l2": np.array(hafed["n_masked_patch_2"]),
    "hafed.mask_drop": np.array(hafed["mask_drop"]),
    "hafed.batch_slides": np.array(hafed["B"]),
})
"""

# where each official value is stated at 6385fe6
_SOURCES = {
    "env.fracs": "camelyon_rl_config.yml:37-38",
    "env.tau": "camelyon_rl_config.yml:39",
    "env.reward_ce": "camelyon_rl_config.yml:20",
    "tsu.tau": "camelyon_tsu_config.yml:11",
    "tsu.epochs_f0.1": "camelyon_tsu_config.yml:2",
    "tsu.epochs_f0.2": "camelyon_tsu_config.yml:1",
    "tsu.lr": "camelyon_tsu_config.yml:6",
    "tsu.weight_decay": "camelyon_tsu_config.yml:5",
    "tsu.batch_slides": "camelyon_tsu_config.yml:3",
    "tsu.hidden": "fglobal_mlp.py:7",
    "hafed.epochs": "camelyon_config.yml:4",
    "hafed.lr": "camelyon_config.yml:8",
    "hafed.weight_decay": "camelyon_config.yml:7",
    "hafed.hidden": "camelyon_config.yml:34",
    "hafed.branches_l1": "camelyon_config.yml:18",
    "hafed.branches_l2": "camelyon_config.yml:19",
    "hafed.top_k_l1": "camelyon_config.yml:20",
    "hafed.top_k_l2": "camelyon_config.yml:21",
    "hafed.mask_drop": "camelyon_config.yml:22",
    "hafed.batch_slides": "camelyon_config.yml:5",
}


def paper_values(d: int = 384) -> dict[str, np.ndarray]:
    """The env/TSU/HAFED values ``--preset paper`` resolves to, as the stages build them."""
    # lazy: the data modules' defaults (Lightning), only for this check
    from sasha_models.data import BagDataModule, TSUPairDataModule

    cfg = load_config("paper")
    agents = cfg["agents"]
    section = dict(cfg.get("tsu") or {})
    tau = float(section.get("tau", 0.95))
    tsus = tsu_configs(section, d, tau)
    hafed_section = dict(cfg.get("hafed") or {})
    fit_settings(hafed_section)  # how the stage fits (select_ties, patience): not HAFEDConfig keys
    hafed = HAFEDConfig(d_in=d, n_classes=2, **hafed_section)
    tsu_batch = inspect.signature(TSUPairDataModule).parameters["batch_size"].default
    bag_batch = inspect.signature(BagDataModule).parameters["batch_size"].default
    return {
        "env.fracs": np.array(sorted(agents["fracs"])),
        "env.tau": np.array(tau),
        "env.reward_ce": np.array(float(agents.get("reward", "ce") == "ce")),
        "tsu.tau": np.array(tsus[0.1].tau),
        "tsu.epochs_f0.1": np.array(tsus[0.1].max_epochs),
        "tsu.epochs_f0.2": np.array(tsus[0.2].max_epochs),
        "tsu.lr": np.array(tsus[0.1].lr),
        "tsu.weight_decay": np.array(tsus[0.1].weight_decay),
        "tsu.batch_slides": np.array(tsu_batch),
        "tsu.hidden": np.array(tsus[0.1].d_hidden or 2 * d),
        "hafed.epochs": np.array(hafed.max_epochs),
        "hafed.lr": np.array(hafed.lr),
        "hafed.weight_decay": np.array(hafed.weight_decay),
        "hafed.hidden": np.array(hafed.d_hidden),
        "hafed.branches_l1": np.array(hafed.n_branches_l1),
        "hafed.branches_l2": np.array(hafed.n_branches),
        "hafed.top_k_l1": np.array(hafed.top_k_l1),
        "hafed.top_k_l2": np.array(hafed.top_k),
        "hafed.mask_drop": np.array(hafed.mask_drop),
        "hafed.batch_slides": np.array(bag_batch),
    }


def preset_checks(official: Path | None, fixtures: Path, write: bool) -> list[Check]:
    theirs = _official(official, fixtures, write, "preset", _PRESET_SCRIPT, {})
    ours = paper_values()
    checks = [
        compare(f"preset.{k}", ours[k], theirs.get(k, np.array(math.nan)), note=_SOURCES[k])
        for k in _SOURCES
    ]
    extra = set(theirs) - set(_SOURCES)
    if extra:
        checks.append(
            Check("preset: unchecked official values", math.inf, ok=False, note=str(extra))
        )
    return checks


def checks(official: Path | None, fixtures: Path, write: bool) -> list[Check]:
    """Every env/TSU/HAFED/preset check (see the module docstring)."""
    torch.set_num_threads(1)
    return [
        *env_checks(official, fixtures, write),
        *nets_checks(official, fixtures, write),
        *tsu_step_checks(official, fixtures, write),
        *tsu_validation_checks(official, fixtures, write),
        *preset_checks(official, fixtures, write),
    ]
