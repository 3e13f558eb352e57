"""Page counts (``validate(page_counts=True)``: what ``set = "executed"`` and the other
page-count selectors read) against counts derived with numpy from the whole trace."""

import numpy as np
import pytest

from altp2m_replay.traces import validate, write_trace


def _expected(gfn, access, op):
    keep = op == 0  # control rows touch no page
    g, a = gfn[keep], access[keep]
    uniq, inv = np.unique(g, return_inverse=True)
    out = {}
    for key, bits in (("touched", None), ("read", 1), ("written", 2), ("executed", 4)):
        w = None if bits is None else ((a & bits) != 0).astype(np.int64)
        c = np.bincount(inv, weights=w, minlength=len(uniq)).astype(np.int64)
        out[key] = (uniq[c > 0], c[c > 0])
    return out


@pytest.mark.parametrize(
    ("rows", "pages", "batch"),
    [
        (1, 1, 1),  # one row
        (5_000, 3, 1_000),  # few pages, many rows each
        (60_000, 40_000, 25_000),  # more distinct pages per batch than the first table holds
        (30_000, 1 << 36, 30_000),  # pages spread over the whole gfn range
    ],
)
def test_page_counts_match_numpy(tmp_path, rows, pages, batch):
    rng = np.random.default_rng(rows)
    gfn = rng.integers(0, pages, rows, dtype=np.uint64)
    access = rng.integers(1, 8, rows, dtype=np.uint8)
    op = np.where(rng.random(rows) < 0.05, 3, 0).astype(np.uint8)  # some host-drop rows
    access[op != 0] = 0
    vcpu = np.zeros(rows, np.uint16)
    insn = np.arange(rows, dtype=np.uint64)
    arg = np.zeros(rows, np.uint64)
    path = tmp_path / "t.parquet"
    write_trace(
        {"gfn": gfn, "access": access, "vcpu": vcpu, "insn": insn, "op": op, "arg": arg},
        path,
        row_group_size=batch,
    )
    st = validate(path, page_counts=True)
    want = _expected(gfn, access, op)
    for key in ("touched", "read", "written", "executed"):
        got_keys, got_counts = st.page_counts[key]
        np.testing.assert_array_equal(got_keys, want[key][0], err_msg=key)
        np.testing.assert_array_equal(got_counts, want[key][1], err_msg=key)
    assert st.distinct_gfns == len(want["touched"][0])
