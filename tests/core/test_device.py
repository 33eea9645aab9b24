"""core.device: the stage-wide precision and what reads it (autocast, channels_last, batches)."""

from __future__ import annotations

import pytest
import torch

from aabl_cli.core.device import PRECISIONS, autocast, channels_last, prepare_model, use_precision, uses_bf16
from aabl_cli.core.errors import AablError
from aabl_cli.core.models import build_model
from aabl_cli.core.pixels import batch_to_float
from aabl_cli.options import PRECISION_CHOICES

CPU = torch.device("cpu")


def test_auto_is_float32_on_the_cpu_and_bf16_on_cuda():
    assert not uses_bf16(CPU) and not channels_last(CPU)  # outside any stage: auto
    with use_precision("auto"):
        assert not uses_bf16(CPU) and uses_bf16(torch.device("cuda"))
    with use_precision("fp32"):
        assert not uses_bf16(torch.device("cuda")) and channels_last(torch.device("cuda"))


def test_bf16_on_the_cpu_autocasts_and_uses_channels_last():
    model = build_model("cnn", num_classes=3, image_size=(16, 16))
    x = torch.rand(2, 3, 16, 16)
    with use_precision("bf16"):
        assert uses_bf16(CPU) and channels_last(CPU)
        with autocast(CPU):
            assert model(x).dtype == torch.bfloat16
        prepared = prepare_model(model, CPU)
        batch = batch_to_float(torch.zeros(2, 3, 16, 16, dtype=torch.uint8), CPU)
    assert prepared.net.features[0][0].weight.is_contiguous(memory_format=torch.channels_last)
    assert batch.is_contiguous(memory_format=torch.channels_last) and batch.dtype == torch.float32
    with autocast(CPU):  # the context ended: float32 again
        assert model(x).dtype == torch.float32


def test_precision_names_are_checked():
    assert PRECISION_CHOICES == PRECISIONS
    with pytest.raises(AablError, match="--precision"), use_precision("fp16"):
        pass
    with use_precision("bf16"), pytest.raises(AablError, match="MPS|mps"):
        uses_bf16(torch.device("mps"))
