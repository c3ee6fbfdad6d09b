"""Writes that never leave a half-written file behind: temp file in the same folder, then rename."""

from __future__ import annotations

import hashlib
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_path(dest):
    """Yield a temporary path beside `dest`; it replaces `dest` only if the block succeeds."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp")
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; the result should look like open()'s
    try:
        yield Path(tmp)
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@contextmanager
def atomic_dir(dest):
    """Yield a temporary folder beside `dest`; on success it takes the place of `dest` (the old
    folder is removed only after the swap), so a failed run leaves the previous one whole."""
    import shutil

    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp"))
    try:
        yield tmp
        old = None
        if dest.exists():
            old = tmp.with_name(tmp.name[:-4] + ".old")
            os.replace(dest, old)
        os.replace(tmp, dest)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(dest, 0o777 & ~umask)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def exclusive(target, what: str = "written", by: str = ""):
    """One writer at a time for `target` (a folder or file): a lock held for the block, a
    hidden file beside the target keyed by its real path (`.NAME.lock` in the folder that
    holds it), so every writer of that output sees it whatever its user cache; removed when
    the block ends. A second process is refused at once with a message naming the target and
    the holder, instead of silently replacing the first one's output. The lock dies with its
    process."""
    import time

    target = Path(target).resolve()
    writable_folder(target.parent, f"the output {target} cannot be written: its folder")
    lock_path = target.parent / f".{target.name}.lock"
    lock = _take_lock(lock_path, target, what)
    try:
        _recover(target)
        lock.seek(0)
        lock.truncate()
        lock.write(f"pid {os.getpid()} ({by + ', ' if by else ''}since "
                   f"{time.strftime('%Y-%m-%d %H:%M:%S')})")
        lock.flush()
        yield target
    finally:
        try:
            os.unlink(lock_path)  # still held: a writer that opened it will find it gone
        except FileNotFoundError:
            pass
        lock.close()


def _take_lock(lock_path: Path, target: Path, what: str):
    """The open lock file, flocked; never through a link planted at its name, and taken again
    when the file was removed between opening and locking it (its holder was finishing)."""
    import fcntl

    from .errors import ConfigError

    while True:
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        except OSError as exc:
            why = ": a link planted there is never followed" if lock_path.is_symlink() else ""
            raise ConfigError(f"{lock_path}: cannot open the lock of {target} "
                              f"({exc.strerror}{why})") from None
        lock = os.fdopen(fd, "r+")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            holder = lock.read().strip() or "another process"
            lock.close()
            raise ConfigError(f"{target} is being {what} by {holder}; wait for it to finish or "
                              "choose another output") from None
        try:
            now = os.lstat(lock_path)
        except FileNotFoundError:
            now = None
        held = os.fstat(fd)
        if now is not None and (now.st_ino, now.st_dev) == (held.st_ino, held.st_dev):
            return lock
        lock.close()


def _recover(target: Path) -> None:
    """What a killed writer of `target` left (atomic_dir's siblings), cleaned up by the next
    writer, which holds the lock so no one else is writing: an interrupted swap puts the
    previous output back, unfinished temporary folders go."""
    import shutil

    pattern = f".{target.name}.*"
    olds = sorted(target.parent.glob(pattern + ".old"), key=lambda p: p.stat().st_mtime)
    if olds and not target.exists():
        os.replace(olds[-1], target)  # killed between the two renames: the old one is whole
    for stale in target.parent.glob(pattern):
        if stale.suffix in (".tmp", ".old") and stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)


def overlaps(a, b) -> bool:
    """Whether two paths are the same folder or one lies inside the other."""
    a, b = Path(a).resolve(), Path(b).resolve()
    return a == b or a in b.parents or b in a.parents


# what each kind of output holds, to recognise one: (kind, files that all mark it)
OUTPUT_KINDS = (("store", ("store.json", "manifest.parquet")),
                ("model folder", ("config.json", "model.safetensors")),
                ("fine-tuning run", ("finetune.json",)),
                ("evaluation", ("results.json", "comparisons.json")))


def output_kind(folder) -> str | None:
    """The kind of output `folder` is (OUTPUT_KINDS), or None."""
    folder = Path(folder)
    for kind, markers in OUTPUT_KINDS:
        if all((folder / m).is_file() for m in markers):
            return kind
    return None


def check_output(out, inputs=(), flag: str = "--out") -> None:
    """The one rule for outputs: `out` may not be or lie inside any input, nor lie inside a
    store, a model, a run or an evaluation (it would break them: `predict --out
    store/manifest.parquet`), nor hold an input. Folders of the same kind as `out` are
    replaced whole by their writers (`check_replaceable`), so `out` itself may be one."""
    from .errors import ConfigError

    out = Path(out)
    target = out.resolve()
    for item in map(Path, inputs):
        if item.exists() and overlaps(target, item):
            raise ConfigError(f"{flag} {out} overlaps the input {item}: choose an output "
                              "outside the inputs")
    for parent in target.parents:
        kind = output_kind(parent)
        if kind is not None:
            raise ConfigError(f"{flag} {out} lies inside the {kind} {parent}: writing there "
                              "would break it; choose an output outside it")


def check_replaceable(out, kind: str, marker: str, ours: tuple, flag: str = "--out") -> None:
    """`out` is about to be replaced whole (atomic_dir): it must be new, empty, or an earlier
    output of this `kind` (it holds `marker`) holding nothing but what such an output holds
    (`ours`), so a store, a model or the user's own files beside it are never deleted."""
    from .errors import ConfigError

    out = Path(out)
    if out.is_file():
        raise ConfigError(f"{flag} {out} is a file, not a folder")
    if not out.is_dir():
        return
    entries = sorted(p.name for p in out.iterdir() if not p.name.startswith("."))
    if entries and marker not in entries:
        raise ConfigError(f"{flag} {out} exists and is not a {kind} (no {marker}); refusing to "
                          "replace it (choose an empty or new folder)")
    foreign = [name for name in entries if name not in ours]
    if foreign:
        raise ConfigError(f"{flag} {out} is a {kind} that also holds {', '.join(foreign[:5])}"
                          f"{' ...' if len(foreign) > 5 else ''}; writing it again would delete "
                          "them: move them out, or choose another folder")


def writable_folder(folder, what: str) -> Path:
    """`folder`, created if needed, once a file could be made in it; else a ConfigError saying
    `what` it is and why (read-only, a file in the way, no such device...), before any work
    rather than when the first result is written."""
    from .errors import ConfigError

    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        raise ConfigError(f"{what} {folder}: cannot write there ({exc.strerror or exc}"
                          + (f": {exc.filename}" if exc.filename and str(exc.filename) !=
                             str(folder) else "") + ")") from None
    return folder


def _write_fresh(dest, write) -> None:
    """`write(file)` into a fresh temporary file beside `dest`, through the descriptor that
    created it (never reopened by name, so a link planted there is never followed), then
    swapped in whole."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as out:
            write(out)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_bytes_atomic(dest, data: bytes) -> None:
    _write_fresh(dest, lambda out: out.write(data))


def write_stream_atomic(dest, write) -> None:
    """`write(file)` streams into a fresh temporary file beside `dest` (flushed to disk), which
    then takes `dest`'s place whole; a link planted at `dest` is replaced, never followed."""

    def synced(out):
        write(out)
        out.flush()
        os.fsync(out.fileno())

    _write_fresh(dest, synced)


def refuse_links(paths, what: str) -> None:
    """A ConfigError naming the first of `paths` that is a symbolic link (checked with lstat,
    never followed): outputs are never written through a link planted in them."""
    from .errors import ConfigError

    for path in map(Path, paths):
        if path.is_symlink():
            raise ConfigError(f"{path} is a symbolic link (to {os.readlink(path)}); {what} is "
                              "never written through a link: remove it, or choose another "
                              "output")


def link_or_copy(src, dest) -> None:
    """`src` (a regular file) at `dest` as a hard link, or a copy where links cannot be made
    (another file system)."""
    try:
        os.link(src, dest)
    except OSError:
        copy_file_atomic(src, dest)


def copy_file_atomic(src, dest) -> None:
    """`src` copied to `dest`, swapped in whole (as write_bytes_atomic, streamed)."""
    import shutil

    with open(src, "rb") as inp:
        _write_fresh(dest, lambda out: shutil.copyfileobj(inp, out, 1 << 22))


JSON_LIMIT = 64 << 20  # bytes: our JSON files (configs, sidecars, metrics) are kilobytes


def read_json(path, limit: int = JSON_LIMIT):
    """The JSON in `path`, bounded: a file over `limit` bytes, or nested deeper than the parser
    can follow, is a ValueError saying so (as malformed JSON is), never a RecursionError that
    ends a whole run or minutes spent parsing a huge file."""
    import json

    path = Path(path)
    size = path.stat().st_size
    if size > limit:
        raise ValueError(f"{size:,} bytes, more than the {limit:,} a JSON file here may hold")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except RecursionError:
        raise ValueError("nested deeper than the JSON parser can follow") from None


def find_repo_root(start=None) -> Path:
    """The nearest folder with pyproject.toml from `start` (default cwd) upward, else `start`:
    DVC stages, Prefect workers and tests started in sub-folders then share one store."""
    start = Path(start or os.getcwd()).resolve()
    for folder in (start, *start.parents):
        if (folder / "pyproject.toml").is_file():
            return folder
    return start


def sha256_file(path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def save_figure(fig, path, dpi: int = 110) -> Path:
    """A matplotlib figure laid out, written atomically as PNG, and closed."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi, format="png")
    plt.close(fig)
    return path
