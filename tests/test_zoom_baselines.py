"""The attention baselines' choice of patches: greedy_attention, attention_topk and
lowres_attention_topk (design.md, contract — results.json)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sasha_env.agents.episodes import (
    attention_topk_policy,
    greedy_attention_policy,
    lowres_attention_topk_policy,
    run_episodes,
)
from sasha_env.envs.wsi import SashaWSIEnv
from sasha_env.testing import random_models, random_slides, write_workdir
from sasha_models.hafed import AttentionMILClassifier

D = 8


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """Every slide of the cohort, zoomed whole (f = 1), with a TSU that updates similar rows."""
    hafed, tsu = random_models(D, tau=0.9, seed=3)
    slides = random_slides(n_slides=8, d=D, n_range=(8, 14), seed=1)
    root = write_workdir(tmp_path_factory.mktemp("zoom_wd"), slides, hafed, tsu, tiffs=False)
    return SashaWSIEnv(root, split=None, frac=1.0)


def _attention(clf: torch.nn.Module, S: np.ndarray) -> np.ndarray:
    """Softmax per branch over the rows, averaged over branches, computed here independently."""
    with torch.no_grad():
        logits = clf.attention(torch.from_numpy(S).float())  # (N, M): the gated attention
    return torch.softmax(logits, dim=0).mean(dim=1).numpy()


def _zoom_order(env: SashaWSIEnv, policy, slide_id: str) -> list[int]:
    (episode,) = run_episodes(env, policy, [slide_id])
    assert episode["slide_id"] == slide_id
    return env.zoomed


def _hand_set_lowres() -> AttentionMILClassifier:
    """A low-res classifier whose attention logits are ``0.5·tanh(z[:, 0])`` on every branch:
    it attends most to the rows with the largest first feature."""
    model = AttentionMILClassifier(D, 2, d_hidden=4, n_branches=3).eval()
    gate = model.attention
    with torch.no_grad():
        for p in gate.parameters():
            p.zero_()
        gate.V.weight[0, 0] = 1.0  # tanh(z0) in hidden unit 0; sigmoid(0) = 0.5 gates it
        gate.w.weight[:, 0] = 1.0
    return model


def test_greedy_attention_zooms_the_argmax_of_current_attention(env):
    clf = env.hafed.level2
    policy = greedy_attention_policy()
    for sid in env.slide_ids:
        env.reset(options={"slide_id": sid})
        done = False
        while not done:
            legal = env.action_masks()[: env.slide.n]
            expected = int(np.argmax(np.where(legal, _attention(clf, env.state()), -np.inf)))
            action = policy(env, {})
            assert action == expected, (sid, env.zoomed)
            _, _, done, _, _ = env.step(action)


def test_attention_topk_keeps_the_low_res_order_and_differs_from_greedy(env):
    clf = env.hafed.level2
    topk, greedy = attention_topk_policy(), greedy_attention_policy()
    differ = 0
    for sid in env.slide_ids:
        env.reset(options={"slide_id": sid})
        initial = _attention(clf, env.state())  # HAFED on the low-res state
        order = _zoom_order(env, topk, sid)
        assert order == np.argsort(-initial, kind="stable").tolist(), sid
        differ += _zoom_order(env, greedy, sid) != order
    assert differ, "greedy_attention followed the low-res order on every slide"


def test_attention_topk_recomputes_on_each_new_slide(env):
    """One policy object over several episodes: each slide gets its own low-res order."""
    policy = attention_topk_policy()
    clf = env.hafed.level2
    for sid in [*env.slide_ids, env.slide_ids[0]]:
        env.reset(options={"slide_id": sid})
        initial = _attention(clf, env.state())
        assert _zoom_order(env, policy, sid) == np.argsort(-initial, kind="stable").tolist()


def test_lowres_attention_topk_follows_the_low_res_classifier(env):
    lowres = _hand_set_lowres()
    policy, hafed_topk = lowres_attention_topk_policy(lowres), attention_topk_policy()
    differ = 0
    for sid in env.slide_ids:
        env.reset(options={"slide_id": sid})
        z = env.slide.z.numpy()
        order = _zoom_order(env, policy, sid)
        assert order == np.argsort(-z[:, 0], kind="stable").tolist(), sid
        differ += _zoom_order(env, hafed_topk, sid) != order
    assert differ, "the low-res classifier's order equalled HAFED's on every slide"


def test_lowres_attention_topk_at_a_budget_zooms_the_top_patches(tmp_path):
    hafed, tsu = random_models(D, tau=0.9, seed=0)
    root = write_workdir(tmp_path, random_slides(d=D, n_range=(10, 12)), hafed, tsu, tiffs=False)
    env = SashaWSIEnv(root, split=None, frac=0.3)
    policy = lowres_attention_topk_policy(_hand_set_lowres())
    for sid in env.slide_ids:
        env.reset(options={"slide_id": sid})
        z0 = env.slide.z.numpy()[:, 0]
        zoomed = _zoom_order(env, policy, sid)
        assert len(zoomed) == env.budget
        assert zoomed == np.argsort(-z0, kind="stable")[: env.budget].tolist()
