"""Copy the latest benchmark tables into the user docs.

Each ``<!-- results:NAME -->`` ... ``<!-- /results:NAME -->`` block in ``docs/*.md`` (the
markers on lines of their own) is replaced by ``benchmarks/results/NAME.md``; run it after a benchmark wrote new results. A
block whose table does not exist is an error, so a renamed results file cannot leave a stale
table behind unnoticed.

    python benchmarks/update_docs.py            # splice every block
    python benchmarks/update_docs.py --check    # change nothing; exit 1 naming stale blocks
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
RESULTS = ROOT / "benchmarks" / "results"
_OPEN = re.compile(r"^<!-- results:([\w.-]+) -->$", re.M)


def splice(text: str, results: Path = RESULTS) -> tuple[str, list[str]]:
    """``text`` with every results block holding its table; returns it and the block names.

    Raises:
        FileNotFoundError: a block names a table that ``results`` does not hold.
    """
    names = list(dict.fromkeys(_OPEN.findall(text)))
    for name in names:
        table = results / f"{name}.md"
        if not table.is_file():
            raise FileNotFoundError(f"<!-- results:{name} --> has no table {table}")
        fresh = f"<!-- results:{name} -->\n{table.read_text().strip()}\n<!-- /results:{name} -->"
        key = re.escape(name)
        block = re.compile(rf"^<!-- results:{key} -->$.*?^<!-- /results:{key} -->$", re.S | re.M)
        if not block.search(text):  # an opening marker alone: the table goes in after it
            block = re.compile(rf"^<!-- results:{key} -->$", re.M)
        text = block.sub(lambda _, fresh=fresh: fresh, text, count=1)
    return text, names


def update(
    docs: list[Path] | None = None, results: Path = RESULTS, *, check: bool = False
) -> dict[Path, list[str]]:
    """Splice the tables into ``docs`` (default: ``docs/*.md``).

    Returns, per file, the blocks that changed (with ``check``, that would change; nothing is
    written then).
    """
    changed: dict[Path, list[str]] = {}
    for path in docs if docs is not None else sorted(DOCS.glob("*.md")):
        text = path.read_text()
        fresh, names = splice(text, results)
        if fresh == text:
            continue
        old, new = _blocks(text), _blocks(fresh)
        changed[path] = [n for n in names if old.get(n) != new[n]]
        if not check:
            path.write_text(fresh)
    return changed


def _blocks(text: str) -> dict[str, str]:
    """The current content of every complete results block, by name."""
    found = re.findall(
        r"^<!-- results:([\w.-]+) -->$(.*?)^<!-- /results:\1 -->$", text, re.S | re.M
    )
    return {name: body for name, body in found}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if a block is stale")
    args = parser.parse_args(argv)
    try:
        changed = update(check=args.check)
    except FileNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    for path, names in changed.items():
        verb = "stale" if args.check else "updated"
        print(f"{verb}: {path.relative_to(ROOT)}: {', '.join(names)}")
    if not changed:
        print("every results block is up to date")
    return 1 if args.check and changed else 0


if __name__ == "__main__":
    sys.exit(main())
