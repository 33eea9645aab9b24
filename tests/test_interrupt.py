"""Interruption of real `aabl` processes: SIGKILL mid-training then --resume ends with the weights of an
uninterrupted seeded CPU run, and Ctrl-C (SIGINT) leaves no half-written output (SPEC "Nothing is lost").

slow (~30 s): every test runs fresh interpreters that import torch.
"""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SLOW_COPIES, make_folder, tree_hash, write_fake_scan
from safetensors import safe_open
from safetensors.torch import load_file

import aabl_cli.core.resume as resume_mod
from aabl_cli.stages.split import split
from aabl_cli.stages.train import train

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
# 3 epochs of plain training, ~0.8 s each on one thread: long enough to be killed between two.
TRAIN = ("--arch", "cnn", "--epochs", "3", "--eps", "0", "--batch-size", "16", "--seed", "1", "--device", "cpu")



def aabl(*args: object) -> list[str]:
    return [sys.executable, "-m", "aabl_cli", *map(str, args)]


def slowed(*args: object) -> list[str]:
    return [sys.executable, "-c", SLOW_COPIES, *map(str, args)]


def wait_for(condition: Callable[[], bool], proc: subprocess.Popen, timeout: float = 120) -> None:
    """Poll `condition` every few milliseconds; fail if the process ends first or time runs out."""
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError(f"the process ended (exit {proc.returncode}) before it could be interrupted:\n"
                                 f"{out}\n{err}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("timed out waiting for the process to reach the interruption point")
        time.sleep(0.005)


def _history(path: Path) -> list[list[str]]:
    with open(path, newline="") as fh:
        return [row[:4] for row in csv.reader(fh)]  # epoch, lr, train_loss, train_acc (not the timings)


def test_sigkill_mid_training_then_resume_gives_the_uninterrupted_weights(tmp_path: Path) -> None:
    data = make_folder(tmp_path / "data", classes=3, per_class=45, size=32)
    before = tree_hash(data)
    cache = tmp_path / "cache"

    full = subprocess.run(aabl("train", data, "--workdir", tmp_path / "full", "--cache-dir", cache, "--quiet", *TRAIN),
                          env=ENV, capture_output=True, text=True, timeout=300)
    assert full.returncode == 0, full.stderr

    work = tmp_path / "cut"
    state = work / ".train.partial" / "state.safetensors"
    proc = subprocess.Popen(aabl("train", data, "--workdir", work, "--cache-dir", cache, "--quiet", *TRAIN), env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(state.exists, proc)  # epoch 1's resume state is committed
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    # no output, whole or half: only the hidden in-progress folder, and the lock the killed run held
    assert sorted(p.name for p in work.iterdir()) == [".train.lock", ".train.partial"]
    with safe_open(str(state), framework="pt") as fh:
        done = int(fh.metadata()["epoch"])
    assert 1 <= done < 3

    resumed = subprocess.run(aabl("train", data, "--workdir", work, "--cache-dir", cache, "--resume", *TRAIN),
                             env=ENV, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming after epoch {done}/3" in resumed.stderr
    assert "train epoch 1/3:" not in resumed.stderr  # it did not start over

    a, b = load_file(str(tmp_path / "full" / "train" / "model.safetensors")), load_file(str(work / "train" /
                                                                                           "model.safetensors"))
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"resumed weights differ from the uninterrupted run: {different[:5]}"
    assert _history(work / "train" / "history.csv") == _history(tmp_path / "full" / "train" / "history.csv")
    assert sorted(p.name for p in work.iterdir()) == ["train"]
    assert tree_hash(data) == before


def _sigint_when(proc: subprocess.Popen, condition: Callable[[], bool]) -> tuple[str, str]:
    try:
        wait_for(condition, proc)
        proc.send_signal(signal.SIGINT)
        return proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()


def _snapshot(tree: Path) -> dict[str, bytes]:
    return {p.relative_to(tree).as_posix(): p.read_bytes() for p in sorted(tree.rglob("*")) if p.is_file()}


def test_sigint_during_split_keeps_the_previous_output(tmp_path: Path) -> None:
    data = make_folder(tmp_path / "data", classes=2, per_class=20)
    before = tree_hash(data)
    work = tmp_path / "work"
    scores = write_fake_scan(work, data, np.linspace(0.1, 2.0, 40))
    split(scores, workdir=work, method="quantile", fraction=0.5)  # the previous output, written in-process
    old = _snapshot(work / "split")
    assert len(old) == 42  # 40 images, split.csv, split.json

    proc = subprocess.Popen(slowed("split", scores, "--workdir", work, "--quiet", "--method", "quantile",
                                   "--fraction", "0.1"), env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    _, err = _sigint_when(proc, lambda: any(work.glob(".split.tmp-*/kept/*/*.png")))
    assert proc.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err
    assert sorted(p.name for p in work.iterdir()) == ["scan", "split"]  # no temporary or half-swapped folder
    assert _snapshot(work / "split") == old
    assert tree_hash(data) == before


def test_sigint_during_poison_leaves_no_output(tmp_path: Path) -> None:
    data = make_folder(tmp_path / "data", classes=2, per_class=20)
    before = tree_hash(data)
    out = tmp_path / "work" / "poisoned"
    proc = subprocess.Popen(slowed("poison", data, "--backdoor", "badnets", "--out", out, "--quiet"), env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _, err = _sigint_when(proc, lambda: any(out.parent.glob(".poisoned.tmp-*/*/*.png")))
    assert proc.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err
    assert list(out.parent.iterdir()) == []
    assert tree_hash(data) == before


def test_kill_between_the_model_file_and_the_resume_state_still_resumes_exactly(tiny_data: Path, tmp_path: Path,
                                                                                 monkeypatch) -> None:
    """Each epoch writes model.safetensors, then the resume state: a kill between the two (here epoch
    2's model is on disk, its state is not) must resume from epoch 1 as a whole, not from epoch 2's
    weights with epoch 1's optimizer."""
    common = dict(arch="cnn", epochs=3, eps=0.0, batch_size=16, seed=1, device="cpu", quiet=True,
                  cache_dir=tmp_path / "c")
    train(tiny_data, workdir=tmp_path / "full", **common)
    real = resume_mod.save_state

    def killed_at_epoch_2(path: Path, *, epoch: int, **kwargs: object) -> None:
        if epoch == 2:
            raise KeyboardInterrupt
        real(path, epoch=epoch, **kwargs)

    work = tmp_path / "cut"
    with monkeypatch.context() as mp:
        mp.setattr(resume_mod, "save_state", killed_at_epoch_2)
        with pytest.raises(KeyboardInterrupt):
            train(tiny_data, workdir=work, **common)
    with safe_open(str(work / ".train.partial" / "model.safetensors"), framework="pt") as fh:
        assert fh.metadata()["epochs"] == "2"  # the newer model file is there
    train(tiny_data, workdir=work, resume=True, **common)
    a, b = load_file(str(tmp_path / "full" / "train" / "model.safetensors")), load_file(str(work / "train" /
                                                                                           "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert _history(work / "train" / "history.csv") == _history(tmp_path / "full" / "train" / "history.csv")
