"""The README and the docs name only what exists: files, links and their anchors, modules,
``python -m`` targets and config fields. A rename in the code that leaves a guide behind
fails here, not in a user's shell."""

from __future__ import annotations

import ast
import dataclasses
import re
from functools import cache
from pathlib import Path

import pytest

from stafinetune.commands import COMMANDS
from stafinetune.config import JobConfig
from stafinetune.inference.compare import CompareConfig
from stafinetune.inference.generate import SampleConfig
from stafinetune.parallel.sampling import SampleParallelConfig
from stafinetune.search import SearchConfig

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
IDS = [str(p.relative_to(ROOT)) for p in DOCS]
# folders a path in the docs may start from: the repository root, or a room of the package
ROOTS = ("stafinetune/", "benchmarks/", "conf/", "launch/", "kernels/", "docs/", "notes/", "tests/")
ROOMS = ("commands/", "training/", "inference/", "diffusion/", "models/", "parallel/",
         "data/", "metrics/", "search/", "assets/")  # fmt: skip
# run-directory files, not repository files
RUN_FILES = ("export/", "checkpoints/", "samples/", "figures/", "wandb/", "videos/", ".hydra/")
EXTENSIONS = ("md", "py", "yaml", "json", "jsonl", "png", "mp4", "txt", "log", "safetensors", "sh")
UNKNOWN_ON_PURPOSE = {"train.stepz"}  # the unknown-key error example


def code(path: Path) -> list[str]:
    """Every inline code span and every line of every fenced block of ``path``."""
    text = path.read_text()
    fenced = re.findall(r"^```\w*\n(.*?)^```$", text, re.S | re.M)
    prose = re.sub(r"^```\w*\n.*?^```$", "", text, flags=re.S | re.M)
    return re.findall(r"`([^`\n]+)`", prose) + [ln for block in fenced for ln in block.splitlines()]


def tokens(path: Path) -> list[str]:
    return [t for span in code(path) for t in re.split(r"[\s,;()'\"=\[\]{}]+", span) if t]


@cache
def module_names(module: Path) -> set[str]:
    """Top-level names a module (or package ``__init__``) defines or imports."""
    tree = ast.parse(module.read_text())
    names = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names.update(t.id for t in targets if isinstance(t, ast.Name))
            if any(isinstance(t, ast.Name) and t.id == "__all__" for t in targets):
                names.update(ast.literal_eval(node.value))  # lazily imported names too
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
    if module.name == "__init__.py":
        names.update(p.stem for p in module.parent.iterdir() if p.suffix == ".py" or p.is_dir())
    return names


def resolves(dotted: str) -> bool:
    """``stafinetune.a.b[.name[.attr]]``: a module path, then a name it defines."""
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        base = ROOT.joinpath(*parts[:i])
        module = (
            base.with_suffix(".py") if base.with_suffix(".py").is_file() else base / "__init__.py"
        )
        if module.is_file():
            rest = parts[i:]
            return not rest or (rest[0] in module_names(module) and len(rest) <= 2)
    return False


def slug(heading: str) -> str:
    """GitHub's anchor of a Markdown heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower().replace("`", "")).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = re.sub(r"^```.*?^```$", "", path.read_text(), flags=re.S | re.M)
    return {slug(h) for h in re.findall(r"^#+ (.+)$", text, re.M)}


def dead_links(doc: Path) -> list[str]:
    """Relative links whose file, or whose anchor in a Markdown file, does not exist."""
    text = re.sub(r"^```.*?^```$", "", doc.read_text(), flags=re.S | re.M)
    bad = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target):
            continue
        file, _, anchor = target.partition("#")
        resolved = (doc.parent / file).resolve() if file else doc
        if not resolved.exists():
            bad.append(target)
        elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
            bad.append(target)
    return bad


def missing_files(doc: Path) -> list[str]:
    """Repository paths in code spans and blocks that do not exist."""
    bad = []
    for token in tokens(doc):
        token = token.split("::")[0].rstrip(".:")
        if any(c in token for c in "<>*$") or token.startswith(("http", "~", "/")):
            continue
        if re.search(r"(^|/)[A-Z_]{3,}(/|\.|$)", token):  # a placeholder: VIDEO_DIR, NAME.md
            continue
        if token.startswith(ROOTS):
            candidates = [ROOT / token]
        elif token.startswith(ROOMS) and token.endswith((".py", "/")):
            candidates = [ROOT / "stafinetune" / token]
        elif re.fullmatch(r"[\w.-]+\.(py|sh|sbatch)", token) and not token.startswith(RUN_FILES):
            candidates = list(ROOT.glob(f"[!.]*/**/{token}"))
        else:
            continue
        if not any(c.exists() for c in candidates):
            bad.append(token)
    return bad


def missing_modules(doc: Path) -> list[str]:
    """``python -m`` targets and dotted ``stafinetune.*`` names that do not resolve."""
    bad = []
    for span in code(doc):
        for target in re.findall(r"-m (stafinetune[\w.]*|sta_kernels[\w.]*)(?: (\w+))?", span):
            module, command = target
            if module == "stafinetune":
                if command and command not in COMMANDS:  # (no command: a <placeholder>)
                    bad.append(f"-m stafinetune {command}")
            elif not ROOT.joinpath(*module.split(".")).with_suffix(".py").is_file():
                bad.append(f"-m {module}")
        for dotted in re.findall(r"(?<![\w/.])stafinetune(?:\.\w+)+", span):
            if not resolves(dotted):
                bad.append(dotted)
    return bad


@cache
def schema_fields() -> dict[str, set[str]]:
    """The fields of every config section a command line can name (``train``, ``search``, ...)."""
    job = JobConfig()
    sections = {
        f.name: getattr(job, f.name)
        for f in dataclasses.fields(job)
        if dataclasses.is_dataclass(getattr(job, f.name))
    }
    sections.update(search=SearchConfig, sample=SampleConfig, compare=CompareConfig)
    fields = {n: {f.name for f in dataclasses.fields(schema)} for n, schema in sections.items()}
    fields["parallel"] |= {f.name for f in dataclasses.fields(SampleParallelConfig)}  # sample, eval
    return fields


def unknown_fields(doc: Path) -> list[str]:
    """``group.field`` keys that no config schema has."""
    sections = schema_fields()
    pattern = rf"(?<![\w./-])({'|'.join(sections)})\.([a-z_][a-z0-9_]*)(?![\w/])"
    bad = set()
    for span in code(doc):
        for group, name in re.findall(pattern, span):
            key = f"{group}.{name}"
            if (
                name not in EXTENSIONS
                and name not in sections[group]
                and key not in UNKNOWN_ON_PURPOSE
            ):
                bad.add(key)
    return sorted(bad)


CHECKS = {"links": dead_links, "files": missing_files, "modules": missing_modules,
          "config fields": unknown_fields}  # fmt: skip


@pytest.mark.parametrize("check", CHECKS)
@pytest.mark.parametrize("doc", DOCS, ids=IDS)
def test_docs_name_only_what_exists(doc: Path, check: str) -> None:
    bad = CHECKS[check](doc)
    assert not bad, f"{doc.name}: {check} that do not exist: {sorted(set(bad))}"
