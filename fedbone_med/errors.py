"""Error hierarchy. Every error a user can cause is a ``FedboneError``.

Messages name the check that failed and what to do about it. They never contain
patient data: no pixel values, tensor contents, labels, file contents or DICOM
header values (file *paths* given by the administrator are allowed).
The command-line tools map each class to its own exit code.
"""

from __future__ import annotations


class FedboneError(Exception):
    """Base class; ``exit_code`` is what the command-line tools exit with."""

    exit_code = 1


class ConfigError(FedboneError):
    """A configuration file or value is invalid (unknown key, wrong type, bad value)."""

    exit_code = 2


class RegistryError(ConfigError):
    """An unknown or duplicate name in a registry."""


class DataError(FedboneError):
    """Input data is missing, unreadable or inconsistent."""

    exit_code = 3


class ModelError(FedboneError):
    """A model does not fit its task, or shapes do not match at the cut."""

    exit_code = 4


class AggregationError(FedboneError):
    """Site gradients cannot be aggregated (non-finite, mismatched sizes)."""

    exit_code = 5


class ProtocolError(FedboneError):
    """A message between a site and the server failed validation."""

    exit_code = 6


class CheckpointError(FedboneError):
    """A checkpoint is missing, unreadable or does not match the run."""

    exit_code = 7


class SiteDropped(ProtocolError):
    """The site is no longer a member of the federation (it missed a deadline, left, or joined again
    mid-round); it should join again (gRPC ABORTED)."""


class ServerHalted(FedboneError):
    """The server stopped serving this run (a round boundary could not be recorded); retry later.

    Every call after the halt gets this error (gRPC UNAVAILABLE): the sites reconnect with backoff
    and train the round again once the operator has fixed the cause and run ``serve --resume``.
    """
