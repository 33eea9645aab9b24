"""The streamed data path: images read from the decode cache batch by batch, never held whole.

When the decoded set does not fit the memory budget (`core.memory`), a stage trains and scores
on a `StreamedImages`, which stands in for the uint8 (N, C, H, W) tensor of the resident path:
indexing it with a batch's indices (or a slice) reads those rows from the cache file with
positioned reads (a memory map's pages would count as the process's memory; the page cache
the reads go through does not) and delivers them where the resident tensor would live (the
GPU on CUDA, else host memory). `read_batches` reads the next batches ahead on a background thread,
into pinned memory on CUDA, and copies each to the GPU on a side stream while the previous
one computes. The rows and their order are the resident path's, and augmentation still runs
on the delivered batch with the same generator, so a seeded run gives the same batches on both.

Memory of the streamed path: about PREFETCH + 2 batches of uint8 images, whatever the set's size.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator, Sequence

import numpy as np
import torch

from aabl_cli.core.data import ImageDataset

PREFETCH = 2  # batches read ahead of the one computing


class StreamedImages:
    """The rows `rows` (default: all) of `dataset`'s images, read from its cache file when indexed and
    delivered where a stage computing on `device` keeps its images: on the GPU with CUDA, else in host
    memory (`images[idx]`: uint8 (len(idx), C, H, W)). `subset` narrows it without
    reading anything. A dataset held in memory (`dataset.rows` None) is indexed directly."""

    dtype = torch.uint8

    def __init__(self, dataset: ImageDataset, device: torch.device, rows: torch.Tensor | None = None) -> None:
        self.dataset = dataset
        self.device = device if device.type == "cuda" else torch.device("cpu")
        self.rows = None if rows is None else rows.cpu().numpy().astype(np.int64)
        n = len(dataset) if self.rows is None else len(self.rows)
        self.shape = torch.Size((n, *dataset.images.shape[1:]))

    def __len__(self) -> int:
        return self.shape[0]

    def subset(self, index: torch.Tensor) -> StreamedImages:
        """The rows `index` (int64 positions, or a boolean mask) of these, unread."""
        index = index.cpu()
        if index.dtype == torch.bool:
            index = index.nonzero().flatten()
        return StreamedImages(self.dataset, self.device, torch.from_numpy(self._global(index)))

    def _global(self, index: torch.Tensor | slice) -> np.ndarray:
        """Positions in the dataset of these rows' `index`."""
        if isinstance(index, slice):
            local = np.arange(len(self))[index]
        else:
            local = index.cpu().numpy().astype(np.int64).reshape(-1)
        return local if self.rows is None else self.rows[local]

    def read(self, rows: np.ndarray) -> torch.Tensor:
        """The dataset's rows `rows` in host memory: pinned when bound for a GPU (so the copy is async)."""
        pin = self.device.type == "cuda"
        out = torch.empty((len(rows), *self.shape[1:]), dtype=torch.uint8, pin_memory=pin)
        if self.dataset.rows is None:
            out.copy_(self.dataset.images[torch.from_numpy(rows)])
        else:
            self.dataset.rows.read_into(rows, out.numpy())
        return out

    def __getitem__(self, index: torch.Tensor | slice) -> torch.Tensor:
        host = self.read(self._global(index))
        return host if self.device.type != "cuda" else host.to(self.device, non_blocking=True)


Images = torch.Tensor | StreamedImages  # what the loops index: the resident tensor, or the stream


def select(images: Images, index: torch.Tensor) -> Images:
    """`images[index]` of the resident tensor (a copy); of a stream, the narrowed stream (nothing read)."""
    return images.subset(index) if isinstance(images, StreamedImages) else images[index]


def read_batches(images: Images, indices: Sequence[torch.Tensor | slice], *,
            depth: int = PREFETCH) -> Iterator[torch.Tensor]:
    """`images[i]` for each `i` of `indices`, in order. A resident tensor is indexed as each batch is
    wanted; a stream is read `depth` batches ahead on a background thread (and on CUDA copied to the
    GPU one batch ahead on a side stream), so reading overlaps compute."""
    if not isinstance(images, StreamedImages):
        return (images[i] for i in indices)
    return _prefetched(images, [images._global(i) for i in indices], depth)


def _prefetched(images: StreamedImages, rows: list[np.ndarray], depth: int) -> Iterator[torch.Tensor]:
    ready: queue.Queue[torch.Tensor | BaseException] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def offer(item: torch.Tensor | BaseException) -> bool:
        while not stop.is_set():
            try:
                ready.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def read_ahead() -> None:
        try:
            for part in rows:
                if not offer(images.read(part)):
                    return
        except BaseException as err:  # noqa: BLE001 - handed to the consumer, which raises it
            offer(err)

    def take() -> torch.Tensor:
        item = ready.get()
        if isinstance(item, BaseException):
            raise item
        return item

    reader = threading.Thread(target=read_ahead, name="aabl-stream", daemon=True)
    reader.start()
    try:
        if images.device.type != "cuda":
            for _ in rows:
                yield take()
            return
        copier = torch.cuda.Stream(images.device)
        compute = torch.cuda.current_stream(images.device)

        def upload(host: torch.Tensor) -> torch.Tensor:
            with torch.cuda.stream(copier):
                return host.to(images.device, non_blocking=True)

        following = upload(take()) if rows else None
        for k in range(len(rows)):
            current = following
            assert current is not None
            compute.wait_stream(copier)  # the batch has arrived before compute reads it
            current.record_stream(compute)  # and its memory is not reused before compute is done
            following = upload(take()) if k + 1 < len(rows) else None
            yield current
    finally:  # the consumer stopped (done, an error, Ctrl-C): release the reader
        stop.set()
        while not ready.empty():
            ready.get_nowait()
        reader.join(timeout=5)
