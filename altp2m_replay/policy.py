"""Policy files (SPEC §9): TOML in, a validated ``Policy`` out.

This module's one job is the policy model and its parsing. Loading happens in two steps.
``load_policy`` parses and checks everything that does not depend on a trace and returns
a ``Policy`` whose gfn selectors are still symbolic. ``selectors.resolve_all`` then turns
every selector into sorted, merged ``[first, last]`` ranges using
the trace's statistics (``{ set = ..., top = N }``) and the domain's RAM. One addition to
SPEC §9: ``{ above_ram = [a, b] }`` selects gfns ``ram_top + 1 + a .. ram_top + 1 + b``, where
DRAKVUF-style policies put shadow and sink pages with ``add_ram``.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from altp2m_replay.errors import PolicyError, did_you_mean, shown
from altp2m_replay.schema import GFN_LIMIT, GPA_LIMIT, VCPU_LIMIT

# p2m_access_t values, in Xen's order (xen/include/xen/mem_access.h).
ACCESS_CODES = {
    "n": 0,
    "r": 1,
    "w": 2,
    "rw": 3,
    "x": 4,
    "rx": 5,
    "wx": 6,
    "rwx": 7,
    "rx2rw": 8,
    "n2rwx": 9,
}
ACCESS_NAMES = {v: k for k, v in ACCESS_CODES.items()}
# Which of r(1)/w(2)/x(4) each access permits; rx2rw permits rx (a write converts it), n2rwx
# nothing (any access converts it). The kernel's table by code, and policy checks, use this.
ACCESS_PERMITS = {name: code for name, code in ACCESS_CODES.items() if code < 8} | {
    "rx2rw": 5,
    "n2rwx": 0,
}
PERMITS = np.array([ACCESS_PERMITS[ACCESS_NAMES[c]] for c in range(len(ACCESS_CODES))], np.int64)
KIND_CODES = {"r": 0, "w": 1, "x": 2}
# Actions, as small integers for the kernel.
RESPONSE_CODES = {"step": 0, "emulate": 1, "switch": 2, "set-access": 3}
VE_CODES = {"vmfunc-step": 0, "vmfunc-switch": 1, "emulate": 2}
SETUP_OPS = (
    "set_mem_access",
    "change_gfn",
    "set_suppress_ve",
    "set_visibility",
    "add_ram",
    "switch_p2m",
    "enable_notify",
)

TOP_KEYS = (
    "name",
    "description",
    "domain",
    "view",
    "breakpoints",
    "setup",
    "on_violation",
    "on_ve",
    "on_breakpoint",
    "on_cr3",
    "costs",
)
BREAKPOINT_KEYS = ("at", "fallback")
ON_BREAKPOINT_KEYS = ("action", "to", "fast")
ON_CR3_KEYS = ("sync", "onchangeonly", "switch")
CR3_SWITCH_KEYS = ("cr3", "to")
ADDRESS_SETS = ("executed_ips",)
DOMAIN_KEYS = (
    "altp2m",
    "nr_altp2m",
    "origin",
    "host_order",
    "host_access",
    "exec_sp",
    "monitor",
    "access_required",
    "xen",
    "ram",
)
ORIGINS = ("create", "restore")
# Legacy VGA hole of every HVM guest (emulated MMIO), left out of the fallback RAM (SPEC §3).
VGA_HOLE = (0xA0, 0xBF)
VIEW_KEYS = ("name", "index", "default_access", "visible")
SETUP_KEYS = {
    "set_mem_access": ("view", "gfns", "access"),
    "change_gfn": ("view", "old", "new"),
    "set_suppress_ve": ("view", "gfns", "suppress"),
    "set_visibility": ("view", "visible"),
    "add_ram": ("gfns",),
    "write_breakpoints": ("view",),
    "switch_p2m": ("view",),
    "enable_notify": ("vcpus",),
}
RULE_KEYS = ("view", "kind", "gfns", "action", "to", "fast", "access")
VE_KEYS = ("action", "to")
SELECTOR_SETS = ("executed", "written", "read", "touched", "breakpoints")


# --------------------------------------------------------------------------- model
@dataclass(frozen=True)
class Domain:
    """``[domain]`` settings, SPEC §3."""

    altp2m: bool = True
    nr_altp2m: int = 10
    origin: str = "create"
    host_order: int = 18  # resolved from ``origin`` and ``xen`` unless the policy sets it
    host_access: str = "rwx"
    exec_sp: bool = True
    monitor: bool = True
    access_required: bool = True
    xen: tuple[int, int] = (4, 22)
    ram: tuple[tuple[int, int], ...] | None = None


@dataclass(frozen=True)
class View:
    name: str
    index: int
    default_access: str
    visible: bool


@dataclass(frozen=True)
class Selector:
    """A gfn selector as written: static ``ranges``, a trace set, or ``above_ram`` offsets."""

    ranges: tuple[tuple[int, int], ...] = ()
    set: str | None = None
    top: int | None = None
    above_ram: tuple[int, int] | None = None
    text: str = ""


@dataclass(frozen=True)
class SetupOp:
    op: str
    where: str  # "setup[3]" for messages
    view: int | None = None
    gfns: Selector | None = None  # set_mem_access, set_suppress_ve, add_ram; `old` of change_gfn
    new: Selector | None = None  # change_gfn target; None means "invalid"
    access: str | None = None
    suppress: bool | None = None
    visible: bool | None = None
    vcpus: tuple[int, ...] | None = None  # None means "all"


@dataclass(frozen=True)
class Rule:
    where: str
    action: str
    view: int | None = None
    kinds: tuple[str, ...] | None = None
    gfns: Selector | None = None
    to: int = 0
    fast: bool = False
    access: str = "rwx"


@dataclass(frozen=True)
class OnVE:
    action: str
    to: int = 0


@dataclass(frozen=True)
class AddressSelector:
    """One item of ``[breakpoints] at`` (SPEC §4): byte addresses, ips, symbols or a ranked set."""

    addresses: tuple[int, ...] = ()
    ips: tuple[int, ...] = ()
    symbols: tuple[str, ...] = ()
    set: str | None = None
    top: int | None = None


@dataclass(frozen=True)
class OnBreakpoint:
    action: str  # "step" or "emulate"
    to: int = 0
    fast: bool = False


@dataclass(frozen=True)
class Cr3Rule:
    where: str
    values: tuple[int, ...]  # CR3 values
    processes: tuple[str, ...]  # "process:NAME" names, resolved against the trace
    other: bool  # "other": any value
    to: int


@dataclass(frozen=True)
class OnCr3:
    sync: bool = True
    onchangeonly: bool = True
    switch: tuple[Cr3Rule, ...] = ()


@dataclass(frozen=True)
class Policy:
    name: str
    description: str
    source: str
    domain: Domain
    views: tuple[View, ...]  # declared views (view 0 is implicit)
    setup: tuple[SetupOp, ...]
    rules: tuple[Rule, ...]
    on_ve: OnVE | None
    costs: dict[str, Any] = field(default_factory=dict)
    text: str = ""
    breakpoints: tuple[AddressSelector, ...] | None = None
    on_breakpoint: OnBreakpoint | None = None
    # [breakpoints] fallback: what `at` becomes on a trace without `symbols` metadata
    breakpoints_fallback: tuple[AddressSelector, ...] | None = None
    on_cr3: OnCr3 | None = None

    def view_name(self, index: int) -> str:
        for v in self.views:
            if v.index == index:
                return v.name
        return "0" if index == 0 else str(index)


# --------------------------------------------------------------------------- parsing
def _fail(where: str, msg: str) -> PolicyError:
    return PolicyError(f"{where}: {msg}")


def _check_keys(table: dict, allowed, where: str) -> None:
    for key in table:
        if key not in allowed:
            raise _fail(where, f'unknown key "{key}"{did_you_mean(key, allowed)}')


def _gfn(value, where: str) -> int:
    if isinstance(value, bool):
        raise _fail(where, f"expected a gfn (integer or hex string), found {value!r}")
    if isinstance(value, int):
        g = value
    elif isinstance(value, str):
        try:
            g = int(value, 0)
        except ValueError:
            raise _fail(
                where, f'expected a gfn (integer or hex string like "0x1f000"), found "{value}"'
            ) from None
    else:
        raise _fail(where, f"expected a gfn (integer or hex string), found {value!r}")
    if not 0 <= g < GFN_LIMIT:
        raise _fail(where, f"gfn {g:#x} out of range (0 .. 2^36-1)")
    return g


def _is_gfn(value) -> bool:
    return isinstance(value, (int, str)) and not isinstance(value, bool)


def parse_selector(value, where: str) -> Selector:
    """Parse a SPEC §9 gfn selector (plus ``{ above_ram = [a, b] }``)."""
    text = repr(value)
    if isinstance(value, dict):
        _check_keys(value, ("set", "top", "above_ram"), where)
        if "above_ram" in value:
            if len(value) != 1:
                raise _fail(where, "above_ram cannot be combined with set/top")
            pair = value["above_ram"]
            if not (
                isinstance(pair, list)
                and len(pair) == 2
                and all(isinstance(p, int) and not isinstance(p, bool) and p >= 0 for p in pair)
                and pair[0] <= pair[1]
            ):
                raise _fail(
                    where,
                    f"above_ram must be [first_offset, last_offset] with 0 <= first <= last, found {pair!r}",
                )
            return Selector(above_ram=(pair[0], pair[1]), text=text)
        if "set" not in value:
            raise _fail(where, 'a selector table needs "set"')
        name = value["set"]
        if not isinstance(name, str) or not (name in SELECTOR_SETS or name.startswith("meta:")):
            raise _fail(
                where,
                f'set must be one of {", ".join(SELECTOR_SETS)} or "meta:NAME", found {name!r}{did_you_mean(name, SELECTOR_SETS)}',
            )
        top = value.get("top")
        if top is not None and (not isinstance(top, int) or isinstance(top, bool) or top < 1):
            raise _fail(where, f"top must be a positive integer, found {top!r}")
        return Selector(set=name, top=top, text=text)
    if _is_gfn(value):
        g = _gfn(value, where)
        return Selector(ranges=((g, g),), text=text)
    if isinstance(value, list):
        if len(value) == 2 and all(_is_gfn(v) for v in value):
            a, b = _gfn(value[0], where), _gfn(value[1], where)
            if a > b:
                raise _fail(where, f"range [{a:#x}, {b:#x}] is empty (first > last)")
            return Selector(ranges=((a, b),), text=text)
        ranges = []
        for item in value:
            if isinstance(item, list):
                if not (len(item) == 2 and all(_is_gfn(v) for v in item)):
                    raise _fail(where, f"a range must be [first, last], found {item!r}")
                a, b = _gfn(item[0], where), _gfn(item[1], where)
                if a > b:
                    raise _fail(where, f"range [{a:#x}, {b:#x}] is empty (first > last)")
                ranges.append((a, b))
            elif _is_gfn(item):
                g = _gfn(item, where)
                ranges.append((g, g))
            else:
                raise _fail(where, f"expected a gfn or [first, last], found {item!r}")
        return Selector(ranges=tuple(ranges), text=text)
    raise _fail(where, f"expected a gfn selector, found {value!r}")


def _access(value, where: str, allow_special: bool = True) -> str:
    if not isinstance(value, str) or value not in ACCESS_CODES:
        raise _fail(where, f"unknown access {value!r}{did_you_mean(value, ACCESS_CODES)}")
    if value in ("w", "wx"):
        raise _fail(
            where,
            f'access "{value}" is write-without-read: an EPT misconfiguration that crashes the domain (Xen refuses it)',
        )
    if not allow_special and value in ("rx2rw", "n2rwx"):
        raise _fail(where, f'access "{value}" is not allowed here')
    return value


def _bool(table: dict, key: str, default: bool, where: str) -> bool:
    v = table.get(key, default)
    if not isinstance(v, bool):
        raise _fail(where, f'"{key}" must be true or false, found {v!r}')
    return v


def _int(table: dict, key: str, default: int, where: str, lo: int, hi: int) -> int:
    v = table.get(key, default)
    if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
        raise _fail(where, f'"{key}" must be an integer in {lo}..{hi}, found {v!r}')
    return v


def _parse_domain(t: dict) -> Domain:
    where = "[domain]"
    if not isinstance(t, dict):
        raise _fail(where, "must be a table")
    _check_keys(t, DOMAIN_KEYS, where)
    xen_s = t.get("xen", "4.22")
    try:
        major, minor = (int(p) for p in str(xen_s).split(".")[:2])
    except ValueError:
        raise _fail(where, f'"xen" must be a version like "4.22", found {shown(xen_s)}') from None
    xen = (major, minor)
    if xen < (4, 6):
        raise _fail(where, f'"xen" {xen_s} predates altp2m (4.6)')
    max_views = 512 if xen >= (4, 21) else 10
    nr = t.get("nr_altp2m", 10)
    if not isinstance(nr, int) or isinstance(nr, bool) or not 1 <= nr <= max_views:
        raise _fail(where, f'"nr_altp2m" must be in 1..{max_views} for xen {xen_s}, found {nr!r}')
    origin = t.get("origin", "create")
    if origin not in ORIGINS:
        raise _fail(
            where,
            f'"origin" must be "create" or "restore", found {origin!r}'
            f"{did_you_mean(origin, ORIGINS) if isinstance(origin, str) else ''}",
        )
    host_order = t.get("host_order", default_host_order(origin, xen))
    if type(host_order) is not int or host_order not in (0, 9, 18):
        raise _fail(where, f'"host_order" must be 0, 9 or 18, found {host_order!r}')
    ram = None
    if "ram" in t:
        sel = parse_selector(t["ram"], where + " ram")
        if sel.set or sel.above_ram:
            raise _fail(where, '"ram" must be a list of [first_gfn, last_gfn]')
        ram = sel.ranges
    return Domain(
        altp2m=_bool(t, "altp2m", True, where),
        nr_altp2m=nr,
        origin=origin,
        host_order=host_order,
        host_access=_access(t.get("host_access", "rwx"), where + " host_access"),
        exec_sp=_bool(t, "exec_sp", True, where),
        monitor=_bool(t, "monitor", True, where),
        access_required=_bool(t, "access_required", True, where),
        xen=xen,
        ram=ram,
    )


def default_host_order(origin: str, xen: tuple[int, int]) -> int:
    """SPEC §3: the toolstack gives a new guest 1 GiB pages where they fit; a restored one
    (snapshot, migration) 4 KiB pages before xen 4.21 and 2 MiB pages from 4.21."""
    if origin == "create":
        return 18
    return 9 if xen >= (4, 21) else 0


def _view_ref(value, names: dict[str, int], where: str) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        if value == 0:
            return 0
        for idx in names.values():
            if idx == value:
                return idx
        raise _fail(where, f"view {value} is not declared")
    if isinstance(value, str):
        if value in ("host", "view0", "0"):
            return 0
        if value in names:
            return names[value]
        raise _fail(where, f'unknown view "{value}"{did_you_mean(value, [*list(names), "host"])}')
    raise _fail(where, f"expected a view name or index, found {value!r}")


# Bounds that keep reading a hostile file fast (tomllib is quadratic in dotted-key parts).
MAX_POLICY_BYTES = 16 << 20
MAX_KEY_PARTS = 100
_PART = r"""(?:[A-Za-z0-9_-]+|"[^"\n]*"|'[^'\n]*')"""
# where a key or a table name starts: a line's start (after "[" or "[["), or in an inline table
_LONG_KEY = re.compile(
    r"(?:^|[{,])[ \t]*\[{0,2}[ \t]*"
    + _PART
    + r"(?:[ \t]*\.[ \t]*"
    + _PART
    + f"){{{MAX_KEY_PARTS}}}",
    re.MULTILINE,
)


