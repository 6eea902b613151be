"""CLI commands of the stages after export, one module each, listed here by object.

A new command is a module with ``COMMANDS = [...]`` imported below and added to
:data:`COMMANDS`; trtforge.cli adds every one to the ``trtforge`` group. Shared helpers
(printing results, naming the flag an option error is about) are in :mod:`trtforge.commands.base`.
"""

from __future__ import annotations

import click

from trtforge.commands import build, checkpoint, parity, quantize, run

COMMANDS: tuple[click.Command, ...] = (
    *quantize.COMMANDS,
    *parity.COMMANDS,
    *build.COMMANDS,
    *run.COMMANDS,
    *checkpoint.COMMANDS,
)

__all__ = ["COMMANDS"]
