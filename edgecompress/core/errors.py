"""One exception tree for the whole tool.

The CLI turns every :class:`EdgecompressError` into one line on stderr; user
mistakes (:class:`UsageError` and its children) exit with code 2, everything
else with code 1 and a hint to rerun with ``--debug``.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable


class EdgecompressError(Exception):
    """Base of every error the tool raises on purpose."""

    exit_code = 1


class UsageError(EdgecompressError):
    """Bad input from the user: a budget, a name, a path, a file."""

    exit_code = 2


class UnknownNameError(UsageError):
    """A registry lookup (target, model, method, runtime) found nothing."""

    def __init__(self, kind: str, name: str, known: Iterable[str]):
        known = sorted(known)
        # Names that start with what was typed first: "lcnet_05" is as close to lcnet_075 as to lcnet_050 by ratio.
        prefixed = [k for k in known if k.startswith(name)]
        hint = difflib.get_close_matches(name, prefixed or known, n=1, cutoff=0.5)
        message = f"unknown {kind} {name!r}"
        if hint:
            message += f"; did you mean {hint[0]!r}?"
        else:
            message += f"; known: {', '.join(known)}"
        super().__init__(message)
        self.kind, self.name, self.known = kind, name, known


class DataError(UsageError):
    """A data directory or data file the tool cannot use."""


class WeightsError(UsageError):
    """A weights file that is missing, corrupt, or of another architecture."""


class TargetFileError(UsageError):
    """A malformed target description; the message names the file and the key."""


class BudgetError(UsageError):
    """A budget nothing can meet, or that contradicts the target."""


class RunDirError(UsageError):
    """An output directory that would be overwritten, or a resume that does not match."""


class NumericalError(EdgecompressError):
    """A compressed model produced NaN or Inf."""


class DiskFullError(EdgecompressError):
    """The disk filled up while an artifact was written; the old state is intact."""

    exit_code = 2


class DeviceError(EdgecompressError):
    """The device could not be reached, refused us, or failed to run the benchmark."""

    exit_code = 2


class BundleError(UsageError):
    """A bundle that is incomplete, tampered with, or does not load."""


class TrtexecParseError(EdgecompressError):
    """A trtexec log without the latency summary (the engine build failed, or the format is unknown)."""


# Exceptions that are never a runtime's refusal: a mistake in our own code, or the tool's own error (a full disk, an
# unreachable device). Where a runtime's error (in whatever type its bindings raise) leaves one candidate out, these
# still end the command (pre-measurement, a build's tries).
OWN_MISTAKES = (TypeError, AttributeError, NameError, KeyError, EdgecompressError)


_LOCATION = re.compile(r"^Exception from \S+:\d+:$")


def one_line(exc: BaseException, limit: int = 200) -> str:
    """The line of a foreign exception (a runtime's, a converter's) that says what went wrong.

    Usually its first line; OpenVINO's converter starts with an assertion's location ("Check 'false' failed at
    ...unconverted_ops_report.cpp") and names what it could not convert in its summary, which is the line kept.
    OpenVINO's runtime puts a line of location before its message ("Exception from src/inference/src/dev/plugin.cpp:54:"
    then "could not append an elementwise post-op"): such lines are passed over.
    """
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    lines = [line for line in lines if not _LOCATION.match(line)] or lines
    summary = [line for line in lines if line.startswith("-- Conversion is failed for")]
    if summary:
        return ("OpenVINO cannot convert " + summary[-1].split("for", 1)[1].strip(" :"))[:limit]
    return (lines or [type(exc).__name__])[0][:limit]
