"""Errors the user can act on: each one names the file (or setting) and the problem."""

from __future__ import annotations


class BrainLMError(Exception):
    """Base class: the CLI prints these as one line, without a traceback."""


class InputError(BrainLMError):
    """A recording or table that cannot be used. `source` names the file."""

    def __init__(self, source, problem: str):
        self.source = str(source)
        self.problem = problem
        super().__init__(f"{self.source}: {problem}")


class ConfigError(BrainLMError):
    """A setting with a value that cannot work."""


class OrientationError(BrainLMError):
    """An array that is not [parcels, time] where it should be."""


def check_orientation(array, n_parcels: int, where: str, min_time: int = 1):
    """Raise unless `array` is 2-D [parcels, time] with `n_parcels` rows.

    Called at every boundary (parcellation output, scaler, store, windows) so a transposed
    array is caught where it appears instead of training silently on [time, parcels].
    """
    if getattr(array, "ndim", None) != 2:
        raise OrientationError(f"{where}: expected a 2-D [parcels, time] array, got shape "
                               f"{getattr(array, 'shape', None)}")
    p, t = array.shape
    if p != n_parcels:
        hint = " (looks transposed)" if t == n_parcels else ""
        raise OrientationError(f"{where}: expected [parcels={n_parcels}, time], got shape "
                               f"{tuple(array.shape)}{hint}")
    if t < min_time:
        raise OrientationError(f"{where}: {t} timepoints, need at least {min_time}")
    return array
