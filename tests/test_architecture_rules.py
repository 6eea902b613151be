"""The architecture, checked on the source (Python's ast, not text search).

(a) stages never import each other: a module of exporter/, calibration/, engines/ or parity/
    imports only the core (trtforge/) and its own stage; it reaches another stage's entries
    through trtforge.registry. The core itself never imports a stage, except the face and glue
    (CLI, commands, pipeline, recipes) that exist to call them.
(b) trtforge's own modules are imported at the top of each module, where readers and tools see
    them; only torch, transformers, onnxruntime, tensorrt and modelopt stay lazy, behind their
    adapters (a stage's private ``_name.py`` modules, which functions import when they need the
    library). The few function-level imports that break an import cycle are listed below, each
    with its reason.
(c) manifests are read through typed attributes: no ``manifest[...]`` and no ``.manifest.get(``
    in product code (``Manifest.__getitem__`` is a read-only JSON view for tests and scripts).
(d) precision names are compared through ``trtforge.vocab.Precision``, never as string literals
    (``x == "int8"``, ``p in ("fp8", "int4-weight-only")``), outside trtforge/vocab.py.

Each failure names the file and line, so the message says what to change.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

from trtforge.vocab import Precision

REPO = Path(__file__).resolve().parent.parent
STAGES = ("exporter", "calibration", "engines", "parity")
PRODUCT = ("trtforge", *STAGES)
# The core's face and glue: they exist to call the stages (trtforge/commands/ as a whole too).
FACE = {"trtforge/cli.py", "trtforge/pipeline.py", "trtforge/pipeline_recipe.py", "trtforge/recipes.py"}

# (b): function-level imports of trtforge modules that break an import cycle. "file": {module: reason}.
LAZY_IMPORT_ALLOWED: dict[str, dict[str, str]] = {
    "trtforge/__init__.py": {
        "trtforge.pipeline": "the pipeline imports every stage and every stage imports the trtforge package: "
                             "importing it while the package initializes is a cycle (and `import trtforge` stays light)",
    },
    "trtforge/manifest.py": {
        "trtforge.artifacts": "artifacts imports manifest (Manifest, ModelDims) at its top; the JSON reader/writer "
                              "lives in artifacts",
    },
}

# (d): the names of the one vocabulary, and the "int4" shorthand every preset uses.
PRECISION_NAMES = frozenset({p.value for p in Precision} | {"int4"})
PRECISION_LITERALS_ALLOWED = {"trtforge/vocab.py"}


# --------------------------------------------------------------------------- the source


def product_files() -> list[Path]:
    files = []
    for top in PRODUCT:
        files += sorted(p for p in (REPO / top).rglob("*.py") if "__pycache__" not in p.parts)
    return files


def rel(path: Path) -> str:
    return path.relative_to(REPO).as_posix()


def package_of(path: Path) -> str:
    """The dotted package a file's relative imports resolve against (folders map to trtforge.<stage>)."""
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[0] in STAGES:
        parts = ["trtforge", *parts]
    return ".".join(parts[:-1])  # a package's __init__ and its modules resolve against the package


_TREES: dict[Path, ast.Module] = {}


def tree(path: Path) -> ast.Module:
    if path not in _TREES:
        _TREES[path] = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    return _TREES[path]


