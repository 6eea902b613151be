"""Errors a user can act on.

Every :class:`TrtforgeError` carries the problem and the fix. The CLI prints
``error: <problem> (<hint>)`` on one line and exits 1, without a traceback;
anything that is not a TrtforgeError is a bug and keeps its traceback.
"""

from __future__ import annotations

import re


class TrtforgeError(Exception):
    """Base class: a problem the user can fix, and the hint that says how."""

    exit_code = 1

    def __init__(self, problem: str, hint: str | None = None) -> None:
        super().__init__(problem)
        self.problem = problem
        self.hint = hint

    def one_line(self) -> str:
        text = self.problem.rstrip(".")
        if self.hint:
            text += f" ({self.hint.rstrip('.')})"
        return " ".join(text.split())

    def __str__(self) -> str:  # pragma: no cover - trivial
        return self.one_line()


class MissingDependencyError(TrtforgeError):
    """An optional library is not installed."""

    def __init__(self, module: str, extra: str | None = None, purpose: str | None = None) -> None:
        what = f"{module} is not installed"
        if purpose:
            what += f"; it is needed to {purpose}"
        hint = f"pip install 'trtforge[{extra}]'" if extra else f"pip install {module}"
        super().__init__(what, hint)
        self.module = module
        self.extra = extra


class InputError(TrtforgeError):
    """A model folder, data file, artifact or option the user gave is not usable."""


class ExportError(TrtforgeError):
    """The ONNX export itself failed."""


class ValidationError(TrtforgeError):
    """An exported or quantized model does not compute what its source does."""


class CalibrationError(TrtforgeError):
    """Calibration data or activation statistics are unusable."""


class QuantizationError(TrtforgeError):
    """A quantization recipe cannot be applied to this model."""


class TargetError(TrtforgeError):
    """The build target cannot run this artifact, or is not present on this machine."""


class BuildError(TrtforgeError):
    """The engine build failed."""


class ParityError(TrtforgeError):
    """The parity check could not run (not: the gate failed, which is a result)."""


class RecipeError(TrtforgeError):
    """A recipe file or --set override is invalid."""


class OutputExistsError(TrtforgeError):
    """The output folder exists and --force was not given."""

    def __init__(self, path: object) -> None:
        super().__init__(f"output folder {path} already exists", "choose another -o or pass --force to replace it")


class LockedError(TrtforgeError):
    """Another trtforge process holds the output folder."""


class OptionError(InputError):
    """An option value is not usable. The message names the option by its field (``optimization_level``);
    ``fields`` lists the names used, so the CLI and recipe layers can say which flag or key set it
    (:meth:`relabel`)."""

    def __init__(self, problem: str, hint: str | None = None, *, fields: tuple[str, ...] = ()) -> None:
        super().__init__(problem, hint)
        self.fields = tuple(fields)

    def relabel(self, labels: dict[str, str]) -> OptionError:
        """The same error with each field name replaced by its label (``{"optimization_level": "--opt-level"}``)."""
        def sub(text: str | None) -> str | None:
            if text is None:
                return None
            for f in sorted(self.fields, key=len, reverse=True):
                if f in labels:
                    text = re.sub(rf"(?<![\w-]){re.escape(f)}(?![\w-])", labels[f], text)
            return text

        return OptionError(sub(self.problem) or self.problem, sub(self.hint), fields=())
