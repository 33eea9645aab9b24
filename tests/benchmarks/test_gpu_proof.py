"""benchmarks/gpu.sh pack and proof: the data the proof takes along, and the proof itself at its tiny
scale on the CPU, through benchmarks/reproduce.py and the real CLI, writing only under tmp_path."""

import io
import json
import os
import subprocess
import sys
import tarfile
import zipfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from conftest import class_image
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
CLASSES = [f"class_{k}" for k in range(10)]
TRAIN, TEST = 30, 20  # images a class in the fake zip; the tiny scale takes 20 and 10 of them
CONFIGS = ["cifar10/none", "cifar10/badnets"]  # a clean set and a poisoned one: each process imports torch


def fake_cifar10(path: Path) -> Path:
    """A zip in cifar10-jpeg.zip's layout: cifar10/{train,test}/CLASS/NNNN.jpg, 16-px learnable images."""
    rng = np.random.default_rng(0)
    with zipfile.ZipFile(path, "w") as archive:
        for part, per_class in (("train", TRAIN), ("test", TEST)):
            for label, name in enumerate(CLASSES):
                for i in range(per_class):
                    buf = io.BytesIO()
                    Image.fromarray(class_image(label, 16, rng)).save(buf, format="JPEG", quality=90)
                    archive.writestr(f"cifar10/{part}/{name}/{i:04d}.jpg", buf.getvalue())
    return path


def gpu_sh(*args: object, tmp: Path, **env: str) -> subprocess.CompletedProcess:
    """`bash benchmarks/gpu.sh ARGS` with the proof's data, results and tables under `tmp`, on the CPU."""
    settings = {"PYTHON": sys.executable, "OMP_NUM_THREADS": "1", "XDG_CACHE_HOME": str(tmp / "xdg-cache"),
                "PROOF_DATA": str(tmp / "gpu-data"), "PROOF_SCALE": "gpu-proof-tiny", "PROOF_DEVICE": "cpu",
                "PROOF_RESULTS": str(tmp / "results"), "PROOF_MD": str(tmp / "RESULTS.md"),
                "PROOF_CONFIGS": " ".join(CONFIGS)}
    return subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu.sh"), *map(str, args)], capture_output=True,
                          text=True, env={**os.environ, **settings, **env}, timeout=600)


@pytest.fixture(scope="module")
def proof(tmp_path_factory):
    """A packed fake CIFAR-10 and one proof run on it; (its folder, the fake zip, the run)."""
    tmp = tmp_path_factory.mktemp("proof")
    source = fake_cifar10(tmp / "cifar10-jpeg.zip")
    packed = gpu_sh("pack", source, tmp=tmp)
    assert packed.returncode == 0, packed.stderr
    (tmp / "out").mkdir()
    run = gpu_sh("proof", tmp / "work", tmp=tmp, OUT=str(tmp / "out"))
    return tmp, source, run


def test_pack_keeps_every_training_image_and_a_balanced_test_subset(proof, tmp_path):
    tmp, source, _ = proof
    out = tmp / "gpu-data" / "cifar10-jpeg.zip"
    with zipfile.ZipFile(out) as packed, zipfile.ZipFile(source) as original:
        names = packed.namelist()
        assert sum(n.startswith("cifar10/train/") for n in names) == len(CLASSES) * TRAIN
        # 2,000 test images asked, 200 a class: all 20 of each class here
        assert Counter(n.split("/")[2] for n in names if n.startswith("cifar10/test/")) == {c: TEST for c in CLASSES}
        assert {i.compress_type for i in packed.infolist()} == {zipfile.ZIP_STORED}
        assert all(packed.read(n) == original.read(n) for n in names)  # the JPEG bytes unchanged
    again = subprocess.run([sys.executable, ROOT / "benchmarks" / "pack.py", source, tmp_path / "again.zip",
                            "--test-images", "50"], capture_output=True, text=True, check=True)
    assert "300 train and 50 test images" in again.stdout
    with zipfile.ZipFile(tmp_path / "again.zip") as small:
        assert Counter(n.split("/")[2] for n in small.namelist() if "/test/" in n) == {c: 5 for c in CLASSES}
    subprocess.run([sys.executable, ROOT / "benchmarks" / "pack.py", source, tmp_path / "twice.zip",
                    "--test-images", "50"], check=True, capture_output=True)
    assert (tmp_path / "again.zip").read_bytes() == (tmp_path / "twice.zip").read_bytes()  # deterministic


