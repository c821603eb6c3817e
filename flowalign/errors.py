"""The user-error type and the one error boundary of every command.

``UserError`` is a mistake in what the user gave (a file, a config key, a folder, a device, a missing
extra); its message names the thing and the fix, on one line. It is a ``ValueError`` (``ConfigError``
is one), so library callers that catch ``ValueError`` keep working.

``run_command`` is the boundary every ``flowalign`` subcommand runs inside: a ``UserError``, an
``OSError`` (unreadable or unwritable file, full disk) or a missing optional extra becomes one line
``<prog>: error: <message>`` and exit code 2; anything else is a bug and keeps its traceback.

The checks that can run before a model is loaded live here too, so a command fails before it has
spent minutes loading or written anything: ``check_output_dir`` (the output folder can be created
and written), and ``flowalign.torch_utils.check_device`` (the device exists).
"""

from __future__ import annotations

import errno
import os
import sys
import tempfile
from pathlib import Path
from typing import Callable

__all__ = ["UserError", "run_command", "check_output_dir", "EXTRAS"]


class UserError(ValueError):
    """A mistake in the user's input; the one-line message names the file or key and the fix."""


# Optional packages and the extra that installs them (pyproject.toml [project.optional-dependencies]).
EXTRAS = {"httpx": "vlm", "xformers": "gpu", "tensorboard": "track", "wandb": "track"}

_OS_FIXES = {
    errno.EACCES: "choose a folder you can write to (or fix its permissions)",
    errno.EPERM: "choose a folder you can write to (or fix its permissions)",
    errno.EROFS: "choose a folder on a writable file system",
    errno.ENOSPC: "free disk space or choose another folder",
    errno.ENOENT: "check the path",
    errno.ENOTDIR: "a part of the path is a file; choose another path",
    errno.EISDIR: "give a file, not a folder",
    errno.EEXIST: "remove it or choose another path",
    errno.EADDRINUSE: "choose another port",
}


def _message(err: BaseException) -> str | None:
    """The one-line message of an expected failure, or None for a bug."""
    if isinstance(err, UserError):
        return " ".join(str(err).split("\n"))
    if isinstance(err, ModuleNotFoundError) and (err.name or "").split(".")[0] in EXTRAS:
        package = err.name.split(".")[0]
        return (f"this needs the optional package {package!r}, which is not installed; "
                f"install it with `pip install 'flowalign[{EXTRAS[package]}]'`")
    if isinstance(err, OSError) and err.errno is not None:
        where = f" {err.filename}" if err.filename is not None else ""
        fix = _OS_FIXES.get(err.errno, "check the path and try again")
        return f"{err.strerror or err}:{where}; {fix}"
    return None


def run_command(prog: str, func: Callable, ns) -> int:
    """``func(ns)``'s exit code; an expected failure (see the module docstring) prints one line on
    stderr and returns 2, anything else propagates with its traceback."""
    try:
        return func(ns)
    except (UserError, ModuleNotFoundError, OSError) as err:
        message = _message(err)
        if message is None:
            raise
        print(f"{prog}: error: {message}", file=sys.stderr)
        return 2


def check_output_dir(path: str | os.PathLike, key: str) -> Path:
    """``path`` as a folder a command can write into, checked without creating anything: it is a
    folder or can be created (no part of it is a file) and the nearest existing folder accepts a new
    file. ``key`` names the setting in the message (``run.output_dir``, ``--out``)."""
    path = Path(path).expanduser()
    existing = path
    while not existing.exists():
        if existing.parent == existing:
            break
        existing = existing.parent
    if existing.exists() and not existing.is_dir():
        what = "is a file" if existing == path else f"lies under {existing}, which is a file"
        raise UserError(f"{key}={str(path)!r} {what}; choose a folder (a new or an existing one)")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as err:
        raise UserError(f"{key}={str(path)!r}: cannot write in {existing} ({err.strerror}); "
                        "choose a folder you can write to") from None
    return path
