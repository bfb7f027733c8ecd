"""Adaptive reading: stop when confident, refer when not (issue 23).

Fast: pure functions on hand-made traces, and a synthetic workdir (sasha_env.testing) for the
environment option and the val-only fit.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from sasha_models.calibration import Calibration
from sasha_models.spaces import episode_budget
from sasha_models.stopping import (
    StopRule,
    apply_rule,
    fit_capped_rule,
    fit_stop_rule,
    referral_metrics,
    risk_coverage,
)


def _trace(conf: list[float]) -> tuple[np.ndarray, list[int], int]:
    """A binary trace whose positive-class probability after each step is ``conf``."""
    p = np.array(conf, np.float32)
    return np.stack([1 - p, p], 1), list(range(1, len(conf) + 1)), 10


# ----------------------------------------------------------------------------- pure


def test_the_rule_stops_at_the_first_zoom_past_its_threshold_else_at_the_cap():
    rule = StopRule(0.8, 0.7)
    out = apply_rule(*_trace([0.6, 0.79, 0.85, 0.95]), rule)
    assert (out.steps, out.n_zoomed, out.stopped, out.referred) == (3, 3, "confident", False)
    assert out.frac_read == pytest.approx(0.3) and out.confidence == pytest.approx(0.85)
    cap = apply_rule(*_trace([0.6, 0.55, 0.62]), rule)
    assert (cap.steps, cap.stopped, cap.referred) == (3, "cap", True)  # 0.62 < 0.7
    sure = apply_rule(*_trace([0.6, 0.55, 0.75]), rule)
    assert (sure.stopped, sure.referred) == ("cap", False)  # at the cap, but above 0.7
    assert apply_rule(*_trace([0.99, 1.0]), StopRule(1.0)).stopped == "cap"  # 1 never fires


def test_the_confidence_is_the_calibrated_one():
    cal = Calibration(temperature=4.0, bias=(0.0, 0.0))  # softens 0.9 to about 0.64
    out = apply_rule(*_trace([0.9, 0.9]), StopRule(0.8, 0.0, cal))
    assert out.stopped == "cap" and out.confidence < 0.7
    assert apply_rule(*_trace([0.9, 0.9]), StopRule(0.8)).stopped == "confident"


def test_the_stop_threshold_is_the_least_reading_within_the_margin_of_the_target():
    # two negatives and two positives; the positives become confident at step 2, the
    # negatives at step 1 (p = 0.2); at thresholds >= 0.95 only the cap ranks them right
    val = [
        _trace([0.2, 0.1, 0.1, 0.1]),
        _trace([0.3, 0.35, 0.1, 0.1]),
        _trace([0.4, 0.97, 0.97, 0.99]),
        _trace([0.45, 0.9, 0.96, 0.99]),
    ]
    labels = np.array([0, 0, 1, 1])
    rule = fit_stop_rule(val, labels, None, target_auc=1.0, margin=0.0)
    curve = {c["threshold"]: c for c in rule.info["val_curve"]}
    ok = [c for c in curve.values() if c["auc"] is not None and c["auc"] >= 1.0]
    assert rule.info["val_mean_frac"] == min(c["mean_frac"] for c in ok)
    assert curve[rule.threshold]["auc"] == 1.0
    assert rule.info["fitted_on"] == "val" and rule.info["n_slides"] == 4
    # a target nothing reaches: the highest AUC, reading least among those
    far = fit_stop_rule(val, 1 - labels, None, target_auc=1.0, margin=0.0)
    best = max(c["auc"] for c in far.info["val_curve"])
    assert far.info["val_auc"] == best


def test_a_threshold_inside_a_dip_of_the_val_curve_is_not_chosen():
    # Loose thresholds stop every slide early and happen to rank the four right; at 0.9 the
    # second positive stops on a confidently wrong step (p = 0.06) and the AUC dips; from 0.95
    # on every slide reads on to where it is right. A fit that takes the least reading
    # threshold with AUC 1 takes the fluke (0.5); the stable fit takes 0.95.
    val = [
        _trace([0.18, 0.07, 0.04, 0.02]),
        _trace([0.4, 0.08, 0.04, 0.01]),
        _trace([0.87, 0.06, 0.5, 0.995]),
        _trace([0.6, 0.7, 0.96, 0.999]),
    ]
    labels = np.array([0, 0, 1, 1])
    rule = fit_stop_rule(val, labels, None, target_auc=1.0, margin=0.0)
    curve = {c["threshold"]: c for c in rule.info["val_curve"]}
    assert curve[0.5]["auc"] == 1.0 and curve[0.5]["mean_frac"] < curve[0.95]["mean_frac"]
    assert curve[0.9]["auc"] < 1.0
    assert rule.threshold == 0.95
    assert all(c["auc"] == 1.0 for t, c in curve.items() if t >= rule.threshold)


def test_the_referral_threshold_refers_the_fewest_slides_that_bring_the_error_down():
    # every slide reaches the cap (threshold 1); two wrong ones at low confidence
    val = [_trace([p]) for p in (0.95, 0.9, 0.85, 0.6, 0.55)]
    labels = np.array([1, 1, 1, 0, 1])  # 0.6 → predicted 1, wrong; 0.55 right
    rule = fit_stop_rule(val, labels, None, None, max_auto_error=0.0, thresholds=(1.0,))
    assert rule.threshold == 1.0
    # refer the 0.55 and 0.6 slides (confidence just above 0.6), no more
    assert 0.6 < rule.refer_below < 0.85
    lax = fit_stop_rule(val, labels, None, None, max_auto_error=0.25, thresholds=(1.0,))
    assert lax.refer_below == 0.0  # 1 error in 5 is allowed: refer nothing


def test_referral_metrics_by_hand():
    p1 = np.array([0.9, 0.2, 0.6, 0.1, 0.55, 0.4])
    probs = np.stack([1 - p1, p1], 1)
    labels = np.array([1, 0, 0, 0, 1, 1])
    referred = np.array([False, False, False, False, True, False])
    m = referral_metrics(probs, labels, referred)
    assert m["share_referred"] == pytest.approx(1 / 6) and m["n_auto"] == 5
    # automatic: positives 0.9 (right), 0.4 (wrong) → sensitivity 1/2; negatives 0.2, 0.6,
    # 0.1 → specificity 2/3
    assert m["sensitivity"] == pytest.approx(0.5) and m["specificity"] == pytest.approx(2 / 3)
    # least automatic positive is 0.4: slides below it, not referred: 0.2 and 0.1
    assert m["cleared_at_full_sensitivity"] == pytest.approx(2 / 6)
    coverage, risk = risk_coverage(probs.max(1), probs.argmax(1) == labels)
    # by confidence: 0.9 ok, 0.1 ok, 0.2 ok, 0.6 wrong, 0.4 wrong, 0.55 ok
    assert risk.tolist() == pytest.approx([0, 0, 0, 1 / 4, 2 / 5, 2 / 6])
    assert m["aurc"] == pytest.approx(np.mean([0, 0, 0, 1 / 4, 2 / 5, 2 / 6]))
    assert coverage[-1] == 1.0 and len(m["risk_coverage"]) == 6


def test_a_rule_round_trips_and_refuses_bad_thresholds():
    rule = StopRule(0.9, 0.6, Calibration(2.0, (0.0, 0.5)), {"fitted_on": "val"})
    back = StopRule.from_dict(json.loads(json.dumps(rule.to_dict())))
    assert back == rule and back.info["fitted_on"] == "val"
    with pytest.raises(ValueError, match="stop threshold"):
        StopRule(1.5)
    with pytest.raises(ValueError, match="referral threshold"):
        StopRule(0.9, -0.1)


def test_per_class_thresholds_stop_on_each_class_at_its_own_level():
    rule = StopRule.per_class((0.99, 0.7))  # rule out at 0.99, rule in at 0.7
    assert rule.threshold == 0.99
    neg = apply_rule(*_trace([0.1, 0.05, 0.02, 0.005]), rule)  # p(normal) 0.9, 0.95, 0.98, 0.995
    assert (neg.steps, neg.stopped) == (4, "confident")
    pos = apply_rule(*_trace([0.4, 0.75, 0.9]), rule)
    assert (pos.steps, pos.stopped) == (2, "confident")
    shared = StopRule(0.9)
    assert apply_rule(*_trace([0.1, 0.05]), shared).steps == 2  # 0.95 > 0.9: rules out at once
    # (t, t) is the shared rule
    for conf in ([0.1, 0.05, 0.02], [0.4, 0.75, 0.95], [0.5, 0.5]):
        a = apply_rule(*_trace(conf), StopRule.per_class((0.9, 0.9)))
        assert a.steps == apply_rule(*_trace(conf), shared).steps
    with pytest.raises(ValueError, match="largest"):
        StopRule(0.9, 0.0, None, {}, (0.99, 0.7))
    with pytest.raises(ValueError, match="class thresholds"):
        StopRule.per_class((0.9, 0.8)).confident(np.array([0.2, 0.3, 0.5]))
    back = StopRule.from_dict(json.loads(json.dumps(rule.to_dict())))
    assert back == rule and back.class_thresholds == (0.99, 0.7)
    legacy = {k: v for k, v in StopRule(0.9).to_dict().items() if k != "class_thresholds"}
    assert StopRule.from_dict(legacy).class_thresholds is None
    assert rule.describe() == "p[0] > 0.99 or p[1] > 0.7"
    assert shared.describe() == "confidence > 0.9"


def _search_traces() -> tuple[list, np.ndarray]:
    """Four negatives that look normal from the first zoom, three positives whose tumour is
    reached at step 1, 3 and 5 of 6 (looking normal before it). A shared threshold that rules
    out early also stops the late positives before their tumour; per class, ruling in at once
    and ruling out only at the cap ranks every slide right."""
    neg = [_trace([0.2, 0.15, 0.1, 0.08, 0.06, 0.05]) for _ in range(4)]
    pos = [
        _trace([0.9, 0.95, 0.97, 0.98, 0.99, 0.99]),
        _trace([0.06, 0.05, 0.9, 0.95, 0.97, 0.99]),
        _trace([0.05, 0.04, 0.03, 0.03, 0.9, 0.97]),
    ]
    return neg + pos, np.array([0] * 4 + [1] * 3)


def test_the_per_class_fit_rules_in_early_and_out_late_where_the_shared_one_cannot():
    val, labels = _search_traces()
    shared = fit_stop_rule(val, labels, None, target_auc=1.0, margin=0.0)
    per = fit_stop_rule(val, labels, None, target_auc=1.0, margin=0.0, per_class=True)
    assert per.info["val_auc"] == 1.0 and shared.info["val_auc"] == 1.0
    assert per.info["val_mean_frac"] < shared.info["val_mean_frac"]
    assert per.class_thresholds is not None and per.info["per_class"] is True
    t_normal, t_tumour = per.class_thresholds
    assert t_tumour < t_normal  # ruled in sooner than out
    # on the val traces themselves the fitted rule is what the fit says it is
    outs = [apply_rule(p, z, n, per) for p, z, n in val]
    assert np.mean([o.frac_read for o in outs]) == pytest.approx(per.info["val_mean_frac"])
    # every stricter rule also keeps the target, so loosening the normal class is not chosen
    # if it breaks the ranking: ruling out at 0.85 stops the late positives before their
    # tumour, below the negatives (which stop at 0.1)
    assert t_normal >= 0.97
    loose = StopRule.per_class((0.85, t_tumour))
    probs = np.stack([apply_rule(p, z, n, loose).probabilities for p, z, n in val])
    assert probs[-2:, 1].min() < probs[:4, 1].min()


def test_the_likelihood_criterion_refuses_a_confident_wrong_stop_that_still_ranks_right():
    # Negatives look normal at once (p = 0.04); one positive looks just as normal (p = 0.045)
    # until its tumour is reached at step 3. Stopping at 0.95 rules it out with p = 0.045,
    # still ranked above every negative, so val AUC stays 1; its likelihood does not.
    neg = [_trace([0.04, 0.04, 0.04, 0.04]) for _ in range(3)]
    pos = [_trace([0.9, 0.99, 0.99, 0.99]), _trace([0.045, 0.045, 0.9, 0.99])]
    val, labels = neg + pos, np.array([0, 0, 0, 1, 1])
    auc_only = fit_stop_rule(val, labels, None, target_auc=1.0, margin=0.0)
    assert auc_only.threshold < 0.955 and auc_only.info["val_auc"] == 1.0
    late = apply_rule(*val[-1], auc_only)
    assert late.steps == 1  # ruled out before its tumour
    nll = fit_stop_rule(val, labels, None, target_auc=1.0, margin=0.0, nll_margin=0.1)
    assert nll.threshold > 0.955 and nll.info["nll_margin"] == 0.1
    assert apply_rule(*val[-1], nll).probabilities[1] > 0.9  # read on to its tumour
    for per_class in (False, True):
        rule = fit_stop_rule(val, labels, None, 1.0, 0.0, nll_margin=0.1, per_class=per_class)
        assert apply_rule(*val[-1], rule).steps >= 3


def test_stop_classes_rule_slides_in_early_and_never_out():
    val, labels = _search_traces()
    rule = fit_stop_rule(val, labels, None, 1.0, 0.0, stop_classes=[1])
    assert rule.class_thresholds is not None and rule.class_thresholds[0] == 1.0
    assert rule.info["stop_classes"] == [1] and rule.info["val_auc"] == 1.0
    outs = [apply_rule(p, z, n, rule) for p, z, n in val]
    assert all(o.stopped == "cap" for o in outs[:4])  # normal-looking slides read to the cap
    assert outs[4].steps == 1  # ruled in at its first zoom
    with pytest.raises(ValueError, match="class indices"):
        fit_stop_rule(val, labels, None, 1.0, stop_classes=[2])


def test_the_per_class_grid_agrees_with_the_rule_applied_slide_by_slide():
    from sasha_models.stopping import _per_class_grid

    val, labels = _search_traces()
    cal = Calibration(temperature=1.5, bias=(0.0, 0.3))
    grid = (0.6, 0.8, 0.9, 0.97, 1.0)
    index, frac, auc, nll = _per_class_grid(val, labels, cal, grid)
    assert len(index) == len(grid) ** 2
    from sasha_models.metrics import classification_metrics

    for g in (0, 3, 7, 12, 24):
        rule = StopRule.per_class([grid[i] for i in index[g]], 0.0, cal)
        outs = [apply_rule(p, z, n, rule) for p, z, n in val]
        assert frac[g] == pytest.approx(np.mean([o.frac_read for o in outs]))
        probs = np.stack([o.probabilities for o in outs])
        assert auc[g] == pytest.approx(classification_metrics(probs, labels)["auc"])


def test_a_rule_with_its_own_cap_reads_no_further():
    rise = [0.1, 0.2, 0.3, 0.4, 0.95, 0.99]  # confident at zoom 5 of 6 (N = 10)
    assert apply_rule(*_trace(rise), StopRule(0.9)).steps == 5
    capped = StopRule(0.9, 0.85, max_frac=0.3)  # at most ceil(0.3 * 10) = 3 zooms
    out = apply_rule(*_trace(rise), capped)
    assert (out.steps, out.n_zoomed, out.stopped) == (3, 3, "cap")
    assert out.confidence == pytest.approx(0.7) and out.referred  # 0.7 < 0.85, at its cap
    assert apply_rule(*_trace([0.95, 0.99]), capped).steps == 1  # stops before its cap too
    assert apply_rule(*_trace(rise), StopRule(0.9, max_frac=0.9)).steps == 5  # cap above T
    back = StopRule.from_dict(json.loads(json.dumps(capped.to_dict())))
    assert back == capped and back.max_frac == 0.3
    assert capped.describe() == "confidence > 0.9, reading at most 0.3"
    legacy = {k: v for k, v in StopRule(0.9).to_dict().items() if k != "max_frac"}
    assert StopRule.from_dict(legacy).max_frac is None
    with pytest.raises(ValueError, match="max_frac"):
        StopRule(0.9, max_frac=0.0)


def test_a_mean_reading_budget_lowers_the_cap_not_the_rule_in_threshold():
    traces, y = _search_traces()  # 6 zooms of N = 10: the agent's cap is 0.6
    kw = {"margin": 0.01, "stop_classes": [1]}
    free = fit_stop_rule(traces, y, None, 1.0, **kw)
    assert free.info["val_mean_frac"] == pytest.approx((4 * 0.6 + 0.1 + 0.3 + 0.5) / 7)
    within = fit_capped_rule(traces, y, None, 1.0, 0.5, 0.6, 0.1, **kw)
    assert within.max_frac is None and within.class_thresholds == free.class_thresholds
    rule = fit_capped_rule(traces, y, None, 1.0, 0.4, 0.6, 0.1, **kw)
    # cap 0.5 reads (4 * 0.5 + 0.1 + 0.3 + 0.5) / 7 = 0.414 > 0.4; cap 0.4 reads 0.343
    assert rule.max_frac == pytest.approx(0.4)
    assert rule.class_thresholds[0] == 1.0  # still never rules a slide out before the cap
    read = [apply_rule(*t, rule).frac_read for t in traces]
    assert np.mean(read) == pytest.approx(rule.info["val_mean_frac"]) and np.mean(read) <= 0.4
    assert max(read) <= 0.4 and rule.info["mean_frac_budget"] == 0.4 and rule.info["budget_met"]
    # a budget no cap meets takes the smallest, and says so
    least = fit_capped_rule(traces, y, None, 1.0, 0.01, 0.6, 0.1, **kw)
    assert least.max_frac == 0.1 and least.info["budget_met"] is False
    # a budget not a multiple of the step: the caps below it are (0.55 reads 6 zooms of 10)
    odd = fit_capped_rule(traces, y, None, 1.0, 0.45, 0.55, 0.1, **kw)
    assert odd.max_frac == pytest.approx(0.5) and odd.info["val_mean_frac"] == pytest.approx(
        (4 * 0.5 + 0.1 + 0.3 + 0.5) / 7
    )
    with pytest.raises(ValueError, match="mean reading budget"):
        fit_capped_rule(traces, y, None, 1.0, 0.0, 0.6)


def test_the_per_class_fit_refuses_many_classes():
    p = np.full((3, 4), 0.25, np.float32)
    with pytest.raises(ValueError, match="per_class: false"):
        fit_stop_rule([(p, [1, 2, 3], 10)], np.array([0]), None, 1.0, per_class=True)


# ----------------------------------------------------------------------------- workdir


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    from sasha_env.testing import make_workdir

    return make_workdir(
        tmp_path_factory.mktemp("adaptive") / "wd", n_slides=12, n_patches=(10, 16), fracs=(0.5,)
    )


@pytest.mark.parametrize("per_class", [False, True], ids=["shared", "per-class"])
def test_the_env_option_never_reads_past_a_slides_threshold(made, per_class):
    from sasha_env.agents.adaptive import traces
    from sasha_env.agents.config import AgentConfig
    from sasha_env.agents.envs import load_agent
    from sasha_env.agents.episodes import agent_policy, run_episodes
    from sasha_env.workdir import Workdir

    wd, cfg = Workdir(made), AgentConfig.from_dict(made.config["agents"])
    agent = load_agent(wd, 0.5)
    ids = list(made.slide_ids)
    policy = agent_policy(agent.policy)
    full = run_episodes(agent.make_env(wd, None, cfg), policy, ids, trace=True)
    cal = Calibration(temperature=0.5, bias=(0.0, 0.1))
    conf = np.concatenate([StopRule(1.0, 0, cal).confidence(e["step_probabilities"]) for e in full])
    t = float(np.median(conf))  # some slides stop early, some do not
    if per_class:  # class 1 rules in at the median, class 0 only at a stricter level
        t0 = float(np.quantile(conf, 0.9))
        rule = StopRule.per_class((t0, t), 0.9, cal)
        thresholds = np.array([t0, t], np.float32)
    else:
        rule = StopRule(t, 0.9, cal)
        thresholds = np.array([t, t], np.float32)
    env = agent.make_env(wd, None, cfg, stop_rule=rule)
    stopped = run_episodes(env, policy, ids, trace=True)
    kinds = set()
    for e, f, tr in zip(stopped, full, traces(full), strict=True):
        seen = rule.calibrated(e["step_probabilities"])
        past = (seen > thresholds).any(axis=1)
        assert not past[:-1].any(), "read on past a confident zoom"
        if e["stopped"] == "confident":
            assert past[-1]
        else:
            assert len(seen) == len(f["step_probabilities"])  # the cap
        out = apply_rule(*tr, rule)  # the trace of the full episode gives the same stop
        assert (out.n_zoomed, out.stopped, out.referred) == (
            len(e["zoomed"]),
            e["stopped"],
            e["referred"],
        )
        assert e["zoomed"] == f["zoomed"][: len(e["zoomed"])]
        np.testing.assert_allclose(out.probabilities, e["calibrated_probabilities"], atol=1e-6)
        kinds.add(e["stopped"])
    assert kinds == {"confident", "cap"}


def test_the_env_ends_an_episode_at_the_rules_own_cap(made):
    from sasha_env.agents.adaptive import traces
    from sasha_env.agents.config import AgentConfig
    from sasha_env.agents.envs import load_agent
    from sasha_env.agents.episodes import agent_policy, run_episodes
    from sasha_env.workdir import Workdir

    wd, cfg = Workdir(made), AgentConfig.from_dict(made.config["agents"])
    agent = load_agent(wd, 0.5)
    ids, policy = list(made.slide_ids), agent_policy(agent.policy)
    full = run_episodes(agent.make_env(wd, None, cfg), policy, ids, trace=True)
    rule = StopRule(1.0, 0.0, max_frac=0.2)  # never confident: every slide reads to 0.2
    capped = run_episodes(agent.make_env(wd, None, cfg, stop_rule=rule), policy, ids, trace=True)
    for e, f in zip(capped, full, strict=True):
        n = int(f["n_patches"])
        assert len(e["zoomed"]) == episode_budget(0.2, n) < len(f["zoomed"])
        assert e["zoomed"] == f["zoomed"][: len(e["zoomed"])] and e["stopped"] == "cap"
    # confident stops and the rule's cap together: as the trace of the full episode says
    conf = np.concatenate([StopRule(1.0).confidence(e["step_probabilities"]) for e in full])
    both = StopRule(float(np.quantile(conf, 0.7)), 0.0, max_frac=0.3)
    stopped = run_episodes(agent.make_env(wd, None, cfg, stop_rule=both), policy, ids, trace=True)
    for e, tr in zip(stopped, traces(full), strict=True):
        out = apply_rule(*tr, both)
        assert (len(e["zoomed"]), e["stopped"]) == (out.n_zoomed, out.stopped)
        assert len(e["zoomed"]) <= episode_budget(0.3, tr[2])
    assert {e["stopped"] for e in stopped} == {"confident", "cap"}


def test_the_stop_rule_is_fitted_on_val_slides_only(made, monkeypatch):
    from sasha_env.agents import episodes as ep
    from sasha_env.agents.adaptive import read_stop_rule
    from sasha_env.pipeline.calibrate import calibrate_workdir
    from sasha_env.workdir import Workdir

    wd = Workdir(made)
    seen: list[str] = []
    real = ep.run_episodes

    def spy(env, policy, slide_ids, trace=False):
        seen.extend(slide_ids)
        assert env.split == "val"
        return real(env, policy, slide_ids, trace)

    monkeypatch.setattr(ep, "run_episodes", spy)
    calibrate_workdir(wd, made.config, log=lambda m: None)
    val = {s for s, split in made.splits.items() if split == "val"}
    assert seen and set(seen) == val
    rule = read_stop_rule(made.agents[0.5])
    assert rule is not None and rule.info["n_slides"] == len(val)
    assert rule.info["fitted_on"] == "val" and rule.info["cap"] == 0.5
    # the test slides' labels play no part: flip them and fit again, same rule
    manifest = made.root / "manifest.csv"
    text = manifest.read_text()
    lines = [text.splitlines()[0]]
    for line in text.splitlines()[1:]:
        if ",test" in line:
            line = line.replace(",normal,", ",TMP,").replace(",tumor,", ",normal,")
            line = line.replace(",TMP,", ",tumor,")
        lines.append(line)
    monkeypatch.setattr(ep, "run_episodes", real)
    manifest.write_text("\n".join(lines) + "\n")
    try:
        calibrate_workdir(wd, made.config, log=lambda m: None)
        assert read_stop_rule(made.agents[0.5]).to_dict() == rule.to_dict()
    finally:
        manifest.write_text(text)


def test_the_calibrate_stage_fits_the_configured_rule(made):
    import copy

    from sasha_env.agents.adaptive import read_stop_rule
    from sasha_env.pipeline.calibrate import calibrate_workdir
    from sasha_env.workdir import Workdir

    wd = Workdir(made)
    cfg = copy.deepcopy(made.config)
    try:
        cfg["adaptive"] = {"stop_classes": ["tumor"]}
        calibrate_workdir(wd, cfg, log=lambda m: None)
        rule = read_stop_rule(made.agents[0.5])
        assert rule.class_thresholds is not None and rule.class_thresholds[0] == 1.0
        assert rule.info["stop_classes"] == [1]  # tumor is class 1 (sorted names)
        rule_in = rule
        cfg["adaptive"] = {"per_class": True, "nll_margin": 0.1}
        calibrate_workdir(wd, cfg, log=lambda m: None)
        rule = read_stop_rule(made.agents[0.5])
        assert len(rule.class_thresholds) == 2 and rule.info["nll_margin"] == 0.1
        budget = rule_in.info["val_mean_frac"] - 0.01  # less than ruling in reads at 0.5
        cfg["adaptive"] = {"stop_classes": ["tumor"], "mean_frac": budget}
        calibrate_workdir(wd, cfg, log=lambda m: None)
        rule = read_stop_rule(made.agents[0.5])
        assert rule.max_frac is not None and rule.max_frac < 0.5
        assert rule.info["budget_met"] == (rule.info["val_mean_frac"] <= budget)
        cfg["adaptive"] = {"stop_classes": ["metastasis"]}
        with pytest.raises(ValueError, match=r"not classes of this cohort.*normal"):
            calibrate_workdir(wd, cfg, log=lambda m: None)
    finally:
        calibrate_workdir(wd, made.config, log=lambda m: None)  # the default rule again
    assert read_stop_rule(made.agents[0.5]).class_thresholds is None
    assert read_stop_rule(made.agents[0.5]).max_frac is None


def test_evaluation_reports_the_adaptive_row_curve_and_referral(made):
    from sasha_env.agents.adaptive import read_stop_rule
    from sasha_env.agents.config import AgentConfig
    from sasha_env.agents.envs import load_agent
    from sasha_env.agents.episodes import agent_policy, run_episodes
    from sasha_env.pipeline.calibrate import calibrate_workdir
    from sasha_env.pipeline.evaluate import evaluate_workdir, format_table
    from sasha_env.workdir import Workdir
    from sasha_models.stopping import THRESHOLDS

    wd = Workdir(made)
    calibrate_workdir(wd, made.config, log=lambda m: None)
    rule = read_stop_rule(made.agents[0.5])
    results = evaluate_workdir(wd, made.config, log=lambda m: None)
    by = {(m["method"], m["frac"]): m for m in results["methods"]}
    row, fixed = by[("sasha_adaptive", 0.5)], by[("sasha", 0.5)]
    assert row["threshold"] == rule.threshold and row["refer_below"] == rule.refer_below
    saved = json.loads((made.root / "episodes" / "sasha_adaptive-0.5.json").read_text())
    fr = [e["frac_read"] for e in saved]
    capped = json.loads((made.root / "episodes" / "sasha-0.5.json").read_text())
    assert all(e["frac_read"] <= c["frac_read"] for e, c in zip(saved, capped, strict=True))
    assert row["mean_frac"] == pytest.approx(np.mean(fr))
    # what the env gives when it runs each test slide under the rule
    agent = load_agent(wd, 0.5)
    env = agent.make_env(wd, "test", AgentConfig.from_dict(made.config["agents"]), stop_rule=rule)
    online = run_episodes(env, agent_policy(agent.policy), [e["slide_id"] for e in saved])
    assert [e["zoomed"] for e in saved] == [e["zoomed"] for e in online]
    assert [e["stopped"] for e in saved] == [e["stopped"] for e in online]
    assert [e["referred"] for e in saved] == [e["referred"] for e in online]
    assert row["frac_p50"] == pytest.approx(np.percentile(fr, 50))
    assert row["frac_p90"] == pytest.approx(np.percentile(fr, 90))
    assert all(row[f"{k}_ci"] is not None for k in ("accuracy", "f1"))
    # the curve: every threshold of the fixed grid; at 1 the rule reads the cap, as sasha does
    curve = [c for c in results["adaptive_curve"] if c["frac"] == 0.5]
    assert [c["threshold"] for c in curve] == list(THRESHOLDS)
    never = curve[-1]
    assert never["mean_frac"] == pytest.approx(fixed_mean_frac(made, wd))
    assert never["auc"] == pytest.approx(fixed["auc"])  # calibration is monotone (C = 2)
    at_rule = next(c for c in curve if c["threshold"] == rule.threshold)
    assert at_rule["auc"] == row["auc"] and at_rule["mean_frac"] == row["mean_frac"]
    (referral,) = results["referral"]
    assert referral["share_referred"] == pytest.approx(np.mean([e["referred"] for e in saved]))
    pairs = {(p["a"], p["b"]) for p in results["paired"] if p["metric"] == "auc"}
    assert {("sasha_adaptive@0.5", "sasha@0.5"), ("sasha_adaptive@0.5", "hafed@1")} <= pairs
    assert any(a == "sasha_adaptive@0.5" and b.startswith("random@") for a, b in pairs)
    table = format_table(results)
    assert "sasha_adaptive" in table and "(cap 0.50)" in table and "AURC" in table
    from sasha_env.pipeline.figures import write_adaptive_figures

    written = write_adaptive_figures(wd, results)
    names = ["adaptive_curve.png", "adaptive_fraction_read.png", "risk_coverage.png"]
    assert [p.name for p in written] == names and all(p.stat().st_size > 0 for p in written)


def test_the_curve_varies_the_rule_it_reports_ruling_in_at_its_own_cap(made):
    import copy

    from sasha_env.agents.adaptive import read_stop_rule
    from sasha_env.pipeline.calibrate import calibrate_workdir
    from sasha_env.pipeline.evaluate import evaluate_workdir
    from sasha_env.workdir import Workdir

    wd = Workdir(made)
    cfg = copy.deepcopy(made.config)
    cfg["adaptive"] = {"stop_classes": ["tumor"]}
    try:
        calibrate_workdir(wd, cfg, log=lambda m: None)
        budget = read_stop_rule(made.agents[0.5]).info["val_mean_frac"] - 0.01
        cfg["adaptive"]["mean_frac"] = budget  # a cap below 0.5 too
        calibrate_workdir(wd, cfg, log=lambda m: None)
        rule = read_stop_rule(made.agents[0.5])
        assert rule.max_frac is not None and rule.class_thresholds[0] == 1.0
        results = evaluate_workdir(wd, cfg, log=lambda m: None)
    finally:
        calibrate_workdir(wd, made.config, log=lambda m: None)
        evaluate_workdir(wd, made.config, log=lambda m: None)
    (row,) = [m for m in results["methods"] if m["method"] == "sasha_adaptive"]
    assert row["max_frac"] == rule.max_frac
    curve = {c["threshold"]: c for c in results["adaptive_curve"]}
    # the fitted rule is a point of its curve: tumour's threshold varies, normal never stops
    at_rule = curve[rule.class_thresholds[1]]
    assert at_rule["auc"] == row["auc"] and at_rule["mean_frac"] == row["mean_frac"]
    # and the curve never reads past the rule's own cap
    saved = json.loads((made.root / "episodes" / "sasha-0.5.json").read_text())
    n = [round(len(e["zoomed"]) / e["frac_read"]) for e in saved]  # each test slide's N
    cap = np.mean([episode_budget(rule.max_frac, k) / k for k in n])
    assert curve[1.0]["mean_frac"] == pytest.approx(cap)
    assert max(c["mean_frac"] for c in curve.values()) <= cap + 1e-9


def test_a_rule_of_each_kind_at_another_threshold():
    cal = Calibration(2.0, (0.0, 0.5))
    shared = StopRule(0.9, 0.7, cal, max_frac=0.2).at_threshold(0.6)
    assert (shared.threshold, shared.refer_below, shared.calibration, shared.max_frac) == (
        0.6,
        0.0,
        cal,
        0.2,
    )
    rule_in = StopRule.per_class((1.0, 0.8), 0.5, cal, {"stop_classes": [1]})
    assert rule_in.at_threshold(0.6).class_thresholds == (1.0, 0.6)
    assert StopRule.per_class((0.99, 0.8)).at_threshold(0.6).class_thresholds == (0.6, 0.6)


def fixed_mean_frac(made, wd) -> float:
    saved = json.loads((made.root / "episodes" / "sasha-0.5.json").read_text())
    return float(np.mean([e["frac_read"] for e in saved]))


def test_the_study_carries_the_adaptive_row_and_curve_over_seeds():
    from sasha_env.pipeline.evaluate import format_table
    from sasha_env.pipeline.report import cap_label
    from sasha_env.pipeline.study import aggregate, format_study

    def results(auc, mean_frac):
        row = {
            "method": "sasha_adaptive",
            "frac": 0.2,
            "auc": auc,
            "accuracy": 0.9,
            "f1": 0.9,
            "ece": 0.1,
            "mean_frac": mean_frac,
            "frac_p50": 0.1,
            "frac_p90": 0.2,
        }
        curve = [
            {
                "method": "sasha_adaptive",
                "frac": 0.2,
                "threshold": t,
                "mean_frac": mean_frac * t,
                "auc": auc * t,
                "auc_ci": None,
            }
            for t in (0.9, 1.0)
        ]
        referral = [
            {
                "method": "sasha_adaptive",
                "frac": 0.2,
                "share_referred": mean_frac,
                "sensitivity": 1.0,
                "specificity": 0.5,
                "cleared_at_full_sensitivity": 0.3,
                "aurc": 0.1,
            }
        ]
        return {"n_slides": 10, "paired": [], "methods": [row], "adaptive_curve": curve,
                "referral": referral}  # fmt: skip

    summary = aggregate({0: results(0.9, 0.05), 1: results(1.0, 0.15)}, "demo")
    (row,) = summary["methods"]
    assert row["auc_mean"] == pytest.approx(0.95) and row["mean_frac_mean"] == pytest.approx(0.1)
    assert [p["mean_frac"] for p in row["per_seed"]] == [0.05, 0.15]
    point = next(c for c in summary["adaptive_curve"] if c["threshold"] == 0.9)
    assert point["n_seeds"] == 2 and point["mean_frac_mean"] == pytest.approx(0.09)
    assert point["auc_mean"] == pytest.approx(0.855)
    (referral,) = summary["referral"]
    assert referral["share_referred_mean"] == pytest.approx(0.1)
    assert summary["budget_curve"][0]["mean_frac_mean"] == pytest.approx(0.1)
    assert "| sasha_adaptive | 0.10 (cap 0.20) | 0.950 ± 0.071" in format_study(summary)
    # caps lowered by adaptive.mean_frac, on two seeds of three: the mean cap
    lowered = {0: results(0.9, 0.05), 1: results(1.0, 0.15), 2: results(1.0, 0.1)}
    lowered[0]["methods"][0]["max_frac"] = 0.14
    lowered[1]["methods"][0]["max_frac"] = 0.16
    lowered[2]["methods"][0]["max_frac"] = None
    (row,) = aggregate(lowered, "demo")["methods"]
    assert row["max_frac_mean"] == pytest.approx(0.5 / 3)  # (0.14 + 0.16 + 0.2) / 3
    assert [p["max_frac"] for p in row["per_seed"]] == [0.14, 0.16, None]
    assert "| sasha_adaptive | 0.10 (cap 0.17 of 0.20) |" in format_study(
        aggregate(lowered, "demo")
    )
    one = {"methods": [lowered[0]["methods"][0]], "paired": []}  # one run's table too
    assert "| sasha_adaptive | 0.05 (cap 0.14 of 0.20) |" in format_table(one)
    # a mean cap that rounds to the budget keeps a digit more; the budget itself is no lower cap
    assert cap_label(0.2, 0.198) == "0.198 of 0.20" and cap_label(0.2, 0.2) == "0.20"
    assert cap_label(0.2, 0.15, "g") == "0.15 of 0.2"


def test_the_adaptive_config_section_is_checked():
    from sasha_env.config import load_config
    from sasha_env.pipeline.schema import ConfigError, validate_config

    ok = {
        "adaptive": {
            "margin": 0.02,
            "max_auto_error": 0.1,
            "calibration": "temperature",
            "per_class": True,
            "nll_margin": 0.05,
        }
    }
    validate_config(load_config("tiny", overrides=ok))
    for bad, match in (
        ({"margin": 2.0}, "must be in"),
        ({"per_class": "yes"}, "per_class"),
        ({"nll_margin": -0.1}, "nll_margin"),
        ({"stop_classes": "tumor"}, "list"),
        ({"stop_classes": []}, "class names"),
        ({"calibration": "platt"}, "temperature"),
        ({"treshold": 0.9}, "unknown key 'treshold'"),
    ):
        with pytest.raises(ConfigError, match=match):
            validate_config(load_config("tiny", overrides={"adaptive": bad}))


def test_predict_adaptive_with_full_is_a_usage_error(tmp_path):
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-m", "sasha_env.cli", "predict", "--workdir", str(tmp_path / "none"),
         "x.tiff", "--adaptive", "--full"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 2 and "--adaptive" in out.stderr and "Traceback" not in out.stderr
