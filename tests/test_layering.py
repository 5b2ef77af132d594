"""fewbit's layering, read from the source (DESIGN.md, "Layout"): dependencies point downward, nothing imports another
unit's underscore names, and no verb imports another verb.

A *unit* is the first component after ``fewbit.``: ``fewbit.nn.convert`` belongs to ``nn``, ``fewbit/calibrate.py``
to ``calibrate``. Every ``import`` counts, at module level or inside a function (a lazy import is still a
dependency), and so does ``mod._name`` on a module imported from another unit. ``from fewbit import name`` of a
non-module name imports the package facade (``fewbit/__init__.py``), which stands as high as the highest unit it
imports.

Known violations in code being moved by others are listed in ``ALLOWED`` with the reason; the list can only shrink
(an entry that no longer matches fails the test too).
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parent.parent / "src" / "fewbit"

# Floors, lowest first; units on one floor may import each other (except verbs). ``atomic`` (atomic file writes)
# is the ground floor under everything.
FLOORS: list[tuple[str, ...]] = [
    ("atomic",),
    ("choices",),
    ("kernels",),
    ("formats",),
    ("scaling",),
    ("qtensor",),
    ("recipes",),
    ("nn",),
    ("calibrate", "sparsity", "export"),
    ("train",),
    ("workloads",),
    ("mlperf",),
    ("report",),
    ("study", "post_training", "sparsify", "bench", "ttq", "train_study"),  # the verbs
    ("cli", "__main__"),
]
VERBS = set(FLOORS[-2])
FLOOR = {unit: i for i, units in enumerate(FLOORS) for unit in units}
FACADE = "fewbit"  # the package's __init__.py

# (importer module, imported module or name, rule): each a known violation in a file owned elsewhere, with why.
ALLOWED: dict[tuple[str, str, str], str] = {
    ("fewbit.qtensor", "fewbit.formats._check_input", "private"):
        "qtensor validates its input with formats' private checker; qtensor/formats are being reworked elsewhere",
}


@dataclass(frozen=True)
class Violation:
    importer: str  # dotted module name
    imported: str  # dotted module, or module.name
    rule: str  # "private", "verb", "upward"
    line: int

    def __str__(self) -> str:
        return f"{self.importer}:{self.line}: {self.rule}: imports {self.imported}"


def _module_name(path: Path, root: Path = SRC) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _unit(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else FACADE


def _is_module(dotted: str, root: Path) -> bool:
    path = root.parent.joinpath(*dotted.split("."))
    return path.with_suffix(".py").exists() or (path / "__init__.py").exists()


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _resolve(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(path: Path, root: Path):
    """``(imported module or module.name, is a module, line)`` for every fewbit import in ``path``, and the
    ``mod._name`` accesses on fewbit modules it imported (as ``module._name``)."""
    module = _module_name(path, root)
    tree = ast.parse(path.read_text(), filename=str(path))
    bound: dict[str, str] = {}  # local name -> fewbit module it names
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == "fewbit" or alias.name.startswith("fewbit."):
                    found.append((alias.name, True, node.lineno))
                    bound[alias.asname or alias.name.partition(".")[0]] = alias.name if alias.asname else "fewbit"
        elif isinstance(node, ast.ImportFrom):
            source = _resolve(node, module, path.name == "__init__.py")
            if not (source == "fewbit" or source.startswith("fewbit.")):
                continue
            for alias in node.names:
                target = f"{source}.{alias.name}"
                if _is_module(target, root):
                    found.append((target, True, node.lineno))
                    bound[alias.asname or alias.name] = target
                else:
                    found.append((target, False, node.lineno))
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in bound \
                and _private(node.attr):
            found.append((f"{bound[node.value.id]}.{node.attr}", False, node.lineno))
    return module, found


def _facade_floor(root: Path) -> int:
    _, found = _imports(root / "__init__.py", root)
    return max((FLOOR[_unit(target)] for target, _, _ in found if _unit(target) in FLOOR), default=0)


def violations(root: Path = SRC) -> tuple[list[Violation], list[str]]:
    """Every violation under ``root`` (a ``fewbit`` source folder), and every unit missing from ``FLOORS``."""
    facade = _facade_floor(root)
    found_all, unplaced = [], set()
    for path in sorted(root.rglob("*.py")):
        module, found = _imports(path, root)
        unit = _unit(module)
        if unit == FACADE:
            continue  # the facade re-exports the library; it imports whatever it offers
        if unit not in FLOOR:
            unplaced.add(unit)
            continue
        for target, is_module, line in found:
            target_unit = _unit(target if is_module else target.rpartition(".")[0])
            names = target.split(".")[1:]
            if target_unit != unit and any(_private(n) for n in names):
                found_all.append(Violation(module, target, "private", line))
            if target_unit == unit:
                continue
            if unit in VERBS and target_unit in VERBS:
                found_all.append(Violation(module, target, "verb", line))
            elif target_unit == FACADE:
                if FLOOR[unit] < facade:
                    found_all.append(Violation(module, target, "upward", line))
            elif target_unit not in FLOOR:
                unplaced.add(target_unit)
            elif FLOOR[target_unit] > FLOOR[unit]:
                found_all.append(Violation(module, target, "upward", line))
    return found_all, sorted(unplaced)


def _allowed(v: Violation) -> str | None:
    for (importer, imported, rule), reason in ALLOWED.items():
        if v.importer == importer and v.rule == rule and (v.imported == imported
                                                           or v.imported.startswith(imported + ".")):
            return reason
    return None


def test_every_unit_has_a_floor():
    _, unplaced = violations()
    assert not unplaced, f"units missing from FLOORS in tests/test_layering.py (give each its floor): {unplaced}"


def test_imports_point_down_and_stay_public():
    found, _ = violations()
    bad = [str(v) for v in found if _allowed(v) is None]
    assert not bad, "layering violations (DESIGN.md, Layout):\n" + "\n".join(bad)


def test_allowed_list_only_shrinks():
    found, _ = violations()
    stale = [key for key in ALLOWED
             if not any(v.importer == key[0] and v.rule == key[2]
                        and (v.imported == key[1] or v.imported.startswith(key[1] + ".")) for v in found)]
    assert not stale, f"ALLOWED entries that no longer occur (remove them): {stale}"


# ---- the checker itself, on a small fake package --------------------------------------------------------------


def _write(root: Path, files: dict[str, str]) -> Path:
    pkg = root / "fewbit"
    for name, text in {"__init__.py": "from fewbit.nn import quantize_\n", **files}.items():
        path = pkg / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return pkg


@pytest.mark.parametrize(("files", "expected"), [
    ({"nn/__init__.py": "", "nn/convert.py": "_SKIPPED = 1\n",
      "calibrate.py": "from fewbit.nn.convert import _SKIPPED\n"},
     ["fewbit.calibrate:1: private: imports fewbit.nn.convert._SKIPPED"]),
    ({"nn/__init__.py": "", "nn/functional.py": "",
      "export.py": "def f():\n    from fewbit.nn import functional as QF\n    return QF._State\n"},
     ["fewbit.export:3: private: imports fewbit.nn.functional._State"]),
    ({"study.py": "", "post_training.py": "from fewbit import study\n"},
     ["fewbit.post_training:1: verb: imports fewbit.study"]),
    ({"recipes.py": "def f():\n    from fewbit.workloads.run import x\n", "workloads/__init__.py": "",
      "workloads/run.py": "x = 1\n"},
     ["fewbit.recipes:2: upward: imports fewbit.workloads.run.x"]),
    ({"nn/__init__.py": "", "scaling.py": "import fewbit\n"}, ["fewbit.scaling:1: upward: imports fewbit"]),
    ({"nn/__init__.py": "", "nn/convert.py": "from fewbit.nn import modules\nfrom . import _x\n",
      "nn/modules.py": "", "nn/_x.py": "", "cli.py": "from fewbit import quantize_, __version__\n",
      "calibrate.py": "from fewbit.nn import modules\nfrom fewbit import recipes as _recipes\n",
      "recipes.py": ""},
     []),
])
def test_the_checker_finds_each_kind_of_violation(tmp_path, files, expected):
    found, unplaced = violations(_write(tmp_path, files))
    assert [str(v) for v in found] == expected and unplaced == []


def test_the_checker_names_units_without_a_floor(tmp_path):
    _, unplaced = violations(_write(tmp_path, {"nn/__init__.py": "", "gadgets.py": ""}))
    assert unplaced == ["gadgets"]
