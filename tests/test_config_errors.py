"""Configuration and other user errors: one clear line naming what is wrong, exit status 2."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from sasha_env.agents.config import ALGORITHMS, VEC_ENVS, AgentConfig
from sasha_env.config import PRESETS, load_config
from sasha_env.pipeline.schema import SECTIONS, ConfigError, validate_config

SASHA = [sys.executable, "-m", "sasha_env.cli"]


@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_is_valid(preset):
    assert validate_config(load_config(preset)) is not None


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"hafeed": {"lr": 0.1}}, "unknown config section 'hafeed'; valid sections: preset, seed"),
        (
            {"hafed": {"lrr": 0.1}},
            "unknown key 'lrr' in config section 'hafed'; valid keys: d_hidden",
        ),
        ({"tsu": {"tau_quantle": 0.9}}, "unknown key 'tau_quantle' in config section 'tsu'"),
        ({"lowres": {"n_head": 2}}, "unknown key 'n_head' in config section 'lowres'"),
        ({"baselines": {"n_heads": 2}}, "unknown key 'n_heads' in config section 'baselines'"),
        (
            {"baselines": {"models": {"transmil": {"n_head": 2}}}},
            "unknown key 'n_head' in config section 'baselines.models.transmil'; valid keys: "
            "cpu_threads, d_model, dropout, exact_max, landmarks, lr, max_epochs, n_heads, patience, "
            "select_ties, "
            "weight_decay",
        ),
        ({"baselines": {"models": {"clam": {}}}}, "unknown model 'clam' in config section"),
        ({"agents": {"n_env": 2}}, "unknown key 'n_env' in config section 'agents'"),
        ({"grid": {"zoom_level": 2}}, "unknown key 'zoom_level' in config section 'grid'"),
        ({"train": {"wandbb": None}}, "unknown key 'wandbb' in config section 'train'"),
        ({"train": {"resume_every_s": -1}}, "'train.resume_every_s' = -1 must be >= 0 (seconds"),
        ({"tsu": {"max_epochs": "ten"}}, "config 'tsu.max_epochs' = 'ten' is not of type int"),
        ({"hafed": {"lr": True}}, "config 'hafed.lr' = True is not of type float"),
        (
            {"agents": {"fracs": [0.1, 1.5]}},
            "'agents.fracs' = [0.1, 1.5] must be fractions in (0, 1]",
        ),
        ({"agents": {"algo": "sac"}}, "'agents.algo' = 'sac' must be one of maskable_ppo"),
        ({"tsu": {"tau": 1.2}}, "'tsu.tau' = 1.2 must be in (0, 1] or auto"),
        ({"hafed": {"max_epochs": 0}}, "'hafed.max_epochs' = 0 must be >= 1"),
        ({"split": {"shares": [0.5, 0.5]}}, "'split.shares' = [0.5, 0.5] is not of type"),
        ({"seed": "zero"}, "config 'seed' = 'zero' is not of type int"),
        ({"hafed": [1, 2]}, "config section 'hafed' must be a mapping of keys"),
        (
            {"hafed": {"select_ties": "last"}},
            "'hafed.select_ties' = 'last' must be loss or first (the official rule)",
        ),
        (
            {"hafed": {"temperature": 0}},
            "'hafed.temperature' = 0 must be val (fitted on the val split) or a number > 0",
        ),
        (
            {"hafed": {"temperature": "auto"}},
            "'hafed.temperature' = 'auto' must be val (fitted on the val split) or a number > 0",
        ),
        (
            {"baselines": {"models": {"transmil": {"patience": 0}}}},
            "'baselines.models.transmil.patience' = 0 must be >= 1 epochs without improvement",
        ),
    ],
)
def test_bad_config_names_the_key_its_section_and_the_fix(override, message):
    with pytest.raises(ConfigError) as err:
        validate_config(load_config("tiny", overrides=override))
    assert message in str(err.value)


def test_good_values_of_every_kind_pass():
    cfg = load_config(
        "tiny",
        overrides={
            "tsu": {"tau": 0.9, "d_hidden": None},
            "grid": {"hi_mpp": 0.5},
            "agents": {"fracs": [0.05, 1], "extra": {"vf_coef": 0.5}, "cpu_threads": None},
            "baselines": {"models": {"transmil": {"n_heads": 4, "cpu_threads": 2}}},
            "hafed": {"select_ties": "first", "patience": None},
            "lowres": {"select_ties": "loss", "patience": 3},
            "train": {"resume_every_s": 30},
        },
    )
    assert validate_config(cfg) is cfg
    assert set(SECTIONS) >= set(cfg)


@pytest.mark.parametrize("algo", ALGORITHMS)
@pytest.mark.parametrize("vec_env", VEC_ENVS)
def test_every_algorithm_and_vector_env_the_agents_stage_trains_validates(algo, vec_env):
    cfg = load_config("tiny", overrides={"agents": {"algo": algo, "vec_env": vec_env}})
    assert validate_config(cfg) is cfg


def _sasha(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([*SASHA, *args], capture_output=True, text=True, timeout=300, cwd=cwd)


def test_cli_reports_config_errors_without_traceback_or_a_workdir(tiny_cohort, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("hafed:\n  lrr: 0.1\n")
    workdir = tmp_path / "wd"
    proc = _sasha(
        "pipeline", "--manifest", str(tiny_cohort), "--workdir", str(workdir),
        "--preset", "tiny", "--config", str(bad),
    )  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "sasha pipeline: error: unknown key 'lrr' in config section 'hafed'; valid keys: "
        "d_hidden, dropout, lr, mask_drop, max_epochs, n_branches, n_branches_l1, "
        "partial_rows, partial_states, patience, row_norm, select_ties, temperature, "
        "top_k, top_k_l1, w_branch, w_div, w_slide, weight_decay"
    ]
    assert not workdir.exists()  # nothing is created for a run that cannot start

    bad.write_text("synth: [unclosed\n")
    proc = _sasha("synth", str(tmp_path / "out"), "--config", str(bad))
    assert proc.returncode == 2 and "bad.yaml: not valid YAML" in proc.stderr
    assert "Traceback" not in proc.stderr

    bad.write_text("synth:\n  n_slidez: 3\n")
    proc = _sasha("synth", str(tmp_path / "out"), "--config", str(bad))
    assert (
        proc.returncode == 2 and "unknown key 'n_slidez' in config section 'synth'" in proc.stderr
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ("pipeline", "--workdir", "{tmp}/none"),
            "none/manifest.csv is missing: give --manifest CSV",
        ),
        (("predict", "--workdir", "{tmp}/none", "x.svs"), "is missing: run the 'pipeline' stage"),
        (
            ("extract", "{manifest}", "--out", "{tmp}/s.zarr", "--backbone", "nope"),
            "unknown backbone 'nope'",
        ),
        (
            ("extract", "{tmp}/missing.csv", "--out", "{tmp}/s.zarr"),
            "manifest {tmp}/missing.csv not found",
        ),
        (("train", "tsu", "--workdir", "{tmp}/wd", "--preset", "tiny"), "is missing"),
    ],
)
def test_cli_user_errors_are_one_line(tiny_cohort, tmp_path, args, message):
    fill = {"tmp": str(tmp_path), "manifest": str(tiny_cohort)}
    proc = _sasha(*(a.format(**fill) for a in args))
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert message.format(**fill) in proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize(
    "args",
    [
        ("pipeline", "--workdir", "{tmp}/none"),
        ("pipeline", "--workdir", "{tmp}/none", "--config", "{tmp}/bad.yaml"),
        ("extract", "{tmp}/missing.csv", "--out", "{tmp}/s.zarr"),
    ],
    ids=["no-manifest", "bad-config", "extract-no-manifest"],
)
def test_a_bad_option_is_reported_before_lightning_loads(tmp_path, args):
    """A typo costs a second, not Lightning's import (which took 10-20 s of every such error
    on the 2-core machine): the command checks its options, config and files first."""
    (tmp_path / "bad.yaml").write_text("hafed:\n  top_kk: 3\n")
    argv = [a.format(tmp=tmp_path) for a in args]
    code = (
        "import sys\nfrom sasha_env.cli import main\n"
        f"status = main({argv!r})\n"
        "print(status, 'lightning' in sys.modules, 'torchmetrics' in sys.modules)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.stdout.split() == ["2", "False", "False"], proc.stdout + proc.stderr[-2000:]
    assert "error:" in proc.stderr


@pytest.mark.parametrize(
    "csv_text",
    ["slide_id,path,label\n", "slide_id,path,label\nbad/id,missing.tiff,tumor\n"],
    ids=["no-rows", "no-usable-row"],
)
def test_a_manifest_that_does_not_validate_writes_no_config(tmp_path, csv_text):
    """The resolved config.yaml is written only once the manifest has been read and checked."""
    from sasha_env.cli import main

    manifest = tmp_path / "cohort.csv"
    manifest.write_text(csv_text)
    workdir = tmp_path / "wd"
    code = main(["pipeline", "--manifest", str(manifest), "--workdir", str(workdir),
                 "--preset", "tiny", "--quiet"])  # fmt: skip
    assert code == 2
    assert not (workdir / "config.yaml").exists()
    assert not (workdir / "manifest.csv").exists()


def test_dropped_rows_and_slides_are_reported_and_change_the_exit_status(tiny_cohort, tmp_path):
    """Every good slide is extracted; a bad row and a missing file are named with their
    reasons in the extract report and on stderr, and the exit status is 1."""
    import csv
    import json

    rows = list(csv.reader(tiny_cohort.open()))
    header, good = rows[0], rows[1:4]
    path_col = header.index("path")
    for row in good:  # the copy lives elsewhere: absolute slide paths
        row[path_col] = str((tiny_cohort.parent / row[path_col]).resolve())
    missing = list(good[0])
    missing[0], missing[path_col] = "gone", str(tmp_path / "gone.tiff")
    bad_id = list(good[0])
    bad_id[0] = "../escape"
    manifest = tmp_path / "cohort.csv"
    with manifest.open("w", newline="") as f:
        csv.writer(f).writerows([header, *good, missing, bad_id])

    workdir = tmp_path / "wd"
    proc = _sasha(
        "pipeline", "--manifest", str(manifest), "--workdir", str(workdir),
        "--preset", "tiny", "--stages", "extract", "--quiet",
    )  # fmt: skip
    assert proc.returncode == 1, proc.stderr[-2000:]
    report = json.loads((workdir / "features.zarr" / "extract_report.json").read_text())
    assert set(report["failed"]) == {"gone", "../escape"}
    assert "file not found" in report["failed"]["gone"]
    assert sorted(report["extracted"]) == sorted(r[0] for r in good)
    marker = json.loads((workdir / "stages" / "extract.json").read_text())
    assert set(marker["outputs"]["failed"]) == {"gone", "../escape"}
    assert "gone:" in proc.stderr and "../escape:" in proc.stderr

    # resumed, nothing to redo: still reported, still status 1
    again = _sasha("pipeline", "--workdir", str(workdir), "--preset", "tiny",
                   "--stages", "extract", "--quiet")  # fmt: skip
    assert again.returncode == 1 and "gone:" in again.stderr


ABLATION_DIR = Path(__file__).parents[1] / "experiments" / "ablations"
ABLATIONS = sorted(ABLATION_DIR.glob("*.yaml"))
#: What the agents stage reads under ``protocol: paper`` (the SB3 settings are unused there).
PAPER_FIELDS = (
    "protocol", "algo", "fracs", "epochs", "episodes_per_slide", "learning_rate",
    "lr_schedule", "policy_arch", "masked_update", "two_optimizers", "time_aware_critic", "use_coords", "reward",
    "d_hidden", "val_every", "val_start", "equal_episodes", "stop", "keep", "warm_start",
)  # fmt: skip


@pytest.mark.parametrize("path", ABLATIONS, ids=lambda p: p.stem)
def test_every_shipped_ablation_config_is_valid_on_the_demo_preset(path):
    assert validate_config(load_config("demo", path)) is not None


@pytest.mark.parametrize("name", ["paper-agents", "paper-tsu"])
def test_the_paper_ablations_train_the_paper_presets_agents(name):
    """``paper-agents.yaml`` and ``paper-tsu.yaml`` on the demo preset must not inherit the
    demo's SB3 settings where the official protocol reads them (a learning rate left at the
    demo's 3e-4, say)."""
    ours = AgentConfig.from_dict(
        load_config("demo", ABLATION_DIR / f"{name}.yaml")["agents"]
    ).resolved()
    paper = AgentConfig.from_dict(load_config("paper")["agents"]).resolved()
    assert {f: getattr(ours, f) for f in PAPER_FIELDS} == {
        f: getattr(paper, f) for f in PAPER_FIELDS
    }


def test_the_paper_tsu_ablation_trains_the_paper_presets_tsus():
    """``paper-tsu.yaml`` on the demo preset trains the ``paper`` preset's per-budget TSUs,
    field by field (the demo's residual, width, anchors and learning rate all reset), with only
    tau calibrated on the demo's features."""
    from sasha_env.pipeline.stages import tsu_configs

    ours = load_config("demo", ABLATION_DIR / "paper-tsu.yaml")["tsu"]
    paper = load_config("paper")["tsu"]
    assert ours["tau"] == "auto"
    mine, theirs = tsu_configs(ours, 1280, 0.9), tsu_configs(paper, 1280, 0.9)
    assert sorted(mine) == [0.1, 0.2]
    assert {f: c.to_dict() for f, c in mine.items()} == {f: c.to_dict() for f, c in theirs.items()}
    assert mine[0.2].max_epochs == 1000 and not mine[0.2].residual
