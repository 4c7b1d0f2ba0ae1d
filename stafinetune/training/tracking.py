"""Experiment tracking: wandb when enabled, a null tracker with the same methods otherwise.

The training loop calls ``tracker.log(...)`` unconditionally; whether anything is sent is
decided once, here.
"""

from __future__ import annotations

import json
import math
import numbers
import os
import secrets
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from stafinetune.config import LoggingConfig


class NullTracker:
    """Tracker that records nothing; used for ``logging=none`` and on non-zero ranks."""

    run_dir: Path | None = None
    mode: str = "disabled"

    def log(self, metrics: dict[str, Any], step: int) -> None:
        """Drop the metrics."""

    def log_video(self, key: str, path: Path, step: int, caption: str = "") -> None:
        """Drop the video."""

    def log_table(self, key: str, columns: list[str], rows: list[list[Any]], step: int) -> None:
        """Drop the table."""

    def log_image(self, key: str, path: Path, step: int, caption: str = "") -> None:
        """Drop the image."""

    def summary(self, values: dict[str, Any]) -> None:
        """Drop the summary values."""

    def finish(self) -> None:
        """Nothing to close."""


class WandbTracker:
    """Thin wrapper over a wandb run.

    Args:
        project, entity, name, group, tags: the usual wandb run fields.
        mode: "auto" (online when an API key is configured, offline otherwise), "online"
            or "offline".
        directory: where wandb writes its run folder (``<directory>/wandb/...``).
        config: the resolved job config, stored with the run.
        resume: continue the wandb run whose id this directory stored (a resumed training
            run); otherwise a new id is stored in ``<directory>/wandb/run_id``.
    """

    def __init__(
        self,
        *,
        project: str,
        entity: str | None,
        name: str | None,
        group: str | None,
        tags: list[str],
        mode: str,
        directory: Path,
        config: dict[str, Any],
        resume: bool = False,
    ) -> None:
        import wandb

        self._wandb = wandb
        if mode == "auto":
            mode = "online" if _has_wandb_key() else "offline"
        self.mode = mode
        directory.mkdir(parents=True, exist_ok=True)
        id_file = directory / "wandb" / "run_id"
        if resume and id_file.is_file():
            run_id = id_file.read_text().strip()
        else:
            run_id = secrets.token_hex(4)  # wandb's id alphabet: [a-z0-9]
            id_file.parent.mkdir(parents=True, exist_ok=True)
            id_file.write_text(run_id + "\n")
        self.run = wandb.init(
            id=run_id,
            resume="allow",
            project=project,
            entity=entity,
            name=name,
            group=group,
            tags=list(tags),
            mode=mode,
            dir=str(directory),
            config=config,
            settings=wandb.Settings(console="off", silent=True),
        )
        self.run_dir = Path(self.run.dir).parent

    def log(self, metrics: dict[str, Any], step: int) -> None:
        """Log scalar metrics at a step."""
        self.run.log(metrics, step=step)

    def log_video(self, key: str, path: Path, step: int, caption: str = "") -> None:
        """Log an mp4 file (already encoded, so wandb needs no video libraries)."""
        self.run.log({key: self._wandb.Video(str(path), caption=caption)}, step=step)

    def log_table(self, key: str, columns: list[str], rows: list[list[Any]], step: int) -> None:
        """Log a table (one ``wandb.Table`` per call: rows of numbers and strings)."""
        self.run.log({key: self._wandb.Table(columns=list(columns), data=rows)}, step=step)

    def log_image(self, key: str, path: Path, step: int, caption: str = "") -> None:
        """Log an image file (e.g. a PNG figure)."""
        self.run.log({key: self._wandb.Image(str(path), caption=caption)}, step=step)

    def summary(self, values: dict[str, Any]) -> None:
        """Set run summary values."""
        for key, value in values.items():
            self.run.summary[key] = value

    def finish(self) -> None:
        """Flush and close the run."""
        self.run.finish()


