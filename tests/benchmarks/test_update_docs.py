"""update_docs.py: the results blocks of the docs hold the latest tables, and a block whose
table is missing is an error instead of a silently stale table."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from update_docs import update  # noqa: E402


def test_blocks_get_their_table_and_the_rest_stays(tmp_path: Path) -> None:
    results = tmp_path / "results"
    results.mkdir()
    (results / "speed.md").write_text("| a |\n| --- |\n| 2 |\n")
    (results / "memory.md").write_text("| b |\n| --- |\n| 3 |\n")
    doc = tmp_path / "guide.md"
    doc.write_text(
        "# Guide\n\nbefore\n<!-- results:speed -->\n| a |\n| --- |\n| 1 |\n"
        "<!-- /results:speed -->\nafter\n\n<!-- results:memory -->\n"
    )
    assert update([doc], results, check=True) == {doc: ["speed", "memory"]}
    assert "| 1 |" in doc.read_text()  # check mode writes nothing
    assert update([doc], results) == {doc: ["speed", "memory"]}
    text = doc.read_text()
    assert text.startswith("# Guide\n\nbefore\n<!-- results:speed -->\n| a |\n| --- |\n| 2 |\n")
    assert "| 1 |" not in text and "after\n\n<!-- results:memory -->\n| b |" in text
    assert text.endswith("| 3 |\n<!-- /results:memory -->\n")
    assert update([doc], results) == {}  # up to date now


def test_a_block_without_its_table_is_an_error(tmp_path: Path) -> None:
    doc = tmp_path / "guide.md"
    doc.write_text("<!-- results:gone -->\nold\n<!-- /results:gone -->\n")
    with pytest.raises(FileNotFoundError, match="results:gone"):
        update([doc], tmp_path)


def test_the_docs_hold_the_latest_tables() -> None:
    stale = update(check=True)
    assert not stale, f"run python benchmarks/update_docs.py: {stale}"
