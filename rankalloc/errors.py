"""The project's exception hierarchy.

``RankallocError`` and its subclasses are *user* errors: something the user typed or pointed at is
wrong.  The command-line layer prints them as a single line and exits with status 2.  Anything else
that escapes is a bug and keeps its traceback.
"""
from __future__ import annotations


class RankallocError(Exception):
    """Base class of every error a user can cause and fix."""


class ConfigError(RankallocError, ValueError):
    """A config file, flag or dotted override is unknown, mistyped or out of range."""


class BudgetError(RankallocError, ValueError):
    """A budget string cannot be parsed or lies outside the feasible range."""


class DataError(RankallocError, ValueError):
    """A task or data file is missing, empty or malformed."""


class ModelError(RankallocError, ValueError):
    """A model cannot be loaded, or its target modules cannot be found."""


class RankMapError(RankallocError, ValueError):
    """A rank map file is malformed or does not fit the model it is applied to."""


class RunDirError(RankallocError):
    """An output folder exists already, or a run to resume/export is missing or incomplete."""


class DivergenceError(RankallocError, FloatingPointError):
    """Training produced a non-finite loss or gradient."""


def first_line(error: BaseException) -> str:
    """The first line of ``error``'s message (its type's name when it has none), for one-line messages."""
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__
