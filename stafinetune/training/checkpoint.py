"""Atomic, resumable training checkpoints that never unpickle anything.

Layout of one checkpoint, ``<run>/checkpoints/step_00000100/``::

    model.safetensors           the student's full module state (rank 0)
    ema.safetensors             EMA weights (when EMA is on)
    optimizer.{json,safetensors} optimiser state: structure as JSON, tensors as safetensors
    trainer.json                step and scheduler state
    rank_00000.{json,safetensors} ... per-rank RNG states and data-loader position
    sharded/, engine/           FSDP2 (torch.distributed.checkpoint) or DeepSpeed state
    meta.json                   step, time, world size, format, the run's resolved config,
                                every file's size and the SHA-256 of every file stafinetune
                                wrote itself (written last)

Every state that is not a plain weight dict is stored as a JSON tree plus a safetensors file
(:func:`save_tree` / :func:`load_tree`): loading a checkpoint parses JSON and reads raw
tensors, so a crafted checkpoint cannot run code. A checkpoint is written into
``step_XXXXXXXX.tmp`` and renamed into place only once every file is flushed to disk, so a
crash mid-write never leaves a checkpoint that looks complete; a write that fails (a full
disk) removes the temporary folder and says where and why.

**Integrity.** Each file stafinetune writes is hashed while it is written (the bytes are
hashed as they go to disk: no second read), and ``meta.json`` records the digests under
``sha256`` beside the sizes under ``files``. :func:`verify_checkpoint` checks both, checks
every safetensors header (:func:`~stafinetune.safety.safetensors_problem`) and the shape of
``meta.json`` itself, so flipped bytes, a truncated copy or a forged header are found before
anything is loaded; ``train.resume=auto`` then falls back to the newest checkpoint that
verifies, with a warning naming the bad file. Files written by torch's or DeepSpeed's own
writers (``sharded/``, ``engine/``) are checked by size only. Checkpoints written before the
digests existed have no ``sha256`` and are checked by size and header.

**Format version.** ``meta.json``'s ``format`` (:data:`FORMAT_VERSION`) changes only when
the files or their meaning change so that an older stafinetune would misread them; an
addition that older versions can ignore (such as ``sha256``) keeps the number, so
checkpoints stay readable in both directions.

:class:`CheckpointManager` is what the training loop talks to: ``should_save(step)``,
``save(step, state)``, ``resume(state)``. The state it saves is a :class:`TrainState` of
named parts; a sharded engine provides its own parts with the same interface.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import pickle
import random
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file

from stafinetune.errors import UserError
from stafinetune.parallel import ParallelDims, all_gather_object, barrier
from stafinetune.safety import is_count, load_json_file, safetensors_problem

log = logging.getLogger(__name__)

FORMAT_VERSION = 2
_STEP_DIR = re.compile(r"^step_(\d{8})$")


# --------------------------------------------------------------------- pickle-free state files
def _encode(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """A JSON tree for ``obj``; tensors and arrays go to ``tensors`` and are referenced by key."""
    if isinstance(obj, torch.Tensor):
        key = str(len(tensors))
        tensors[key] = obj.detach().to("cpu").contiguous()
        return {"__tensor__": key}
    if isinstance(obj, np.ndarray):
        key = str(len(tensors))
        array = obj.astype(np.int64) if obj.dtype.kind in "ui" else obj  # e.g. numpy's uint32 RNG
        tensors[key] = torch.from_numpy(np.ascontiguousarray(array))
        return {"__ndarray__": key, "dtype": str(obj.dtype)}
    if isinstance(obj, (np.integer, np.floating)):
        return obj.item()
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, tensors) for v in obj]}
    if isinstance(obj, list):
        return [_encode(v, tensors) for v in obj]
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return {k: _encode(v, tensors) for k, v in obj.items()}
        return {"__items__": [[_encode(k, tensors), _encode(v, tensors)] for k, v in obj.items()]}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot store a {type(obj).__name__} in a checkpoint state file")


def _decode(node: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(node, list):
        return [_decode(v, tensors) for v in node]
    if not isinstance(node, dict):
        return node
    if "__tensor__" in node:
        return tensors[node["__tensor__"]]
    if "__ndarray__" in node:
        return tensors[node["__ndarray__"]].numpy().astype(np.dtype(node["dtype"]))
    if "__tuple__" in node:
        return tuple(_decode(v, tensors) for v in node["__tuple__"])
    if "__items__" in node:
        return {_decode(k, tensors): _decode(v, tensors) for k, v in node["__items__"]}
    return {k: _decode(v, tensors) for k, v in node.items()}


# safetensors' dtype names of the tensors a checkpoint holds, in the order the safetensors
# library lays them out (widest first, so every tensor stays aligned)
_SAFETENSORS_DTYPES = {
    torch.uint64: "U64", torch.int64: "I64", torch.float64: "F64", torch.float32: "F32",
    torch.uint32: "U32", torch.int32: "I32", torch.bfloat16: "BF16", torch.float16: "F16",
    torch.uint16: "U16", torch.int16: "I16", torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL",
}  # fmt: skip
_LAYOUT_ORDER = {dtype: k for k, dtype in enumerate(_SAFETENSORS_DTYPES)}


def write_safetensors(tensors: dict[str, torch.Tensor], path: Path) -> str:
    """Write ``tensors`` as a safetensors file and return the SHA-256 of its bytes.

    The bytes are hashed as they are written, one tensor at a time (a GPU tensor is copied
    to the CPU just before its turn), so neither the file nor a second copy of the tensors is
    held in memory or read back. The layout is the safetensors library's: an 8-byte header
    length, a JSON header padded to 8 bytes, then the tensors' little-endian bytes in the
    library's order (widest dtype first, then by name): the same bytes as
    ``safetensors.torch.save_file`` writes.
    """
    for name, tensor in tensors.items():
        if tensor.dtype not in _SAFETENSORS_DTYPES:
            raise TypeError(f"cannot store a {tensor.dtype} tensor ({name}) in a checkpoint")
    items = sorted(tensors.items(), key=lambda kv: (_LAYOUT_ORDER[kv[1].dtype], kv[0]))
    header: dict[str, Any] = {}
    offset = 0
    for name, tensor in items:
        nbytes = tensor.numel() * tensor.element_size()
        header[name] = {"dtype": _SAFETENSORS_DTYPES[tensor.dtype], "shape": list(tensor.shape),
                        "data_offsets": [offset, offset + nbytes]}  # fmt: skip
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    digest = hashlib.sha256()
    with open(path, "wb") as handle:
        for chunk in (len(blob).to_bytes(8, "little"), blob):
            digest.update(chunk)
            handle.write(chunk)
        for _, tensor in items:
            if tensor.numel() == 0:
                continue
            flat = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
            chunk = memoryview(flat.numpy())
            digest.update(chunk)
            handle.write(chunk)
    return digest.hexdigest()


def write_text(path: Path, text: str) -> str:
    """Write ``text`` (UTF-8) to ``path``; returns the SHA-256 of the bytes written."""
    data = text.encode("utf-8")
    path.write_bytes(data)
    return hashlib.sha256(data).hexdigest()


def file_sha256(path: Path) -> str:
    """SHA-256 of a file's bytes, read in 16 MiB pieces (verification at resume)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def save_tree(stem: Path, obj: Any) -> dict[Path, str]:
    """Write ``obj`` (nested dicts, lists, tuples, numbers, strings, tensors, numpy arrays) as
    ``<stem>.json`` plus ``<stem>.safetensors``; returns each file written with its SHA-256."""
    tensors: dict[str, torch.Tensor] = {}
    tree = _encode(obj, tensors)
    json_path, tensor_path = stem.with_suffix(".json"), stem.with_suffix(".safetensors")
    return {
        json_path: write_text(json_path, json.dumps(tree)),
        tensor_path: write_safetensors(tensors, tensor_path),
    }


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """``load_file`` after checking the header; ValueError naming the file when malformed."""
    problem = safetensors_problem(path)
    if problem is not None:
        raise ValueError(f"checkpoint file {path} is damaged: {problem}")
    return load_file(str(path))