def imported_modules(node: ast.Import | ast.ImportFrom, path: Path) -> list[str]:
    """Absolute names of what an import statement imports (``from a import b`` -> a.b and a)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    if node.level:
        base = package_of(path).split(".")
        base = base[: len(base) - (node.level - 1)]
        mod = ".".join(base + ([node.module] if node.module else []))
    else:
        mod = node.module or ""
    return [mod] + [f"{mod}.{a.name}" for a in node.names if a.name != "*"]


def stage_of_module(name: str) -> str | None:
    parts = name.split(".")
    if len(parts) >= 2 and parts[0] == "trtforge" and parts[1] in STAGES:
        return parts[1]
    return None


def stage_of_file(path: Path) -> str | None:
    top = path.relative_to(REPO).parts[0]
    return top if top in STAGES else None


def imports(path: Path) -> Iterator[tuple[ast.Import | ast.ImportFrom, bool]]:
    """Every import statement of a file and whether it runs at import time of the module
    (module level, including ``if``/``try`` blocks there) rather than inside a function."""

    def walk(node: ast.AST, in_function: bool) -> Iterator[tuple[ast.Import | ast.ImportFrom, bool]]:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                yield child, not in_function
            yield from walk(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

    yield from walk(tree(path), False)


def dynamic_imports(path: Path) -> Iterator[tuple[ast.Call, str]]:
    """``importlib.import_module("trtforge....")`` / ``__import__(...)`` with a constant name."""
    for node in ast.walk(tree(path)):
        if not isinstance(node, ast.Call) or not node.args:
            continue
        f = node.func
        name = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else None
        arg = node.args[0]
        if name in ("import_module", "__import__") and isinstance(arg, ast.Constant) and isinstance(arg.value, str):
            yield node, arg.value


def is_type_checking_block(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def type_checking_imports(path: Path) -> set[int]:
    """ids of import nodes under ``if TYPE_CHECKING:`` (never executed)."""
    out: set[int] = set()
    for node in ast.walk(tree(path)):
        if is_type_checking_block(node):
            for child in ast.walk(node):
                if isinstance(child, (ast.Import, ast.ImportFrom)):
                    out.add(id(child))
    return out


# --------------------------------------------------------------------------- (a)


def test_the_source_tree_is_where_the_checks_look():
    files = {rel(p) for p in product_files()}
    for must in ("trtforge/vocab.py", "trtforge/registry.py", "parity/check.py", "calibration/quantize.py",
                 "engines/build.py", "exporter/export.py"):
        assert must in files


def test_stages_import_only_the_core_and_themselves():
    problems = []
    for path in product_files():
        own = stage_of_file(path)
        if own is None:
            continue
        found = [(node.lineno, m) for node, _ in imports(path) for m in imported_modules(node, path)]
        found += [(node.lineno, m) for node, m in dynamic_imports(path)]
        for line, mod in found:
            other = stage_of_module(mod)
            if other and other != own:
                problems.append(f"{rel(path)}:{line} imports {mod} (stage {other}); use the core or a registry")
    assert not problems, "\n".join(sorted(set(problems)))


def test_the_core_never_imports_a_stage():
    """trtforge/*.py below the face (cli, commands, pipeline, recipes) is what every stage builds
    on; a stage import there would be a cycle. The registries reach stages by module name."""
    problems = []
    for path in product_files():
        r = rel(path)
        if stage_of_file(path) or r in FACE or r.startswith("trtforge/commands/"):
            continue
        skip = type_checking_imports(path)
        for node, _ in imports(path):
            if id(node) in skip:
                continue
            for mod in imported_modules(node, path):
                if stage_of_module(mod):
                    problems.append(f"{r}:{node.lineno} imports {mod}")
    assert not problems, "\n".join(sorted(set(problems)))


# --------------------------------------------------------------------------- (b)


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[0] in STAGES:
        parts = ["trtforge", *parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_adapter(module: str) -> bool:
    """A stage's private adapter (``exporter/_torch.py``, ``engines/_trt.py``): the one module that
    imports a heavy library, itself imported lazily by the functions that need it."""
    parts = module.split(".")
    return stage_of_module(module) is not None and parts[-1].startswith("_") and not parts[-1].startswith("__")


def import_targets(node: ast.Import | ast.ImportFrom, path: Path, modules: set[str]) -> list[str]:
    """The trtforge modules an import loads: ``from pkg import mod`` -> pkg.mod, else the module."""
    mods = imported_modules(node, path)
    if isinstance(node, ast.Import):
        return mods
    subs = [m for m in mods[1:] if m in modules]
    return subs if subs and len(subs) == len(mods) - 1 else mods[:1]


def test_own_modules_are_imported_at_module_top():
    problems = []
    used_allowances = set()
    modules = {module_name(p) for p in product_files()}
    for path in product_files():
        r = rel(path)
        allowed = LAZY_IMPORT_ALLOWED.get(r, {})
        for node, top_level in imports(path):
            if top_level:
                continue
            own = [m for m in import_targets(node, path, modules) if m == "trtforge" or m.startswith("trtforge.")]
            for mod in own:
                if is_adapter(mod):
                    continue
                if mod in allowed:
                    used_allowances.add((r, mod))
                    continue
                problems.append(f"{r}:{node.lineno} imports {mod} inside a function; move it to the top of the module")
    assert not problems, f"{len(problems)} function-level imports:\n" + "\n".join(problems)
    stale = {(f, m) for f, d in LAZY_IMPORT_ALLOWED.items() for m in d} - used_allowances
    assert not stale, f"allow-list entries no longer needed: {sorted(stale)}"


# --------------------------------------------------------------------------- (c)


def _is_manifest(node: ast.AST) -> bool:
    if isinstance(node, ast.Name):
        return node.id == "manifest" or node.id.endswith("_manifest")
    if isinstance(node, ast.Attribute):
        return node.attr == "manifest"
    return False


def test_manifests_are_read_through_typed_attributes():
    problems = []
    for path in product_files():
        r = rel(path)
        for node in ast.walk(tree(path)):
            if isinstance(node, ast.Subscript) and _is_manifest(node.value):
                problems.append(f"{r}:{node.lineno} {ast.unparse(node)}")
            elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "get"
                  and _is_manifest(node.func.value)):
                problems.append(f"{r}:{node.lineno} {ast.unparse(node)[:80]}")
    assert not problems, f"{len(problems)} dict reads of a manifest:\n" + "\n".join(problems)


# --------------------------------------------------------------------------- (d)


def _precision_literals(node: ast.Compare) -> list[str]:
    found = []
    for operand in (node.left, *node.comparators):
        if isinstance(operand, ast.Constant) and operand.value in PRECISION_NAMES:
            found.append(operand.value)
        elif isinstance(operand, (ast.Tuple, ast.List, ast.Set)):
            found += [e.value for e in operand.elts if isinstance(e, ast.Constant) and e.value in PRECISION_NAMES]
    return found


def test_precisions_are_not_compared_as_string_literals():
    problems = []
    for path in product_files():
        r = rel(path)
        if r in PRECISION_LITERALS_ALLOWED:
            continue
        for node in ast.walk(tree(path)):
            if isinstance(node, ast.Compare) and _precision_literals(node):
                problems.append(f"{r}:{node.lineno} {ast.unparse(node)[:100]}  (use trtforge.vocab.Precision)")
    assert not problems, f"{len(problems)} precision literal comparisons:\n" + "\n".join(problems)


# --------------------------------------------------------------------------- the checks themselves


@pytest.mark.parametrize(
    ("source", "rule"),
    [
        ("from trtforge.calibration import quantize_model\n", "a"),
        ("def f():\n    from trtforge.artifacts import load_artifact\n", "b"),
        ("x = art.manifest['kind']\n", "c"),
        ("x = art.manifest.get('kind')\n", "c"),
        ("ok = p == 'int8'\n", "d"),
        ("ok = p in ('fp8', 'int4-weight-only')\n", "d"),
    ],
)
def test_each_rule_catches_its_pattern(tmp_path, source, rule):
    """The checks are not vacuous: each one flags a one-line example of what it forbids."""
    path = REPO / "parity" / "_rule_example.py"
    _TREES[path] = ast.parse(source)
    try:
        if rule == "a":
            assert [m for node, _ in imports(path) for m in imported_modules(node, path) if stage_of_module(m) == "calibration"]
        elif rule == "b":
            assert any(not top for _, top in imports(path))
        elif rule == "c":
            assert any((isinstance(n, ast.Subscript) and _is_manifest(n.value)) or (
                isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and _is_manifest(n.func.value))
                for n in ast.walk(_TREES[path]))
        else:
            assert any(isinstance(n, ast.Compare) and _precision_literals(n) for n in ast.walk(_TREES[path]))
    finally:
        _TREES.pop(path, None)


def test_only_stage_adapters_count_as_lazy_by_design():
    assert is_adapter("trtforge.exporter._torch") and is_adapter("trtforge.engines._trt")
    assert not is_adapter("trtforge._deps") and not is_adapter("trtforge.engines.cpu")
    assert not is_adapter("trtforge.engines.__init__")
