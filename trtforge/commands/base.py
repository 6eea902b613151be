"""What every command shares: printing results, and saying which flag an option error is about.

Results go to stdout: JSON with ``--json`` (:func:`emit`), else one human line. Library errors
name an option by its *field* (``optimization_level``), because the same option also comes from
recipe keys; a command turns the field into the flag that set it (``--opt-level``) with
:func:`flag_labels`: every click option labels the field its parameter is named after, and
:func:`field_flags` adds the few whose parameter name differs from the field.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any, TypeVar

import click

from trtforge.errors import OptionError, TrtforgeError

C = TypeVar("C", bound=click.Command)


def json_default(o: Any) -> Any:
    """Manifests, their sections and reports serialize through ``to_json``; the rest as text."""
    return o.to_json() if hasattr(o, "to_json") else str(o)


def emit(result: Any, as_json: bool, text: str | None = None) -> None:
    """The one way a command prints its result: ``result`` as JSON with --json, else ``text``."""
    if as_json:
        click.echo(json.dumps(result, indent=2, default=json_default))
    elif text is not None:
        click.echo(text)


def field_flags(**flags: str) -> Callable[[C], C]:
    """Decorator (above ``@click.command``): option field -> the flag that sets it, for options
    whose click parameter is not named after the field, e.g.
    ``@field_flags(optimization_level="--opt-level")``."""

    def deco(cmd: C) -> C:
        cmd.field_flags = {**getattr(cmd, "field_flags", {}), **flags}  # type: ignore[attr-defined]
        return cmd

    return deco


def flag_labels(cmd: click.Command) -> dict[str, str]:
    """Field -> flag for every option of ``cmd`` (its parameter name, then :func:`field_flags`)."""
    labels: dict[str, str] = {}
    for p in cmd.params:
        if isinstance(p, click.Option) and p.name:
            longs = [o for o in p.opts if o.startswith("--")] or list(p.opts)
            labels[p.name] = longs[0]
    labels.update(getattr(cmd, "field_flags", {}))
    return labels


def for_command(exc: TrtforgeError, cmd: click.Command | None) -> TrtforgeError:
    """The error as the user of ``cmd`` should read it: option fields named by their flags."""
    if isinstance(exc, OptionError) and cmd is not None:
        return exc.relabel(flag_labels(cmd))
    return exc
