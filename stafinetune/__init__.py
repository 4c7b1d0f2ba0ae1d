"""stafinetune: finetune and run video diffusion transformers with Sliding Tile Attention.

``enable_sta(pipe, strategy=...)`` / ``disable_sta(pipe)`` turn STA on and off in a diffusers
Wan or HunyuanVideo pipeline (see ``stafinetune.inference.pipelines``). They are imported on first use,
so ``import stafinetune`` stays cheap.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from stafinetune.inference.pipelines import disable_sta, enable_sta, sta_step

__version__ = "0.1.0"

__all__ = ["__version__", "disable_sta", "enable_sta", "sta_step"]

_PIPELINE_API = frozenset({"disable_sta", "enable_sta", "sta_step"})


def __getattr__(name: str) -> Any:
    if name in _PIPELINE_API:
        from stafinetune.inference import pipelines

        return getattr(pipelines, name)
    raise AttributeError(f"module 'stafinetune' has no attribute {name!r}")
