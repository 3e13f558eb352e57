"""The pure-Python reference (tests/reference.py) against the Numba engine.

The property tests feed both engines random policies and traces (tests/strategies.py) and
want identical counters, or the same error class. The hand-derived scenarios of
``test_scenarios.py`` pin both engines, the reference included, to counters worked out from
the SPEC, so the two cannot agree on a mistake shared by both without one of those failing.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from reference import reference_simulate
from strategies import Case, cases

from altp2m_replay.engine.simulate import _check_c_order
from altp2m_replay.errors import ReplayError
from altp2m_replay.policy import parse_policy


def examples(n: int) -> int:
    """``n`` Hypothesis examples, or fewer under `make test-fast` (HYPOTHESIS_MAX_EXAMPLES)."""
    cap = int(os.environ.get("HYPOTHESIS_MAX_EXAMPLES", 0))
    return min(n, cap) if cap else n


SLOW_OK = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much]


# --------------------------------------------------------------------------- helpers
def normalise(result) -> dict:
    """The four counter tables of either engine as plain ints (the engine's may be numpy)."""
    get = result.get if isinstance(result, dict) else lambda key: getattr(result, key)
    return {
        "total": {k: int(v) for k, v in get("total").items()},
        "vcpus": {int(v): {k: int(x) for k, x in c.items()} for v, c in get("vcpus").items()},
        "views": {int(v): {k: int(x) for k, x in c.items()} for v, c in get("views").items()},
        "gfns": {
            (int(key[0]), int(key[1])): {k: int(x) for k, x in c.items()}
            for key, c in get("gfns").items()
        },
    }


def outcome(fn) -> dict | type:
    """The normalised result, or the class of the ReplayError raised."""
    try:
        return normalise(fn())
    except ReplayError as exc:
        return type(exc)


def differences(ref, eng) -> list[str]:
    """Readable list of what differs between two outcomes."""
    if isinstance(ref, type) or isinstance(eng, type):
        return [f"reference: {ref!r}, engine: {eng!r}"] if ref != eng else []
    out = []
    for table in ("total", "vcpus", "views", "gfns"):
        a, b = ref[table], eng[table]
        if table == "total":
            a, b = {None: a}, {None: b}
        for key in sorted(set(a) | set(b), key=repr):
            if key not in a or key not in b:
                out.append(
                    f"{table}[{key}]: only in {'reference' if key in a else 'engine'}: {a.get(key, b.get(key))}"
                )
                continue
            out.extend(
                f"{table}[{key}].{name}: reference {a[key].get(name)}, engine {b[key].get(name)}"
                for name in sorted(set(a[key]) | set(b[key]))
                if a[key].get(name) != b[key].get(name)
            )
    return out


def compare(case, batch_rows=None) -> None:
    from altp2m_replay.engine import simulate_arrays  # lands with the Numba engine

    ref = outcome(lambda: reference_simulate(case.policy, case.arrays, gfn_sets=case.gfn_sets))
    eng = outcome(
        lambda: simulate_arrays(
            case.policy, case.arrays, meta_ram=None, gfn_sets=case.gfn_sets, batch_rows=batch_rows
        )
    )
    diff = differences(ref, eng)
    assert not diff, "\n".join(
        [case.toml, repr(case.arrays), f"batch_rows={batch_rows}", *diff[:40]]
    )


# --------------------------------------------------------------------------- examples
def test_a_rule_over_an_empty_gfn_set_reaches_execute():
    """A rule whose gfn set is empty leaves the kernel an empty range table, and numpy gives
    an empty concatenation strides (0, 0): execute, which rebuilds its arrays from address and
    shape, must still accept it (found by the property test below)."""
    text = """name = "empty-set"
description = "a rule over an empty metadata set"
[domain]
monitor = false
[[view]]
name = "v1"
default_access = "n"
[[setup]]
op = "switch_p2m"
view = "v1"
[[on_violation]]
view = "v1"
gfns = { set = "meta:hot" }
action = "emulate"
[[on_violation]]
action = "emulate"
"""
    arrays = {
        "gfn": np.array([1, 2, 1], dtype=np.uint64),
        "access": np.array([1, 2, 4], dtype=np.uint8),
        "vcpu": np.zeros(3, dtype=np.uint16),
    }
    compare(Case(text, parse_policy(text, "test"), arrays, gfn_sets={"hot": []}))


def test_the_kernel_is_given_c_ordered_arrays_only():
    """execute rebuilds its arrays from address and shape alone, so the driver refuses a
    strided array; an empty one passes whatever its strides."""

    empty = np.concatenate([np.zeros((0, 2), dtype=np.int64)])
    assert empty.strides == (0, 0)
    _check_c_order((empty, np.zeros((3, 2), dtype=np.int64), 5, True))
    with pytest.raises(AssertionError, match="C-contiguous"):
        _check_c_order((np.zeros((3, 4), dtype=np.int64)[:, ::2],))


# --------------------------------------------------------------------------- properties
@settings(max_examples=examples(300), deadline=None, suppress_health_check=SLOW_OK)
@given(case=cases())
def test_kernel_matches_reference(case):
    compare(case)


@settings(max_examples=examples(150), deadline=None, suppress_health_check=SLOW_OK)
@given(case=cases(), batch_rows=st.sampled_from([1, 7, 4096]) | st.integers(1, 250))
def test_kernel_batch_size_does_not_matter(case, batch_rows):
    compare(case, batch_rows)


@settings(max_examples=examples(150), deadline=None, suppress_health_check=SLOW_OK)
@given(case=cases(), extra=st.integers(1, 6), cache_bytes=st.integers(0, 400))
def test_kernel_with_tiny_buffers_matches_reference(case, extra, cache_bytes):
    """An event log drained every few exits, and a fast-path cache that covers only the
    lowest gfns (or none), give the same counters."""
    from unittest import mock

    from altp2m_replay.engine import _kernels, simulate

    with (
        mock.patch.object(simulate, "LOG_ROWS", _kernels.LOG_SLACK + extra),
        mock.patch.object(simulate, "PMAP_BYTES", cache_bytes),
    ):
        compare(case)
