"""memory: --data-memory's sizes, the automatic budget, and the choice of the resident or streamed path."""

from __future__ import annotations

import pytest
import torch

import aabl_cli.core.memory as memory_mod
from aabl_cli.core.errors import AablError
from aabl_cli.core.memory import budget_bytes, choose_data_path, human, parse_size

CPU = torch.device("cpu")


@pytest.mark.parametrize(("text", "size"), [("512M", 512 * 2**20), ("20G", 20 * 2**30), ("1.5g", 3 * 2**29),
                                            ("64MiB", 64 * 2**20), ("4k", 4096), ("65536", 65536), (" 2 G ", 2**31),
                                            ("0", 0), ("1T", 2**40)])
def test_sizes_parse_in_binary_units(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "M", "12Q", "-5M", "1e9", "twelve", "5 MB extra", "nan"])
def test_bad_sizes_are_refused_with_the_fix(text):
    with pytest.raises(ValueError, match="512M, 20G"):
        parse_size(text)
    with pytest.raises(AablError, match="--data-memory"):
        budget_bytes(text)


def test_auto_is_none_and_a_negative_count_is_refused():
    assert budget_bytes("auto") is None and budget_bytes("AUTO") is None and budget_bytes(7) == 7
    with pytest.raises(AablError, match="negative"):
        budget_bytes(-1)


def test_a_forced_small_budget_streams_and_says_why():
    path = choose_data_path(390 * 2**20, data_memory="64M", device=CPU)
    assert path.streamed and path.budget_bytes == 64 * 2**20
    assert path.reason == "decoded 390 MiB > budget 64 MiB (--data-memory)"
    assert path.as_record() == {"mode": "streamed", "reason": path.reason, "budget_bytes": 64 * 2**20,
                                "decoded_bytes": 390 * 2**20}
    assert not choose_data_path(64 * 2**20, data_memory=64 * 2**20, device=CPU).streamed  # equal fits


def test_auto_takes_half_the_hosts_available_memory_shared_by_local_processes(monkeypatch):
    monkeypatch.setattr(memory_mod, "host_available", lambda: 1000 * 2**20)
    path = choose_data_path(600 * 2**20, data_memory="auto", device=CPU)
    assert path.streamed and path.budget_bytes == 500 * 2**20 and "auto: half of the host's" in path.reason
    assert not choose_data_path(400 * 2**20, data_memory="auto", device=CPU).streamed
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert choose_data_path(200 * 2**20, data_memory="auto", device=CPU).budget_bytes == 125 * 2**20


def test_auto_on_cuda_takes_the_smaller_of_the_gpus_and_the_hosts_share(monkeypatch):
    monkeypatch.setattr(memory_mod, "host_available", lambda: 64 * 2**30)
    monkeypatch.setattr(memory_mod, "device_free", lambda device: 10 * 2**30)
    path = choose_data_path(6 * 2**30, data_memory="auto", device=torch.device("cuda"))
    assert path.streamed and path.budget_bytes == 5 * 2**30 and "half of cuda's 10 GiB free" in path.reason


def test_without_any_memory_figure_auto_stays_resident(monkeypatch):
    monkeypatch.setattr(memory_mod, "host_available", lambda: None)
    path = choose_data_path(2**40, data_memory="auto", device=CPU)
    assert path.mode == "resident" and path.budget_bytes is None


def test_the_host_figure_is_proc_meminfos_mem_available():
    available = memory_mod.host_available()
    assert available is None or available > 0


def test_human_sizes():
    assert human(512) == "512 B" and human(1536) == "1.5 KiB" and human(390 * 2**20) == "390 MiB"
    assert human(64 * 2**20) == "64 MiB" and human(3 * 2**40) == "3072 GiB"
