"""Files written so that a reader (Triton's repository poller, a viewer, a resumed run) never sees half of one."""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def replaced_atomically(path: str | Path) -> Iterator[Path]:
    """Yields a temporary path beside `path` (same folder, so the rename is atomic on POSIX) to write to; renames
    it over `path` when the block succeeds, and removes it when the block raises."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_atomically(path: str | Path, data: bytes | str) -> None:
    """`path` holds `data` (str: UTF-8) in full, or keeps what it held."""
    with replaced_atomically(path) as tmp:
        tmp.write_bytes(data.encode() if isinstance(data, str) else data)
