"""The model as attack steps see it: eval mode, batch norm folded into the convolution before it.

An attack runs the model in eval mode, where batch norm is a fixed per-channel affine map;
folded into the preceding convolution's weights and bias it costs nothing. Building the
folded graph (an `torch.fx` trace) happens once per model; `refresh()` recomputes the
folded weights from the live model in a few tensor operations, so adversarial training
can refresh before every batch while the model learns. Every other layer is the live
model's own module. Where a network cannot be traced, the view is the model itself.
"""

from __future__ import annotations

import torch
import torch.fx
from torch import nn


class AttackView(nn.Module):
    """`view(x)` equals `model.eval()(x)` up to float rounding, and is faster to differentiate."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self._pairs: list[tuple[nn.Conv2d, nn.BatchNorm2d, nn.Conv2d]] = []
        self.graph_module: nn.Module = model
        try:
            traced = torch.fx.symbolic_trace(model)
        except Exception:  # noqa: BLE001 - an untraceable network runs unfused
            return
        modules = dict(traced.named_modules())
        for node in list(traced.graph.nodes):
            if node.op != "call_module" or not isinstance(modules.get(node.target), nn.BatchNorm2d):
                continue
            source = node.args[0]
            if (not isinstance(source, torch.fx.Node) or source.op != "call_module" or len(source.users) != 1
                    or not isinstance(modules.get(source.target), nn.Conv2d)):
                continue
            conv, bn = modules[source.target], modules[node.target]
            if not bn.track_running_stats or bn.running_mean is None:
                continue
            fused = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride,
                              padding=conv.padding, dilation=conv.dilation, groups=conv.groups, bias=True,
                              padding_mode=conv.padding_mode).to(conv.weight.device, conv.weight.dtype)
            fused.requires_grad_(False)
            if (conv.weight.dim() == 4 and conv.weight.is_contiguous(memory_format=torch.channels_last)
                    and not conv.weight.is_contiguous()):
                fused = fused.to(memory_format=torch.channels_last)
            name = f"fused_{len(self._pairs)}"
            traced.add_submodule(name, fused)
            source.target = name
            node.replace_all_uses_with(source)
            traced.graph.erase_node(node)
            self._pairs.append((conv, bn, fused))
        traced.graph.lint()
        traced.recompile()
        self.graph_module = traced
        self.refresh()

    @property
    def folded(self) -> int:
        """How many convolution + batch-norm pairs were folded."""
        return len(self._pairs)

    @torch.no_grad()
    def refresh(self) -> None:
        """Recompute the folded weights from the live model's current parameters and statistics."""
        for conv, bn, fused in self._pairs:
            scale = bn.weight * torch.rsqrt(bn.running_var + bn.eps) if bn.affine else torch.rsqrt(
                bn.running_var + bn.eps)
            shift = bn.bias if bn.affine else torch.zeros_like(scale)
            fused.weight.copy_(conv.weight * scale.view(-1, 1, 1, 1))
            bias = conv.bias if conv.bias is not None else torch.zeros_like(scale)
            fused.bias.copy_((bias - bn.running_mean) * scale + shift)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.graph_module(x)
