"""Loading from user paths without running code from them, and without tracebacks.

Pickle-based weight files (``.bin``, ``.pt``, ``.pth``, ``.ckpt``) can execute arbitrary code
when loaded; safetensors files cannot. Every model folder stafinetune reads (the DiT, the
teacher, the VAE and text encoders, the metrics' DINO/CLIP) goes through
:func:`weights_loading_kwargs`: safetensors only, unless the user consents to pickle weights
for that folder with the config flag the error names.

A safetensors file still describes itself in a JSON header that loaders trust;
:func:`safetensors_problem` checks that header completely (dtype, shape, offsets, file
size) so a damaged or forged file is reported by name instead of failing inside a library,
and :func:`load_json_file` reads JSON files (strategies, checkpoint metadata) with every
parse failure, nesting too deep included, as one ``ValueError`` naming the file.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

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


# ------------------------------------------------------------------ files that describe themselves
def load_json_file(path: str | os.PathLike[str], what: str | None = None) -> Any:
    """Parse the JSON file ``path``.

    Raises:
        ValueError: naming ``what`` (default: the path) when the file is not valid JSON,
            not UTF-8, or nested too deeply to parse (Python's parser recurses per level).
        OSError: the file cannot be read.
    """
    name = what or os.fspath(path)
    with open(path, encoding="utf-8") as handle:
        try:
            return json.load(handle)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"{name} is not valid JSON ({err})") from None
        except RecursionError:
            raise ValueError(f"{name} is nested too deeply to be read as JSON") from None


# The safetensors library refuses headers above this size; so do we (it is read into memory).
SAFETENSORS_MAX_HEADER = 100_000_000
# Element width in bits of every dtype the safetensors format defines.
SAFETENSORS_DTYPE_BITS = {
    "BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E4M3FNUZ": 8,
    "F8_E5M2FNUZ": 8, "F8_E8M0": 8, "I16": 16, "U16": 16, "F16": 16, "BF16": 16, "I32": 32,
    "U32": 32, "F32": 32, "I64": 64, "U64": 64, "F64": 64, "C64": 64, "F4": 4, "F6_E2M3": 6,
    "F6_E3M2": 6,
}  # fmt: skip


def is_count(value: Any) -> bool:
    """Whether a parsed JSON value is an integer >= 0 (JSON's true/false and 1.0 are not)."""
    return type(value) is int and value >= 0


def safetensors_problem(path: str | os.PathLike[str]) -> str | None:
    """Why ``path`` is not a well-formed safetensors file, or None when it is.

    Checks everything a loader trusts the header for: its length fits the file and the
    library's limit, it is a JSON object of tensors (plus an optional ``__metadata__`` of
    strings), every dtype is one the format defines, every shape's element count times the
    dtype's width is exactly the tensor's byte span (Python integers: no overflow), and the
    byte spans tile the data section in order from 0 to the end of the file, without gaps or
    overlaps. The message starts with the file's name.
    """
    name = Path(path).name
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as handle:
            prefix = handle.read(8)
            length = int.from_bytes(prefix, "little") if len(prefix) == 8 else -1
            if not 0 < length <= min(size - 8, SAFETENSORS_MAX_HEADER):
                return f"{name} has a broken header (length {length}, file of {size} bytes)"
            header = json.loads(handle.read(length))
    except OSError as err:
        return f"{name} cannot be read ({err.strerror or err})"
    except (ValueError, RecursionError):  # not JSON, not UTF-8, nested too deep
        return f"{name} has a broken header (not a JSON object)"
    if not isinstance(header, dict):
        return f"{name} has a broken header (not a JSON object)"
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        return f"{name} has a broken header (__metadata__ must map names to strings)"
    spans = []
    for key, entry in header.items():
        if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
            return f"{name}: tensor {key!r} must give exactly dtype, shape and data_offsets"
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        bits = SAFETENSORS_DTYPE_BITS.get(dtype) if isinstance(dtype, str) else None
        if bits is None:
            return f"{name}: tensor {key!r} has an unknown dtype {dtype!r}"
        if not isinstance(shape, list) or not all(is_count(d) for d in shape):
            return f"{name}: tensor {key!r} has a bad shape {shape!r}"
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(map(is_count, offsets))
                and offsets[0] <= offsets[1]):  # fmt: skip
            return f"{name}: tensor {key!r} has bad data_offsets {offsets!r}"
        count = math.prod(shape)
        if (count * bits) % 8 or count * bits // 8 != offsets[1] - offsets[0]:
            return (
                f"{name}: tensor {key!r} of shape {shape} and dtype {dtype} needs "
                f"{count * bits / 8:g} bytes but its data_offsets span {offsets[1] - offsets[0]}"
            )
        spans.append((offsets[0], offsets[1], key))
    end = 0
    for start, stop, key in sorted(spans):
        if start != end:
            what = "overlaps the tensor before it" if start < end else "leaves a gap before it"
            return f"{name}: tensor {key!r} at bytes {start}..{stop} {what}"
        end = stop
    if size != 8 + length + end:
        return f"{name} has {size} bytes, its header needs {8 + length + end}"
    return None


def check_safetensors_files(folder: str | os.PathLike[str], field: str) -> None:
    """Raise ValueError naming ``field`` and the file when any ``*.safetensors`` file under
    ``folder`` is malformed (see :func:`safetensors_problem`); for weights read with a
    library that would fail on them with a traceback of its own."""
    for file in sorted(Path(folder).rglob("*.safetensors")):
        problem = safetensors_problem(file)
        if problem is not None:
            raise ValueError(f"{field}={os.fspath(folder)!r}: {problem} ({file})")
