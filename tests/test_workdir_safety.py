"""The work directory stays trustworthy: no output replaces or sits inside what its command reads,
one writer per stage at a time (file locks), killed runs leave nothing that blocks or lingers, and
the faults a user meets there (a `--link none` split, a full disk, a changed --resume) say what to do.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import SLOW_COPIES, make_folder, tree_hash, write_fake_scan
from safetensors import SafetensorError, safe_open

from aabl_cli.cli import cli
from aabl_cli.core.errors import AablError
from aabl_cli.core.fsutil import Place, refuse_overlap
from aabl_cli.core.lock import lock_path, workdir_lock

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
SCAN = ("--arch", "cnn", "--epochs", "1", "--batch-size", "8", "--device", "cpu")
TRAIN = ("--arch", "cnn", "--epochs", "1", "--eps", "0", "--batch-size", "8", "--device", "cpu")


def invoke(*args: object):
    return CliRunner().invoke(cli, [str(a) for a in args])


@pytest.fixture
def data(tmp_path: Path) -> Path:
    return make_folder(tmp_path / "data", classes=2, per_class=6)


def split_round_one(data: Path, work: Path) -> Path:
    """A finished first round in `work`: a (fake) scan of `data` and a real split; returns split/."""
    write_fake_scan(work, data, np.linspace(0.1, 2.0, 12))
    result = invoke("split", "--workdir", work, "--method", "quantile", "--fraction", "0.25", "--quiet")
    assert result.exit_code == 0, result.output
    return work / "split"


def snapshot(tree: Path) -> dict[str, bytes]:
    return {p.relative_to(tree).as_posix(): p.read_bytes() for p in sorted(tree.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------ (1) outputs never replace inputs


def test_second_round_in_the_same_workdir_is_refused_by_scan_and_split(data: Path, tmp_path: Path) -> None:
    work = tmp_path / "aabl-out"
    round_one = split_round_one(data, work)
    kept = round_one / "kept"
    before = snapshot(round_one)

    scanned = invoke("scan", kept, "--workdir", work, "--cache-dir", tmp_path / "c", "--quiet", *SCAN)
    assert scanned.exit_code == 2, scanned.output
    assert "would replace the data folder" in scanned.output and "--workdir" in scanned.output
    assert "second cleaning round" in scanned.output

    # the sequence: scan.json of the work directory names its own split/kept (e.g. from an older aabl)
    write_fake_scan(work, kept, np.linspace(0.1, 2.0, 9))
    result = invoke("split", "--workdir", work, "--quiet")
    assert result.exit_code == 2, result.output
    assert "would replace the scanned data folder" in result.output
    assert "--workdir OTHER" in result.output and "Traceback" not in result.output
    assert snapshot(round_one) == before  # isolated/, split.csv and split.json of round 1 survive

    # the way out the message names: the second round in a work directory of its own
    other = invoke("split", work / "scan" / "scores.csv", "--workdir", tmp_path / "round-2", "--quiet")
    assert other.exit_code == 0, other.output
    assert snapshot(round_one) == before


def test_split_refuses_the_overlap_through_a_symlink_and_dotdot(data: Path, tmp_path: Path) -> None:
    work = tmp_path / "aabl-out"
    round_one = split_round_one(data, work)
    before = snapshot(round_one)
    scores = write_fake_scan(tmp_path / "round-2", round_one / "kept", np.linspace(0.1, 2.0, 9))
    alias = tmp_path / "alias"
    alias.symlink_to(work, target_is_directory=True)
    for workdir in (alias, work / "split" / ".."):
        result = invoke("split", scores, "--workdir", workdir, "--quiet")
        assert result.exit_code == 2, result.output
        assert "would replace the scanned data folder" in result.output
    assert snapshot(round_one) == before


def test_run_of_its_own_kept_folder_is_refused(data: Path, tmp_path: Path) -> None:
    work = tmp_path / "aabl-out"
    round_one = split_round_one(data, work)
    before = snapshot(round_one)
    result = invoke("run", round_one / "kept", "--workdir", work, "--cache-dir", tmp_path / "c", "--arch", "cnn",
                    "--device", "cpu")
    assert result.exit_code == 2, result.output
    assert "would replace the data folder" in result.output and "--workdir" in result.output
    assert snapshot(round_one) == before


def test_train_val_inside_the_output_is_refused(data: Path, tmp_path: Path) -> None:
    work = tmp_path / "w"
    val = make_folder(work / "train" / "val", classes=2, per_class=3)
    before = tree_hash(val)
    result = invoke("train", data, "--val", val, "--workdir", work, "--cache-dir", tmp_path / "c", *TRAIN)
    assert result.exit_code == 2, result.output
    assert "contains the --val folder" in result.output and "choose a --workdir" in result.output
    assert tree_hash(val) == before and not (work / ".train.partial").exists()


@pytest.mark.parametrize("where", ["same", "inside", "holds"])
def test_poison_out_equal_to_inside_or_around_its_source_is_refused(data: Path, tmp_path: Path, where: str) -> None:
    out = {"same": data, "inside": data / "class_0" / "p", "holds": tmp_path}[where]
    before = tree_hash(data)
    result = invoke("poison", data, "--backdoor", "badnets", "--out", out, "--quiet")
    assert result.exit_code == 2, result.output
    expected = {"same": "is the source folder itself", "inside": "is inside the source folder",
                "holds": "contains the source folder"}[where]
    assert expected in result.output and "choose an output folder" in result.output
    assert tree_hash(data) == before and not (data / "class_0" / "p").exists()


def test_poison_out_holding_its_pattern_is_refused(data: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    shutil.copytree(data / "class_0", out)  # e.g. an older output, one of whose images is the blend pattern
    before = tree_hash(out)
    result = invoke("poison", data, "--backdoor", "blend", "--pattern", out / "img_000.png", "--out", out, "--quiet")
    assert result.exit_code == 2, result.output
    assert "contains --pattern" in result.output and "would replace --pattern" in result.output
    assert tree_hash(out) == before


def test_evaluate_out_over_its_model_is_refused(data: Path, tmp_path: Path) -> None:
    model = tmp_path / "model.safetensors"
    model.write_bytes(b"weights")
    result = invoke("evaluate", model, data, "--out", model, "--device", "cpu", "--quiet")
    assert result.exit_code == 2, result.output
    assert "would replace MODEL" in result.output and "choose an --out" in result.output
    assert model.read_bytes() == b"weights"


def test_refuse_overlap_checks_both_directions_after_resolving(tmp_path: Path) -> None:
    data = (tmp_path / "data").resolve()
    (data / "sub").mkdir(parents=True)
    link = tmp_path / "link"
    link.symlink_to(data / "sub")
    with pytest.raises(AablError, match="is inside the data folder"):
        refuse_overlap([Place(data, "the data folder")], writes_into=[Place(link, "--workdir")], fix="move it")
    with pytest.raises(AablError, match="contains the data folder"):
        refuse_overlap([Place(link / "x", "the data folder")], replaces=[Place(data / "sub" / ".." / "sub", "out")],
                       fix="move it")
    # a work directory that merely holds the data is fine: only what it replaces must not
    refuse_overlap([Place(data / "sub", "the data folder")], writes_into=[Place(data, "--workdir")],
                   replaces=[Place(data / "scan", "the scan output")], fix="move it")


# ------------------------------------------------------------------ (5) one writer per stage


@pytest.fixture
def held() -> Iterator:
    """Take a stage lock as another process would: a separate open file description with its own flock."""
    fds: list[int] = []

    def take(workdir: Path, stage: str, pid: int | None = None) -> dict:
        workdir.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock_path(workdir, stage), os.O_RDWR | os.O_CREAT)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        info = {"pid": pid or os.getpid(), "host": socket.gethostname(), "command": f"aabl {stage} ./somewhere",
                "started": "2024-05-01 12:00:00 +0000"}
        os.write(fd, json.dumps(info).encode())
        fds.append(fd)
        return info

    yield take
    for fd in fds:
        os.close(fd)


def test_a_held_lock_stops_scan_split_and_train(data: Path, tmp_path: Path, held) -> None:
    work = tmp_path / "w"
    write_fake_scan(work, data, np.linspace(0.1, 2.0, 12))
    before = snapshot(work)
    # split first: it also takes the scan lock (it reads scan/), and the locks taken here stay held
    runs = {"split": ("split", "--workdir", work),
            "scan": ("scan", data, "--workdir", work, "--cache-dir", tmp_path / "c", *SCAN),
            "train": ("train", data, "--workdir", work, "--cache-dir", tmp_path / "c", *TRAIN)}
    for stage, args in runs.items():
        info = held(work, stage)
        result = invoke(*args)
        assert result.exit_code == 2, result.output
        line = next(x for x in result.output.splitlines() if x.startswith("error: "))
        assert f"PID {info['pid']}" in line and f"aabl {stage} ./somewhere" in line and "2024-05-01" in line
        assert "wait for it to finish" in line and "another --workdir" in line
        assert json.loads(lock_path(work, stage).read_text()) == info  # the holder's file is left alone
    assert snapshot(work / "scan") == {k.removeprefix("scan/"): v for k, v in before.items()}
    assert sorted(p.name for p in work.iterdir()) == [".scan.lock", ".split.lock", ".train.lock", "scan"]


def test_run_takes_every_stage_lock_before_it_starts(data: Path, tmp_path: Path, held) -> None:
    work = tmp_path / "w"
    info = held(work, "train")
    result = invoke("run", data, "--workdir", work, "--cache-dir", tmp_path / "c", "--arch", "cnn", "--device", "cpu")
    assert result.exit_code == 2, result.output
    assert f"PID {info['pid']}" in result.output and str(work / "train") in result.output
    assert sorted(p.name for p in work.iterdir()) == [".train.lock"]  # no stage ran, no other lock is left


def test_a_file_system_without_locks_runs_unlocked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    def no_locks(fd: int, operation: int) -> None:
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(fcntl, "flock", no_locks)
    work = tmp_path / "w"
    work.mkdir()
    with workdir_lock(work, "scan"):
        (work / "scan").mkdir()
    assert "does not support file locks" in capsys.readouterr().err
    assert sorted(p.name for p in work.iterdir()) == ["scan"]


def test_split_waits_for_no_scan_of_its_own_workdir(data: Path, tmp_path: Path, held) -> None:
    work = tmp_path / "w"
    write_fake_scan(work, data, np.linspace(0.1, 2.0, 12))
    held(work, "scan")
    result = invoke("split", "--workdir", work)
    assert result.exit_code == 2 and "is writing" in result.output and str(work / "scan") in result.output
    assert not (work / "split").exists()


def test_a_lock_left_by_a_dead_process_is_taken_over_and_reported(data: Path, tmp_path: Path) -> None:
    work = tmp_path / "w"
    write_fake_scan(work, data, np.linspace(0.1, 2.0, 12))
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    lock_path(work, "split").write_text(json.dumps({"pid": gone.pid, "host": socket.gethostname(),
                                                    "command": "aabl split", "started": "earlier"}))
    result = invoke("split", "--workdir", work)
    assert result.exit_code == 0, result.output
    assert f"a stale lock from PID {gone.pid} (no longer running) was taken over" in result.output
    assert sorted(p.name for p in work.iterdir()) == ["scan", "split"]  # the finished holder removed its file


def test_locks_are_reentrant_in_a_process_and_exclusive_across(tmp_path: Path) -> None:
    work = tmp_path / "w"
    with workdir_lock(work, "scan", "split", "train"):
        with workdir_lock(work, "split"):  # `aabl run` calling split: already held, no deadlock
            fd = os.open(lock_path(work, "split"), os.O_RDWR)
            try:
                with pytest.raises(BlockingIOError):
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            finally:
                os.close(fd)
        assert lock_path(work, "split").exists()  # the outer hold goes on
    assert not work.exists()  # nothing else was written: the folder the lock made is gone again


# A scan that holds its lock until it is told to go on (or 120 s pass), so that a second scan surely
# overlaps with it.
GATED_SCAN = """
import os, sys, time
from pathlib import Path
import aabl_cli.stages.scan as scan_mod
real = scan_mod.score_samples
def gated(*args, **kwargs):
    deadline = time.monotonic() + 120
    while not Path(os.environ["GATE"]).exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    return real(*args, **kwargs)
