"""SSBA, the sample-specific invisible backdoor (Li et al., ICCV 2021), with an encoder trained by the tool.

SSBA hides a fixed code in every image with a steganography encoder (StegaStamp); the
residual it adds depends on the image, so every poisoned image carries a different,
invisible trigger. The original uses a StegaStamp encoder trained on ImageNet, which we
cannot download; here a small encoder and decoder are trained on the folder being
poisoned, StegaStamp-style: with random BITS-bit codes, so the encoder learns to hide
*any* code in *this* image, and the decoder to read it back after 8-bit rounding. The
poison then hides one fixed code (drawn from CODE_SEED, not --seed, so a training set and
its --test set share it). The residual is bounded by construction: `MAX_CHANGE * tanh`,
so no pixel moves by more than MAX_CHANGE (8/255).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from aabl_cli.core.checkpoint import load_trigger
from aabl_cli.core.device import make_generator, seed_everything
from aabl_cli.core.errors import AablError
from aabl_cli.core.pixels import batch_to_float
from aabl_cli.core.progress import log, progress
from aabl_cli.core.stream import Images
from aabl_cli.stages.poison.backdoors.base import Built, Context

DEFAULT_EPOCHS = 10
BITS = 32  # length of the hidden code (StegaStamp: 100)
MAX_CHANGE = 8 / 255  # the largest change of any pixel, in [0, 1] units
CODE_SEED = 0
LAMBDA_L2 = 0.05  # final weight of the residual's mean square (in units of MAX_CHANGE) against the code loss
LR = 1e-3  # Adam
BATCH = 32  # 600 32-px images, 15 epochs: the decoder reads 89 % of the bits (CPU check)
WIDTH = 32


def fixed_code(bits: int = BITS, seed: int = CODE_SEED) -> torch.Tensor:
    """The code every poisoned image hides: float (bits,) of 0 and 1."""
    return torch.randint(0, 2, (bits,), generator=torch.Generator().manual_seed(seed)).float()


class Encoder(nn.Module):
    """(x (N, 3, H, W) in [0, 1], code (N, bits) of 0/1) -> residual (N, 3, H, W) within +-bound.

    The code is spread into a coarse 3x8x8 map and upsampled to the image, as StegaStamp
    does, then convolved together with the image; fully convolutional, so any size works.
    """

    def __init__(self, bits: int = BITS, width: int = WIDTH, bound: float = MAX_CHANGE) -> None:
        super().__init__()
        self.bound = bound
        self.spread = nn.Linear(bits, 3 * 8 * 8)
        self.net = nn.Sequential(nn.Conv2d(6, width, 3, padding=1), nn.ReLU(),
                                 nn.Conv2d(width, width, 3, padding=1), nn.ReLU(),
                                 nn.Conv2d(width, width, 3, padding=1), nn.ReLU(),
                                 nn.Conv2d(width, 3, 3, padding=1))

    def forward(self, x: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
        spread = self.spread(code * 2 - 1).view(-1, 3, 8, 8)
        spread = F.interpolate(spread, size=x.shape[-2:], mode="bilinear", align_corners=False)
        # The code map also goes straight to the output: from the first step the residual carries the
        # code at a visible strength, and the convolutions shape it to the image.
        return self.bound * torch.tanh(spread + self.net(torch.cat([x - 0.5, spread], dim=1)))


class Decoder(nn.Module):
    """x (N, 3, H, W) in [0, 1] -> code logits (N, bits). Batch norm matters: without it the decoder
    stayed at chance (49 % of bits) where with it it read 69 %, after the same 114 steps."""

    def __init__(self, bits: int = BITS, width: int = WIDTH) -> None:
        super().__init__()

        def block(cin: int, cout: int, stride: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, stride=stride, padding=1), nn.BatchNorm2d(cout), nn.ReLU()]

        self.net = nn.Sequential(*block(3, width, 1), *block(width, 2 * width, 2), *block(2 * width, 2 * width, 2),
                                 nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(2 * width * 16, bits))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def as_stored(y: torch.Tensor) -> torch.Tensor:
    """y rounded to 8 bits, as a PNG stores it; gradients pass straight through, so training sees
    what the file will hold."""
    return y + ((y * 255).round() / 255 - y).detach()


def encode(encoder: Encoder, x: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """x with `code` (N, bits) hidden in it, rounded to 8 bits."""
    return as_stored((x + encoder(x, code)).clamp(0, 1))


def train_ssba(images: Images, *, epochs: int, device: torch.device, seed: int, quiet: bool = False
               ) -> tuple[Encoder, Decoder, dict[str, Any]]:
    """Train the encoder and decoder on uint8 `images` (N, 3, H, W); returns both in eval mode and a
    report: the settings and, over the training images with the fixed code, the decoder's bit
    accuracy and the mean and largest pixel change.

    As StegaStamp, the code loss trains alone at first: the residual's L2 weight is 0 for the
    first half of the epochs and then ramps up to LAMBDA_L2, so the residual does not shrink
    to nothing before the decoder has learnt to read it.
    """
    seed_everything(seed)
    generator = make_generator(images.device, seed)
    encoder, decoder = Encoder().to(device), Decoder().to(device)
    optimizer = torch.optim.Adam([*encoder.parameters(), *decoder.parameters()], lr=LR)
    n = images.shape[0]
    for epoch in progress(range(epochs), total=epochs, desc="ssba: encoder + decoder", unit="epoch", quiet=quiet):
        l2_weight = LAMBDA_L2 * min(1.0, max(0.0, 2 * epoch / epochs - 1))
        perm = torch.randperm(n, generator=generator, device=images.device)
        total = torch.zeros((), device=device)
        for s in range(0, n, BATCH):
            x = batch_to_float(images[perm[s:s + BATCH]], device)
            code = torch.randint(0, 2, (x.shape[0], BITS), generator=generator, device=images.device).float()
            code = code.to(device)
            residual = encoder(x, code)
            loss = (F.binary_cross_entropy_with_logits(decoder(as_stored((x + residual).clamp(0, 1))), code)
                    + l2_weight * (residual / MAX_CHANGE).pow(2).mean())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.detach() * x.shape[0]
        log(f"ssba: encoder + decoder epoch {epoch + 1}/{epochs}: loss {float(total) / max(1, n):.4f}",
            quiet=quiet)
    encoder.eval().requires_grad_(False)
    decoder.eval().requires_grad_(False)
    report = {"epochs": epochs, "bits": BITS, "max_change": MAX_CHANGE, "max_change_255": MAX_CHANGE * 255,
              "code": fixed_code().int().tolist(), "lambda_l2": LAMBDA_L2, "lr": LR, "batch_size": BATCH,
              "width": WIDTH, **_measure(encoder, decoder, images, device=device)}
    return encoder, decoder, report


@torch.no_grad()
def _measure(encoder: Encoder, decoder: Decoder, images: Images, *, device: torch.device) -> dict[str, float]:
    """The fixed code hidden in every training image: the share of its bits the decoder reads back, and
    the mean and largest pixel change in 1/255 units."""
    code = fixed_code().to(device)
    right = change_sum = change_max = 0.0
    for s in range(0, images.shape[0], 256):
        x = batch_to_float(images[s:s + 256], device)
        y = encode(encoder, x, code.expand(x.shape[0], -1))
        right += float(((decoder(y) > 0) == code.bool()).float().sum())
        change = (y - x).abs() * 255
        change_sum += float(change.mean()) * x.shape[0]
        change_max = max(change_max, float(change.max()))
    n = max(1, images.shape[0])
    return {"code_bit_accuracy": right / (n * BITS), "mean_change_255": change_sum / n,
            "max_change_seen_255": change_max}


def build_trigger(encoder: Encoder, device: torch.device) -> Callable[[torch.Tensor], torch.Tensor]:
    """The poisoning trigger: CPU float (N, 3, H, W) in [0, 1] -> the image with the fixed code hidden, on the CPU."""
    code = fixed_code().to(device)

    @torch.no_grad()
    def trigger(x: torch.Tensor) -> torch.Tensor:
        x = x.to(device)
        return (x + encoder(x, code.expand(x.shape[0], -1))).clamp(0, 1).cpu()
    return trigger


def state(encoder: Encoder, decoder: Decoder) -> dict[str, torch.Tensor]:
    """Both networks' weights, for a trigger file."""
    return {**{f"encoder.{k}": v for k, v in encoder.state_dict().items()},
            **{f"decoder.{k}": v for k, v in decoder.state_dict().items()}}