def parse_policy(text: str, source: str) -> Policy:
    """Parse and check policy TOML ``text``; ``source`` names it in messages."""
    if len(text) > MAX_POLICY_BYTES:
        raise PolicyError(
            f"{source}: {len(text):,} characters; policy files are limited to {MAX_POLICY_BYTES:,}"
        )
    long_key = _LONG_KEY.search(text)
    if long_key is not None:
        line = text.count("\n", 0, long_key.start()) + 1
        raise PolicyError(
            f"{source}: line {line}: a dotted key or table name with more than "
            f"{MAX_KEY_PARTS} parts"
        )
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise PolicyError(f"{source}: broken TOML: {exc}") from None
    except RecursionError:
        raise PolicyError(f"{source}: arrays or tables nested too deeply") from None
    try:
        return _build(doc, text, source)
    except PolicyError as exc:
        raise PolicyError(f"{source}: {exc}") from None
    except RecursionError:  # repr() of a value nested hundreds deep, in a message
        raise PolicyError(f"{source}: a value nested too deeply") from None


def _one_of(value, choices) -> bool:
    """``value`` is a string among ``choices`` (a list or table from TOML is not)."""
    return isinstance(value, str) and value in choices


def _build(doc: dict, text: str, source: str) -> Policy:
    _check_keys(doc, TOP_KEYS, "policy")
    name = doc.get("name")
    if not isinstance(name, str) or not name:
        raise _fail("policy", 'needs a "name" string')
    description = doc.get("description", "")
    if not isinstance(description, str):
        raise _fail("policy", f'"description" must be a string, found {type(description).__name__}')
    domain = _parse_domain(doc.get("domain", {}))

    raw_views = doc.get("view", [])
    if not isinstance(raw_views, list):
        raise _fail("[[view]]", "must be an array of tables")
    if raw_views and not domain.altp2m:
        raise _fail("[[view]]", "views need altp2m; this policy sets [domain] altp2m = false")
    taken = {0}
    explicit: dict[int, int] = {}
    for i, v in enumerate(raw_views):
        where = f"view[{i}]"
        if not isinstance(v, dict):
            raise _fail(where, "must be a table")
        _check_keys(v, VIEW_KEYS, where)
        if "index" in v:
            idx = _int(v, "index", 0, where, 1, 511)
            if idx in explicit.values():
                raise _fail(where, f"index {idx} is already taken by another view")
            explicit[i] = idx
            taken.add(idx)
    views: list[View] = []
    names: dict[str, int] = {}
    next_free = 1
    for i, v in enumerate(raw_views):
        where = f"view[{i}]"
        vname = v.get("name")
        if not isinstance(vname, str) or not vname or vname in ("host", "view0", "0"):
            raise _fail(where, 'needs a "name" (not "host", "view0" or "0")')
        if vname in names:
            raise _fail(where, f'view name "{vname}" is used twice')
        if i in explicit:
            idx = explicit[i]
        else:
            while next_free in taken:
                next_free += 1
            idx = next_free
            taken.add(idx)
        if idx >= domain.nr_altp2m:
            raise _fail(
                where,
                f"view index {idx} is not below nr_altp2m = {domain.nr_altp2m}: Xen has no free slot for it",
            )
        access = _access(v.get("default_access", domain.host_access), where + " default_access")
        views.append(View(vname, idx, access, _bool(v, "visible", True, where)))
        names[vname] = idx

    setup = tuple(_parse_setup(doc.get("setup", []), names, domain))
    rules = tuple(_parse_rules(doc.get("on_violation", []), names, domain))
    on_ve = _parse_on_ve(doc.get("on_ve"), names, domain)
    costs = doc.get("costs", {})
    if not isinstance(costs, dict):
        raise _fail("[costs]", "must be a table")
    from altp2m_replay.costs import check_cost_table

    check_cost_table(costs, "[costs]")
    breakpoints = _parse_breakpoints(doc.get("breakpoints"))
    fallback = (
        _parse_breakpoints(doc["breakpoints"], "fallback")
        if breakpoints and "fallback" in doc["breakpoints"]
        else None
    )
    on_breakpoint = _parse_on_breakpoint(doc.get("on_breakpoint"), names, domain)
    on_cr3 = _parse_on_cr3(doc.get("on_cr3"), names, domain)
    policy = Policy(
        name,
        description,
        source,
        domain,
        tuple(views),
        setup,
        rules,
        on_ve,
        dict(costs),
        text,
        breakpoints=breakpoints,
        on_breakpoint=on_breakpoint,
        on_cr3=on_cr3,
        breakpoints_fallback=fallback,
    )
    _check_semantics(policy)
    return policy


