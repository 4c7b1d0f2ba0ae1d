"""Data pipeline: sources (synthetic, manifest folder, local datasets), decoding, encoders,
the latent cache, and the training loader.

Public entry points::

    DataConfig                              # the ``data`` config group
    prepare_data(cfg, rank=0, world_size=1) # build (or find) the latent cache -> its folder
    build_train_loader(cfg, batch_size=..., seed=..., dp_rank=..., dp_size=...)
    build_video_encoder(cfg), build_text_encoder(cfg)
    dp_coordinates(rank, world_size, sp_size)
"""

from stafinetune.data.config import DataConfig, default_data_root
from stafinetune.data.encoders import build_text_encoder, build_video_encoder
from stafinetune.data.loader import TrainLoader, build_train_loader, dp_coordinates
from stafinetune.data.preprocess import prepare_data, resolve_cache_dir

__all__ = [
    "DataConfig",
    "TrainLoader",
    "build_text_encoder",
    "build_train_loader",
    "build_video_encoder",
    "default_data_root",
    "dp_coordinates",
    "prepare_data",
    "resolve_cache_dir",
]
