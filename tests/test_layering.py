"""The package's import graph points one way: ops <- layers <- state <- models <- the users of models <- cli.

Every module under ``src/statelab`` is parsed with ``ast``: imports inside functions and under ``TYPE_CHECKING``
count, and so do ``importlib.import_module("...")`` calls with a literal name and ``from statelab import NAME`` or
``statelab.NAME`` of the package's lazy public names. Each import of another statelab area must go to an area of the
same or a lower rank in :data:`RANKS`. In words: ``ops`` imports no layer, ``layers`` no model, ``state`` never imports
``models`` (a model makes states; a state never needs a model class), ``train`` never imports ``experiments``, and
no library module imports the command line (only :mod:`statelab.cli` itself and ``__main__`` entry points do).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "statelab"

#: rank of each top-level area of statelab (a subpackage or a module): an area may import areas of its rank or below
RANKS: dict[str, int] = {
    # foundations that import no other statelab area (statelab.errors at most): anyone may import these
    "errors": 0,
    "glossary": 0,
    "config": 0,
    "jsonl": 0,
    "fileio": 0,
    "threads": 0,
    "testing": 0,
    # the script that builds the shipped task data (imports no statelab module)
    "data": 0,
    # scans and the capability check that picks their implementation (each imports the other)
    "ops": 1,
    "backends": 1,
    "layers": 2,
    "state": 3,
    "models": 4,
    "tasks": 5,
    "objectives": 5,
    "train": 6,
    "eval": 6,
    "experiments": 7,
    "serve": 7,
    "demo": 7,
    "cli": 8,
}

#: upward imports that remain, each with the reason it stays: (importer, imported module) -> why
EXCEPTIONS: dict[tuple[str, str], str] = {}


def _module_name(path: Path, src: Path = SRC) -> str:
    parts = list(path.relative_to(src).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _lazy_exports(src: Path = SRC) -> dict[str, str]:
    """``NAME -> module`` from the ``_EXPORTS`` table of ``statelab/__init__.py`` (public names resolved lazily)."""
    init = src / "statelab" / "__init__.py"
    tree = ast.parse(init.read_text(encoding="utf-8")) if init.exists() else ast.Module(body=[], type_ignores=[])
    for node in tree.body:
        if isinstance(node, ast.AnnAssign | ast.Assign):
            target = node.target if isinstance(node, ast.AnnAssign) else node.targets[0]
            if isinstance(target, ast.Name) and target.id == "_EXPORTS" and node.value is not None:
                return ast.literal_eval(node.value)
    return {}


def _submodule(module: str, name: str, src: Path) -> str:
    """``module.name`` when that is a module (or package) under ``src``, else ``module``."""
    base = src.joinpath(*f"{module}.{name}".split("."))
    return f"{module}.{name}" if base.with_suffix(".py").exists() or base.is_dir() else module


def imports_of(path: Path, exports: dict[str, str], src: Path = SRC) -> list[tuple[str, int]]:
    """``(imported statelab module, line)`` for every import in the file under ``src``, at any depth."""
    name = _module_name(path, src)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: list[tuple[str, int]] = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            if module == "statelab":
                found += [(exports.get(a.name, "statelab"), node.lineno) for a in node.names]
            else:  # `from statelab.cli import store` imports the module statelab.cli.store
                found += [(_submodule(module, a.name, src), node.lineno) for a in node.names]
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "statelab":
            if node.attr in exports:  # `import statelab` then `statelab.load_model`: the lazy name's module
                found.append((exports[node.attr], node.lineno))
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "import_module"
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            found.append((node.args[0].value, node.lineno))
    return [(m, line) for m, line in found if m == "statelab" or m.startswith("statelab.")]


def _area(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def _modules(src: Path = SRC) -> list[Path]:
    return sorted(p for p in (src / "statelab").rglob("*.py") if "__pycache__" not in p.parts)


def test_every_area_has_a_rank():
    areas = {_area(_module_name(p)) for p in _modules()} - {None}
    missing = sorted(areas - set(RANKS))
    assert not missing, f"give these areas of statelab a rank in RANKS: {missing}"


def upward_imports(src: Path = SRC) -> list[str]:
    """One line per import that breaks the rule (module, line, what it imports), for the package under ``src``."""
    exports = _lazy_exports(src)
    bad = []
    for path in _modules(src):
        importer = _module_name(path, src)
        area = _area(importer)
        if area is None:  # statelab/__init__.py: names only, resolved by importlib at attribute access
            continue
        entry_point = importer.endswith(".__main__")
        for module, line in imports_of(path, exports, src):
            target = _area(module)
            if target is None or target == area or (importer, module) in EXCEPTIONS:
                continue
            if target == "cli" and not entry_point:
                bad.append(f"{importer}:{line} imports the command line ({module}); move what it needs out of cli/")
            elif target != "cli" and RANKS.get(target, -1) > RANKS.get(area, -1):
                bad.append(f"{importer}:{line} ({area}, rank {RANKS.get(area)}) imports {module} "
                           f"({target}, rank {RANKS.get(target)})")  # fmt: skip
    return bad


def test_no_upward_imports():
    bad = upward_imports()
    assert not bad, "upward imports:\n" + "\n".join(bad)


def test_exceptions_are_still_needed():
    """An exception that no longer matches an import is stale: remove it from EXCEPTIONS."""
    exports = _lazy_exports()
    seen = {(_module_name(p), m) for p in _modules() for m, _ in imports_of(p, exports)}
    assert not [key for key in EXCEPTIONS if key not in seen]


@pytest.mark.parametrize(
    "source, importer, expected",
    [
        ("import statelab.models.mamba1\n", "statelab.state.x", ["statelab.models.mamba1"]),
        ("def f():\n    from statelab.models import loading\n", "statelab.state.x", ["statelab.models.loading"]),
        ("from ..models import base\n", "statelab.state.x", ["statelab.models.base"]),
        ("from . import core\n", "statelab.state.x", ["statelab.state.core"]),
        ("from statelab import load_model\n", "statelab.state.x", ["statelab.models.loading"]),
        (
            "import statelab\nstatelab.load_model('embedded')\n",
            "statelab.state.x",
            ["statelab", "statelab.models.loading"],
        ),
        ("import importlib\nimportlib.import_module('statelab.cli')\n", "statelab.eval.x", ["statelab.cli"]),
        ("import os\nfrom typing import Any\n", "statelab.eval.x", []),
    ],
    ids=[
        "import",
        "in-function",
        "relative-parent",
        "relative-sibling",
        "lazy-root-name",
        "lazy-root-attribute",
        "import_module",
        "none",
    ],
)
def test_imports_are_found(tmp_path, source, importer, expected):
    """The scanner sees every form of import (so the rule above cannot pass by missing one)."""
    parts = importer.split(".")
    path = tmp_path.joinpath(*parts[:-1], f"{parts[-1]}.py")
    for module in [*expected, importer]:  # the modules exist (a `from PACKAGE import NAME` of a module is one)
        f = tmp_path.joinpath(*module.split(".")).with_suffix(".py")
        f.parent.mkdir(parents=True, exist_ok=True)
        f.touch()
    path.write_text(source)
    assert [m for m, _ in imports_of(path, _lazy_exports(), src=tmp_path)] == expected


def test_an_upward_import_is_reported(tmp_path):
    """On a small tree: a state module importing a model, a lazy root name and the CLI from a library module are
    reported; a ``__main__`` entry point may import the CLI, and downward imports pass."""
    files = {
        "statelab/__init__.py": "_EXPORTS = {'load_model': 'statelab.models.loading'}\n",
        "statelab/state/io.py": "def f():\n    from statelab.models.loading import load_model\n",
        "statelab/state/mix.py": "from statelab import load_model\n",
        "statelab/eval/skills.py": "from statelab.cli.common import CliError\nfrom statelab.state import io\n",
        "statelab/train/__main__.py": "from statelab.cli.train import app\n",
        "statelab/models/loading.py": "from ..state import io\nfrom statelab.layers import mamba1\n",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    bad = upward_imports(tmp_path)
    assert [line.split(" ")[0] for line in bad] == [
        "statelab.eval.skills:1",
        "statelab.state.io:2",
        "statelab.state.mix:1",
    ]
    assert "imports the command line" in bad[0] and "imports statelab.models.loading (models, rank 4)" in bad[1]