def _parse_setup(raw, names: dict[str, int], domain: Domain) -> list[SetupOp]:
    if not isinstance(raw, list):
        raise _fail("[[setup]]", "must be an array of tables")
    ops = []
    for i, t in enumerate(raw):
        where = f"setup[{i}]"
        if not isinstance(t, dict):
            raise _fail(where, "must be a table")
        op = t.get("op")
        if not _one_of(op, SETUP_KEYS):
            raise _fail(where, f"unknown op {shown(op)}{did_you_mean(op, SETUP_OPS)}")
        where = f"setup[{i}] ({op})"
        _check_keys(t, ("op",) + SETUP_KEYS[op], where)
        for key in SETUP_KEYS[op]:
            if key not in t and not (op == "enable_notify" and key == "vcpus"):
                raise _fail(where, f'missing "{key}"')
        if not domain.altp2m and op not in ("set_mem_access", "add_ram"):
            raise _fail(where, f"{op} needs altp2m; this policy sets [domain] altp2m = false")
        view = _view_ref(t["view"], names, where) if "view" in t else None
        if op == "set_mem_access":
            ops.append(
                SetupOp(
                    op,
                    where,
                    view=view,
                    gfns=parse_selector(t["gfns"], where + " gfns"),
                    access=_access(t["access"], where + " access"),
                )
            )
        elif op == "change_gfn":
            new = t["new"]
            new_sel = None if new == "invalid" else parse_selector(new, where + " new")
            ops.append(
                SetupOp(
                    op, where, view=view, gfns=parse_selector(t["old"], where + " old"), new=new_sel
                )
            )
        elif op == "set_suppress_ve":
            ops.append(
                SetupOp(
                    op,
                    where,
                    view=view,
                    gfns=parse_selector(t["gfns"], where + " gfns"),
                    suppress=_bool(t, "suppress", True, where),
                )
            )
        elif op == "set_visibility":
            ops.append(SetupOp(op, where, view=view, visible=_bool(t, "visible", True, where)))
        elif op == "add_ram":
            ops.append(SetupOp(op, where, gfns=parse_selector(t["gfns"], where + " gfns")))
        elif op in ("switch_p2m", "write_breakpoints"):
            ops.append(SetupOp(op, where, view=view))
        elif op == "enable_notify":
            vc = t.get("vcpus", "all")
            if vc == "all":
                vcpus = None
            elif isinstance(vc, list) and all(
                isinstance(x, int) and not isinstance(x, bool) and 0 <= x < VCPU_LIMIT for x in vc
            ):
                vcpus = tuple(sorted(set(vc)))
            else:
                raise _fail(
                    where,
                    f'"vcpus" must be "all" or a list of vCPU numbers (0..4095), found {vc!r}',
                )
            ops.append(SetupOp(op, where, vcpus=vcpus))
    return ops