def from_state(tensors: dict[str, torch.Tensor], *, device: torch.device) -> tuple[Encoder, Decoder]:
    """Rebuild the encoder and decoder from `state()`'s tensors; raises RuntimeError when they do not fit."""
    encoder, decoder = Encoder(), Decoder()
    encoder.load_state_dict({k[8:]: v for k, v in tensors.items() if k.startswith("encoder.")}, strict=True)
    decoder.load_state_dict({k[8:]: v for k, v in tensors.items() if k.startswith("decoder.")}, strict=True)
    return encoder.to(device).eval().requires_grad_(False), decoder.to(device).eval().requires_grad_(False)


def build(ctx: Context) -> Built:
    """Train the encoder on the source folder, or load it from `ctx.trigger_file` (a trigger.safetensors)."""
    if ctx.trigger_file is not None:
        tensors, settings = load_trigger(ctx.trigger_file, backdoor="ssba")
        try:
            encoder, _ = from_state(tensors, device=ctx.device)
        except (RuntimeError, ValueError) as err:
            raise AablError(f"--trigger {ctx.trigger_file}: the tensors do not fit the ssba networks "
                            f"({str(err).splitlines()[0]}); the file is damaged or from another aabl version") from err
        return Built(build_trigger(encoder, ctx.device),
                     report={"loaded_from": str(Path(ctx.trigger_file).resolve()), "trained_with": settings})
    data = ctx.dataset(min_classes=1)
    images, _ = ctx.placed(data)
    encoder, decoder, report = train_ssba(images, epochs=ctx.epochs or DEFAULT_EPOCHS, device=ctx.device,
                                          seed=ctx.seed, quiet=ctx.quiet)
    if report["code_bit_accuracy"] < 0.75:
        log(f"note: the ssba decoder reads back only {report['code_bit_accuracy']:.0%} of the hidden code's bits "
            "(50 % is chance), so the residual does not carry the code reliably yet; raise --epochs", quiet=ctx.quiet)
    return Built(build_trigger(encoder, ctx.device), report=report, weights=state(encoder, decoder))