def load_tree(stem: Path) -> Any:
    """Read what :func:`save_tree` wrote (JSON and raw tensors only: no code can run)."""
    json_path, tensor_path = stem.with_suffix(".json"), stem.with_suffix(".safetensors")
    for path in (json_path, tensor_path):
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint file missing: {path}")
    tree = load_json_file(json_path, f"checkpoint file {json_path}")
    return _decode(tree, _load_safetensors(tensor_path))


# --------------------------------------------------------------------- safe sharded loading
# What the metadata of a torch.distributed.checkpoint folder may contain: its own record
# types, torch.Size, dtypes, layouts and memory formats. Anything else (a crafted
# ``.metadata`` naming os.system, say) is refused instead of being called.
_DCP_CLASSES = {
    ("torch.distributed.checkpoint.metadata", name)
    for name in ("Metadata", "TensorStorageMetadata", "BytesStorageMetadata",
                 "ChunkStorageMetadata", "TensorProperties", "MetadataIndex", "StorageMeta",
                 "_MEM_FORMAT_ENCODING")
} | {("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"),
     ("torch.serialization", "_get_layout"), ("collections", "OrderedDict"),
     ("pathlib", "PosixPath"), ("pathlib", "WindowsPath")}  # fmt: skip


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _DCP_CLASSES:
            return super().find_class(module, name)
        if module == "torch" and isinstance(
            getattr(torch, name, None), (torch.dtype, torch.layout, torch.memory_format)
        ):
            return getattr(torch, name)
        raise pickle.UnpicklingError(
            f"a sharded checkpoint's metadata names {module}.{name}, which a checkpoint never "
            "holds: refusing to load it (the file may have been tampered with)"
        )