def test_proof_runs_each_configuration_and_writes_its_tables(proof):
    tmp, _, run = proof
    assert run.returncode == 0, run.stdout + run.stderr
    for config in CONFIGS:
        dataset, backdoor, mode = (config.split("/") + ["aabl"])[:3]
        result = json.loads((tmp / "results" / "gpu-proof-tiny" / f"{dataset}-{backdoor}-{mode}.json").read_text())
        assert result["finished"] is True and result["scale"] == "gpu-proof-tiny"
        assert 0 <= result["acc"] <= 1 and 0 <= result["ra"] <= 1
        assert f"{dataset}/{backdoor}/{mode}: " in run.stdout  # and its seconds
    badnets = json.loads((tmp / "results" / "gpu-proof-tiny" / "cifar10-badnets-aabl.json").read_text())
    assert 0 < badnets["kept_share"] <= 1 and 0 <= badnets["asr"] <= 1
    assert "### Scale `gpu-proof-tiny`: 2 of" in (tmp / "RESULTS.md").read_text()
    summary = run.stdout.split("configuration")[-1]
    assert "cifar10/badnets/aabl" in summary and "not finished" not in summary
    with tarfile.open(tmp / "out" / "proof.tar") as sent:  # what a remote runner brings back
        assert {"RESULTS.md", "proof.log", "results/gpu-proof-tiny/cifar10-badnets-aabl.json"} <= set(sent.getnames())
    # nothing of it in the checkout
    assert not (ROOT / "benchmarks" / "results" / "gpu-proof-tiny").exists()
    assert "gpu-proof-tiny" not in (ROOT / "benchmarks" / "RESULTS.md").read_text()


def test_a_second_proof_skips_finished_configurations(proof):
    tmp, _, first = proof
    assert first.returncode == 0, first.stdout + first.stderr
    stored = {p: p.stat().st_mtime_ns for p in (tmp / "results" / "gpu-proof-tiny").glob("*.json")}
    again = gpu_sh("proof", tmp / "work", tmp=tmp)
    assert again.returncode == 0, again.stdout + again.stderr
    assert again.stdout.count("finished earlier") == len(CONFIGS) and " ..." not in again.stdout
    assert {p: p.stat().st_mtime_ns for p in stored} == stored


def test_a_budget_too_small_runs_nothing_and_says_so(proof, tmp_path):
    tmp, _, _ = proof
    run = gpu_sh("proof", tmp_path / "work", tmp=tmp, PROOF_BUDGET_S="0", PROOF_RESULTS=str(tmp_path / "results"),
                 PROOF_MD=str(tmp_path / "RESULTS.md"))
    assert run.returncode == 0, run.stdout + run.stderr
    assert "stopping before cifar10/none/aabl" in run.stdout and "run proof again" in run.stdout
    assert not list(tmp_path.glob("results/*/*.json"))
    assert run.stdout.count("not finished") == len(CONFIGS)


def test_an_aabl_configuration_waits_for_room_for_its_control_too(proof, tmp_path):
    """The control trains the split its A-ABL run leaves in SCRATCH, which a fresh machine lacks: the two
    start only when both fit."""
    tmp, _, _ = proof
    run = gpu_sh("proof", tmp_path / "work", tmp=tmp, PROOF_BUDGET_S="120", PROOF_EST_AABL_S="100",
                 PROOF_EST_CONTROL_S="50", PROOF_CONFIGS="cifar10/blend cifar10/blend/control",
                 PROOF_RESULTS=str(tmp_path / "results"), PROOF_MD=str(tmp_path / "RESULTS.md"))
    assert run.returncode == 0, run.stdout + run.stderr
    assert "stopping before cifar10/blend/aabl" in run.stdout and "about 150s more" in run.stdout


def test_proof_without_packed_data_says_how_to_make_it(tmp_path):
    run = gpu_sh("proof", tmp_path / "work", tmp=tmp_path)
    assert run.returncode == 2
    assert "bash benchmarks/gpu.sh pack" in run.stderr
