"""One read of an input file: its content hash and its (decompressed) bytes from the same pass.

`SourceFile` opens a recording once. Every raw byte read from disk goes through sha256 in
order, whoever reads it (the gzip reader's thread or the caller); the decompressed content
(gzip when the name ends in .gz) is read from byte 0, and the first bytes a parser peeks at
(`peek`) are kept, so the parser and the data reader see one stream. `finish` hashes whatever
the readers left unread (a gzip trailer, bytes after the last volume) and returns the hex
digest: the same as `brainlm.fileio.sha256_file` of the file.

The parcellation cache is keyed on that hash, which is known only once the file has been
read. So a run must decide before reading whether a recording is probably cached (then it only
hashes the file, to check) or probably not (then it parcellates while hashing, one read).
`remembered_hash` / `remember_hash` keep, beside the cache, the hash last computed for a path
with the file's size, mtime and inode then: a prediction only, always checked against the
content (as DVC and git use stat data to avoid rehashing, but never trusted here).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from pathlib import Path

_BLOCK = 1 << 22


class _HashingReader(io.RawIOBase):
    """A raw file whose every byte read updates `digest` (sequential reads only)."""

    def __init__(self, raw, digest):
        self._raw, self.digest = raw, digest

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        n = self._raw.readinto(b)
        if n:
            self.digest.update(memoryview(b)[:n])
        return n or 0


class SourceFile:
    """An input file opened once: hashed as read, its decompressed content replayable from 0.

    Raises OSError when it cannot be opened. Use as a context manager (closes the file and the
    gzip reader's thread)."""

    def __init__(self, path):
        self.path = Path(path)
        self._file = open(self.path, "rb")
        self.stat = os.fstat(self._file.fileno())  # before reading: what remember_hash keeps
        self._raw = _HashingReader(self._file, hashlib.sha256())
        self._stream = None  # the decompressed reader, opened on the first read
        self._head = bytearray()  # decompressed bytes peeked at, replayed to the reader
        self._pos = 0  # the reader's position in the decompressed content
        self._hex: str | None = None

    # ------------------------------------------------------------------ decompressed side

    def _decompressed(self):
        if self._stream is None:
            if self.path.name.endswith(".gz"):
                from isal import igzip_threaded

                self._stream = igzip_threaded.open(self._raw, "rb", threads=1)
            else:
                self._stream = self._raw
        return self._stream

    def _read_more(self, n: int) -> bytes:
        """Up to n bytes from the decompressed stream (fewer only at its end)."""
        out = bytearray(n)
        view, got = memoryview(out), 0
        while got < n:
            k = self._decompressed().readinto(view[got:])
            if not k:
                break
            got += k
        del view
        return bytes(out[:got])

    def peek(self, n: int) -> bytes:
        """The first n bytes of the content (fewer if it is shorter), without consuming them."""
        if self._pos > len(self._head):
            raise ValueError("peek after the reader went past the peeked bytes")
        if len(self._head) < n:
            self._head += self._read_more(n - len(self._head))
        return bytes(self._head[:n])

    def readinto(self, b) -> int:
        """Read the content from where the reader is: the peeked bytes first, then the stream."""
        view = memoryview(b).cast("B")
        if self._pos < len(self._head):
            n = min(len(view), len(self._head) - self._pos)
            view[:n] = self._head[self._pos:self._pos + n]
        else:
            n = self._decompressed().readinto(view) or 0
        self._pos += n
        return n

    def read_all(self) -> bytes:
        """The whole content from where the reader is to its end."""
        rest = self._head[self._pos:] if self._pos < len(self._head) else b""
        chunks = [bytes(rest)]
        self._pos = max(self._pos, len(self._head))
        while block := self._read_more(_BLOCK):
            chunks.append(block)
            self._pos += len(block)
        return b"".join(chunks)

    # ------------------------------------------------------------------ raw side

    def finish(self) -> str:
        """Hash the bytes nobody read and return the file's sha256 (hex)."""
        if self._hex is None:
            if self._stream is not None and self._stream is not self._raw:
                self._stream.close()  # stops the gzip thread; what it read is hashed
            buf = bytearray(_BLOCK)
            while self._raw.readinto(buf):
                pass
            self._hex = self._raw.digest.hexdigest()
        return self._hex

    def close(self) -> None:
        if self._stream is not None and self._stream is not self._raw:
            self._stream.close()
        self._file.close()

    def __enter__(self) -> "SourceFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def hash_file(path) -> tuple[str, os.stat_result]:
    """(sha256 hex, stat before reading) of a file read once; OSError when it cannot be read."""
    with SourceFile(path) as source:
        return source.finish(), source.stat


# --------------------------------------------------------------------------- stat memo


def _memo_path(cache_dir, path) -> Path:
    name = hashlib.sha256(str(Path(path).resolve()).encode()).hexdigest()
    return Path(cache_dir) / "sources" / name[:2] / f"{name}.json"


def _fingerprint(path, st: os.stat_result) -> dict:
    return {"path": str(Path(path).resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns,
            "ino": st.st_ino}


def remembered_hash(cache_dir, path) -> str | None:
    """The hash last computed for `path` if its size, mtime and inode are unchanged, else None.
    A prediction: callers check it against the content before relying on it."""
    try:
        memo = json.loads(_memo_path(cache_dir, path).read_text())
        if memo.get("file") == _fingerprint(path, os.stat(path)):
            return str(memo["sha256"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        pass
    return None


def remember_hash(cache_dir, path, st: os.stat_result, sha256: str) -> None:
    """Keep `sha256` as the content of `path` as it was when stat `st` was taken."""
    from ..fileio import write_bytes_atomic

    memo = {"file": _fingerprint(path, st), "sha256": sha256}
    target = _memo_path(cache_dir, path)
    try:
        if json.loads(target.read_text()) == memo:
            return
    except (OSError, ValueError):
        pass
    try:
        write_bytes_atomic(target, json.dumps(memo, sort_keys=True).encode())
    except OSError:
        pass  # a read-only cache only loses the prediction
