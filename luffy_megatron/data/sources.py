"""Reading raw rows from parquet files (paths or globs) and Hugging Face datasets (saved folders or hub names).

Every row comes back as a plain dict of the requested top-level columns together with where it came from
(``RawRow.source`` = file or dataset name, ``RawRow.row`` = row number in it), so later errors can name both.
"""

from __future__ import annotations

import glob
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

logger = logging.getLogger(__name__)

_GLOB_CHARS = "*?["


class DataError(ValueError):
    """Bad input data; the message names the file, and where it applies the row and the column."""


@dataclass
class RawRow:
    source: str
    row: int
    values: dict[str, Any]


@dataclass
class Table:
    """The rows of one file or dataset, restricted to the columns that exist in it."""

    source: str
    columns: list[str]  # every top-level column the source has
    rows: list[dict[str, Any]]

    def __iter__(self) -> Iterator[RawRow]:
        for i, values in enumerate(self.rows):
            yield RawRow(self.source, i, values)


def expand_sources(specs: list[str]) -> list[str]:
    """Expand globs (sorted, de-duplicated); a glob without matches is an error. Other specs pass through."""
    out: list[str] = []
    for spec in specs:
        if any(ch in spec for ch in _GLOB_CHARS) and not Path(spec).exists():
            matches = sorted(glob.glob(spec))
            if not matches:
                raise DataError(f"{spec}: the pattern matches no file")
            out.extend(matches)
        else:
            out.append(spec)
    seen: set[str] = set()
    return [s for s in out if not (s in seen or seen.add(s))]


def _split_spec(spec: str) -> tuple[str, str | None]:
    """``name@split`` -> (name, split); the split suffix selects a split of an HF dataset."""
    if "@" in spec and not Path(spec).exists():
        name, split = spec.rsplit("@", 1)
        return name, split or None
    return spec, None


def read_table(spec: str, columns: list[str]) -> Table:
    """Read the wanted top-level ``columns`` (those present) of one source.

    ``spec`` is a ``.parquet`` file, a folder written by ``datasets.save_to_disk``, a folder of data files or a hub
    dataset name readable by ``datasets.load_dataset``; ``@split`` picks a split (default: the only one, or train).
    """
    path_str, split = _split_spec(spec)
    path = Path(path_str)
    if path.is_file():
        if path.suffix != ".parquet":
            raise DataError(f"{spec}: unsupported file type {path.suffix!r} (expected .parquet)")
        return _read_parquet(spec, path, columns)
    if path.is_dir() and ((path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists()):
        return _read_hf(spec, columns, split, from_disk=True)
    if path.is_dir() or (not path_str.startswith((".", "/")) and path_str.count("/") <= 1):
        return _read_hf(spec, columns, split, from_disk=False)
    raise DataError(f"{spec}: no such file or directory")


def _read_parquet(spec: str, path: Path, columns: list[str]) -> Table:
    try:
        schema = pq.read_schema(path)
        present = [c for c in columns if c in schema.names]
        table = pq.read_table(path, columns=present)
    except Exception as e:  # pyarrow raises several types for truncated or non-parquet files
        raise DataError(f"{spec}: cannot read parquet file: {e}") from e
    return Table(spec, list(schema.names), table.to_pylist())


def _read_hf(spec: str, columns: list[str], split: str | None, from_disk: bool) -> Table:
    import datasets  # lazy: seconds to import, and only Hugging Face dataset sources need it

    name, _ = _split_spec(spec)
    try:
        if from_disk:
            ds = datasets.load_from_disk(name)
        else:
            ds = datasets.load_dataset(name, split=split) if split else datasets.load_dataset(name)
    except Exception as e:
        raise DataError(f"{spec}: cannot load dataset: {e}") from e
    if isinstance(ds, datasets.DatasetDict):
        if split is None:
            if len(ds) == 1:
                split = next(iter(ds))
            elif "train" in ds:
                split = "train"
            else:
                raise DataError(f"{spec}: several splits {list(ds)}; choose one with {name}@SPLIT")
        if split not in ds:
            raise DataError(f"{spec}: no split {split!r} (have {list(ds)})")
        ds = ds[split]
    present = [c for c in columns if c in ds.column_names]
    return Table(spec, list(ds.column_names), ds.select_columns(present).to_list())
