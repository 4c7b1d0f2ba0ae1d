"""Every README / docs code block marked to run on the CPU runs, as written.

A block is marked by an HTML comment on the line before its fence (GitHub renders nothing):

    <!-- test: cpu -->                        run the block as written
    <!-- test: cpu, exit: 2 -->               every command must exit with this code
    <!-- test: cpu, args: train.steps=2 -->   append these overrides to every stafinetune
                                              command (a long run shortened for the test)

- ``python`` blocks run in a fresh interpreter and must exit with 0;
- ``bash`` blocks run under ``bash -euo pipefail`` and must exit with 0;
- ``console`` blocks are transcripts: each ``$ command`` runs, and its output (stdout and
  stderr) must equal the lines that follow it, up to the next ``$``.

Every block runs in a temporary directory with this interpreter's ``bin`` first on ``PATH``,
the data root (``STAFINETUNE_DATA``) inside it and wandb disabled, so nothing outside it is
written. Blocks that need a GPU or real weights are simply not marked.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
MARKER = re.compile(r"^<!-- test: cpu(?:, exit: (\d+))?(?:, args: (.+?))? -->$")
LANGUAGES = ("python", "bash", "console")
COMMAND = re.compile(r"^(stafinetune-\w+|python -m stafinetune \w+)(?=\s|$)")
TIMEOUT_S = 300


@dataclass(frozen=True)
class Block:
    path: Path
    line: int  # 1-based line of the opening fence
    language: str
    code: str
    exit_code: int
    args: str

    @property
    def name(self) -> str:
        return f"{_label(self.path)}:{self.line}"


def _label(path: Path) -> str:
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else path.name


def collect(path: Path) -> list[Block]:
    """The marked blocks of one Markdown file; a malformed marker is an error."""
    lines = path.read_text().splitlines()
    blocks = []
    for i, line in enumerate(lines):
        if not line.startswith("<!-- test:"):
            continue
        where = f"{_label(path)}:{i + 1}"
        match = MARKER.match(line)
        if match is None:
            raise ValueError(f"{where}: malformed marker {line!r}")
        fence = lines[i + 1] if i + 1 < len(lines) else ""
        if not fence.startswith("```") or fence[3:] not in LANGUAGES:
            raise ValueError(
                f"{where}: a marker must precede a ```python, ```bash or ```console fence"
            )
        end = lines.index("```", i + 2)
        blocks.append(
            Block(
                path,
                i + 2,
                fence[3:],
                "\n".join(lines[i + 2 : end]) + "\n",
                int(match.group(1) or 0),
                match.group(2) or "",
            )  # fmt: skip
        )
    return blocks


BLOCKS = [block for path in DOCS for block in collect(path)]


def shorten(command: str, args: str) -> str:
    """``command`` with ``args`` appended when it runs a stafinetune command."""
    return f"{command} {args}" if args and COMMAND.match(command) else command


def environment(tmp: Path) -> dict[str, str]:
    env = {
        k: v for k, v in os.environ.items() if k not in ("STAFINETUNE_DEBUG", "HYDRA_FULL_ERROR")
    }
    env.update(
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
        STAFINETUNE_DATA=str(tmp / "data"),
        WANDB_MODE="disabled",
        WANDB_DIR=str(tmp),
        OMP_NUM_THREADS="1",  # the tiny models run fastest so on a shared CPU
        PYTHONUNBUFFERED="1",
    )
    return env


def run(argv: list[str], tmp: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, cwd=tmp, env=environment(tmp), text=True, timeout=TIMEOUT_S,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT)  # fmt: skip


def transcript(code: str) -> list[tuple[str, list[str]]]:
    """(command, expected output lines) pairs of a console block."""
    pairs: list[tuple[str, list[str]]] = []
    for line in code.splitlines():
        if line.startswith("$ "):
            pairs.append((line[2:], []))
        elif pairs:
            pairs[-1][1].append(line)
        elif line.strip():
            raise ValueError(f"console block starts with output, not a '$ ' command: {line!r}")
    return pairs


@pytest.mark.parametrize("block", BLOCKS, ids=[b.name for b in BLOCKS])
def test_block_runs_as_documented(block: Block, tmp_path: Path) -> None:
    if block.language == "python":
        script = tmp_path / "block.py"
        script.write_text(block.code)
        result = run([sys.executable, str(script)], tmp_path)
        assert result.returncode == block.exit_code, f"{block.name}:\n{result.stdout}"
    elif block.language == "bash":
        lines = [shorten(line, block.args) for line in block.code.splitlines()]
        result = run(["bash", "-euo", "pipefail", "-c", "\n".join(lines)], tmp_path)
        assert result.returncode == block.exit_code, f"{block.name}:\n{result.stdout}"
    else:
        pairs = transcript(block.code)
        assert pairs, f"{block.name}: no '$ ' command"
        for command, expected in pairs:
            result = run(["bash", "-c", shorten(command, block.args)], tmp_path)
            shown = f"{block.name}: $ {command}\n{result.stdout}"
            assert result.returncode == block.exit_code, shown
            assert result.stdout.rstrip("\n").splitlines() == expected, shown


def test_the_marked_blocks_are_there() -> None:
    """The examples the docs promise to run (a marker lost in an edit would skip them)."""
    marked = {(b.path.name, b.language) for b in BLOCKS}
    assert ("configuration.md", "console") in marked, "the error examples"
    assert ("configuration.md", "bash") in marked, "--help and --cfg job"
    assert ("pipelines.md", "python") in marked, "the enable_sta CPU example"


def test_markers_parse(tmp_path: Path) -> None:
    fence = "```"
    doc = tmp_path / "guide.md"
    doc.write_text(f"<!-- test: cpu, exit: 2, args: train.steps=2 attention.window=[3,3,5] -->\n"
                   f"{fence}console\n$ stafinetune-train\nconfig error: x\n{fence}\n")  # fmt: skip
    (block,) = collect(doc)
    assert (block.language, block.exit_code) == ("console", 2)
    assert block.args == "train.steps=2 attention.window=[3,3,5]"
    assert transcript(block.code) == [("stafinetune-train", ["config error: x"])]
    assert shorten("stafinetune-train", block.args).endswith("attention.window=[3,3,5]")
    assert shorten("ls stafinetune", block.args) == "ls stafinetune"
    assert shlex.split(shorten("python -m stafinetune search", "a=1"))[-1] == "a=1"
    doc.write_text(f"<!-- test: gpu -->\n{fence}bash\nnvidia-smi\n{fence}\n")
    with pytest.raises(ValueError, match="malformed marker"):
        collect(doc)
