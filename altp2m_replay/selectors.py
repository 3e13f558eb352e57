"""Resolve a parsed policy against a trace: selectors to gfn ranges, breakpoints, CR3 rules.

This module's one job is the second step of loading a policy (SPEC §9): ``load_policy``
leaves gfn selectors symbolic, and ``resolve_all`` turns each into ranges using what the
trace holds (``TraceFacts``: its highest gfn, metadata, and page counts when a selector
ranks pages), the domain's RAM and the breakpoints it resolves from symbols or addresses.
``needs_page_counts`` and ``needs_insn_stats`` say which trace passes a policy needs.
"""

from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass, field

import numpy as np

from altp2m_replay.errors import PolicyError
from altp2m_replay.policy import VGA_HOLE, Policy, Selector
from altp2m_replay.ranges import (
    first_n,
    gfns_to_ranges,
    merge_ranges,
    range_count,
    subtract,
)
from altp2m_replay.schema import GFN_LIMIT


@dataclass
class TraceFacts:
    """What selector resolution needs from a trace: max gfn, metadata, page counts."""

    max_gfn: int
    meta_ram: list[tuple[int, int]] | None = None
    gfn_sets: dict[str, list[tuple[int, int]]] = field(default_factory=dict)
    page_counts: dict[str, tuple[np.ndarray, np.ndarray]] | None = None
    # SPEC §2 metadata for breakpoint selectors and CR3 rules
    symbols: dict[str, int] = field(default_factory=dict)
    processes: dict[str, int] = field(default_factory=dict)
    # whether instructions have byte addresses (a gpa column, or gfn and ip), and, when a
    # policy's breakpoint selectors need them (needs_insn_stats), from a pass over the trace:
    # insn_starts = (byte addresses uint64 (n,) sorted, instructions starting there int64 (n,)),
    # ip_first = (ips uint64 (m,) sorted, byte address of the first instruction whose first
    # row is a fetch with that ip uint64 (m,))
    byte_addresses: bool = False
    insn_starts: tuple[np.ndarray, np.ndarray] | None = None
    ip_first: tuple[np.ndarray, np.ndarray] | None = None


def needs_page_counts(p: Policy) -> bool:
    sels = [op.gfns for op in p.setup] + [op.new for op in p.setup] + [r.gfns for r in p.rules]
    # a meta: set needs no counts unless ``top`` ranks its members by them
    return any(
        s is not None
        and s.set is not None
        and s.set != "breakpoints"
        and (not s.set.startswith("meta:") or s.top is not None)
        for s in sels
    )


def needs_insn_stats(p: Policy) -> bool:
    """Whether resolving the policy's breakpoints needs the trace's instruction statistics."""
    return any(
        a.ips or a.symbols or a.set for a in (p.breakpoints or ()) + (p.breakpoints_fallback or ())
    )


def resolve_breakpoints(p: Policy, facts: TraceFacts, warnings: list[str]) -> np.ndarray:
    """SPEC §4 ``[breakpoints] at`` against the trace: sorted unique byte addresses, int64 (n,)."""
    out: list[int] = []
    ip_first = facts.ip_first or (np.zeros(0, np.uint64), np.zeros(0, np.uint64))

    def first_address(ip: int) -> int | None:
        """The byte address of the first instruction fetched at ``ip``, None if never."""
        i = int(np.searchsorted(ip_first[0], np.uint64(ip)))
        return int(ip_first[1][i]) if i < len(ip_first[0]) and int(ip_first[0][i]) == ip else None

    selectors = p.breakpoints or ()
    if p.breakpoints_fallback is not None and not facts.symbols:
        warnings.append("[breakpoints]: the trace has no symbols; using the fallback addresses")
        selectors = p.breakpoints_fallback
    for sel in selectors:
        out.extend(sel.addresses)
        for ip in sel.ips:
            if (a := first_address(ip)) is None:
                warnings.append(
                    f"[breakpoints]: ip {ip:#x} is never executed by the trace; skipped"
                )
            else:
                out.append(a)
        for pattern in sel.symbols:
            names = sorted(n for n in facts.symbols if fnmatch.fnmatchcase(n, pattern))
            if not names:
                warnings.append(
                    f"[breakpoints]: symbol {pattern!r} matches nothing in the trace's symbols"
                )
            unexecuted = 0
            for n in names:
                if (a := first_address(facts.symbols[n] % (1 << 64))) is None:
                    unexecuted += 1
                else:
                    out.append(a)
            if unexecuted:
                warnings.append(
                    f"[breakpoints]: {unexecuted} of the {len(names)} symbols matching "
                    f"{pattern!r} are never executed by the trace; skipped"
                )
        if sel.set == "executed_ips":
            addrs, counts = facts.insn_starts or (np.zeros(0, np.uint64), np.zeros(0, np.int64))
            order = np.lexsort((addrs, -np.asarray(counts, dtype=np.int64)))
            if sel.top is not None:
                order = order[: sel.top]
            out.extend(int(a) for a in addrs[order])
    return np.unique(np.asarray(out, dtype=np.int64))


