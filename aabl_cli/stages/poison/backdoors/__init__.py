"""The paper's seven backdoors, one module each, and `BACKDOORS`, the registry `aabl poison --backdoor` chooses from.

Every trigger works on float `(N, 3, H, W)` tensors in [0, 1] and returns a new tensor, so
the code that poisons folders can also trigger GPU batches elsewhere. The backdoors that need
a network (IAB, SSBA, CLB) train it in their `build`, on the folder being poisoned.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aabl_cli.stages.poison.backdoors import blend, clb, iab, ssba, wanet
from aabl_cli.stages.poison.backdoors.base import Built, Context
from aabl_cli.stages.poison.backdoors.patches import TROJAN_GLYPH, badnets_trigger, trojan_trigger


def _build_badnets(ctx: Context) -> Built:
    return Built(badnets_trigger)


def _build_trojan(ctx: Context) -> Built:
    return Built(trojan_trigger)


@dataclass(frozen=True)
class Backdoor:
    """One `--backdoor` choice: `build(ctx)` returns its trigger on (N, 3, H, W) floats in [0, 1].

    `params` are the backdoor's fixed settings, recorded in poison.json; `uses_pattern` says
    whether `--pattern` means anything to it. `clean_label`: it poisons target-class images
    and keeps their labels, and `--rate` is a share of that class. `noise_ratio`: label-keeping
    noise images per poisoned image (WaNet). `default_epochs`: epochs of the network it
    trains (None: it trains none). `trained_trigger`: its trigger is a network, written to
    trigger.safetensors, that a `--test` run must load back.
    """

    name: str
    help: str
    build: Callable[[Context], Built]
    params: dict[str, Any] = field(default_factory=dict)
    uses_pattern: bool = False
    default_rate: float = 0.1
    clean_label: bool = False
    noise_ratio: int = 0
    default_epochs: int | None = None
    trained_trigger: bool = False


BACKDOORS: dict[str, Backdoor] = {b.name: b for b in (
    Backdoor("badnets", "3x3 white patch flush in the bottom-right corner (at 32 px; scales with image size)",
             _build_badnets, {"patch_at_32px": 3, "position": "bottom-right, flush", "color": "white"}),
    Backdoor("blend", f"blend a fixed pattern (--pattern) over the whole image at opacity {blend.OPACITY}",
             blend.build, {"opacity": blend.OPACITY}, uses_pattern=True),
    Backdoor("trojan", "5x7 watermark-like colour patch flush in the bottom-left corner (at 32 px; scales with "
             "image size)", _build_trojan,
             {"patch_at_32px": [5, 7], "position": "bottom-left, flush", "glyph": list(TROJAN_GLYPH)}),
    Backdoor("wanet", f"warp the whole image (k={wanet.K}, s={wanet.STRENGTH}, grid_rescale={wanet.GRID_RESCALE}); "
             f"{wanet.CROSS_RATIO}x as many other images get a jittered warp and keep their label (noise mode)",
             wanet.build, {"k": wanet.K, "strength": wanet.STRENGTH, "grid_rescale": wanet.GRID_RESCALE,
                           "cross_ratio": wanet.CROSS_RATIO, "field_seed": wanet.FIELD_SEED,
                           "noise_jitter_px": 0.5}, noise_ratio=wanet.CROSS_RATIO),
    Backdoor("iab", "input-aware dynamic pattern and mask, from networks trained on DATA with a classifier",
             iab.build, {"mask_density": iab.MASK_DENSITY, "lambda_norm": iab.LAMBDA_NORM,
                         "lambda_div": iab.LAMBDA_DIV, "p_poison": iab.P_POISON, "p_cross": iab.P_CROSS},
             default_epochs=iab.DEFAULT_EPOCHS, trained_trigger=True),
    Backdoor("ssba", f"invisible sample-specific residual (at most {ssba.MAX_CHANGE * 255:.0f}/255 per pixel) hiding "
             "a fixed code, from an encoder trained on DATA", ssba.build,
             {"bits": ssba.BITS, "max_change": ssba.MAX_CHANGE, "code_seed": ssba.CODE_SEED},
             default_epochs=ssba.DEFAULT_EPOCHS, trained_trigger=True),
    Backdoor("clb", "clean label: target-class images pushed away from their label by PGD, then a 3x3 checkerboard "
             "in each corner", clb.build,
             {"eps": clb.EPS, "step_size": clb.STEP_SIZE, "steps": clb.STEPS, "patch_at_32px": 3,
              "position": "all four corners"}, default_rate=0.5, clean_label=True, default_epochs=clb.DEFAULT_EPOCHS),
)}
