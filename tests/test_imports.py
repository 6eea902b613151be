"""Every module imports, and every command's --help runs, with the heavy libraries hidden."""

from __future__ import annotations

import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(
    """
    import importlib, importlib.abc, pkgutil, sys
    HIDDEN = {"torch", "transformers", "onnxruntime", "tensorrt", "modelopt"}

    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name.split(".")[0] in HIDDEN:
                raise ImportError(f"No module named {name!r} (hidden by test)", name=name)
            return None

    sys.meta_path.insert(0, Block())
    import trtforge
    failed = []
    for pkg in ("trtforge", "trtforge.exporter", "trtforge.calibration", "trtforge.engines", "trtforge.parity"):
        mod = importlib.import_module(pkg)
        for info in pkgutil.walk_packages(mod.__path__, pkg + "."):
            leaf = info.name.rsplit(".", 1)[1]
            if leaf.startswith("_"):  # private adapters (e.g. engines/_trt.py) are allowed to need their library
                continue
            try:
                importlib.import_module(info.name)
            except Exception as exc:
                failed.append(f"{info.name}: {exc!r}")
    assert not failed, failed
    for name in HIDDEN:
        assert name not in sys.modules, f"{name} was imported"

    from click.testing import CliRunner
    from trtforge.cli import main

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
