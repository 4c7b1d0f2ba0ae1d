"""Copy the latest benchmark tables into README.md.

Each ``<!-- results:NAME -->`` ... ``<!-- /results:NAME -->`` block in the README is
replaced by ``benchmarks/results/NAME.md``; run after a benchmark wrote new results.

    python benchmarks/update_readme.py
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def update(
    readme: Path = ROOT / "README.md", results: Path = ROOT / "benchmarks" / "results"
) -> list[str]:
    """Splice every results block whose table exists; returns the names updated."""
    text = readme.read_text()
    done = []
    for name in re.findall(r"<!-- results:([\w.-]+) -->", text):
        table = results / f"{name}.md"
        if not table.is_file():
            continue
        block = re.compile(
            rf"<!-- results:{re.escape(name)} -->.*?<!-- /results:{re.escape(name)} -->", re.S
        )
        fresh = f"<!-- results:{name} -->\n{table.read_text().strip()}\n<!-- /results:{name} -->"
        if block.search(text):
            text = block.sub(lambda _, fresh=fresh: fresh, text)
        else:
            text = text.replace(f"<!-- results:{name} -->", fresh, 1)
        done.append(name)
    readme.write_text(text)
    return done


if __name__ == "__main__":
    print("updated:", ", ".join(update()) or "nothing")
