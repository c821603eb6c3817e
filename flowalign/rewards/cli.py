"""``flowalign judge-server``: registered into the main CLI by ``register(subparsers)``."""

from __future__ import annotations

import argparse


def _run(ns: argparse.Namespace) -> int:
    from .server import run

    return run(ns)


def register(subparsers) -> None:
    """Add ``judge-server`` to an argparse subparsers object; the parsed namespace's ``func(ns)``
    runs the server (blocking) and returns an exit code."""
    from .server import __doc__ as doc
    from .server import add_arguments

    p = subparsers.add_parser(
        "judge-server",
        help="OpenAI-compatible judge on 127.0.0.1 backed by a local reward (with fault injection)",
        description=doc,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(p)
    p.set_defaults(func=_run)