def _safe_dcp_reader(folder: Path) -> Any:
    """A ``torch.distributed.checkpoint`` reader whose metadata and byte items cannot run code
    (the stock reader unpickles both without restriction)."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.storage import StorageMeta

    class SafeFileSystemReader(FileSystemReader):
        def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
            path = Path(self.path) / ".metadata"
            if not path.is_file():
                raise FileNotFoundError(f"sharded checkpoint {folder} has no .metadata")
            with open(path, "rb") as f:
                metadata = _MetadataUnpickler(f).load()
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return SafeFileSystemReader(str(folder))


def _safe_dcp_planner() -> Any:
    from torch.distributed.checkpoint import DefaultLoadPlanner

    class SafeLoadPlanner(DefaultLoadPlanner):
        def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
            # non-tensor entries (optimiser hyper-parameters) hold only plain Python values
            obj = torch.load(value, weights_only=True)
            super().load_bytes(read_item, _BytesValue(obj))

    return SafeLoadPlanner()


class _BytesValue(io.BytesIO):
    """Hands an already safely loaded object to the stock planner's ``load_bytes``."""

    def __init__(self, obj: Any) -> None:
        super().__init__()
        buffer = io.BytesIO()
        torch.save(obj, buffer)
        self.write(buffer.getvalue())
        self.seek(0)