def _check_breakpoint_step(p: Policy, bps: np.ndarray, ranges: dict[int, np.ndarray]) -> None:
    """SPEC §6.4: refuse an [on_breakpoint] step into a view that maps, at a breakpoint's gfn,
    the frame holding it: the writer itself, or — where the writer had not remapped the gfn —
    any view that does not remap it either. The restarted fetch would trap again forever."""
    bp = p.on_breakpoint
    if bp is None or bp.action != "step" or not len(bps):
        return
    gfns = np.unique(bps >> 12)
    remapped: dict[int, set[int]] = {}
    writers: list[tuple[int, set[int]]] = []
    for op in p.setup:
        if op.op == "change_gfn" and op.new is not None:
            sel = ranges[id(op.gfns)]
            hit = {int(g) for g in gfns if any(a <= g <= b for a, b in sel)}
            remapped.setdefault(op.view, set()).update(hit)
        elif op.op == "write_breakpoints":
            writers.append((op.view, set(remapped.get(op.view, set()))))
    to_remaps = remapped.get(bp.to, set())
    for writer, w_remaps in writers:
        for g in gfns:
            g = int(g)
            if writer == bp.to or (g not in w_remaps and g not in to_remaps):
                raise PolicyError(
                    f"[on_breakpoint]: step to view {p.view_name(bp.to)!r} maps, at gfn {g:#x}, the frame "
                    f"write_breakpoints put an INT3 in: the restarted instruction would trap again at "
                    f"every restart (step into a view that shows the original frame)"
                )


def resolve_cr3_rules(
    p: Policy, facts: TraceFacts, warnings: list[str]
) -> list[tuple[tuple[int, ...], bool, int]]:
    """``[[on_cr3.switch]]`` rules as (CR3 values, matches any value, view to switch to)."""
    out = []
    for r in p.on_cr3.switch if p.on_cr3 else ():
        values = list(r.values)
        for name in r.processes:
            if name in facts.processes:
                values.append(int(facts.processes[name]))
            else:
                warnings.append(
                    f'{r.where}: the trace names no process {name!r}; "process:{name}" matches nothing'
                )
        out.append((tuple(values), r.other, r.to))
    return out


def ram_ranges(p: Policy, facts: TraceFacts) -> np.ndarray:
    """Guest RAM, SPEC §3: policy ``ram``, else trace metadata ``ram``, else aligned max gfn."""
    if p.domain.ram is not None:
        return merge_ranges(p.domain.ram)
    if facts.meta_ram:
        return merge_ranges(facts.meta_ram)
    # [0, 0x9f] and [0xc0, max gfn rounded up to a whole GiB]: the VGA hole stays MMIO
    size = 1 << 18
    last = int(math.ceil((facts.max_gfn + 1) / size) * size) - 1
    ranges = [(0, VGA_HOLE[0] - 1)]
    if last > VGA_HOLE[1]:
        ranges.append((VGA_HOLE[1] + 1, last))
    return np.asarray(ranges, dtype=np.int64)


