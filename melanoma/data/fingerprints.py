"""Content fingerprints: know an image again under another name, size, crop or orientation.

Dermoscopy datasets contain each other under new names (ISIC 2019 holds all of HAM10000,
DermMel's melanomas are renamed augmented copies), so a file name cannot say whether a model has
seen an image. Each image gets:

- an id: its ``ISIC_xxxxxxx`` stem where it has one (``melanoma.data.overlap.image_id``), else
  its file stem (shown, never matched: ``1.jpg`` in two datasets is no evidence);
- a perceptual hash (imagehash's DCT hash, ``HASH_SIZE`` x ``HASH_SIZE`` bits) of each of the
  8 flips/rotations of the image. Row 0 is the image as it is (what a checkpoint stores, a few
  bytes per image); a copy matches when the smallest Hamming distance between one of its 8 rows
  and a stored row 0 is at most ``MATCH_DISTANCE``. The hash is taken on a small grey version of
  the image, so renaming, re-encoding, resizing and brightness changes barely move it.

``MATCH_DISTANCE`` was chosen on the real HAM10000 images (``experiments/fingerprint_threshold.py``,
recorded in ``experiments/results/fingerprint_threshold.md``): the largest distance at which
distinct lesions are at most rarely matched, and what share of augmented copies that finds.

Fingerprints are cached per dataset root (``fingerprint_files``), keyed by relative path, size
and modification time, so a second run reads them back instead of decoding every image.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

__all__ = ["HASH_SIZE", "HASH_BYTES", "MATCH_DISTANCE", "Matches", "cache_dir", "fingerprint_files",
           "fingerprint_image", "match", "near_duplicate_clusters", "near_duplicate_pairs", "connected_labels"]

#: DCT hash side: HASH_SIZE**2 bits per image (imagehash.phash's hash_size)
HASH_SIZE = 12
HASH_BYTES = (HASH_SIZE * HASH_SIZE + 7) // 8
#: the largest Hamming distance (of HASH_SIZE**2 bits) at which two images are the same image;
#: measured in experiments/results/fingerprint_threshold.md
MATCH_DISTANCE = 16
#: the grey thumbnail the hash is taken from (imagehash's 4x oversampling of the DCT side)
_THUMB = HASH_SIZE * 4
#: bump when the fingerprint of an image changes meaning (a cache of another version is ignored)
FINGERPRINT_VERSION = 1
CACHE_ENV = "MELANOMA_CACHE_DIR"


def _dihedral(a: np.ndarray) -> list[np.ndarray]:
    """The 8 flips/rotations of a 2-D array; the first is the array itself."""
    flipped = np.fliplr(a)
    return [np.rot90(a, k) for k in range(4)] + [np.rot90(flipped, k) for k in range(4)]


def fingerprint_image(image) -> np.ndarray:
    """(8, HASH_BYTES) uint8: the packed DCT hash of the image and of its 7 other flips/rotations.

    ``image``: a path or a PIL image. JPEGs are decoded at reduced scale (the hash only needs a
    ~50 px grey thumbnail), EXIF orientation is ignored on purpose: a rotated copy matches anyway.
    """
    import imagehash
    from PIL import Image

    im = Image.open(image) if isinstance(image, (str, os.PathLike)) else image
    im.draft("L", (2 * _THUMB, 2 * _THUMB))  # JPEG: decode at 1/2..1/8 scale, a no-op otherwise
    grey = np.asarray(im.convert("L").resize((_THUMB, _THUMB), Image.Resampling.LANCZOS))
    rows = [imagehash.phash(Image.fromarray(np.ascontiguousarray(v)), hash_size=HASH_SIZE).hash.reshape(-1)
            for v in _dihedral(grey)]
    return np.packbits(np.stack(rows), axis=1)


def cache_dir() -> Path:
    """Where fingerprint caches live: $MELANOMA_CACHE_DIR, else ~/.cache/melanoma (XDG)."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "melanoma"


def _cache_file(root: Path) -> Path:
    key = hashlib.sha1(str(root.resolve()).encode()).hexdigest()[:16]
    return cache_dir() / "fingerprints" / f"{key}-v{FINGERPRINT_VERSION}-{HASH_SIZE}.npz"


def _stat(path: str) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_size, st.st_mtime_ns


def fingerprint_files(paths: Sequence[str | os.PathLike], root: str | os.PathLike | None = None,
                      progress: bool = False, desc: str = "fingerprints",
                      unreadable: list | None = None) -> np.ndarray:
    """(N, 8, HASH_BYTES) fingerprints of image files, read from and added to the cache of
    ``root`` (the dataset folder; default: the files' common folder). A file whose size or
    modification time changed is hashed again. An unreadable file raises with its path, or, when
    a list ``unreadable`` is given, is appended to it (its row stays zero: match nothing with it)."""
    paths = [os.fspath(p) for p in paths]
    out = np.zeros((len(paths), 8, HASH_BYTES), dtype=np.uint8)
    if not paths:
        return out
    root = Path(root if root is not None else os.path.commonpath([os.path.abspath(p) for p in paths]))
    if root.is_file():
        root = root.parent
    cache_file = _cache_file(root)
    cached: dict[str, tuple[int, int, np.ndarray]] = {}
    if cache_file.is_file():
        try:
            with np.load(cache_file) as z:
                cached = {r: (int(s), int(m), h) for r, s, m, h in zip(z["rel"], z["size"], z["mtime"], z["hashes"])}
        except (OSError, ValueError, KeyError) as e:  # a torn or foreign file: rebuild it
            log.warning("ignoring an unreadable fingerprint cache %s (%s)", cache_file, e)
    rels = [os.path.relpath(os.path.abspath(p), root) for p in paths]
    todo = []
    for i, (p, rel) in enumerate(zip(paths, rels)):
        hit = cached.get(rel)
        try:
            fresh = hit is not None and hit[:2] == _stat(p)
        except OSError:
            fresh = False  # missing: fingerprint_image below names it
        if fresh:
            out[i] = hit[2]
        else:
            todo.append(i)
    if todo:
        from tqdm.auto import tqdm

        for i in tqdm(todo, desc=desc, unit="img", disable=not progress or len(todo) < 50, leave=False):
            try:
                out[i] = fingerprint_image(paths[i])
            except Exception as e:  # noqa: BLE001 - any decoder error, named with the file
                if unreadable is None:
                    raise OSError(f"cannot fingerprint {paths[i]}: {type(e).__name__}: {e}") from e
                unreadable.append(paths[i])
                continue
            size, mtime = _stat(paths[i])
            cached[rels[i]] = (size, mtime, out[i])
        if cached:
            _write_cache(cache_file, cached)
    return out