def _parse_rules(raw, names: dict[str, int], domain: Domain) -> list[Rule]:
    if not isinstance(raw, list):
        raise _fail("[[on_violation]]", "must be an array of tables")
    rules = []
    for i, t in enumerate(raw):
        where = f"on_violation[{i}]"
        if not isinstance(t, dict):
            raise _fail(where, "must be a table")
        _check_keys(t, RULE_KEYS, where)
        action = t.get("action")
        if not _one_of(action, RESPONSE_CODES):
            raise _fail(
                where, f"unknown action {shown(action)}{did_you_mean(action, RESPONSE_CODES)}"
            )
        if not domain.altp2m and action in ("step", "switch"):
            raise _fail(
                where,
                f'action "{action}" switches views, which needs altp2m; with altp2m = false only emulate and set-access exist',
            )
        view = _view_ref(t["view"], names, where) if "view" in t else None
        kinds = None
        if "kind" in t:
            k = t["kind"]
            ks = [k] if isinstance(k, str) else k
            if not isinstance(ks, list) or not ks or any(not _one_of(x, KIND_CODES) for x in ks):
                raise _fail(
                    where, f'"kind" must be "r", "w", "x" or a list of them, found {shown(k)}'
                )
            kinds = tuple(sorted(set(ks)))
        gfns = parse_selector(t["gfns"], where + " gfns") if "gfns" in t else None
        extra = {
            "step": ("to", "fast"),
            "switch": ("to",),
            "set-access": ("access",),
            "emulate": (),
        }[action]
        for key in ("to", "fast", "access"):
            if key in t and key not in extra:
                raise _fail(where, f'"{key}" does not apply to action "{action}"')
        if action == "switch" and "to" not in t:
            raise _fail(where, 'action "switch" needs "to"')
        to = _view_ref(t["to"], names, where + " to") if "to" in t else 0
        if action in ("step", "switch") and view is not None and to == view:
            raise _fail(
                where,
                f'"to" is the view the rule filters on ({t.get("to", 0)!r}): the access would fault again in the same view',
            )
        fast = _bool(t, "fast", False, where)
        if fast and domain.xen < (4, 14):
            raise _fail(where, "fast single-step needs xen >= 4.14")
        access = (
            _access(t.get("access", "rwx"), where + " access") if action == "set-access" else "rwx"
        )
        rules.append(Rule(where, action, view, kinds, gfns, to, fast, access))
    return rules


