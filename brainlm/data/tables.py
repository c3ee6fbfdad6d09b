"""Tables beside or instead of images: already-parcellated time series and fMRIPrep confounds.

Both readers take the file's bytes when the caller has them (read once, and hashed from the
same bytes for the parcellation cache) and parse those; should that fail they parse the file
itself, so an unreadable table is refused in the words it always was.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from ..errors import InputError
from .nifti import describe_error

_MISSING = {"", "n/a", "na", "nan", "NaN", "NA", "N/A"}
_BYTES_SUFFIXES = (".npy", ".tsv", ".csv")  # names whose parse does not depend on the name


def read_timeseries_table(path, n_parcels: int, data: bytes | None = None
                          ) -> tuple[np.ndarray, np.ndarray]:
    """An already-parcellated time x parcels table (TSV/CSV/NPY) -> ([P, T], coverage).

    Whole-NaN columns are parcels without coverage (XCP-D writes them so); scattered NaNs are
    an error. `data`: the file's content, when already read.
    """
    path = Path(path)
    if data is not None and not path.name.endswith(_BYTES_SUFFIXES):
        data = None  # e.g. .tsv.gz: pandas infers the compression from the name
    try:
        table = _parse_table(path, io.BytesIO(data) if data is not None else path, n_parcels)
    except InputError:
        raise
    except Exception as exc:
        if data is not None:
            return read_timeseries_table(path, n_parcels)
        raise InputError(path, f"unreadable time-series table ({describe_error(exc)})") from None
    table = np.asarray(table)
    if table.dtype.kind not in "iuf":  # text, booleans, complex, records: not a signal
        raise InputError(path, f"holds {table.dtype} values, not real numbers")
    table = table.astype(np.float64)
    if table.ndim != 2:
        raise InputError(path, f"expected a 2-D time x parcels table, got shape {table.shape}")
    if table.shape[1] != n_parcels:
        if table.shape[0] == n_parcels:
            raise InputError(path, f"shape {table.shape} looks like parcels x time; expected "
                                   f"time x parcels ({n_parcels} columns)")
        raise InputError(path, f"{table.shape[1]} columns but the coordinates list "
                               f"{n_parcels} parcels")
    bad = ~np.isfinite(table)
    empty = bad.all(axis=0)
    scattered = bad[:, ~empty].sum()
    if scattered:
        raise InputError(path, f"{int(scattered)} NaN/Inf values inside "
                               f"{int(bad[:, ~empty].any(axis=0).sum())} parcel columns")
    signals = np.where(bad, 0.0, table).T.astype(np.float32)
    return signals, ~empty & (signals.std(axis=1) > 0)


def _table_bounds(path: Path, n_parcels: int) -> tuple[int, int]:
    """(most columns, most bytes) a table may have before it is parsed: a transposed table has
    one column per timepoint (at most BRAINLM_MAX_VOLUMES), and ~32 bytes of text per value."""
    from .nifti import size_limits

    volumes, _ = size_limits()
    return max(n_parcels, volumes), n_parcels * volumes * 32


def _parse_table(path: Path, content, n_parcels: int):
    import pandas as pd

    most_columns, most_bytes = _table_bounds(path, n_parcels)
    if path.name.endswith(".npy"):
        _check_npy_header(path, content, most_columns)
        return np.load(content, allow_pickle=False)
    sep = "\t" if path.name.endswith((".tsv", ".tsv.gz")) else ","
    if isinstance(content, io.BytesIO):
        raw_bytes = content.getvalue()
    elif path.name.endswith(".gz"):
        import gzip

        chunks, total = [], 0
        with gzip.open(path, "rb") as f:
            while total <= most_bytes and (chunk := f.read(1 << 24)):
                chunks.append(chunk)
                total += len(chunk)
        raw_bytes = b"".join(chunks)
    else:
        raw_bytes = path.read_bytes()
    if len(raw_bytes) > most_bytes:
        raise InputError(path, f"more than {most_bytes:,} bytes of table text (a "
                               "decompression bomb? BRAINLM_MAX_VOLUMES bounds it)")
    width = raw_bytes[:raw_bytes.find(b"\n") if b"\n" in raw_bytes else None].count(
        sep.encode()) + 1
    if width > most_columns:
        raise InputError(path, f"{width:,} columns on its first line, more than the "
                               f"{most_columns:,} a table of {n_parcels} parcels or of "
                               "BRAINLM_MAX_VOLUMES timepoints can have")
    try:
        text = raw_bytes.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw_bytes[:exc.start].count(b"\n") + 1
        raise InputError(path, f"not UTF-8 text: byte {raw_bytes[exc.start]:#04x} on line "
                               f"{line} (save the table as UTF-8)") from None
    lines = text.rstrip("\r\n").splitlines()
    _check_lines(lines, sep, path)
    raw = pd.read_csv(io.StringIO("\n".join(lines)), sep=sep, header=None, dtype=str,
                      keep_default_na=False)
    return _numeric_table(raw, path)


def _check_npy_header(path: Path, content, most_columns: int) -> None:
    """The .npy's shape from its header, before its data are read: at most 2-D and
    `most_columns` wide either way."""
    f = content if isinstance(content, io.BytesIO) else open(content, "rb")
    try:
        version = np.lib.format.read_magic(f)
        reader = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
            np.lib.format.read_array_header_2_0
        shape, _, _ = reader(f)
    except (ValueError, OSError):
        return  # np.load names what is wrong with it
    finally:
        if isinstance(content, io.BytesIO):
            content.seek(0)
        else:
            f.close()
    if len(shape) > 2 or any(int(d) > most_columns for d in shape):
        raise InputError(path, f"declares an array of shape {tuple(shape)}: more than a time x "
                               f"parcels table of at most {most_columns:,} rows or columns")


def _check_lines(lines: list, sep: str, path: Path) -> None:
    """Every line one timepoint with every parcel: an empty line or a short one inside the
    table is named (pandas would skip or pad it, losing or shifting a timepoint silently)."""
    width = lines[0].count(sep) + 1 if lines else 0
    bad = [(i, line) for i, line in enumerate(lines)
           if not line.strip() or line.count(sep) + 1 != width]
    if bad:
        i, line = bad[0]
        what = "is empty" if not line.strip() else f"has {line.count(sep) + 1} fields, not {width}"
        raise InputError(path, f"line {i + 1} {what} ({len(bad)} such lines): every line must "
                               "be one timepoint with every parcel")


def _numeric_table(raw, path: Path) -> np.ndarray:
    """Text cells -> float [rows, cols]. The first row is a header when it holds any
    non-number, or when it is exactly 0..C-1 or 1..C (column labels written as numbers)."""
    import pandas as pd

    first = pd.to_numeric(raw.iloc[0], errors="coerce")
    n_cols = raw.shape[1]
    labels = first.to_numpy()
    is_header = (first.isna().any() and not raw.iloc[0].isin(_MISSING).all()) or \
        np.array_equal(labels, np.arange(n_cols)) or np.array_equal(labels, np.arange(1, n_cols + 1))
    if is_header and not first.isna().any():  # numbers read as labels: say so, never silently
        import warnings

        warnings.warn(f"{path}: first line {' '.join(raw.iloc[0])} read as column labels "
                      "(a header), not as a timepoint", stacklevel=2)
    body = raw.iloc[1:] if is_header else raw
    missing = body.isin(_MISSING)
    values = body.apply(pd.to_numeric, errors="coerce")
    text = values.isna() & ~missing
    if text.to_numpy().any():
        r, c = np.argwhere(text.to_numpy())[0]
        raise InputError(path, f"non-numeric value {body.iat[r, c]!r} in row {r + 1 + is_header}, "
                               f"column {c + 1} ({int(text.to_numpy().sum())} such cells)")
    return values.to_numpy(np.float64)


def read_confounds(path: Path | None, columns: tuple[str, ...], source: Path, n_t: int,
                   data: bytes | None = None):
    """The `columns` of fMRIPrep's confounds table for recording `source` [n_t, k], or None
    when no regression is asked for. `data`: the table's content, when already read."""
    import pandas as pd

    if not columns:
        return None
    if path is None:
        raise InputError(source, "confound regression asked for, but no "
                                 "*_desc-confounds_timeseries.tsv beside it")
    try:
        table = pd.read_csv(io.BytesIO(data) if data is not None else path, sep="\t",
                            na_values=["n/a"])
    except Exception as exc:
        if data is not None:
            return read_confounds(path, columns, source, n_t)
        raise InputError(source, f"unreadable confounds table {path.name} ({exc})") from None
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise InputError(source, f"confounds table {path.name} lacks columns: "
                                 f"{', '.join(missing)}")
    if len(table) != n_t:
        raise InputError(source, f"confounds table {path.name} has {len(table)} rows for "
                                 f"{n_t} volumes")
    return table[list(columns)].fillna(0.0).to_numpy(np.float64)