scan_mod.score_samples = gated
from aabl_cli.cli import cli
cli(sys.argv[1:], prog_name="aabl")
"""


def test_two_concurrent_scans_one_is_refused_and_scan_is_one_runs(data: Path, tmp_path: Path) -> None:
    work, gate, cache = tmp_path / "w", tmp_path / "go", tmp_path / "c"
    first = subprocess.Popen([sys.executable, "-c", GATED_SCAN, "scan", data, "--workdir", work, "--cache-dir", cache,
                              "--seed", "1", "--quiet", *SCAN[:3], "2", *SCAN[4:]],
                             env={**ENV, "GATE": str(gate)}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (lock_path(work, "scan").exists() and lock_path(work, "scan").read_text()):
            assert first.poll() is None, first.communicate()
            assert time.monotonic() < deadline, "the first scan never took its lock"
            time.sleep(0.02)
        second = subprocess.run([sys.executable, "-m", "aabl_cli", "scan", data, "--workdir", work, "--cache-dir",
                                 cache, "--seed", "2", "--quiet", *SCAN], env=ENV, capture_output=True, text=True,
                                timeout=120)
        gate.touch()
        out, err = first.communicate(timeout=120)
    finally:
        if first.poll() is None:
            first.kill()
    assert second.returncode == 2, second.stderr
    assert f"PID {first.pid}" in second.stderr and "Traceback" not in second.stderr
    assert first.returncode == 0, err
    scan_json = json.loads((work / "scan" / "scan.json").read_text())
    assert scan_json["settings"]["seed"] == 1 and scan_json["settings"]["epochs"] == 2  # the first scan's, whole
    with safe_open(str(work / "scan" / "model.safetensors"), framework="pt") as fh:
        meta = fh.metadata()
    assert meta["seed"] == "1" and meta["epochs"] == "2"
    assert len((work / "scan" / "history.csv").read_text().splitlines()) == 1 + 2
    assert sorted(p.name for p in work.iterdir()) == ["scan"]


# ------------------------------------------------------------------ (9c) what killed runs leave behind


def test_stale_temporaries_of_a_stage_are_removed(data: Path, tmp_path: Path) -> None:
    work = tmp_path / "w"
    write_fake_scan(work, data, np.linspace(0.1, 2.0, 12))
    for name in (".split.tmp-99999999-abcd", ".split.old-99999999-abcd", ".split.tmp-0a1b2c3d"):
        (work / name / "kept").mkdir(parents=True)
        (work / name / "kept" / "x.png").write_bytes(b"half")
    result = invoke("split", "--workdir", work, "--quiet")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in work.iterdir()) == ["scan", "split"]


def test_a_split_killed_mid_write_leaves_nothing_the_next_one_keeps(data: Path, tmp_path: Path) -> None:
    work = tmp_path / "w"
    scores = write_fake_scan(work, data, np.linspace(0.1, 2.0, 12))
    proc = subprocess.Popen([sys.executable, "-c", SLOW_COPIES, "split", scores, "--workdir", work, "--quiet"], env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not any(work.glob(".split.tmp-*/kept/*/*.png")):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.communicate(timeout=60)
    assert any(work.glob(f".split.tmp-{proc.pid}-*")) and lock_path(work, "split").exists()

    again = invoke("split", scores, "--workdir", work)
    assert again.exit_code == 0, again.output
    assert f"a stale lock from PID {proc.pid} (no longer running) was taken over" in again.output
    assert sorted(p.name for p in work.iterdir()) == ["scan", "split"]


# ------------------------------------------------------------------ (9e, 9f, 9g) faults that say what to do


def test_train_after_a_link_none_split_says_how_to_resplit(data: Path, tmp_path: Path) -> None:
    work = tmp_path / "w"
    write_fake_scan(work, data, np.linspace(0.1, 2.0, 12))
    assert invoke("split", "--workdir", work, "--link", "none", "--quiet").exit_code == 0
    for given in ((), (work / "split" / "kept",)):
        result = invoke("train", *given, "--workdir", work, "--cache-dir", tmp_path / "c", *TRAIN)
        assert result.exit_code == 2, result.output
        assert "--link none" in result.output and "aabl split --link copy" in result.output
        assert "add images under" not in result.output
    assert not (work / "train").exists()


def test_a_full_disk_while_saving_a_checkpoint_names_the_file_and_the_fix(data: Path, tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    def no_space(tensors: object, filename: str, metadata: object = None) -> None:
        Path(filename).write_bytes(b"\0" * 10)  # half-written, as a full disk leaves it
        raise SafetensorError(f'Error while serializing: I/O error: No space left on device (os error 28) at path '
                              f'"{filename}"')

    monkeypatch.setattr("aabl_cli.core.checkpoint.save_file", no_space)
    work = tmp_path / "w"
    result = invoke("scan", data, "--workdir", work, "--cache-dir", tmp_path / "c", "--quiet", *SCAN)
    assert result.exit_code == 1, result.output
    line = next(x for x in result.output.splitlines() if x.startswith("error: "))
    assert "No space left on device" in line and "model.safetensors" in line
    assert "free some space or choose another --workdir" in line
    assert "SafetensorError" not in result.output and "Traceback" not in result.output
    assert not (work / "scan").exists() and not list(work.rglob(".*.tmp-*"))


def test_a_refused_resume_names_the_settings_that_changed(data: Path, tmp_path: Path) -> None:
    work, cache = tmp_path / "w", tmp_path / "c"
    first = invoke("train", data, "--workdir", work, "--cache-dir", cache, "--quiet", *TRAIN)
    assert first.exit_code == 0, first.output
    shutil.copytree(work / "train", work / ".train.partial")  # an interrupted run's resume state
    assert (work / ".train.partial" / "state.safetensors").exists()
    changed = [*TRAIN[:3], "3", *TRAIN[4:], "--lr", "0.05"]
    result = invoke("train", data, "--workdir", work, "--cache-dir", cache, "--resume", "--quiet", *changed)
    assert result.exit_code == 2, result.output
    line = next(x for x in result.output.splitlines() if x.startswith("error: "))
    assert "epochs was 1, now 3" in line and "lr was 0.00625, now 0.05" in line and "milestones was" in line
    assert "without --resume to start over" in line
