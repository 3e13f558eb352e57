"""Sets of gfns as sorted, merged, inclusive ``[first, last]`` ranges: int64 arrays (n, 2).

This module's one job is the range algebra every other module uses on gfn sets: building
ranges from lists or from gfns, merging, intersecting, subtracting, counting, expanding
and walking them in chunks. It knows nothing of policies or traces.
"""

from __future__ import annotations

import numpy as np


def merge_ranges(ranges) -> np.ndarray:
    """Sort and merge ``[first, last]`` pairs into an int64 array of shape (n, 2)."""
    arr = np.asarray(sorted((int(a), int(b)) for a, b in ranges), dtype=np.int64).reshape(-1, 2)
    if len(arr) <= 1:
        return arr
    out = [list(arr[0])]
    for a, b in arr[1:]:
        if a <= out[-1][1] + 1:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return np.asarray(out, dtype=np.int64)


def gfns_to_ranges(gfns: np.ndarray) -> np.ndarray:
    """Sorted unique gfns (any int dtype) -> merged ranges, int64 (n, 2)."""
    g = np.unique(np.asarray(gfns, dtype=np.int64))
    if len(g) == 0:
        return np.zeros((0, 2), dtype=np.int64)
    breaks = np.flatnonzero(np.diff(g) != 1)
    starts = np.concatenate(([g[0]], g[breaks + 1]))
    ends = np.concatenate((g[breaks], [g[-1]]))
    return np.stack([starts, ends], axis=1)


def subtract(ranges: np.ndarray, gfns: np.ndarray) -> np.ndarray:
    """int64 (n, 2) sorted merged ``ranges`` less the gfns in ``gfns`` (int64 (m,), inside
    them), as sorted ranges."""
    out = []
    cut = np.sort(gfns)
    for a, b in ranges:
        a, b = int(a), int(b)
        for g in cut[(cut >= a) & (cut <= b)]:
            if g > a:
                out.append((a, int(g) - 1))
            a = int(g) + 1
        if a <= b:
            out.append((a, b))
    return np.asarray(out, dtype=np.int64).reshape(-1, 2)


def first_n(ranges: np.ndarray, n: int) -> np.ndarray:
    """The first ``n`` gfns of sorted ``ranges``, as ranges."""
    out = []
    for a, b in ranges:
        if n <= 0:
            break
        take = min(n, int(b) - int(a) + 1)
        out.append((int(a), int(a) + take - 1))
        n -= take
    return np.asarray(out, dtype=np.int64).reshape(-1, 2)


def expand(ranges: np.ndarray) -> np.ndarray:
    """int64 (n, 2) ranges -> every gfn, int64 (m,)."""
    if len(ranges) == 0:
        return np.zeros(0, dtype=np.int64)
    return np.concatenate([np.arange(a, b + 1, dtype=np.int64) for a, b in ranges])


def range_count(ranges: np.ndarray) -> int:
    """Number of gfns in int64 (n, 2) inclusive ranges."""
    return int((ranges[:, 1] - ranges[:, 0] + 1).sum()) if len(ranges) else 0


def intersect_ranges(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Intersection of two sorted, merged range sets, int64 (n, 2)."""
    out, i, j = [], 0, 0
    while i < len(a) and j < len(b):
        lo, hi = max(a[i, 0], b[j, 0]), min(a[i, 1], b[j, 1])
        if lo <= hi:
            out.append((lo, hi))
        if a[i, 1] < b[j, 1]:
            i += 1
        else:
            j += 1
    return np.asarray(out, dtype=np.int64).reshape(-1, 2)


def first_outside(a: np.ndarray, b: np.ndarray) -> int | None:
    """The lowest gfn of ranges ``a`` not inside ranges ``b`` (both sorted, merged), or None."""
    for lo, hi in a:
        g = int(lo)
        for blo, bhi in b:
            if bhi < g:
                continue
            if blo > g:
                break
            g = int(bhi) + 1
        if g <= hi:
            return g
    return None


def iter_gfn_chunks(ranges: np.ndarray, chunk: int = 1 << 20):
    """Every gfn of int64 (n, 2) ranges, as int64 arrays of at most ``chunk`` gfns."""
    for a, b in ranges:
        for lo in range(int(a), int(b) + 1, chunk):
            yield np.arange(lo, min(int(b), lo + chunk - 1) + 1, dtype=np.int64)