@dataclass
class ResolvedSelectors:
    """Every selector of a policy as int64 (n, 2) ranges, keyed by ``id(selector)``, plus the
    breakpoint byte addresses (int64 (b,) sorted) and the CR3 rules resolved against the trace."""

    ranges: dict[int, np.ndarray]
    warnings: list[str]
    breakpoints: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    cr3_rules: list = field(default_factory=list)


def resolve_selector(
    sel: Selector,
    facts: TraceFacts,
    ram_top: int,
    warnings: list[str],
    where: str,
    breakpoints: np.ndarray | None = None,
) -> np.ndarray:
    """Turn one selector into sorted merged ranges (int64, shape (n, 2))."""
    if sel.above_ram is not None:
        a, b = sel.above_ram
        first, last = ram_top + 1 + a, ram_top + 1 + b
        if last >= GFN_LIMIT:
            raise PolicyError(f"{where}: above_ram reaches beyond gfn 2^36")
        return np.asarray([[first, last]], dtype=np.int64)
    if sel.set is None:
        return merge_ranges(sel.ranges)
    if sel.set == "breakpoints":
        return (
            gfns_to_ranges(np.unique(breakpoints >> 12))
            if breakpoints is not None
            else np.zeros((0, 2), np.int64)
        )
    if sel.set.startswith("meta:"):
        set_name = sel.set[5:]
        if set_name not in facts.gfn_sets:
            warnings.append(
                f'{where}: the trace has no gfn set "{set_name}" in its metadata; the selector is empty'
            )
            return np.zeros((0, 2), dtype=np.int64)
        ranges = merge_ranges(facts.gfn_sets[set_name])
        if sel.top is None:
            return ranges
        gfns, counts = (
            facts.page_counts["touched"]
            if facts.page_counts
            else (np.zeros(0, np.uint64), np.zeros(0, np.int64))
        )
        g = gfns.astype(np.int64)
        inside = np.zeros(len(g), dtype=bool)
        for a, b in ranges:
            inside |= (g >= a) & (g <= b)
        touched = _top(g[inside], counts[inside], sel.top)
        short = sel.top - range_count(touched)
        if short > 0:
            # every member counts, touched or not: untouched ones rank last, lowest gfn first
            touched = merge_ranges(
                list(map(tuple, touched))
                + list(map(tuple, first_n(subtract(ranges, g[inside]), short)))
            )
        return touched
    if facts.page_counts is None:
        raise PolicyError(f"{where}: selector {sel.text} needs the trace's page counts")
    gfns, counts = facts.page_counts[sel.set]
    g = gfns.astype(np.int64)
    if sel.top is None:
        return gfns_to_ranges(g)
    return _top(g, counts, sel.top)


def _top(gfns: np.ndarray, counts: np.ndarray, n: int) -> np.ndarray:
    # Most rows first, ties broken by the lower gfn (SPEC §9).
    order = np.lexsort((gfns, -counts))
    return gfns_to_ranges(gfns[order[:n]])


def resolve_all(p: Policy, facts: TraceFacts) -> tuple[np.ndarray, ResolvedSelectors]:
    """Resolve RAM, breakpoints, CR3 rules and every selector of ``p`` against ``facts``."""
    ram = ram_ranges(p, facts)
    ram_top = int(ram[:, 1].max()) if len(ram) else -1
    warnings: list[str] = []
    out: dict[int, np.ndarray] = {}
    try:
        if p.breakpoints is not None and not facts.byte_addresses:
            raise PolicyError(
                "[breakpoints] need a trace whose instructions have byte addresses "
                "(a gpa column, or gfn and ip); this trace has neither"
            )
        bps = resolve_breakpoints(p, facts, warnings)
        for op in p.setup:
            for sel, tag in ((op.gfns, "gfns"), (op.new, "new")):
                if sel is not None:
                    out[id(sel)] = resolve_selector(
                        sel, facts, ram_top, warnings, f"{op.where} {tag}", bps
                    )
        for r in p.rules:
            if r.gfns is not None:
                out[id(r.gfns)] = resolve_selector(
                    r.gfns, facts, ram_top, warnings, f"{r.where} gfns", bps
                )
        cr3 = resolve_cr3_rules(p, facts, warnings)
        _check_breakpoint_step(p, bps, out)
    except PolicyError as exc:
        raise PolicyError(f"{p.source}: {exc}") from None
    return ram, ResolvedSelectors(out, warnings, bps, cr3)


