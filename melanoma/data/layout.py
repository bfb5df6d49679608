"""Finding a dataset's anchor file or folder below the root a user gives (downloads nest)."""

from __future__ import annotations

import os
from pathlib import Path


def _find(root: Path, name: str, max_depth: int, want_dir: bool) -> Path | None:
    """Breadth first: the shallowest entry called ``name`` (case-insensitive, hidden ones
    skipped) at or below ``root``, a folder when ``want_dir`` else a file."""
    wanted = name.lower()
    level = [root]
    for _ in range(max_depth + 1):
        nxt = []
        for folder in level:
            try:
                entries = sorted(os.scandir(folder), key=lambda e: e.name)
            except OSError:
                continue
            for e in entries:
                if e.name.startswith("."):
                    continue
                is_dir = e.is_dir()
                if is_dir == want_dir and e.name.lower() == wanted:
                    return Path(e.path)
                if is_dir:
                    nxt.append(Path(e.path))
        level = nxt
    return None


def find_file(root: Path, name: str, max_depth: int = 3) -> Path | None:
    """Shallowest file called ``name`` (case-insensitive) at or below ``root``."""
    return _find(root, name, max_depth, want_dir=False)


def require_root(root: Path, dataset: str, expected: str, download: str) -> None:
    """Refuse a dataset root that does not exist, saying what the download looks like."""
    if not root.is_dir():
        raise FileNotFoundError(
            f"{dataset}: dataset root {root} does not exist. Expected the {expected}; get it from "
            f"{download} and set dataset.root to where it is."
        )


def require_file(root: Path, name: str, dataset: str, download: str, max_depth: int = 3) -> Path:
    """``find_file`` that fails with a message naming the file and where it comes from."""
    found = find_file(root, name, max_depth)
    if found is None:
        raise FileNotFoundError(
            f"{dataset}: {name} not found under {root} (searched {max_depth} levels); it comes "
            f"with the download from {download}."
        )
    return found


def subdirs(folder: Path) -> dict[str, Path]:
    """Visible subfolders keyed by lower-cased name."""
    with os.scandir(folder) as it:
        return {e.name.lower(): Path(e.path) for e in sorted(it, key=lambda e: e.name)
                if e.is_dir() and not e.name.startswith(".")}


def find_dir(root: Path, name: str, max_depth: int = 3) -> Path | None:
    """Shallowest folder called ``name`` (case-insensitive) at or below ``root``."""
    return _find(root, name, max_depth, want_dir=True)


def match_listed_images(dataset: str, ids, index: dict, listing: Path, where, advice: str):
    """The path of every image id a label file lists (``index``: id -> path); a clear error
    counting and naming the listed images that are not on disk."""
    import pandas as pd

    ids = pd.Series(ids)
    paths = ids.map(index)
    absent = ids[paths.isna()]
    if len(absent):
        raise FileNotFoundError(
            f"{dataset}: {len(absent)} of {len(ids)} images listed in {listing} are missing from {where}, "
            f"e.g. {', '.join(sorted(absent)[:5])}. {advice}"
        )
    return paths