def _parse_on_ve(raw, names: dict[str, int], domain: Domain) -> OnVE | None:
    if raw is None:
        return None
    where = "[on_ve]"
    if not isinstance(raw, dict):
        raise _fail(where, "must be a table")
    if not domain.altp2m:
        raise _fail(where, "#VE needs altp2m; this policy sets [domain] altp2m = false")
    _check_keys(raw, VE_KEYS, where)
    action = raw.get("action")
    if not _one_of(action, VE_CODES):
        raise _fail(where, f"unknown action {shown(action)}{did_you_mean(action, VE_CODES)}")
    if action == "emulate":
        if "to" in raw:
            raise _fail(where, '"to" does not apply to action "emulate"')
        return OnVE(action)
    if "to" not in raw:
        raise _fail(where, f'action "{action}" needs "to"')
    return OnVE(action, _view_ref(raw["to"], names, where + " to"))


def _address(value, where: str) -> int:
    """A byte address (guest physical): an integer or a hex string, below 2^48."""
    if isinstance(value, str):
        try:
            value = int(value, 16) if value.lower().startswith("0x") else int(value)
        except ValueError:
            raise _fail(
                where, f"expected an address (integer or hex string), found {value!r}"
            ) from None
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < GPA_LIMIT:
        raise _fail(where, f"expected an address below 2^48, found {value!r}")
    return value


