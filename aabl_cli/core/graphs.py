"""PGD / iFGSM steps recorded once as a CUDA graph and replayed for every batch.

At CIFAR sizes a GPU finishes each of ResNet-18's kernels in microseconds, so an attack
step written as eager PyTorch spends most of its time in Python and kernel launches.
A CUDA graph records the whole attack (all steps: forward, input gradient, signed step,
projection) once per batch shape and replays it with one launch. The graph reads the
model's weights where they live, so a model that keeps learning (adversarial training,
with `fuse.AttackView.refresh` copying folded weights in place) is attacked as it is now.

Only CUDA; `GraphedAttack` runs the eager `attacks.pgd` elsewhere, for a batch shape
the first time it comes (a shape is recorded when it comes again, up to MAX_GRAPHS), and
after a recording fails.
"""

from __future__ import annotations

import contextlib
import warnings

import torch
from torch import nn

from aabl_cli.core.attacks import pgd, pgd_steps
from aabl_cli.core.device import autocast

WARMUP = 3  # eager runs on a side stream before recording (autograd and cuDNN set themselves up)
MAX_GRAPHS = 4  # recorded batch shapes per attack (each holds its own activation memory)


class GraphedAttack:
    """`attack(x, y, generator)` = `pgd(model, x, y, ...)` under `device.autocast` (the stage's
    precision; `amp=False`: float32), replayed from a CUDA graph.

    The random start is drawn outside the graph with the caller's generator, so runs stay
    seeded. The model must already be in the mode it is attacked in (eval); its parameters
    may change between calls but must not be replaced by new tensors.
    """

    def __init__(self, model: nn.Module, *, eps: float, step_size: float, steps: int, random_start: bool,
                 device: torch.device, graphs: bool = True, amp: bool = True) -> None:
        self.model, self.eps, self.step_size, self.steps = model, eps, step_size, steps
        self.random_start, self.device = random_start, device
        self.amp = amp
        self.enabled = graphs and device.type == "cuda" and eps > 0 and steps > 0
        self._graphs: dict[tuple[int, ...], tuple[torch.cuda.CUDAGraph, dict[str, torch.Tensor]]] = {}
        self._seen: dict[tuple[int, ...], int] = {}
        self._failed = False

    def __call__(self, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        key = tuple(x.shape)
        self._seen[key] = self._seen.get(key, 0) + 1
        if (not self.enabled or self._failed
                or (key not in self._graphs and (self._seen[key] < 2 or len(self._graphs) >= MAX_GRAPHS))):
            with self._autocast():
                return pgd(self.model, x, y, eps=self.eps, step_size=self.step_size, steps=self.steps,
                           random_start=self.random_start, generator=generator)
        x = x.detach().float()
        start = torch.zeros_like(x)
        if self.random_start:
            start.uniform_(-self.eps, self.eps, generator=generator)
            start = (x + start).clamp(0, 1) - x
        if key not in self._graphs:
            try:
                self._graphs[key] = self._record(x, y, start)
            except RuntimeError as err:  # an op the graph cannot hold: stay eager from now on
                warnings.warn(f"recording the attack as a CUDA graph failed ({err}); it runs eagerly, "
                              "which is slower on a GPU", RuntimeWarning, stacklevel=2)
                self._failed = True
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                return self._steps(x, y, start).detach()
        graph, io = self._graphs[key]
        io["x"].copy_(x)
        io["y"].copy_(y)
        io["start"].copy_(start)
        graph.replay()
        return io["out"].clone()

    def _steps(self, x: torch.Tensor, y: torch.Tensor, start: torch.Tensor) -> torch.Tensor:
        # no autocast weight cache: a recorded graph must cast the weights it reads at every replay
        with self._autocast(cache_enabled=False):
            return x + pgd_steps(self.model, x, y, start, eps=self.eps, step_size=self.step_size, steps=self.steps)

    def _autocast(self, cache_enabled: bool = True) -> contextlib.AbstractContextManager[None]:
        return autocast(self.device, cache_enabled=cache_enabled) if self.amp else contextlib.nullcontext()

    def _record(self, x: torch.Tensor, y: torch.Tensor,
                start: torch.Tensor) -> tuple[torch.cuda.CUDAGraph, dict[str, torch.Tensor]]:
        io = {"x": x.clone(), "y": y.clone(), "start": start.clone()}
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(WARMUP):
                self._steps(io["x"], io["y"], io["start"])
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            io["out"] = self._steps(io["x"], io["y"], io["start"])
        return graph, io

