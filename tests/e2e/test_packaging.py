"""``pip install .`` ships the embedded model and the console script."""

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_wheel_contains_the_embedded_model_and_entry_point(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), str(ROOT)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    (wheel,) = tmp_path.glob("rayalign-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        model_bytes = sum(archive.getinfo(n).file_size for n in names if n.startswith("actors/toy/assets/toy-t2i/"))
        entry_points = archive.read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    for required in (
        "model_index.json",
        "unet/diffusion_pytorch_model.safetensors",
        "vae/diffusion_pytorch_model.safetensors",
        "text_encoder/model.safetensors",
        "tokenizer/tokenizer.json",
        "scheduler/scheduler_config.json",
    ):
        assert f"actors/toy/assets/toy-t2i/{required}" in names
    assert 0 < model_bytes <= 30 * 1024 * 1024
    assert "rayalign = jobs.cli:main" in entry_points
    assert not [n for n in names if n.startswith("tests/")]
