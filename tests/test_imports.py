"""Every module imports, and every command's --help runs, with the heavy libraries hidden."""

from __future__ import annotations

import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(
    """
    import importlib, importlib.abc, pkgutil, sys
    HIDDEN = {"torch", "transformers", "onnxruntime", "tensorrt", "modelopt"}
    CORE = ["trtforge.vocab", "trtforge.manifest", "trtforge.stage", "trtforge.registry", "trtforge.backend",
            "trtforge.requantize", "trtforge.onnx_io", "trtforge.architectures.base", "trtforge.commands.base",
            "trtforge.commands.parity", "trtforge.parity.models", "trtforge.calibration.requantize"]

    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name.split(".")[0] in HIDDEN:
                raise ImportError(f"No module named {name!r} (hidden by test)", name=name)
            return None

    sys.meta_path.insert(0, Block())
    import trtforge
    failed, seen = [], set()
    for pkg in ("trtforge", "trtforge.exporter", "trtforge.calibration", "trtforge.engines", "trtforge.parity"):
        mod = importlib.import_module(pkg)
        for info in pkgutil.walk_packages(mod.__path__, pkg + "."):
            leaf = info.name.rsplit(".", 1)[1]
            if leaf.startswith("_"):  # private adapters (e.g. engines/_trt.py) are allowed to need their library
                continue
            seen.add(info.name)
            try:
                importlib.import_module(info.name)
            except Exception as exc:
                failed.append(f"{info.name}: {exc!r}")
    assert not failed, failed
    # the walk reaches the core, the registries' entry packages and the CLI's command modules
    for name in CORE:
        assert name in seen, f"{name} was not found by the walk"

    # every registry loads all of its built-in entries, and each entry is one importable module
    from trtforge.registry import ARCHITECTURES, BACKENDS, QUANT_METHODS

    for reg in (ARCHITECTURES, QUANT_METHODS, BACKENDS):
        names = reg.names()
        assert names, f"the {reg.kind} registry is empty"
        for mod in reg._builtin:
            assert mod in sys.modules, f"{mod} ({reg.kind} entry) was not imported"
    for name in HIDDEN:
        assert name not in sys.modules, f"{name} was imported"

    from click.testing import CliRunner
    from trtforge.cli import main
    from trtforge.commands import COMMANDS

    for cmd in COMMANDS:  # registered explicitly, by object
        assert main.commands.get(cmd.name) is cmd, cmd.name

    def walk(group, prefix):
        yield prefix
        for name, cmd in getattr(group, "commands", {}).items():
            yield from walk(cmd, prefix + [name])

    for args in walk(main, []):
        r = CliRunner().invoke(main, args + ["--help"])
        assert r.exit_code == 0, (args, r.output, r.exception)
        assert "Usage:" in r.output
    print("ok", len(list(walk(main, []))))
    """
)


def test_modules_and_help_without_heavy_libraries():
    r = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr + r.stdout
    assert r.stdout.startswith("ok")


def test_missing_dependency_error_names_the_extra(monkeypatch):
    import pytest

    from trtforge._deps import require
    from trtforge.errors import MissingDependencyError

    monkeypatch.setitem(sys.modules, "tensorrt", None)  # makes `import tensorrt` fail here
    with pytest.raises(MissingDependencyError) as info:
        require("tensorrt")
    assert "tensorrt is not installed" in info.value.one_line()
    assert "trtforge[gpu]" in info.value.one_line()
