"""Cheap, on-demand timing of the attention modules (for the ``perf/attn_time_share`` metric).

Hooks are attached only for the steps that are measured, so the other steps pay nothing.
Forward time runs from the module's pre-hook to its forward hook; backward time from the
moment the output's gradient arrives to the moment the query's gradient is produced.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn


class _Clock:
    """Host timestamps on CPU, CUDA events on GPU (read after a synchronise)."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def mark(self) -> Any:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def seconds(self, start: Any, end: Any) -> float:
        if self.cuda:
            return start.elapsed_time(end) / 1000.0
        return end - start


class AttentionTimer:
    """Measures the time spent inside attention modules (forward and backward).

    Args:
        modules: the attention modules (e.g. the student's and the teacher's ``STAAttention``).
        device: where they run.
        enabled: False attaches nothing and :meth:`stop` returns NaN (not measured), e.g. for
            compiled models, whose graphs hooks would change.
    """

    def __init__(
        self, modules: Iterable[nn.Module], device: torch.device, enabled: bool = True
    ) -> None:
        self.enabled = enabled
        self.modules = list(modules)
        self.clock = _Clock(device)
        self._handles: list[Any] = []
        self._spans: list[tuple[Any, Any]] = []

    def start(self) -> None:
        """Attach the hooks; every attention call until :meth:`stop` is timed."""
        self._spans = []
        if not self.enabled:
            return
        for module in self.modules:
            self._handles.append(module.register_forward_pre_hook(self._pre, with_kwargs=True))
            self._handles.append(module.register_forward_hook(self._post, with_kwargs=True))

    def _pre(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        module._stafinetune_t0 = self.clock.mark()  # type: ignore[attr-defined]

    def _post(self, module: nn.Module, args: tuple, kwargs: dict, out: torch.Tensor) -> None:
        self._spans.append((module._stafinetune_t0, self.clock.mark()))  # type: ignore[attr-defined]
        q = args[0] if args else kwargs.get("q")
        if torch.is_tensor(out) and out.requires_grad and q is not None and q.requires_grad:
            box: dict[str, Any] = {}

            def grad_in(grad: torch.Tensor) -> None:
                box["t0"] = self.clock.mark()

            def grad_out(grad: torch.Tensor) -> None:
                if "t0" in box:
                    self._spans.append((box.pop("t0"), self.clock.mark()))

            out.register_hook(grad_in)
            q.register_hook(grad_out)

    def stop(self) -> float:
        """Detach the hooks and return the seconds spent in attention since :meth:`start`
        (NaN when not enabled)."""
        if not self.enabled:
            return float("nan")
        for handle in self._handles:
            handle.remove()
        self._handles = []
        if self.clock.cuda:
            torch.cuda.synchronize()
        total = sum(self.clock.seconds(a, b) for a, b in self._spans)
        self._spans = []
        return total
