"""The examples run as written, on a tiny folder."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_python_api_example_runs_all_three_stages(tiny_data, tmp_path):
    workdir = tmp_path / "work"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "XDG_CACHE_HOME": str(tmp_path / "cache")}
    result = subprocess.run([sys.executable, str(ROOT / "examples" / "python_api.py"), str(tiny_data), str(workdir),
                             "--epochs", "1"], capture_output=True, text=True, timeout=300,
                            env=env)
    assert result.returncode == 0, result.stderr
    assert "verdict:" in result.stdout
    for path in ("scan/scores.csv", "split/split.json", "train/model.safetensors"):
        assert (workdir / path).exists(), path


def test_pipeline_script_is_valid_bash():
    result = subprocess.run(["bash", "-n", str(ROOT / "examples" / "pipeline.sh")], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr

