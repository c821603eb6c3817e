"""Prompt sources: the one reader of ``train.prompts`` / ``eval.prompts`` (and any prompt list).

A source is a string, a local file or folder or a Hugging Face dataset, with optional options after ``?``:

* ``prompts/x.txt``: one prompt per line (blank lines and ``#`` comments skipped);
* ``prompts/x.jsonl``: one JSON object per line with a ``prompt`` string; the other keys are kept as the
  prompt's metadata and reach the rewards (the pocket world's ``spec``, GenEval's object list);
* ``data/x.csv`` / ``data/x.parquet``: a table with a ``prompt`` column (``?column=caption`` for another);
  the other columns are the metadata;
* a folder written by ``datasets``' ``save_to_disk`` (``?split=test`` picks a split of a ``DatasetDict``);
* ``hf:OWNER/NAME?split=train&column=caption``: a dataset on the Hugging Face Hub (or a local data folder
  ``hf:/path/to/dir``), loaded with ``datasets.load_dataset`` and kept in its cache (``HF_DATASETS_CACHE``),
  so after one online run it loads offline. Options: ``split`` (default ``train``; slices such as
  ``test[:512]`` work), ``column`` (default ``prompt``), ``name`` (the dataset's config), ``data_files``
  (files inside the repository, e.g. ``train/prompts.txt``, whose text lines are the ``text`` column),
  ``revision``.

Every source takes ``unique=true`` (drop repeated prompts, first kept: caption datasets list a caption once
per rated pair). A prompt world with its own grammar passes a ``parse`` step
(``pocket.prompts.load_prompt_file``). Every mistake — a missing file, a column that is not there, a
dataset that is neither cached nor reachable — is one ``UserError`` (a ValueError) that says where the prompts come from and
how to fix it, raised before anything is generated.
"""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path
from typing import Callable
from urllib.parse import parse_qsl

from .errors import UserError

__all__ = ["read_prompts", "parse_source", "PromptSource", "HF_PREFIX"]

HF_PREFIX = "hf:"
_TABLES = (".csv", ".parquet")
_OPTIONS = {"split", "column", "name", "data_files", "revision", "unique"}


class PromptSource:
    """A parsed source string: ``location`` (path or dataset id), ``hub`` (a ``hf:`` source) and options."""

    def __init__(self, text: str, location: str, hub: bool, options: dict[str, str]):
        self.text, self.location, self.hub, self.options = text, location, hub, options

    @property
    def column(self) -> str:
        return self.options.get("column", "prompt")

    @property
    def unique(self) -> bool:
        return self.options.get("unique", "false").lower() in ("1", "true", "yes")

    def __repr__(self) -> str:
        return f"PromptSource({self.text!r})"


def parse_source(source: str | os.PathLike) -> PromptSource:
    """Split ``source`` into location and ``?key=value&...`` options; ValueError for unknown options."""
    text = os.fspath(source)
    hub = text.startswith(HF_PREFIX)
    body = text[len(HF_PREFIX):] if hub else text
    location, _, query = body.partition("?")
    options = dict(parse_qsl(query, keep_blank_values=True)) if query else {}
    unknown = sorted(set(options) - _OPTIONS)
    if unknown:
        raise UserError(f"prompt source {text!r}: unknown option {unknown[0]!r} (options: "
                         f"{', '.join(sorted(_OPTIONS))}), e.g. 'hf:OWNER/NAME?split=train&column=caption'")
    if hub and not location:
        raise UserError(f"prompt source {text!r} names no dataset; write hf:OWNER/NAME?split=train&column=prompt")
    if not hub and set(options) - {"column", "split", "unique"}:
        extra = sorted(set(options) - {"column", "split", "unique"})[0]
        raise UserError(f"prompt source {text!r}: option {extra!r} is for Hub datasets (hf:OWNER/NAME?...)")
    return PromptSource(text, location, hub, options)


def read_prompts(source: str | os.PathLike, parse: Callable[[dict], dict] | None = None) -> list[dict]:
    """Rows ``{"prompt": str, **metadata}`` of ``source`` (module docstring); ValueError naming the source
    (and the line, for text files) for bad input. ``parse(row) -> row`` checks or completes each row; its
    ValueError/KeyError is reported with the source and row too."""
    src = parse_source(source)
    if src.hub:
        rows, where = _hub_rows(src), src.text
    else:
        path = Path(src.location).expanduser()
        where = str(path)
        if path.is_dir():
            rows = _saved_dataset_rows(path, src)
        elif not path.is_file():
            raise UserError(f"prompt file {where!r} does not exist (give a .txt file with one prompt per line, "
                             "a .jsonl file with a 'prompt' key per line, a .csv/.parquet table, a folder saved by "
                             "datasets' save_to_disk, or a Hub dataset 'hf:OWNER/NAME?split=train&column=prompt')")
        elif path.suffix in (".txt", ".jsonl"):
            if "column" in src.options:
                raise UserError(f"prompt source {src.text!r}: 'column' applies to tables and datasets; a "
                                 f"{path.suffix} file holds its prompt in each line / its 'prompt' key")
            rows = _text_rows(path)
        elif path.suffix in _TABLES:
            rows = _table_rows(path, src)
        else:
            raise UserError(f"prompt file {where!r} must end in .txt (one prompt per line), .jsonl (one JSON "
                             "object with a 'prompt' key per line), .csv or .parquet (a 'prompt' column)")
    out, seen = [], set()
    for n, row in rows:
        if src.unique:
            if row["prompt"] in seen:
                continue
            seen.add(row["prompt"])
        out.append(_parsed(row, parse, where, n))
    if not out:
        raise UserError(f"prompt source {src.text!r} has no prompts")
    return out


# ---------------------------------------------------------------------------------------------- local files


def _text_rows(path: Path):
    """(line number, row) of a .txt or .jsonl file."""
    for n, line in enumerate(_utf8(path).splitlines(), 1):
        text = line.strip()
        if not text or (path.suffix == ".txt" and text.startswith("#")):
            continue
        if path.suffix == ".txt":
            yield n, {"prompt": text}
            continue
        try:
            row = json.loads(text)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{n}: not valid JSON ({e.msg}); each line must be an object like "
                             '{"prompt": "a red cube"}') from None
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str) or not row["prompt"].strip():
            raise UserError(f"{path}:{n}: each line needs a non-empty string 'prompt', got {text[:80]!r}")
        yield n, row


def _utf8(path: Path) -> str:
    """The text of ``path``; a file that is not UTF-8 is a ``UserError`` naming the file and line."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        line = path.read_bytes()[:e.start].count(b"\n") + 1
        raise UserError(f"{path}:{line}: not UTF-8 text (byte {e.object[e.start]:#04x}); save the file as "
                        "UTF-8") from None


def _table_rows(path: Path, src: PromptSource):
    """(row number, row) of a .csv (header line first) or .parquet table."""
    if path.suffix == ".csv":
        reader = csv.DictReader(io.StringIO(_utf8(path), newline=""))
        columns = list(reader.fieldnames or [])
        _check_column(src, columns, str(path))
        records = list(reader)
        return _column_rows(records, src, str(path), first=2)  # line 1 is the header
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise UserError(f"reading {path} needs pyarrow: pip install 'flowalign[data]'") from None
    table = pq.read_table(path)
    _check_column(src, table.column_names, str(path))
    return _column_rows(table.to_pylist(), src, str(path), first=1)


def _saved_dataset_rows(path: Path, src: PromptSource):
    """Rows of a folder written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``."""
    datasets = _import_datasets(str(path))
    try:
        data = datasets.load_from_disk(str(path))
    except FileNotFoundError:
        raise UserError(f"prompt source {src.text!r} is a folder but not one written by datasets' save_to_disk "
                         "(no dataset_info.json / dataset_dict.json); give a prompt file or a saved dataset") from None
    if isinstance(data, datasets.DatasetDict):
        split = src.options.get("split", "train" if list(data) == ["train"] else "")
        if split not in data:
            raise UserError(f"prompt source {src.text!r} holds the splits {', '.join(data)}; pick one with "
                             f"?split=NAME (e.g. {str(path)}?split={next(iter(data))})")
        data = data[split]
    _check_column(src, data.column_names, src.text)
    return _column_rows(data, src, src.text, first=0)


# ---------------------------------------------------------------------------------------------- the Hub


def _hub_rows(src: PromptSource):
    """Rows of ``hf:ID?...`` through ``datasets.load_dataset`` (cached in HF_DATASETS_CACHE)."""
    datasets = _import_datasets(src.text)
    o = src.options
    split = o.get("split", "train")
    kwargs = {k: o[k] for k in ("name", "data_files", "revision") if k in o}
    try:
        data = datasets.load_dataset(src.location, split=split, **kwargs)
    except datasets.exceptions.DatasetNotFoundError as e:
        raise UserError(
            f"prompt source {src.text!r}: the Hub has no dataset {src.location!r} that this machine may read "
            f"({str(e).splitlines()[0][:200]}); check the id (https://huggingface.co/datasets/{src.location}), or, for "
            f"a gated or private dataset, accept its terms and log in (`hf auth login`)"
        ) from None
    except OSError as e:  # ConnectionError (unreachable, offline), FileNotFoundError (a data_files path)
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0") or \
            os.environ.get("HF_DATASETS_OFFLINE", "0") not in ("", "0")
        fetch = f"datasets.load_dataset({src.location!r}, split={split!r}" + "".join(
            f", {k}={v!r}" for k, v in kwargs.items()) + ")"
        raise UserError(
            f"prompt source {src.text!r}: the Hugging Face dataset {src.location!r} is not in the local cache "
            f"({datasets.config.HF_DATASETS_CACHE}) and could not be "
            f"{'fetched (offline mode is on: HF_HUB_OFFLINE / HF_DATASETS_OFFLINE)' if offline else 'reached'}"
            f" ({type(e).__name__}: {str(e).splitlines()[0][:200]}). Fetch it once on a machine with access to "
            f"huggingface.co: python -c \"import datasets; {fetch}\" (then copy the cache folder here if "
            f"needed), or point the prompts at a local file"
        ) from None
    except ValueError as e:  # an unknown split or a bad slice
        raise UserError(f"prompt source {src.text!r}: {str(e).splitlines()[0][:300]}; fix ?split=") from None
    _check_column(src, data.column_names, src.text)
    return _column_rows(data, src, src.text, first=0)


def _import_datasets(where: str):
    try:
        import datasets
    except ImportError:
        raise UserError(f"prompt source {where!r} needs the datasets library: pip install 'flowalign[data]'") from None
    return datasets


# ---------------------------------------------------------------------------------------------- shared


def _check_column(src: PromptSource, columns: list[str], where: str) -> None:
    if src.column not in columns:
        raise UserError(f"prompt source {where!r} has no column {src.column!r} (its columns: "
                         f"{', '.join(columns) or 'none'}); name the prompt column with ?column=NAME")


def _column_rows(records, src: PromptSource, where: str, first: int):
    """(row number, {"prompt": ..., **other columns}) of table ``records`` (an iterable of dicts)."""
    col = src.column
    for n, rec in enumerate(records, first):
        text = rec[col]
        if not isinstance(text, str) or not text.strip():
            raise UserError(f"{where}: row {n} has no prompt text in column {col!r} (got {text!r}); "
                             "remove the row or pick another column")
        row = {k: v for k, v in rec.items() if k != col}
        row["prompt"] = text.strip()
        yield n, row


def _parsed(row: dict, parse, where: str, n: int) -> dict:
    if parse is None:
        return row
    try:
        return parse(row)
    except KeyError as e:
        raise UserError(f"{where}:{n}: missing key {e}") from e
    except ValueError as e:
        raise UserError(f"{where}:{n}: {e}") from e
