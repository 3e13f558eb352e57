"""Hypothesis strategies: small random policies (as TOML text) and small random traces.

Gfns are drawn from a few narrow regions (around gfn 0, the 2 MiB boundaries at 512 and
1024, the 1 GiB boundary at 2^18, just above RAM) so that rows, setup ops and rules
collide on the same pages and superpages.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
from hypothesis import assume
from hypothesis import strategies as st

from altp2m_replay.errors import PolicyError
from altp2m_replay.policy import Policy, parse_policy

GIB = 1 << 18  # gfns per 1 GiB
ACCESSES = ("n", "r", "rw", "x", "rx", "rwx", "rx2rw", "n2rwx")
XENS = ("4.16", "4.18", "4.21", "4.22")
REGIONS = ((0, 24), (506, 518), (1020, 1028), (GIB - 3, GIB + 3))
# Explicit RAM candidates. A full 1 GiB of RAM gives 1 GiB host leaves (host_order 18);
# with host_order 0 only the small ranges are used (the host would hold one leaf per page).
RAM_SMALL = ((0, 15), (0, 511), (0, 1023), (8, 600), (510, 1030), (GIB - 600, GIB + 600))
RAM_LARGE = ((0, GIB + 100), (0, 2 * GIB - 1))


@dataclass
class Case:
    """One generated run: policy text and parsed policy, trace arrays, metadata sets."""

    toml: str
    policy: Policy
    arrays: dict[str, np.ndarray]
    gfn_sets: dict[str, list[list[int]]] | None = None


# --------------------------------------------------------------------------- TOML text
def _value(x) -> str:
    if isinstance(x, bool):
        return "true" if x else "false"
    if isinstance(x, int):
        return str(x)
    if isinstance(x, str):
        return json.dumps(x)  # a JSON string of plain ASCII is a TOML basic string
    if isinstance(x, list):
        return "[" + ", ".join(_value(v) for v in x) + "]"
    if isinstance(x, dict):
        return "{ " + ", ".join(f"{k} = {_value(v)}" for k, v in x.items()) + " }"
    raise TypeError(x)


def to_toml(doc: dict) -> str:
    """Serialise the policy shapes used here: scalars, tables, arrays of tables."""
    lines = [f"{k} = {_value(v)}" for k, v in doc.items() if not isinstance(v, (dict, list))]
    for key in ("domain", "on_ve", "breakpoints", "on_breakpoint", "on_cr3"):
        if key in doc:
            lines += ["", f"[{key}]"] + [f"{k} = {_value(v)}" for k, v in doc[key].items()]
    for key in ("view", "setup", "on_violation"):
        for table in doc.get(key, []):
            lines += ["", f"[[{key}]]"] + [f"{k} = {_value(v)}" for k, v in table.items()]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- pieces
def one_in(draw, n: int) -> bool:
    """True about once in ``n`` draws.

    Hypothesis over-samples the bounds of an integer range, so the rare outcome is a middle
    value (shrinking, towards 0, then drops the rare feature).
    """
    return draw(st.integers(0, n - 1)) == 1


def region_gfn(extra: tuple[tuple[int, int], ...] = ()) -> st.SearchStrategy[int]:
    return st.sampled_from(REGIONS + extra).flatmap(lambda r: st.integers(r[0], r[1]))


@st.composite
def ram_gfn(draw, ram: list[list[int]]) -> int:
    """A gfn inside one of the RAM ranges: near an edge or a region of REGIONS."""
    first, last = draw(st.sampled_from(ram))
    spots = [(first, min(first + 8, last)), (max(first, last - 8), last)]
    spots += [(max(first, a), min(last, b)) for a, b in REGIONS if a <= last and b >= first]
    lo, hi = draw(st.sampled_from(spots))
    return draw(st.integers(lo, hi))


def _one(draw, pool: list[int]):
    g = draw(st.sampled_from(pool))
    return hex(g) if one_in(draw, 4) else g


@st.composite
def selectors(draw, pool: list[int]):
    """Every selector form of SPEC §9 (plus above_ram), mostly over the shared gfn pool."""
    kind = draw(st.sampled_from(["one", "one", "one", "range", "list", "set", "above", "meta"]))
    if kind == "one":
        return _one(draw, pool)
    if kind == "range":
        a = draw(st.sampled_from(pool))
        return [a, a + draw(st.integers(0, 3))]
    if kind == "list":
        items = [
            _one(draw, pool) if draw(st.booleans()) else [g := draw(st.sampled_from(pool)), g + 1]
            for _ in range(draw(st.integers(1, 3)))
        ]
        if len(items) == 2 and not any(isinstance(i, list) for i in items):
            items.append(items[0])  # two bare gfns would read as a range
        return items
    if kind == "set":
        sel = {"set": draw(st.sampled_from(["executed", "written", "read", "touched"]))}
        if not one_in(draw, 3):
            sel["top"] = draw(st.integers(1, 3))
        return sel
    if kind == "above":
        a = draw(st.integers(0, 2))
        return {"above_ram": [a, a + draw(st.integers(0, 1))]}
    return {"set": "meta:missing" if one_in(draw, 4) else "meta:hot"}


@st.composite
def domains(draw) -> dict:
    d: dict = {}
    if one_in(draw, 6):
        d["altp2m"] = False
    order = draw(st.sampled_from([0, 9, 18]))
    if one_in(draw, 4):
        d["origin"] = draw(st.sampled_from(["create", "restore"]))
    if order != 9 or draw(st.booleans()):
        d["host_order"] = order
    if one_in(draw, 3):
        # A restrictive host makes view 0 fault: set-access there rewrites the host.
        d["host_access"] = draw(st.sampled_from(["rx", "rw", "r", "x", "rx2rw", "n2rwx"]))
    for key, odds in (("exec_sp", 4), ("monitor", 7), ("access_required", 4)):
        if one_in(draw, odds):
            d[key] = False
    # Before 4.19 lazy copies take the host's access, which leaves views' default_access
    # unused: keep the newer versions most common so views do restrict.
    d["xen"] = draw(st.sampled_from(XENS + XENS[2:] * 2))
    # a restored domain without host_order has 4 KiB host pages before 4.21: keep RAM small
    small = order == 0 or (d.get("origin") == "restore" and "host_order" not in d)
    if small or not one_in(draw, 3):
        pool = RAM_SMALL if small else RAM_SMALL + RAM_LARGE
        d["ram"] = [list(r) for r in draw(st.lists(st.sampled_from(pool), min_size=1, max_size=2))]
    return d


def _action(draw, action: str, view_ref, need_to: bool = False) -> dict:
    r = {"action": action}
    if action == "step":
        if need_to or draw(st.booleans()):
            r["to"] = draw(view_ref)
        if draw(st.booleans()):
            r["fast"] = draw(st.booleans())
    elif action == "switch":
        r["to"] = draw(view_ref)
    elif action == "set-access" and draw(st.booleans()):
        r["access"] = draw(st.sampled_from(ACCESSES))
    return r


def _in_ram(pool: list[int], domain: dict) -> list[int]:
    """Pool gfns inside explicit RAM (default RAM covers the trace, so: all of them)."""
    ram = domain.get("ram")
    inside = [g for g in pool if ram is None or any(a <= g <= b for a, b in ram)]
    return inside or pool


@st.composite
def policy_docs(draw, pool: list[int], domain: dict) -> dict:
    """A random policy document over ``domain`` whose selectors mostly hit ``pool``."""
    altp2m = domain.get("altp2m", True)
    # Ops that refuse gfns without an entry (change_gfn old, set_suppress_ve) mostly get RAM.
    ram_pool = _in_ram(pool, domain)
    doc: dict = {"name": "random", "description": "generated", "domain": domain}
    views = []
    if altp2m:
        for i in range(0 if one_in(draw, 6) else draw(st.integers(1, 3))):
            view = {"name": f"v{i + 1}"}
            if not one_in(draw, 5):
                view["default_access"] = draw(st.sampled_from(ACCESSES))
            if one_in(draw, 8):
                view["visible"] = False
            if one_in(draw, 6):
                view["index"] = draw(st.integers(1, 9))
            views.append(view)
    doc["view"] = views
    view_ref = st.sampled_from([0, "host"] + [v["name"] for v in views])
    own_ref = st.sampled_from([v["name"] for v in views]) if views else st.just(0)
    sel = selectors(pool)

    setup = []
    ops = ["set_mem_access", "set_mem_access", "set_mem_access", "add_ram"]
    if altp2m:
        ops += ["change_gfn", "set_suppress_ve", "set_visibility", "switch_p2m"]
    for _ in range(draw(st.integers(0, 5))):
        op = draw(st.sampled_from(ops))
        t: dict = {"op": op}
        if op == "set_mem_access":
            t |= {
                "view": draw(own_ref | view_ref) if altp2m else 0,
                "gfns": draw(sel),
                "access": draw(st.sampled_from(ACCESSES)),
            }
        elif op == "add_ram":
            t["gfns"] = draw(sel)
        elif op == "change_gfn":
            new = "invalid" if one_in(draw, 4) else draw(sel)
            old = draw(sel) if one_in(draw, 5) else _one(draw, ram_pool)
            t |= {"view": draw(own_ref | view_ref), "old": old, "new": new}
        elif op == "set_suppress_ve":
            gfns = draw(sel) if one_in(draw, 5) else _one(draw, ram_pool)
            t |= {"view": draw(view_ref), "gfns": gfns, "suppress": draw(st.booleans())}
        elif op == "set_visibility":
            t |= {"view": draw(view_ref), "visible": draw(st.booleans())}
        else:
            t["view"] = draw(view_ref)
        setup.append(t)
    start = draw(own_ref)  # the view vCPUs start on (when views exist and a switch is drawn)
    if views and not one_in(draw, 4):
        setup.append({"op": "switch_p2m", "view": start})
    if altp2m and one_in(draw, 3):
        # #VE: the agent, its vCPUs, and pages it owns: write-protected with suppress-VE 0
        # (as hvmi-ve-pagetables), mostly in the start view.
        for _ in range(draw(st.integers(1, 3))):
            view, g = (draw(own_ref) if one_in(draw, 4) else start), _one(draw, ram_pool)
            pair = [{"op": "set_suppress_ve", "view": view, "gfns": g, "suppress": False}]
            if not one_in(draw, 4):
                pair.append(
                    {
                        "op": "set_mem_access",
                        "view": view,
                        "gfns": g,
                        "access": draw(st.sampled_from(["n", "r", "rx", "x"])),
                    }
                )
            at = draw(st.integers(0, len(setup)))
            setup[at:at] = pair[::-1] if draw(st.booleans()) else pair
            if one_in(draw, 4):
                # A later host write propagates into the view, keeping its suppress-VE bit.
                setup.append(
                    {
                        "op": "set_mem_access",
                        "view": 0,
                        "gfns": g,
                        "access": draw(st.sampled_from(["r", "rx", "x", "rwx"])),
                    }
                )
        notify: dict = {"op": "enable_notify"}
        if one_in(draw, 4):
            notify["vcpus"] = sorted(set(draw(st.lists(st.integers(0, 2), min_size=1, max_size=3))))
        setup.insert(draw(st.integers(0, len(setup))), notify)
        action = draw(st.sampled_from(["vmfunc-step", "vmfunc-switch", "emulate"]))
        doc["on_ve"] = (
            {"action": action} if action == "emulate" else {"action": action, "to": draw(view_ref)}
        )
    doc["setup"] = setup

    actions = ["step", "switch", "emulate", "set-access"] if altp2m else ["emulate", "set-access"]
    if one_in(draw, 10):
        actions = ["emulate"]
    rules = []
    for _ in range(draw(st.integers(0, 3))):
        r: dict = {}
        if altp2m and not one_in(draw, 4):
            r["view"] = draw(view_ref if one_in(draw, 3) else own_ref)
        if draw(st.booleans()):
            r["kind"] = draw(
                st.sampled_from(["r", "w", "x"])
                | st.lists(st.sampled_from("rwx"), min_size=1, max_size=3)
            )
        if one_in(draw, 3):
            r["gfns"] = draw(sel)
        # A view filter always comes with an explicit "to": parse_policy raises KeyError on a
        # step rule filtered on view 0 that leaves "to" at its default (a bug reported upstream).
        rules.append(
            r | _action(draw, draw(st.sampled_from(actions)), view_ref, need_to="view" in r)
        )
    if views and "step" in actions and one_in(draw, 2):
        # The xen-access / DRAKVUF pattern first: violations in the start view step elsewhere.
        rules.insert(0, {"view": start} | _action(draw, "step", view_ref, need_to=True))
    # A final catch-all (nearly always) so runs rarely stop at an unmatched violation. Its
    # step or switch goes to view 0, the usual permissive view; set-access mostly to rwx.
    if not one_in(draw, 10):
        # Step to view 0 is the commonest real pattern (xen-access, DRAKVUF): weigh it up.
        final = draw(st.sampled_from(actions + ["step"] * ("step" in actions)))
        if final in ("step", "switch"):
            rules.append(_action(draw, final, st.just(0), need_to=final == "switch"))
        elif final == "set-access" and not one_in(draw, 4):
            rules.append({"action": "set-access"})
        else:
            rules.append(_action(draw, final, view_ref))
    doc["on_violation"] = rules
    if altp2m and domain.get("monitor", True) and one_in(draw, 3):
        # INT3 breakpoints (SPEC §4, §6.4): at pool pages, offsets the traces fetch from
        doc["breakpoints"] = {
            "at": [
                hex((g << 12) | draw(st.sampled_from(OFFSETS)))
                for g in draw(st.lists(st.sampled_from(pool), min_size=1, max_size=3))
            ]
        }
        for _ in range(draw(st.integers(1, 2))):
            setup.insert(
                draw(st.integers(0, len(setup))),
                {"op": "write_breakpoints", "view": draw(view_ref)},
            )
        if one_in(draw, 3):
            doc["on_breakpoint"] = {"action": "emulate"}
        else:
            doc["on_breakpoint"] = {
                "action": "step",
                "to": draw(view_ref),
                "fast": draw(st.booleans()),
            }
    if domain.get("monitor", True) and one_in(draw, 3):
        cr3: dict = {"sync": not one_in(draw, 4), "onchangeonly": not one_in(draw, 3)}
        if cr3["sync"] and altp2m:
            cr3["switch"] = [
                {"cr3": draw(st.sampled_from([*CR3S, "other"])), "to": draw(view_ref)}
                for _ in range(draw(st.integers(0, 2)))
            ]
        doc["on_cr3"] = cr3
    return doc


OFFSETS = [0x10, 0x20]  # byte offsets of fetches and breakpoints in their page
CR3S = [0x1000, 0x2000, 0x3000]


@st.composite
def traces(draw, pool: list[int], extra=()) -> dict[str, np.ndarray]:
    """1-200 rows over the pool (and a few other gfns), 1-3 vCPUs, ``insn`` runs of 1-5 rows."""
    gfn_choice = st.sampled_from(pool)
    if draw(st.booleans()):
        gfn_choice = gfn_choice | region_gfn(extra)
    n_vcpus = draw(st.integers(1, 3))
    # Draw the length first: left to itself Hypothesis keeps lists very short.
    n_rows = draw(st.integers(1, 200))
    rows = draw(
        st.lists(
            st.tuples(
                gfn_choice, st.integers(1, 7), st.integers(0, n_vcpus - 1), st.integers(1, 5)
            ),
            min_size=n_rows,
            max_size=n_rows,
        )
    )
    arrays = {
        "gfn": np.array([r[0] for r in rows], dtype=np.uint64),
        "access": np.array([r[1] for r in rows], dtype=np.uint8),
    }
    if n_vcpus > 1 or draw(st.booleans()):
        arrays["vcpu"] = np.array([r[2] for r in rows], dtype=np.uint16)
    if draw(st.booleans()):
        # Consecutive runs of 1-5 rows share an id (per vCPU they form the instructions).
        ids, ident, left = [], 100, 0
        for r in rows:
            if left == 0:
                ident, left = ident + 1, r[3]
            ids.append(ident)
            left -= 1
        arrays["insn"] = np.array(ids, dtype=np.uint64)
    if one_in(draw, 3):
        # control rows (SPEC §2): guest VMFUNCs, CR3 writes, host drops and maps
        n = len(rows)
        op = np.zeros(n, np.uint8)
        arg = np.zeros(n, np.uint64)
        for i in draw(st.lists(st.integers(0, n - 1), max_size=max(1, n // 8))):
            o = draw(st.integers(1, 4))
            op[i] = o
            arg[i] = (
                draw(st.integers(0, 3)) if o == 1 else draw(st.sampled_from(CR3S)) if o == 2 else 0
            )
        arrays["access"] = np.where(op > 0, 0, arrays["access"]).astype(np.uint8)
        arrays["op"], arrays["arg"] = op, arg
    if one_in(draw, 2):
        # byte addresses: a gpa column, fetches at the breakpoint offsets mostly
        offs = np.array(
            draw(st.lists(st.sampled_from([*OFFSETS, 48]), min_size=len(rows), max_size=len(rows))),
            dtype=np.uint64,
        )
        arrays["gpa"] = (arrays.pop("gfn") << np.uint64(12)) | offs
    return arrays


@st.composite
def cases(draw) -> Case:
    """A policy parse_policy accepts and a trace to replay it on, sharing one gfn pool."""
    domain = draw(domains())
    ram_top = max(b for _, b in domain["ram"]) if "ram" in domain else None
    # Gfns just above explicit RAM are holes, or shadow pages once add_ram maps them.
    extra = ((ram_top + 1, ram_top + 3),) if ram_top is not None else ()
    pool = draw(st.lists(region_gfn(extra), min_size=1, max_size=4))
    if "ram" in domain:
        # Explicit RAM may miss the regions: add gfns inside it, at its edges and boundaries.
        pool += draw(st.lists(ram_gfn(domain["ram"]), min_size=1, max_size=4))
    pool = sorted(set(pool))
    text = to_toml(draw(policy_docs(pool, domain)))
    try:
        policy = parse_policy(text, "generated")
    except PolicyError:
        assume(False)
    arrays = draw(traces(pool, extra))
    gfn_sets = None
    if draw(st.booleans()):
        a = draw(st.sampled_from(pool))
        gfn_sets = {"hot": [[a, a + draw(st.integers(0, 3))]]}
    return Case(text, policy, arrays, gfn_sets)
