"""stream: StreamedImages reads the rows the resident tensor holds, in the order asked, read ahead on a
thread; `fit` and scoring on a stream give the resident results bit for bit on the CPU; each torchrun
process streams its own shard."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

import aabl_cli.core.distributed as distributed
from aabl_cli.core.data import load_image_folder
from aabl_cli.core.loop import fit, place_on_device, step_schedule
from aabl_cli.core.models import build_model, channel_stats
from aabl_cli.core.stream import StreamedImages, read_batches, select

CPU = torch.device("cpu")


@pytest.fixture
def dataset(tiny_data, tmp_path):
    return load_image_folder(tiny_data, cache_dir=tmp_path / "cache", quiet=True)


def test_indexing_a_stream_reads_the_rows_the_tensor_holds(dataset):
    stream = StreamedImages(dataset, CPU)
    assert stream.shape == dataset.images.shape and len(stream) == 36 and stream.device == CPU
    perm = torch.randperm(36, generator=torch.Generator().manual_seed(0))
    assert torch.equal(stream[perm[:10]], dataset.images[perm[:10]])
    assert torch.equal(stream[3:17], dataset.images[3:17])
    assert torch.equal(stream[30:99], dataset.images[30:])  # a slice past the end stops at it, as a tensor's does


def test_a_subset_narrows_without_reading_and_indexes_like_the_copy(dataset):
    stream = StreamedImages(dataset, CPU)
    mask = dataset.labels == 1
    part, copy = select(stream, mask), select(dataset.images, mask)
    assert isinstance(part, StreamedImages) and part.shape == copy.shape
    assert torch.equal(part[torch.tensor([4, 0, 2])], copy[torch.tensor([4, 0, 2])])
    again = select(part, torch.tensor([1, 3]))
    assert torch.equal(again[0:2], copy[torch.tensor([1, 3])])


def test_read_batches_keeps_the_order_asked_for_both_kinds(dataset):
    perm = torch.randperm(36, generator=torch.Generator().manual_seed(1))
    wanted = [perm[i:i + 5] for i in range(0, 36, 5)] + [slice(0, 7)]
    streamed = list(read_batches(StreamedImages(dataset, CPU), wanted))
    resident = list(read_batches(dataset.images, wanted))
    assert len(streamed) == len(resident) == 9
    assert all(torch.equal(a, b) for a, b in zip(streamed, resident))


def test_a_read_error_reaches_the_consumer_and_an_early_stop_frees_the_reader(dataset, monkeypatch):
    stream = StreamedImages(dataset, CPU)
    before = threading.active_count()
    batches = read_batches(stream, [slice(i, i + 2) for i in range(0, 36, 2)], depth=1)
    next(batches)
    batches.close()  # the consumer stops after one batch: the reader must not stay blocked
    assert threading.active_count() == before

    def broken(rows, out):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(dataset.rows, "read_into", broken)
    with pytest.raises(OSError, match="Input/output"):
        list(read_batches(stream, [slice(0, 4)]))


def test_each_process_streams_its_own_shard(dataset, monkeypatch):
    seen = []
    for rank in range(3):
        monkeypatch.setattr(distributed, "rank", lambda rank=rank: rank)
        monkeypatch.setattr(distributed, "world", lambda: 3)
        shard = distributed.training_shard(len(dataset))
        images, labels = place_on_device(dataset, CPU, shard, stream=True)
        resident, resident_labels = place_on_device(dataset, CPU, shard)
        assert isinstance(images, StreamedImages) and images.rows.tolist() == shard.tolist()
        assert shard.tolist() == list(range(rank, 36, 3))  # a strided slice, as distributed.shard documents
        assert torch.equal(images[0:len(images)], resident) and torch.equal(labels, resident_labels)
        seen += images.rows.tolist()
    assert sorted(seen) == list(range(36))


def test_streamed_training_and_stats_equal_the_resident_ones_bit_for_bit(dataset):
    weights = []
    for stream in (False, True):
        torch.manual_seed(0)
        images, labels = place_on_device(dataset, CPU, stream=stream)
        mean, std = channel_stats(images)
        model = build_model("cnn", num_classes=3, image_size=16, mean=mean, std=std)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        history = fit(model, images, labels, optimizer=optimizer, epochs=2, batch_size=7, schedule=step_schedule(0.05),
                      device=CPU, seed=3, quiet=True)
        weights.append((model.state_dict(), history[-1]["train_loss"], (mean, std)))
    (a, loss_a, stats_a), (b, loss_b, stats_b) = weights
    assert stats_a == stats_b and loss_a == loss_b
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_set_held_in_memory_streams_too(dataset):
    dataset.rows = None  # as a set decoded without any file behind it
    stream = StreamedImages(dataset, CPU)
    idx = torch.tensor([9, 1, 33])
    assert torch.equal(stream[idx], dataset.images[idx])
    assert np.array_equal(next(read_batches(stream, [idx])).numpy(), dataset.images[idx].numpy())
