"""Errors a user can fix, kept apart from bugs.

Everything raised for bad input (a wrong size, a missing file, a checkpoint that
does not match its config) derives from `WanBuildError`. The CLI catches that one
type, prints its message in one or two lines and exits 1; any other exception is a
bug and keeps its traceback.
"""

from __future__ import annotations


class WanBuildError(Exception):
    """A problem with the user's input: the message names the input, the rule and the fix."""


class ConfigError(WanBuildError):
    """A model config or preset that is unknown or inconsistent."""


class GeometryError(WanBuildError):
    """A video or latent size that the model cannot take."""


class WeightsError(WanBuildError):
    """A checkpoint that cannot be read or does not fit the model."""


class InputError(WanBuildError):
    """A forward call whose tensors no Wan model accepts."""
