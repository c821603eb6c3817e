"""Prompt files: ``.txt`` (one prompt per line; blank lines and ``#`` comments skipped) or ``.jsonl``
(one JSON object per line with a ``prompt`` string; the other keys are kept as the prompt's metadata
and reach the rewards, e.g. the pocket world's ``spec`` or GenEval's object list). The one reader of
both; a prompt world with its own grammar passes a ``parse`` step (``pocket.prompts.load_prompt_file``)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable


def read_prompts(path: str | os.PathLike, parse: Callable[[dict], dict] | None = None) -> list[dict]:
    """Rows ``{"prompt": str, **metadata}``; ValueError naming the file and line for bad input.
    ``parse(row) -> row`` checks or completes each row; its ValueError/KeyError is reported with the
    file and line too."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ValueError(f"prompt file {str(path)!r} does not exist (give a .txt file with one prompt per line, "
                         "or a .jsonl file with a 'prompt' key per line)")
    if path.suffix not in (".txt", ".jsonl"):
        raise ValueError(f"prompt file {str(path)!r} must end in .txt (one prompt per line) or .jsonl "
                         "(one JSON object with a 'prompt' key per line)")
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        text = line.strip()
        if not text or (path.suffix == ".txt" and text.startswith("#")):
            continue
        if path.suffix == ".txt":
            rows.append(_parsed({"prompt": text}, parse, path, n))
            continue
        try:
            row = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n}: not valid JSON ({e.msg}); each line must be an object like "
                             '{"prompt": "a red cube"}') from None
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str) or not row["prompt"].strip():
            raise ValueError(f"{path}:{n}: each line needs a non-empty string 'prompt', got {text[:80]!r}")
        rows.append(_parsed(row, parse, path, n))
    if not rows:
        raise ValueError(f"prompt file {str(path)!r} has no prompts")
    return rows


def _parsed(row: dict, parse, path: Path, n: int) -> dict:
    if parse is None:
        return row
    try:
        return parse(row)
    except (ValueError, KeyError) as e:
        raise ValueError(f"{path}:{n}: {e}") from e
