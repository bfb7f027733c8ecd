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
