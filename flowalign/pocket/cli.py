"""``flowalign pocket ...``: the pocket world from the command line.

    flowalign pocket render "two red circles" --out file.png [--size 32] [--seed 0] [--scale 8]

``register(subparsers)`` adds the ``pocket`` command to the ``flowalign`` parser; ``pocket build`` and
``pocket eval`` will join ``render`` as further subcommands. ``python -m flowalign.pocket.cli ...``
runs the same command without the rest of the CLI.
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def _cmd_render(ns) -> int:
    from .render import render_scene, to_pil

    if ns.scale < 1:
        print(f"flowalign pocket render: --scale must be 1 or more, got {ns.scale}", file=sys.stderr)
        return 2
    try:
        image, scene = render_scene(ns.prompt, seed=ns.seed, size=ns.size)
    except ValueError as e:
        print(f"flowalign pocket render: {e}", file=sys.stderr)
        return 2
    out = os.path.abspath(ns.out)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    tmp = f"{out}.tmp.{os.getpid()}"
    to_pil(image, ns.scale).save(tmp, format="PNG")
    os.replace(tmp, out)
    print(json.dumps({"out": ns.out, "prompt": ns.prompt, **scene.to_dict()}))
    return 0


def register(subparsers) -> None:
    """Add ``pocket`` (with its subcommands) to an argparse subparsers object."""
    p_pocket = subparsers.add_parser("pocket", help="the pocket world: a text-to-image world small enough for a CPU")
    sub = p_pocket.add_subparsers(dest="pocket_command", required=True)

    p_render = sub.add_parser(
        "render",
        help="draw a scene for a prompt of the pocket grammar and save it as a PNG "
        "(prints the scene spec as JSON)",
    )
    p_render.add_argument("prompt", help="e.g. 'two red circles' or 'a blue square to the left of a yellow triangle'")
    p_render.add_argument("--out", required=True, help="PNG file to write")
    p_render.add_argument("--size", type=int, default=32, help="image side in pixels (default 32, at least 24)")
    p_render.add_argument("--seed", type=int, default=0, help="layout and color seed (default 0)")
    p_render.add_argument("--scale", type=int, default=1,
                          help="upscale the saved PNG this many times, nearest neighbour, for viewing (default 1)")
    p_render.set_defaults(func=_cmd_render)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="flowalign")
    register(parser.add_subparsers(dest="command", required=True))
    ns = parser.parse_args(argv)
    return ns.func(ns)


if __name__ == "__main__":
    sys.exit(main())