def _parse_breakpoints(raw, key: str = "at") -> tuple[AddressSelector, ...] | None:
    """``[breakpoints] at`` (SPEC §4), or its ``fallback`` (same forms)."""
    if raw is None:
        return None
    where = "[breakpoints]"
    if not isinstance(raw, dict):
        raise _fail(where, "must be a table")
    _check_keys(raw, BREAKPOINT_KEYS, where)
    if "at" not in raw:
        raise _fail(where, 'missing "at"')
    at = raw[key]
    items = at if isinstance(at, list) else [at]
    out = []
    for i, item in enumerate(items):
        w = f"{where} {key}[{i}]" if isinstance(at, list) else f"{where} {key}"
        if not isinstance(item, dict):
            out.append(AddressSelector(addresses=(_address(item, w),)))
            continue
        if "set" in item:
            _check_keys(item, ("set", "top"), w)
            if item["set"] not in ADDRESS_SETS:
                raise _fail(w, f'set must be "executed_ips", found {item["set"]!r}')
            top = item.get("top")
            if top is not None and (not isinstance(top, int) or isinstance(top, bool) or top < 1):
                raise _fail(w, f"top must be a positive integer, found {top!r}")
            out.append(AddressSelector(set=item["set"], top=top))
            continue
        if len(item) != 1:
            raise _fail(w, 'a table must have exactly one of "ip", "symbol", "set"')
        key, value = next(iter(item.items()))
        if key == "ip":
            vals = value if isinstance(value, list) else [value]
            out.append(AddressSelector(ips=tuple(_ip(v, w + " ip") for v in vals)))
        elif key == "symbol":
            vals = value if isinstance(value, list) else [value]
            if not vals or any(not isinstance(v, str) or not v for v in vals):
                raise _fail(w, f'"symbol" must be a name or a list of names, found {value!r}')
            out.append(AddressSelector(symbols=tuple(vals)))
        else:
            raise _fail(w, f'unknown key "{key}"{did_you_mean(key, ("ip", "symbol", "set"))}')
    return tuple(out)