# --------------------------------------------------------------------- RNG states
def rng_state() -> dict[str, Any]:
    """Capture python, numpy, torch CPU and CUDA RNG states of this process."""
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def seed_rng(seed: int) -> None:
    """Seed python's ``random``, numpy's global generator and torch's (every device) with
    ``seed``: what :func:`rng_state` captures starts from the run's seed, not from the OS
    entropy each new process draws, so a resumed run and an uninterrupted one hold the same
    states at the same step."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` captured (also after a :func:`save_tree` round trip)."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    np.random.set_state(tuple(state["numpy"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(list(state["cuda"]))


# --------------------------------------------------------------------- files on disk
def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as handle:
        os.fsync(handle.fileno())


def list_checkpoints(ckpt_dir: Path) -> list[Path]:
    """Complete checkpoints under ``ckpt_dir``, oldest first."""
    if not ckpt_dir.is_dir():
        return []
    found = [p for p in ckpt_dir.iterdir() if p.is_dir() and _STEP_DIR.match(p.name)]
    found = [p for p in found if (p / "meta.json").is_file()]
    return sorted(found, key=lambda p: int(_STEP_DIR.match(p.name).group(1)))


def latest_checkpoint(ckpt_dir: Path) -> Path | None:
    """The newest complete checkpoint, or None."""
    found = list_checkpoints(ckpt_dir)
    return found[-1] if found else None


def _meta_problem(path: Path, meta: Any) -> str | None:
    """What is malformed in a checkpoint's parsed ``meta.json`` (None: its shape is right).

    ``step`` and ``world_size`` are integers; ``files`` (sizes) and ``sha256`` (digests),
    when present, map names of files inside the checkpoint to integers and strings.
    """
    if not isinstance(meta, dict):
        return "meta.json is not a JSON object"
    for key in ("step", "world_size"):
        if not is_count(meta.get(key)):
            return f"meta.json: {key} must be an integer >= 0, got {meta.get(key)!r}"
    for key, valid, what in (("files", is_count, "sizes"),
                             ("sha256", lambda v: isinstance(v, str), "hex digests")):  # fmt: skip
        table = meta.get(key) or {}
        if not isinstance(table, dict) or not all(map(valid, table.values())):
            return f"meta.json: {key} must map file names to {what}, got {table!r:.80}"
        for name in table:
            if not name or not (path / name).resolve().is_relative_to(path.resolve()):
                return f"meta.json: {key} names {name!r}, outside the checkpoint"
    return None


def verify_checkpoint(path: Path) -> str | None:
    """What is wrong with checkpoint ``path``, or None when it is whole as written.

    ``meta.json`` must be well formed, every JSON file must parse, every file must have the
    size and (when recorded) the SHA-256 that ``meta.json`` gives, and every safetensors file
    a consistent header. The message names the file at fault.
    """
    for file in sorted(path.glob("*.json")):
        try:
            load_json_file(file)
        except (OSError, ValueError):
            return f"{file.name} is not valid JSON"
    meta = load_json_file(path / "meta.json")
    problem = _meta_problem(path, meta)
    if problem:
        return problem
    for name, size in (meta.get("files") or {}).items():
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        if file.stat().st_size != size:
            return f"{name} has {file.stat().st_size} bytes, {size} were written"
    for file in sorted(path.rglob("*.safetensors")):
        problem = safetensors_problem(file)
        if problem:
            return problem
    for name, digest in (meta.get("sha256") or {}).items():
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        if file_sha256(file) != digest:
            return f"{name} does not match its SHA-256 recorded at save: its bytes changed"
    return None


# --------------------------------------------------------------------- what is saved
Getter = Callable[[], Any]
Setter = Callable[[Any], None]


@dataclass
class TrainState:
    """The named parts of a run's state, each a pair of (get, set) functions.

    - ``weights``: flat name -> tensor dicts, written as safetensors by rank 0;
    - ``trees``: any JSON/tensor tree, written by rank 0 (getters may return None elsewhere);
    - ``rank``: each rank's own parts, in its own file (RNG states, data position);
    - ``sharded``: state dicts of DTensors (FSDP2), written by every rank together with
      ``torch.distributed.checkpoint`` into ``sharded/``;
    - ``engines``: name -> (save(folder), load(folder)) of engines with their own format
      (DeepSpeed), called by every rank with ``<checkpoint>/<name>`` (the student's engine is
      ``engine``, a critic's ``critic_engine``).
    """

    weights: dict[str, tuple[Getter, Setter]] = field(default_factory=dict)
    trees: dict[str, tuple[Getter, Setter]] = field(default_factory=dict)
    rank: dict[str, tuple[Getter, Setter]] = field(default_factory=dict)
    sharded: dict[str, tuple[Getter, Setter]] = field(default_factory=dict)
    engines: dict[str, tuple[Callable[[Path], None], Callable[[Path], None]]] = field(
        default_factory=dict
    )

    def rank_snapshot(self) -> dict[str, Any]:
        """This rank's own parts, now (e.g. the state a NaN step rolls back to)."""
        return {name: get() for name, (get, _) in self.rank.items()}


class CheckpointWriteError(UserError):
    """A checkpoint could not be written (full disk, no permission); names the folder."""


# What torch's zip writer says when the disk fills up under it (it hides the OSError).
_WRITE_FAILURES = ("unexpected pos", "file write failed", "No space left", "Disk quota")


def _human(nbytes: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if nbytes < 1024:
            return f"{nbytes:.0f} {unit}"
        nbytes /= 1024
    return f"{nbytes:.1f} TiB"


class CheckpointManager:
    """Saves and restores a :class:`TrainState` under ``<run>/checkpoints``.

    Args:
        ckpt_dir: the run's checkpoint folder (shared by every rank).
        dims: the run's parallel degrees (rank 0 writes the global parts).
        every: save every this many optimiser steps (0: only at the end).
        keep_last: complete checkpoints kept; older ones are removed after a save.
        config: the run's resolved config, stored in every ``meta.json`` (so a resume from
            another folder can compare it).
    """

    def __init__(
        self,
        ckpt_dir: Path,
        dims: ParallelDims,
        *,
        every: int,
        keep_last: int,
        config: dict[str, Any] | None = None,
    ) -> None:
        self.ckpt_dir = ckpt_dir
        self.dims = dims
        self.every = every
        self.keep_last = keep_last
        self.config = config

    def check_writable(self) -> None:
        """Create the folder and write, sync and delete a probe file (every rank, its own).

        Raises:
            CheckpointWriteError: naming the folder, at start-up rather than at the first save.
        """
        probe = self.ckpt_dir / f".write_test_rank{self.dims.rank:05d}"
        try:
            self.ckpt_dir.mkdir(parents=True, exist_ok=True)
            with open(probe, "wb") as handle:
                handle.write(b"stafinetune")
                handle.flush()
                os.fsync(handle.fileno())
            probe.unlink()
        except OSError as err:
            raise CheckpointWriteError(
                f"cannot write checkpoints to {self.ckpt_dir}: {err.strerror or err} "
                "(the run directory must be writable: hydra.run.dir=...)"
            ) from err

    def check_free_space(self, nbytes: int) -> None:
        """Refuse to start when one checkpoint of about ``nbytes`` does not fit on the disk;
        warn when the ``keep_last`` + 1 that rotation holds at once do not."""
        free = shutil.disk_usage(self.ckpt_dir).free
        if free < nbytes:
            raise CheckpointWriteError(
                f"{self.ckpt_dir} has {_human(free)} free but one checkpoint needs about "
                f"{_human(nbytes)}"
            )
        if free < nbytes * (self.keep_last + 1) and self.dims.is_main:
            log.warning(
                "%s has %s free; train.keep_last=%d checkpoints of about %s each (plus the one "
                "being written) may not fit",
                self.ckpt_dir, _human(free), self.keep_last, _human(nbytes),
            )  # fmt: skip

    def should_save(self, step: int, last: int) -> bool:
        """Save on the cadence and at the last step of the run (``last``)."""
        return step == last or (self.every > 0 and step % self.every == 0)

    def save(self, step: int, state: TrainState, rank_state: dict[str, Any] | None = None) -> Path:
        """Write one checkpoint atomically (every rank calls this); ``rank_state`` overrides this
        rank's current parts (a NaN stop saves the state before the bad step).

        Raises:
            CheckpointWriteError: the disk is full or the folder unwritable; the temporary
                folder is removed (any other error removes it too and propagates).
        """
        final = self.ckpt_dir / f"step_{step:08d}"
        tmp = self.ckpt_dir / f"step_{step:08d}.tmp"
        try:
            self._write(step, state, rank_state, tmp, final)
        except BaseException as err:
            shutil.rmtree(tmp, ignore_errors=True)
            failed = isinstance(err, OSError) or any(m in str(err) for m in _WRITE_FAILURES)
            if not isinstance(err, Exception) or not failed:
                raise
            try:
                free = _human(shutil.disk_usage(self.ckpt_dir).free)
            except OSError:
                free = "unknown space"
            raise CheckpointWriteError(
                f"could not write checkpoint {final}: {err} ({free} free on {self.ckpt_dir}); "
                f"the partial folder {tmp.name} was removed"
            ) from err
        return final

    def _write(
        self,
        step: int,
        state: TrainState,
        rank_state: dict[str, Any] | None,
        tmp: Path,
        final: Path,
    ) -> None:
        rank, main = self.dims.rank, self.dims.is_main
        if main:
            self.ckpt_dir.mkdir(parents=True, exist_ok=True)
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir()
        barrier()
        own = rank_state if rank_state is not None else state.rank_snapshot()
        written = save_tree(tmp / f"rank_{rank:05d}", own)
        for path in written:
            _fsync_file(path)
        digests = {str(p.relative_to(tmp)): d for p, d in written.items()}
        if state.sharded:
            import torch.distributed.checkpoint as dcp

            dcp.save({name: get() for name, (get, _) in state.sharded.items()},
                     checkpoint_id=str(tmp / "sharded"))  # fmt: skip
        for name, (save, _) in state.engines.items():
            save(tmp / name)
        gathered = all_gather_object(digests)  # every rank's files, for meta.json
        barrier()
        if main:
            sha256 = {name: d for ranks in gathered for name, d in ranks.items()}  # type: ignore[union-attr]
            for name, (get, _) in state.weights.items():
                weights = get()
                if weights is not None:
                    file = f"{name}.safetensors"
                    sha256[file] = write_safetensors(weights, tmp / file)
            for name, (get, _) in state.trees.items():
                for path, digest in save_tree(tmp / name, get()).items():
                    sha256[str(path.relative_to(tmp))] = digest
            for path in tmp.rglob("*"):
                if path.is_file():
                    _fsync_file(path)
            files = {str(p.relative_to(tmp)): p.stat().st_size for p in sorted(tmp.rglob("*"))
                     if p.is_file()}  # fmt: skip
            meta = {"step": step, "world_size": self.dims.world_size, "time": time.time(),
                    "format": FORMAT_VERSION, "config": self.config, "files": files,
                    "sha256": dict(sorted(sha256.items()))}  # fmt: skip
            (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
            _fsync_file(tmp / "meta.json")
            _fsync_dir(tmp)
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            _fsync_dir(self.ckpt_dir)
            for old in list_checkpoints(self.ckpt_dir)[: -self.keep_last]:
                shutil.rmtree(old, ignore_errors=True)
        barrier()

    def load(self, path: Path, state: TrainState) -> int:
        """Restore every part of ``state`` from checkpoint ``path``; returns its step.

        Raises:
            ValueError: the checkpoint does not fit this run (format, world size, pickled
                files) or a file is damaged (named).
        """
        meta = load_json_file(path / "meta.json")
        problem = _meta_problem(path, meta)
        if problem:
            raise ValueError(f"checkpoint {path} is damaged: {problem}")
        pickled = sorted(p.name for p in path.glob("*.pt"))
        if pickled and not state.engines:
            raise ValueError(
                f"checkpoint {path} holds pickled state files ({', '.join(pickled)}), which can "
                "run code when loaded; stafinetune never unpickles them (checkpoints of this "
                "version are JSON + safetensors). Resume from a checkpoint this version wrote."
            )
        if meta.get("format") != FORMAT_VERSION:
            raise ValueError(
                f"checkpoint {path} has format {meta.get('format')!r}; this version of "
                f"stafinetune reads format {FORMAT_VERSION}"
            )
        if meta["world_size"] != self.dims.world_size:
            raise ValueError(
                f"checkpoint {path} was written by {meta['world_size']} ranks but this run has "
                f"{self.dims.world_size}; exact resume needs the same world size"
            )
        for name, (_, set_) in state.weights.items():
            file = path / f"{name}.safetensors"
            if not file.is_file():
                raise FileNotFoundError(f"checkpoint {path} has no {file.name}")
            set_(_load_safetensors(file))
        for name, (_, set_) in state.trees.items():
            set_(load_tree(path / name))
        if state.sharded:
            import torch.distributed.checkpoint as dcp

            loaded = {name: get() for name, (get, _) in state.sharded.items()}
            dcp.load(
                loaded,
                storage_reader=_safe_dcp_reader(path / "sharded"),
                planner=_safe_dcp_planner(),
            )
            for name, (_, set_) in state.sharded.items():
                set_(loaded[name])
        for name, (_, load) in state.engines.items():
            load(path / name)
        own = load_tree(path / f"rank_{self.dims.rank:05d}")
        for name, (_, set_) in state.rank.items():
            set_(own[name])
        return int(meta["step"])