def page_counts_from_arrays(
    gfn: np.ndarray, access: np.ndarray
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Rows per gfn for the selector sets: gfn uint64 (n,), access uint8 (n,)."""
    out = {}
    for name, bit in (("read", 1), ("written", 2), ("executed", 4), ("touched", 7)):
        g, c = np.unique(gfn[(access & bit) != 0], return_counts=True)
        out[name] = (g.astype(np.uint64), c.astype(np.int64))
    return out


def facts_from_arrays(
    arrays: dict[str, np.ndarray],
    meta_ram=None,
    gfn_sets=None,
    symbols=None,
    processes=None,
    insn_stats: bool = False,
) -> TraceFacts:
    """TraceFacts for an in-memory trace (``gfn`` and ``access`` arrays; optional ``op``,
    ``vcpu``, ``insn``, ``ip``, ``gpa``). ``insn_stats`` walks the rows in Python: for the
    small traces of tests and examples."""
    gfn = np.asarray(arrays["gfn"], dtype=np.uint64)
    access = np.asarray(arrays["access"], dtype=np.uint8)
    op = arrays.get("op")
    op = np.zeros(len(gfn), np.uint8) if op is None else np.asarray(op, dtype=np.uint8)
    sized = gfn[(op == 0) | (op >= 3)]  # access rows and host drops / maps
    has_gpa = arrays.get("gpa") is not None
    byte_addresses = has_gpa or arrays.get("ip") is not None
    facts = TraceFacts(
        max_gfn=int(sized.max()) if len(sized) else 0,
        meta_ram=meta_ram,
        gfn_sets=dict(gfn_sets or {}),
        page_counts=page_counts_from_arrays(gfn, access),
        symbols=dict(symbols or {}),
        processes=dict(processes or {}),
        byte_addresses=byte_addresses,
    )
    if insn_stats and byte_addresses:
        facts.insn_starts, facts.ip_first = _insn_stats(arrays, gfn, access, op)
    return facts


def _insn_stats(
    arrays, gfn, access, op
) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """(insn_starts, ip_first) of TraceFacts, one row at a time (SPEC §2 instructions)."""
    n = len(gfn)
    vcpu = arrays.get("vcpu")
    insn = arrays.get("insn")
    ip = arrays.get("ip")
    gpa = arrays.get("gpa")
    current: dict[int, int] = {}
    starts: dict[int, int] = {}
    first_of_ip: dict[int, int] = {}
    for r in range(n):
        if op[r] >= 3:
            continue
        v = int(vcpu[r]) if vcpu is not None else 0
        ident = int(insn[r]) if insn is not None else -1 - r
        if current.get(v) == ident:
            continue
        current[v] = ident
        if op[r] != 0 or not access[r] & 4:
            continue  # the instruction starts with no fetch: no byte address
        addr = int(gpa[r]) if gpa is not None else (int(gfn[r]) << 12) | (int(ip[r]) & 0xFFF)
        starts[addr] = starts.get(addr, 0) + 1
        if ip is not None:
            first_of_ip.setdefault(int(ip[r]), addr)
    sa = sorted(starts)
    si = sorted(first_of_ip)
    return (
        (np.asarray(sa, dtype=np.uint64), np.asarray([starts[a] for a in sa], dtype=np.int64)),
        (
            np.asarray(si, dtype=np.uint64),
            np.asarray([first_of_ip[i] for i in si], dtype=np.uint64),
        ),
    )