def _ip(v, where: str) -> int:
    """A virtual address (ip or CR3 value): an integer or a hex / decimal string, in uint64."""
    if isinstance(v, str):
        try:
            v = int(v, 16) if v.lower().startswith("0x") else int(v)
        except ValueError:
            raise _fail(where, f"expected an integer or hex string, found {v!r}") from None
    if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v < 1 << 64:
        raise _fail(where, f"expected a value in uint64 range, found {v!r}")
    return v


def _parse_on_breakpoint(raw, names: dict[str, int], domain: Domain) -> OnBreakpoint | None:
    if raw is None:
        return None
    where = "[on_breakpoint]"
    if not isinstance(raw, dict):
        raise _fail(where, "must be a table")
    _check_keys(raw, ON_BREAKPOINT_KEYS, where)
    action = raw.get("action")
    if action not in ("step", "emulate"):
        raise _fail(
            where,
            f'action must be "step" or "emulate", found {action!r}'
            f"{did_you_mean(action, ('step', 'emulate')) if isinstance(action, str) else ''}",
        )
    if action == "emulate":
        for key in ("to", "fast"):
            if key in raw:
                raise _fail(where, f'"{key}" does not apply to action "emulate"')
        return OnBreakpoint(action)
    if not domain.altp2m:
        raise _fail(
            where,
            'action "step" switches views, which needs altp2m; with altp2m = false use "emulate"',
        )
    fast = _bool(raw, "fast", False, where)
    if fast and domain.xen < (4, 14):
        raise _fail(where, "fast single-step needs xen >= 4.14")
    to = _view_ref(raw["to"], names, where + " to") if "to" in raw else 0
    return OnBreakpoint(action, to, fast)


def _parse_on_cr3(raw, names: dict[str, int], domain: Domain) -> OnCr3 | None:
    if raw is None:
        return None
    where = "[on_cr3]"
    if not isinstance(raw, dict):
        raise _fail(where, "must be a table")
    _check_keys(raw, ON_CR3_KEYS, where)
    sync = _bool(raw, "sync", True, where)
    rules = []
    switches = raw.get("switch", [])
    if not isinstance(switches, list):
        raise _fail(where, '"switch" must be an array of tables ([[on_cr3.switch]])')
    if switches and not sync:
        raise _fail(
            where, "[[on_cr3.switch]] needs sync = true: an asynchronous event has no response"
        )
    if switches and not domain.altp2m:
        raise _fail(where, "[[on_cr3.switch]] switches views, which needs altp2m")
    for i, t in enumerate(switches):
        w = f"on_cr3.switch[{i}]"
        if not isinstance(t, dict):
            raise _fail(w, "must be a table")
        _check_keys(t, CR3_SWITCH_KEYS, w)
        for key in CR3_SWITCH_KEYS:
            if key not in t:
                raise _fail(w, f'missing "{key}"')
        vals = t["cr3"] if isinstance(t["cr3"], list) else [t["cr3"]]
        values, procs, other = [], [], False
        for v in vals:
            if isinstance(v, str) and v == "other":
                other = True
            elif isinstance(v, str) and v.startswith("process:") and len(v) > 8:
                procs.append(v[8:])
            elif isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 1 << 64:
                values.append(v)
            elif isinstance(v, str) and v.lower().startswith("0x"):
                values.append(_ip(v, w))
            else:
                raise _fail(
                    w,
                    f'"cr3" must be an integer, "process:NAME", "other" or a list of them, found {v!r}',
                )
        rules.append(
            Cr3Rule(w, tuple(values), tuple(procs), other, _view_ref(t["to"], names, w + " to"))
        )
    return OnCr3(sync, _bool(raw, "onchangeonly", True, where), tuple(rules))


