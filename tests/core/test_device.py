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


@pytest.mark.filterwarnings("ignore:--precision bf16 on this CPU")  # where the CPU has no bf16 instructions
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


def test_native_bf16_is_read_from_the_cpus_flags(tmp_path):
    from aabl_cli.core.device import cpu_has_native_bf16

    avx2 = tmp_path / "avx2"
    avx2.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx avx2 fma\n\nprocessor\t: 1\nflags\t\t: fpu avx2\n")
    amx = tmp_path / "amx"
    amx.write_text("processor\t: 0\nflags\t\t: avx2 avx512f avx512_bf16 amx_tile amx_bf16\n")
    arm = tmp_path / "arm"
    arm.write_text("processor\t: 0\nFeatures\t: fp asimd bf16 i8mm\n")
    assert cpu_has_native_bf16(str(avx2)) is False
    assert cpu_has_native_bf16(str(amx)) is True and cpu_has_native_bf16(str(arm)) is True
    assert cpu_has_native_bf16(str(tmp_path / "missing")) is None  # the system does not say: no warning


@pytest.mark.parametrize(("native", "precision", "warns"), [(False, "bf16", True), (True, "bf16", False),
                                                            (None, "bf16", False), (False, "fp32", False),
                                                            (False, "auto", False)])
def test_bf16_on_a_cpu_without_bf16_instructions_warns(monkeypatch, recwarn, native, precision, warns):
    import aabl_cli.core.device as device

    monkeypatch.setattr(device, "cpu_has_native_bf16", lambda: native)
    with use_precision(precision):
        prepare_model(build_model("cnn", num_classes=3, image_size=(16, 16)), CPU)
    found = [str(w.message) for w in recwarn if "emulated" in str(w.message)]
    assert len(found) == (1 if warns else 0)
    if warns:
        assert "use --precision auto or fp32" in found[0]
