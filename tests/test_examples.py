"""The examples run as written, on a tiny folder."""

import json
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



def _ci_step(data, workdir, **env):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DATA": str(data), "WORKDIR": str(workdir), "ARCH": "cnn",
           "EPOCHS": "1", **env}
    env["XDG_CACHE_HOME"] = str(workdir.parent / "cache")
    return subprocess.run(["bash", str(ROOT / "examples" / "ci-clean-data.sh")], capture_output=True, text=True,
                          timeout=300, env=env)


def _report_of(workdir):
    page = (workdir / "report.html").read_text(encoding="utf-8")
    verdict = json.loads((workdir / "split" / "split.json").read_text())["verdict"]
    assert page.startswith("<!DOCTYPE html>") and verdict in page
    return page


def test_ci_cleaning_step_publishes_the_split_and_gates(tiny_data, tmp_path):
    passed = _ci_step(tiny_data, tmp_path / "ok")  # the default gates on the verdict alone
    assert passed.returncode in (0, 3), passed.stderr  # 3 only through --fail-on-suspect
    assert "--fail-over" not in passed.stderr
    for path in ("split/kept", "split/isolated", "split/split.json", "scan/scores.png", "report.html"):
        assert (tmp_path / "ok" / path).exists(), path
    _report_of(tmp_path / "ok")
    gated = _ci_step(tiny_data, tmp_path / "gate", FAIL_OVER="0.01")
    assert gated.returncode == 3 and "more than --fail-over 1.0%" in gated.stderr
    assert (tmp_path / "gate" / "split" / "kept").is_dir()  # written before the gate tripped
    assert "more than --fail-over 1.0%" in _report_of(tmp_path / "gate")  # the report too, naming the gate


def test_workflow_runs_the_ci_step_and_publishes_its_outputs():
    workflow = (ROOT / "examples" / "github-actions.yml").read_text()
    assert "run: bash examples/ci-clean-data.sh" in workflow
    assert "if: always()" in workflow and "actions/upload-artifact" in workflow
    script = (ROOT / "examples" / "ci-clean-data.sh").read_text()
    for path in ("split/kept", "split/isolated", "split/split.json", "scan/scores.png", "report.html"):
        assert f"{{{{ env.WORKDIR }}}}/{path}" in workflow and path in script
    assert script.index('\naabl report "$workdir"') > script.index("\naabl split")  # after the split, before exit
    assert all(f"{name}:" in workflow for name in ("DATA", "WORKDIR", "FAIL_OVER"))
    assert 'FAIL_OVER: ""' in workflow and "fail_over=${FAIL_OVER:-}" in script  # off unless a budget is set


def test_torchvision_export_writes_an_image_folder_aabl_reads(tmp_path):
    import random

    from PIL import Image

    sys.path.insert(0, str(ROOT / "examples"))
    try:
        from export_torchvision import export
    finally:
        sys.path.pop(0)
    from aabl_cli.core.data import load_image_folder

    rng = random.Random(0)
    fake = [(Image.new("RGB", (40, 30), tuple(rng.randrange(256) for _ in range(3))), i % 3) for i in range(12)]
    assert export(fake, ["a", "b", "c"], tmp_path / "out", size=32) == 12
    data = load_image_folder(tmp_path / "out", cache_dir=tmp_path / "cache", quiet=True)
    assert data.classes == ["a", "b", "c"] and data.class_counts() == [4, 4, 4]
    assert tuple(data.image_size) == (32, 32)
    assert sorted(p.name for p in (tmp_path / "out" / "b").iterdir()) == ["01.png", "04.png", "07.png", "10.png"]
