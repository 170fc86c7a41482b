"""A small on-disk cache of decoded arrays (video frames), keyed by file, its mtime and the parameters.

The cache folder is the one given, else `$MDPD_CACHE`; with neither the cache is off (nothing is
ever written to a home folder behind the user's back). Entries are `.npz` files written atomically,
so a crash or two workers writing the same entry never leave a half-written file behind. With
several processes only the main one (and its loader workers) writes entries; every process reads them.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from mdpd_vl import dist
from mdpd_vl.atomic import write_bytes

ENV = "MDPD_CACHE"


def cache_root(given: str | Path | None = None) -> Path | None:
    """The cache folder: `given`, else `$MDPD_CACHE`, else None (no cache)."""
    root = given if given is not None else os.environ.get(ENV)
    return Path(root).expanduser() if root else None


class ArrayCache:
    """Arrays derived from a file, stored under `<root>/<namespace>/<2 hex>/<key>.npz`."""

    def __init__(self, root: str | Path | None = None, namespace: str = "frames"):
        base = cache_root(root)
        self.dir = base / namespace if base is not None else None
        self.hits = 0
        self.misses = 0

    @property
    def enabled(self) -> bool:
        return self.dir is not None

    def key(self, path: str | Path, params: Mapping[str, Any]) -> str:
        """Content-free key: resolved path, size and mtime (a changed file gets a new key), params."""
        p = Path(path).resolve()
        st = p.stat()
        blob = json.dumps([str(p), st.st_size, st.st_mtime_ns, dict(params)], sort_keys=True, default=str)
        return hashlib.sha1(blob.encode()).hexdigest()

    def _file(self, key: str) -> Path:
        assert self.dir is not None
        return self.dir / key[:2] / f"{key}.npz"

    def get(self, path: str | Path, params: Mapping[str, Any]) -> dict[str, np.ndarray] | None:
        """The stored arrays, or None on a miss (or when disabled, or the entry is unreadable)."""
        if self.dir is None:
            return None
        f = self._file(self.key(path, params))
        try:
            with np.load(f, allow_pickle=False) as data:
                out = {k: data[k] for k in data.files}
        except (OSError, ValueError, EOFError):  # absent or damaged entry: recompute
            self.misses += 1
            return None
        self.hits += 1
        return out

    def put(self, path: str | Path, params: Mapping[str, Any], arrays: Mapping[str, np.ndarray]) -> None:
        """Store `arrays` for (path, params); a no-op when the cache is off or on a process that is
        not the main one (one writer of shared state)."""
        if self.dir is None or not dist.is_main():
            return
        f = self._file(self.key(path, params))
        f.parent.mkdir(parents=True, exist_ok=True)
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        write_bytes(f, buf.getvalue())  # atomic; a full disk is one line naming the entry
