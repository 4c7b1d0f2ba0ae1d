"""Video DiT adapters: diffusers Wan 2.1 / HunyuanVideo with Sliding Tile Attention.

Entry point: ``build_model(model_cfg, attention_cfg, *, device, dtype) -> VideoDiT``.
"""

from .attention import ActivationStore, STAAttention
from .config import AttentionConfig, ModelConfig
from .dit import VideoDiT, build_model, reset_rope_buffers
from .flavors import FLAVORS, Flavor, get_flavor
from .strategy import MaskStrategy, StrategyError
from .windows import WindowPlan, build_window_plan

__all__ = [
    "FLAVORS",
    "ActivationStore",
    "AttentionConfig",
    "Flavor",
    "MaskStrategy",
    "ModelConfig",
    "STAAttention",
    "StrategyError",
    "VideoDiT",
    "WindowPlan",
    "build_model",
    "build_window_plan",
    "get_flavor",
    "reset_rope_buffers",
]
