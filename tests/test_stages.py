"""The stage registry: one declaration per stage, and the per-unit cache a stage may use."""

from __future__ import annotations

import pytest

from sasha_env.cli import build_parser
from sasha_env.pipeline.stages import REGISTRY, STAGES, StageContext


def test_every_stage_reads_only_stages_that_run_before_it():
    seen: set[str] = set()
    for name, stage in REGISTRY.items():
        assert stage.name == name
        assert set(stage.reads) <= seen, f"{name} reads {set(stage.reads) - seen} before they run"
        assert stage.sections, name
        seen.add(name)
    assert tuple(REGISTRY) == STAGES


def test_cli_stage_lists_follow_the_registry(capsys):
    parser = build_parser()
    retrainable = [n for n, s in REGISTRY.items() if s.retrainable]
    assert parser.parse_args(["train", retrainable[-1], "--workdir", "w"]).stage == retrainable[-1]
    with pytest.raises(SystemExit):
        parser.parse_args(["train", "agents", "--workdir", "w"])  # not retrainable
    assert "invalid choice: 'agents'" in capsys.readouterr().err
    args = parser.parse_args(["pipeline", "--workdir", "w", "--stages", *STAGES])
    assert args.stages == list(STAGES)
    with pytest.raises(SystemExit):
        parser.parse_args(["pipeline", "--workdir", "w", "--stages", "nope"])
    help_text = parser._subparsers._group_actions[0].choices["pipeline"].format_help()
    for name in STAGES:
        assert f"  {name} " in help_text


def test_cached_units_are_computed_once_per_key_and_again_when_forced(tmp_path):
    calls: list[str] = []

    def compute(unit: str):
        return lambda: calls.append(unit) or {"unit": unit, "n": len(calls)}

    ctx = StageContext(REGISTRY["agents"], "key-1", tmp_path / "agents.units")
    assert ctx.cached("0.1", compute("0.1")) == ({"unit": "0.1", "n": 1}, False)
    assert ctx.cached("0.1", compute("0.1")) == ({"unit": "0.1", "n": 1}, True)
    assert ctx.cached("0.2", compute("0.2")) == ({"unit": "0.2", "n": 2}, False)
    assert calls == ["0.1", "0.2"]

    changed = StageContext(REGISTRY["agents"], "key-2", tmp_path / "agents.units")
    assert changed.cached("0.1", compute("0.1")) == ({"unit": "0.1", "n": 3}, False)
    forced = StageContext(REGISTRY["agents"], "key-2", tmp_path / "agents.units", force=True)
    assert forced.cached("0.1", compute("0.1"))[1] is False
    assert calls == ["0.1", "0.2", "0.1", "0.1"]
    assert sorted(p.name for p in (tmp_path / "agents.units").iterdir()) == ["0.1.json", "0.2.json"]

    gone = StageContext(REGISTRY["agents"], "key-2", tmp_path / "agents.units")
    outputs, cached = gone.cached("0.2", compute("0.2"), intact=lambda out: False)
    assert not cached and calls[-1] == "0.2"  # recorded outputs no longer stand: recomputed


def test_a_run_on_a_finished_workdir_keeps_its_own_settings(tmp_path, capsys):
    """``sasha pipeline --workdir W --force evaluate`` (or ``sasha train``) without
    ``--preset`` on a workdir an earlier run wrote starts from its ``config.yaml``: the
    default preset's settings (another seed, say) would re-run every stage and replace what
    was trained. ``--config`` alone changes those settings section by section; ``--preset``
    starts from the preset instead."""
    import yaml

    from sasha_env.cli.run import _pipeline
    from sasha_env.config import load_config

    saved = {**load_config("tiny"), "seed": 3}  # as a study's seed-3 workdir writes it
    wd = tmp_path / "seed-3"
    wd.mkdir()
    (wd / "config.yaml").write_text(yaml.safe_dump(saved, sort_keys=False))
    for argv in (
        ["pipeline", "--workdir", str(wd), "--force", "evaluate"],
        ["train", "tsu", "--workdir", str(wd)],
    ):
        args = build_parser().parse_args(argv)
        pipe = _pipeline(args, wd, None)
        assert pipe.cfg == saved and pipe.seed == 3, argv
        assert "preset tiny, seed 3): the workdir's own;" in capsys.readouterr().out
    change = tmp_path / "tm.yaml"
    change.write_text("baselines: {models: {transmil: {max_epochs: 7}}}\n")
    args = build_parser().parse_args(["pipeline", "--workdir", str(wd), "--config", str(change)])
    pipe = _pipeline(args, wd, None)
    assert pipe.seed == 3 and pipe.cfg["preset"] == "tiny"
    assert pipe.cfg["baselines"]["models"]["transmil"]["max_epochs"] == 7
    want = {**saved["baselines"], "models": {**saved["baselines"].get("models", {})}}
    want["models"]["transmil"] = {**want["models"].get("transmil", {}), "max_epochs": 7}
    assert pipe.cfg == {**saved, "baselines": want}  # nothing else changed
    assert f"own, changed by {change}" in capsys.readouterr().out
    given = build_parser().parse_args(["pipeline", "--workdir", str(wd), "--preset", "demo"])
    assert _pipeline(given, wd, None).cfg == load_config("demo")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.yaml").write_text("agents: [unclosed\n")
    args = build_parser().parse_args(["pipeline", "--workdir", str(broken)])
    with pytest.raises(ValueError, match=r"broken/config.yaml: not valid YAML .* give --preset"):
        _pipeline(args, broken, None)
    fresh = tmp_path / "new"  # nothing written yet: the default preset
    args = build_parser().parse_args(["pipeline", "--workdir", str(fresh)])
    assert _pipeline(args, fresh, None).cfg == load_config("demo")