def _write_cache(cache_file: Path, cached: dict) -> None:
    try:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        rel = np.array(list(cached), dtype=str)
        vals = list(cached.values())
        tmp = cache_file.with_name(f".{cache_file.name}.tmp-{os.getpid()}.npz")
        np.savez(tmp, rel=rel, size=np.array([v[0] for v in vals], np.int64),
                 mtime=np.array([v[1] for v in vals], np.int64),
                 hashes=np.stack([v[2] for v in vals]).astype(np.uint8))
        os.replace(tmp, cache_file)  # atomic: DDP ranks and parallel runs never read half a file
    except OSError as e:  # a read-only home: fingerprints still work, only slower next time
        log.warning("could not write the fingerprint cache %s (%s); set %s to a writable folder",
                    cache_file, e, CACHE_ENV)


# --- matching -----------------------------------------------------------------------------------

def _words(packed: np.ndarray) -> np.ndarray:
    """Packed bytes (..., HASH_BYTES) as uint64 words (..., W), zero-padded: fast popcounts."""
    pad = (-packed.shape[-1]) % 8
    if pad:
        packed = np.concatenate([packed, np.zeros(packed.shape[:-1] + (pad,), np.uint8)], axis=-1)
    return np.ascontiguousarray(packed).view(np.uint64)


@dataclass(frozen=True)
class Matches:
    """For each query, its nearest stored image and the distance (min over the query's 8
    flips/rotations); ``matched`` where that distance is within the threshold."""

    nearest: np.ndarray  # (N,) index into the references, -1 when there are none
    distance: np.ndarray  # (N,) Hamming distance to it
    matched: np.ndarray  # (N,) bool


def distances(queries: np.ndarray, references: np.ndarray, chunk: int = 512):
    """Yield (start, (n, M) distances) over query chunks: the smallest Hamming distance between
    any of a query's 8 rows and each reference's row 0. ``queries`` (N, 8, B) as from
    ``fingerprint_files``; ``references`` (M, B) stored rows (or (M, 8, B): row 0 is used)."""
    refs = references[:, 0] if references.ndim == 3 else references
    r = _words(np.asarray(refs, np.uint8))  # (M, W)
    for start in range(0, len(queries), chunk):
        q = _words(np.asarray(queries[start:start + chunk], np.uint8))  # (n, 8, W)
        best = None
        for v in range(q.shape[1]):
            d = np.bitwise_count(q[:, v, None, :] ^ r[None, :, :]).sum(-1, dtype=np.int32)
            best = d if best is None else np.minimum(best, d)
        yield start, best


def match(queries: np.ndarray, references: np.ndarray, max_distance: int = MATCH_DISTANCE) -> Matches:
    """Each query's nearest reference by content (see ``distances``)."""
    n = len(queries)
    nearest, dist = np.full(n, -1, np.int64), np.full(n, np.iinfo(np.int32).max, np.int64)
    if n and len(references):
        for start, d in distances(queries, references):
            nearest[start:start + len(d)] = d.argmin(1)
            dist[start:start + len(d)] = d.min(1)
    return Matches(nearest, dist, (nearest >= 0) & (dist <= max_distance))


def near_duplicate_pairs(fingerprints: np.ndarray, max_distance: int = MATCH_DISTANCE) -> np.ndarray:
    """(K, 3) int array of (i, j, distance), i < j, for every pair of images within one set that
    match by content. The distance of a pair is the smaller of its two directions (each image's
    8 rows against the other's row 0), so the result does not depend on the order of the set."""
    best: dict[tuple[int, int], int] = {}
    for start, d in distances(fingerprints, fingerprints):
        for i, j in zip(*np.nonzero(d <= max_distance)):
            a, b = start + int(i), int(j)
            if a != b:
                key = (min(a, b), max(a, b))
                best[key] = min(best.get(key, 10**9), int(d[i, j]))
    if not best:
        return np.zeros((0, 3), np.int64)
    return np.array(sorted((i, j, dist) for (i, j), dist in best.items()), dtype=np.int64)


def connected_labels(n: int, edges) -> np.ndarray:
    """(n,) label per node of an undirected graph: nodes linked by a chain of edges share the
    smallest index among them."""
    parent = np.arange(n)

    def find(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, j in edges:
        a, b = find(int(i)), find(int(j))
        if a != b:
            parent[max(a, b)] = min(a, b)
    return np.array([find(i) for i in range(n)], dtype=np.int64)


def near_duplicate_clusters(fingerprints: np.ndarray, max_distance: int = MATCH_DISTANCE) -> np.ndarray:
    """(N,) cluster label per image: images linked by a chain of matches share a label (the
    smallest index of the cluster), every other image is its own cluster."""
    return connected_labels(len(fingerprints), near_duplicate_pairs(fingerprints, max_distance)[:, :2])
