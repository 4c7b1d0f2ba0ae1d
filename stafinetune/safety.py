"""Loading from user paths without running code from them.

Pickle-based weight files (``.bin``, ``.pt``, ``.pth``, ``.ckpt``) can execute arbitrary code
when loaded; safetensors files cannot. Every model folder stafinetune reads (the DiT, the
teacher, the VAE and text encoders, the metrics' DINO/CLIP) goes through
:func:`weights_loading_kwargs`: safetensors only, unless the user consents to pickle weights
for that folder with the config flag the error names.
"""

from __future__ import annotations

import os
from pathlib import Path

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def weights_loading_kwargs(
    folder: str | os.PathLike[str], field: str, *, allow_pickle: bool, consent: str | None
) -> dict[str, bool]:
    """The ``from_pretrained`` keyword arguments that load ``folder`` safely.

    Args:
        folder: a local model folder (diffusers or transformers layout).
        field: the config field that named it, for the message (``model.path``).
        allow_pickle: the user's consent to load pickle weights.
        consent: the config flag that gives it (``model.allow_pickle_weights``), if any.
    Raises:
        ValueError: the folder holds pickle weights only and no consent was given.
    """
    if allow_pickle:
        return {}
    files = [p for p in Path(folder).rglob("*") if p.is_file()]
    if any(p.suffix == ".safetensors" for p in files):
        return {"use_safetensors": True}
    pickled = sorted(p.name for p in files if p.suffix in PICKLE_SUFFIXES)
    if pickled:
        allow = f", or set {consent}=true if you trust this folder" if consent else ""
        raise ValueError(
            f"{field}={os.fspath(folder)!r} holds only pickle weights ({', '.join(pickled[:3])}), "
            f"which can run code when loaded; convert them to safetensors{allow}"
        )
    return {"use_safetensors": True}