class JsonlTracker:
    """Appends every logged scalar to ``<run_dir>/metrics.jsonl`` (one JSON object per call)
    and every table to ``tables.jsonl`` beside it (``{"step", "time", "key", "columns",
    "rows"}`` per call), so ``metrics.jsonl`` stays scalars only.

    Runs beside wandb so a run's numbers can be read without any service, and forwards
    everything to an inner tracker (wandb or null).
    """

    def __init__(self, path: Path, inner: NullTracker | WandbTracker) -> None:
        self.path = path
        self.inner = inner
        self.run_dir = inner.run_dir
        self.mode = inner.mode
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(path, "a", encoding="utf-8")  # noqa: SIM115 - closed in finish()
        self.tables_path = path.with_name("tables.jsonl")

    def log(self, metrics: dict[str, Any], step: int) -> None:
        """Write the scalar metrics as one JSON line, then forward them."""
        row = {"step": step, "time": time.time()}
        for key, value in metrics.items():
            value = float(value)
            row[key] = value if math.isfinite(value) else str(value)
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        self.inner.log(metrics, step)

    def log_video(self, key: str, path: Path, step: int, caption: str = "") -> None:
        """Videos go to the inner tracker only (the file itself stays in the run directory)."""
        self.inner.log_video(key, path, step, caption=caption)

    def log_table(self, key: str, columns: list[str], rows: list[list[Any]], step: int) -> None:
        """Append the table as one JSON line of ``tables.jsonl``, then forward it.

        Non-finite floats are written as strings (``"nan"``), as in ``metrics.jsonl``.
        """
        cells = [[_json_cell(v) for v in row] for row in rows]
        row = {"step": step, "time": time.time(), "key": key, "columns": list(columns)}
        with open(self.tables_path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps({**row, "rows": cells}) + "\n")
        self.inner.log_table(key, columns, rows, step)

    def log_image(self, key: str, path: Path, step: int, caption: str = "") -> None:
        """Images go to the inner tracker only (the file itself stays in the run directory)."""
        self.inner.log_image(key, path, step, caption=caption)

    def summary(self, values: dict[str, Any]) -> None:
        """Forward summary values."""
        self.inner.summary(values)

    def finish(self) -> None:
        """Close the file and the inner tracker."""
        self._file.close()
        self.inner.finish()


def _json_cell(value: Any) -> Any:
    """A table cell as JSON: numbers as floats/ints (non-finite as strings), the rest as str."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, numbers.Real):
        number = float(value)
        return number if math.isfinite(number) else str(number)
    return str(value)


def _has_wandb_key() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        return "api.wandb.ai" in netrc.read_text()
    except OSError:
        return False


def build_tracker(
    settings: LoggingConfig,
    *,
    is_main: bool,
    directory: Path,
    config: dict[str, Any],
    resume: bool = False,
) -> NullTracker | JsonlTracker:
    """The tracker of this process, as the ``logging`` group (``settings``) asks.

    Rank 0 writes ``<directory>/metrics.jsonl`` and, with ``settings.backend="wandb"``, a wandb
    run under ``<directory>/wandb`` (``resume``: the run this directory logged to before, so a
    resumed training run keeps one wandb run); other ranks get a NullTracker.
    """
    backend = settings.backend
    if not is_main:
        return NullTracker()
    if backend not in ("wandb", "none"):
        raise ValueError(f"logging.backend must be wandb or none, got {backend!r}")
    if backend == "none":
        return JsonlTracker(directory / "metrics.jsonl", NullTracker())
    inner = WandbTracker(
        project=settings.project,
        entity=settings.entity,
        name=settings.name,
        group=settings.group,
        tags=list(settings.tags or []),
        mode=settings.mode,
        directory=directory,
        config=config,
        resume=resume,
    )
    return JsonlTracker(directory / "metrics.jsonl", inner)