def _check_semantics(p: Policy) -> None:
    """Refuse what Xen would refuse once setup has run (visibility, VMFUNC prerequisites)."""
    visible = {0: True} | {v.index: v.visible for v in p.views}
    notify_any = False
    for op in p.setup:
        if op.op == "set_visibility":
            visible[op.view] = op.visible
        elif op.op == "switch_p2m" and not visible[op.view]:
            raise _fail(
                op.where,
                f"switch_p2m to invisible view {p.view_name(op.view)!r}: Xen returns -EINVAL",
            )
        elif op.op == "enable_notify":
            notify_any = True
    clears_sve = any(op.op == "set_suppress_ve" and not op.suppress for op in p.setup)
    if p.on_ve is None and notify_any and clears_sve:
        raise _fail(
            "[on_ve]",
            "enable_notify and set_suppress_ve = false make violations #VEs, "
            "but no [on_ve] agent says what the guest does with them: add [on_ve]",
        )
    if p.on_ve is not None:
        if not notify_any:
            raise _fail(
                "[on_ve]",
                "the #VE agent needs #VE and VMFUNC: add a setup op enable_notify for its vCPUs",
            )
        if p.on_ve.action != "emulate" and not visible.get(p.on_ve.to, False):
            raise _fail(
                "[on_ve]",
                f"VMFUNC target view {p.view_name(p.on_ve.to)!r} is invisible at the end of setup: the guest's VMFUNC would raise #UD",
            )
    if p.breakpoints is not None:
        if not p.domain.monitor:
            raise _fail(
                "[breakpoints]",
                "breakpoint hits are events to a monitor: [domain] monitor = false has none",
            )
        if p.on_breakpoint is None:
            raise _fail(
                "[breakpoints]", "needs [on_breakpoint] to say how the monitor answers a hit"
            )
    elif p.on_breakpoint is not None:
        raise _fail("[on_breakpoint]", "there are no [breakpoints] to answer")
    if any(op.op == "write_breakpoints" for op in p.setup) and p.breakpoints is None:
        raise _fail("[[setup]]", "write_breakpoints needs a [breakpoints] table")
    uses_bp_set = any(
        sel is not None and sel.set == "breakpoints"
        for sel in [op.gfns for op in p.setup]
        + [op.new for op in p.setup]
        + [r.gfns for r in p.rules]
    )
    if uses_bp_set and p.breakpoints is None:
        raise _fail("policy", '{ set = "breakpoints" } needs a [breakpoints] table')
    if p.on_cr3 is not None and not p.domain.monitor:
        raise _fail("[on_cr3]", "CR3 events go to a monitor: [domain] monitor = false has none")


# --------------------------------------------------------------------------- loading
def builtin_names() -> list[str]:
    files = resources.files("altp2m_replay") / "policies"
    return sorted(f.name[:-5] for f in files.iterdir() if f.name.endswith(".toml"))


def builtin_text(name: str) -> str:
    return (resources.files("altp2m_replay") / "policies" / f"{name}.toml").read_text(
        encoding="utf-8"
    )


def load_policy(ref: str) -> Policy:
    """Load a policy by file path or built-in name."""
    path = Path(ref)
    if path.suffix == ".toml" or path.exists():
        if path.is_dir():
            raise PolicyError(f"{ref}: is a folder; expected a policy .toml file")
        if not path.is_file():
            raise PolicyError(f"{ref}: no such policy file")
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise PolicyError(f"{ref}: cannot read policy file ({exc})") from None
        return parse_policy(text, str(ref))
    names = builtin_names()
    if ref not in names:
        raise PolicyError(
            f'no policy file or built-in policy named "{ref}"{did_you_mean(ref, names)}'
        )
    return parse_policy(builtin_text(ref), f"builtin:{ref}")
