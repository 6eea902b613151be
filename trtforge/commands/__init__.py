"""CLI commands of the stages after export, one module each."""

from __future__ import annotations

import importlib

import click

_MODULES: tuple[str, ...] = ("quantize", "parity", "build", "run", "checkpoint")


def register(group: click.Group) -> None:
    for name in _MODULES:
        mod = importlib.import_module(f"trtforge.commands.{name}")
        for cmd in mod.COMMANDS:
            group.add_command(cmd)
