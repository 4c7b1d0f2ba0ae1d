"""stafinetune: finetune and run video diffusion transformers with Sliding Tile Attention.

``enable_sta(pipe, strategy=...)`` / ``disable_sta(pipe)`` turn STA on and off in a diffusers
Wan or HunyuanVideo pipeline (see ``stafinetune.pipelines``).
"""

from .pipelines import disable_sta, enable_sta, sta_step

__version__ = "0.1.0"

__all__ = ["__version__", "disable_sta", "enable_sta", "sta_step"]
