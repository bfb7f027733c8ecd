"""Distributed training for real: two CPU processes (gloo) through Lightning's DDP."""

import subprocess
import sys
import textwrap

import torch

SCRIPT = textwrap.dedent(
    """
    import sys

    from sasha_models.data import BagDataModule
    from sasha_models.hafed import HAFEDConfig
    from sasha_models.lit import HAFEDModule, train_model
    from sasha_models.toy import planted_bags

    if __name__ == "__main__":
        source, _ = planted_bags(n_slides=16, d=8, n_patches=(5, 9), seed=0)
        module = HAFEDModule(HAFEDConfig(d_in=8, d_hidden=8, n_branches=2), lr=1e-3, seed=0)
        path = train_model(
            module,
            BagDataModule(source, "highres"),
            sys.argv[1],
            max_epochs=2,
            devices=2,
            strategy="ddp",
            accelerator="cpu",
            progress=False,
        )
        print("EXPORTED", path, path.exists())
    """
)


def test_ddp_two_cpu_processes(tmp_path):
    script = tmp_path / "train_ddp.py"
    script.write_text(SCRIPT)
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, str(script), str(out)],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("EXPORTED") == 2  # both ranks return, after the file exists
    assert "True" in proc.stdout
    blob = torch.load(out / "model.pt", map_location="cpu", weights_only=True)
    assert blob["kind"] == "hafed" and blob["meta"]["world_size"] == 2
    assert blob["meta"]["epochs_trained"] == 2
    assert not list(out.glob("*.tmp"))


RESUME_SCRIPT = textwrap.dedent(
    """
    import sys

    from sasha_models.data import BagDataModule
    from sasha_models.hafed import HAFEDConfig
    from sasha_models.lit import HAFEDModule, train_model
    from sasha_models.toy import planted_bags

    if __name__ == "__main__":
        out, kill = sys.argv[1], int(sys.argv[2])
        source, _ = planted_bags(n_slides=16, d=8, n_patches=(5, 9), seed=0)
        cfg = HAFEDConfig(d_in=8, d_hidden=8, n_branches=2, dropout=0.3)  # draws on each rank
        module = HAFEDModule(cfg, lr=1e-3, seed=0)
        step = module.training_step

        def training_step(batch, batch_idx):
            if module.current_epoch == kill:
                raise RuntimeError("killed")
            return step(batch, batch_idx)

        module.training_step = training_step
        train_model(
            module,
            BagDataModule(source, "highres"),
            out,
            max_epochs=4,
            devices=2,
            strategy="ddp",
            accelerator="cpu",
            progress=False,
            resume_key="k",
            resume_every_s=0,
        )
    """
)


def test_a_ddp_fit_killed_between_epochs_resumes_to_the_same_bits(tmp_path):
    """Each rank gets its own random states back (rank 0 writes them all): the two ranks'
    dropout masks after the resume are those of a fit never killed."""
    script = tmp_path / "resume_ddp.py"
    script.write_text(RESUME_SCRIPT)

    def run(out: str, kill: int) -> subprocess.CompletedProcess:
        cmd = [sys.executable, str(script), str(tmp_path / out), str(kill)]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)

    whole = run("whole", -1)
    assert whole.returncode == 0, whole.stderr[-3000:]
    assert run("killed", 2).returncode != 0
    point = torch.load(tmp_path / "killed/checkpoints/resume.ckpt", weights_only=True)
    states = point["callbacks"]["ResumePoint"]
    assert point["epoch"] == 1 and states["torch"].shape[0] == 2  # both ranks' states
    assert not torch.equal(states["torch"][0], states["torch"][1])
    resumed = run("killed", -1)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = (torch.load(tmp_path / d / "model.pt", weights_only=True) for d in ("whole", "killed"))
    assert b["meta"]["resumed_at_epoch"] == 2
    for name, tensor in a["state_dict"].items():
        assert torch.equal(b["state_dict"][name], tensor), name
