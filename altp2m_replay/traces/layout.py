"""What a trace file holds (SPEC §2): its columns, their dtypes and bounds, its metadata.

This module's one job is the trace format itself: the canonical Arrow type of every known
column, the values each may hold, how the writer encodes them, and the JSON metadata under
``META_KEY`` (``TraceMeta``, checked by ``parse_meta``). The reader, checker and writer
build on these definitions and define none of their own.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from altp2m_replay.errors import TraceError, first_line
from altp2m_replay.schema import GFN_LIMIT, GPA_LIMIT, VCPU_LIMIT

META_KEY = "altp2m_replay"
FORMAT_VERSION = 1
DEFAULT_ROW_GROUP = 1_048_576

#: Canonical type of every known column, in the order files are written.
TRACE_SCHEMA: dict[str, pa.DataType] = {
    "gpa": pa.uint64(),
    "gfn": pa.uint64(),
    "access": pa.uint8(),
    "vcpu": pa.uint16(),
    "insn": pa.uint64(),
    "gla": pa.uint64(),
    "ip": pa.uint64(),
    "tsc": pa.uint64(),
    "op": pa.uint8(),
    "arg": pa.uint64(),
}
_NP_DTYPE = {name: np.dtype(t.to_pandas_dtype()) for name, t in TRACE_SCHEMA.items()}

ACCESS_NAMES = {1: "r", 2: "w", 3: "rw", 4: "x", 5: "rx", 6: "wx", 7: "rwx"}
#: control rows (SPEC §2): op -> what ``trace info`` calls their count
OP_NAMES = {1: "guest vmfuncs", 2: "cr3 writes", 3: "host drops", 4: "host maps"}
INSN_ROW_LIMIT = 1024  # rows of one instruction

# Inclusive value bounds per column and how to say them in an error message.
_BOUNDS: dict[str, tuple[int, int, str]] = {
    "gpa": (0, GPA_LIMIT - 1, "a guest-physical address below 2^48"),
    "gfn": (0, GFN_LIMIT - 1, "a gfn below 2^36"),
    "access": (1, 7, "an access mask in 1..7 (1 = read, 2 = write, 4 = execute)"),
    "vcpu": (0, VCPU_LIMIT - 1, "a vCPU number in 0..4095"),
    "op": (
        0,
        4,
        (
            "an op in 0..4 (0 = access; control rows: 1 = guest VMFUNC, 2 = CR3 write, "
            "3 = host drop, 4 = host map)"
        ),
    ),
}
_U64_BOUNDS = (0, (1 << 64) - 1, "a non-negative integer below 2^64")

# Monotonic-ish columns (ip runs along straight-line code) compress and decode far better with delta encoding than with a
# dictionary that overflows; everything else gets a dictionary (few distinct values).
_DELTA_COLUMNS = ("insn", "tsc", "ip")
COMPRESSION = ("lz4", None)  # decoding is replay's bottleneck: lz4 over zstd's smaller files
_BATCH_FIELDS = ("gfn", "access", "vcpu", "insn", "tsc", "ip", "gla", "op", "arg", "gpa")
_MAX_GROUP_READ = 4 * DEFAULT_ROW_GROUP  # bigger row groups are read in slices


@dataclass(frozen=True)
class TraceMeta:
    """Parsed trace metadata (the JSON under ``META_KEY``); all fields optional in the file."""

    format: int = FORMAT_VERSION
    source: str | None = None
    vcpus: int | None = None
    ram: list[tuple[int, int]] | None = None
    gfn_sets: dict[str, list[tuple[int, int]]] = field(default_factory=dict)
    #: function name -> virtual address (breakpoint selectors)
    symbols: dict[str, int] = field(default_factory=dict)
    #: process name -> CR3 value (CR3 rules)
    processes: dict[str, int] = field(default_factory=dict)


def _named_u64(value, key: str, what: str) -> dict[str, int]:
    """Check a {"NAME": integer} object of metadata; raise ValueError naming ``key``."""
    if not isinstance(value, dict):
        raise ValueError(f'"{key}" must be an object of NAME: {what}, found {_short_json(value)}')
    out = {}
    for name, v in value.items():
        if not isinstance(name, str):
            raise ValueError(f'"{key}" names must be strings, found {_short_json(name)}')
        if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v < 1 << 64:
            raise ValueError(
                f'"{key}.{name}" must be {what}, an integer in 0..2^64-1, found {_short_json(v)}'
            )
        out[name] = v
    return out


def _short_json(value) -> str:
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        text = type(value).__name__
    return text if len(text) <= 60 else text[:57] + "..."


def _ranges(value, where: str) -> list[tuple[int, int]]:
    """Check a list of [first, last] gfn pairs; raise ValueError naming ``where``."""
    if not isinstance(value, list):
        raise ValueError(f"{where} must be a list of [first_gfn, last_gfn] pairs")
    out = []
    for item in value:
        ok = (
            isinstance(item, list | tuple)
            and len(item) == 2
            and all(isinstance(x, int) and not isinstance(x, bool) for x in item)
            and 0 <= item[0] <= item[1] < GFN_LIMIT
        )
        if not ok:
            raise ValueError(
                f"{where} must hold [first_gfn, last_gfn] pairs with "
                f"0 <= first <= last < 2^36, found {json.dumps(item)}"
            )
        out.append((int(item[0]), int(item[1])))
    return out


def parse_meta(obj) -> TraceMeta:
    """Build a TraceMeta from decoded JSON; raise ValueError describing the first problem."""
    if not isinstance(obj, dict):
        raise ValueError("must be a JSON object")
    fmt = obj.get("format", FORMAT_VERSION)
    if not isinstance(fmt, int) or isinstance(fmt, bool) or fmt != FORMAT_VERSION:
        raise ValueError(f'"format" must be {FORMAT_VERSION}, found {json.dumps(fmt)}')
    source = obj.get("source")
    if source is not None and not isinstance(source, str):
        raise ValueError(f'"source" must be a string, found {json.dumps(source)}')
    vcpus = obj.get("vcpus")
    if vcpus is not None and (
        not isinstance(vcpus, int) or isinstance(vcpus, bool) or not 1 <= vcpus <= VCPU_LIMIT
    ):
        raise ValueError(
            f'"vcpus" must be an integer in 1..{VCPU_LIMIT}, found {json.dumps(vcpus)}'
        )
    ram = obj.get("ram")
    ram = None if ram is None else _ranges(ram, '"ram"')
    sets = obj.get("gfn_sets", {})
    if not isinstance(sets, dict):
        raise ValueError('"gfn_sets" must be an object of NAME: [[first, last], ...]')
    gfn_sets = {str(k): _ranges(v, f'"gfn_sets.{k}"') for k, v in sets.items()}
    symbols = _named_u64(obj.get("symbols", {}), "symbols", "a virtual address")
    processes = _named_u64(obj.get("processes", {}), "processes", "a CR3 value")
    return TraceMeta(
        format=fmt,
        source=source,
        vcpus=vcpus,
        ram=ram,
        gfn_sets=gfn_sets,
        symbols=symbols,
        processes=processes,
    )


def _read_meta(path, kv: dict | None) -> TraceMeta:
    raw = (kv or {}).get(META_KEY.encode())
    if raw is None:
        return TraceMeta()
    try:
        return parse_meta(json.loads(raw))
    except (ValueError, UnicodeDecodeError) as exc:
        # json.JSONDecodeError is a ValueError too.
        raise TraceError(f'{path}: metadata key "{META_KEY}": {first_line(exc)}') from None
    except RecursionError:
        raise TraceError(
            f'{path}: metadata key "{META_KEY}": arrays or objects nested too deeply'
        ) from None
