"""``policy check``: static checks beyond parsing, and a dry run of setup on a trace."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from altp2m_replay.errors import PolicyError
from altp2m_replay.policy import ACCESS_PERMITS, KIND_CODES, Policy, load_policy
from altp2m_replay.selectors import needs_insn_stats, needs_page_counts


@dataclass
class CheckReport:
    policy: Policy
    warnings: list[str] = field(default_factory=list)
    summary: str = ""


def coverage_gaps(p: Policy) -> tuple[list[str], list[str]]:
    """(errors, warnings) for violations no ``[[on_violation]]`` rule can answer.

    Over-approximates the accesses a view can hold (its default, every access setup or a
    set-access response can write, the host default) and asks, for each view and kind one
    of them forbids, whether a rule without a gfn filter matches. Only gfn-filtered rules
    matching gives a warning; no rule at all is an error.

    A view-0 ``set_mem_access`` writes the host p2m. Before xen 4.19 (or with altp2m off)
    every view can end up with its access: lazy copies take the host entry's. From 4.19 a
    view copies with its own default, so the access reaches a view only by propagation into
    a leaf the view already holds (SPEC §4) - and views start empty: only a view an earlier
    setup op wrote into can hold one.
    """
    d = p.domain
    if not d.monitor:
        return [], []
    views = [0] + [v.index for v in p.views] if d.altp2m else [0]
    defaults = {0: d.host_access} | {v.index: v.default_access for v in p.views}
    everywhere = {d.host_access} | {r.access for r in p.rules if r.action == "set-access"}
    copies_host_access = not d.altp2m or d.xen < (4, 19)
    errors, warnings = [], []
    for view in views:
        accesses = {defaults[view]} | everywhere
        for i, op in enumerate(p.setup):
            if op.op != "set_mem_access":
                continue
            if op.view == view and (view != 0 or not d.altp2m):
                accesses.add(op.access)  # a view's own restriction (or the host's)
            elif op.view == 0 and (copies_host_access or any(o.view == view for o in p.setup[:i])):
                accesses.add(op.access)  # the host's, copied or propagated into the view
        if any(op.op == "change_gfn" and op.view == view for op in p.setup):
            accesses |= set(defaults.values())
        for kind, bit in KIND_CODES.items():
            # rx2rw writes and n2rwx accesses never need a rule (no sync event).
            sync = [a for a in accesses if a != "n2rwx" and not (a == "rx2rw" and kind == "w")]
            if all(ACCESS_PERMITS[a] >> bit & 1 for a in sync):
                continue
            matching = [
                r
                for r in p.rules
                if (r.view is None or r.view == view) and (r.kinds is None or kind in r.kinds)
            ]
            label = f"a {kind!r} violation in view {p.view_name(view)!r}"
            if not matching:
                errors.append(
                    f"{label} matches no [[on_violation]] rule (add one, or a final catch-all)"
                )
            elif all(r.gfns is not None for r in matching):
                warnings.append(
                    f"{label} is only covered for some gfns; a violation elsewhere stops the replay"
                )
    return errors, warnings


def check_policy(ref: str, trace_path: str | None = None) -> CheckReport:
    """Load and check ``ref``; with a trace, also resolve selectors and run setup."""
    from altp2m_replay.engine.simulate import Replayer, setup_warnings

    p = load_policy(ref)
    errors, warnings = coverage_gaps(p)
    if errors:
        raise PolicyError(f"{p.source}: {errors[0]}")
    report = CheckReport(p, warnings)
    lines = [
        f"{p.name}: ok ({p.source})",
        "  views: 0 (view 0)"
        + "".join(f", {v.index} ({v.name}, {v.default_access})" for v in p.views)
        if p.domain.altp2m
        else "  altp2m off: vCPUs walk the host p2m",
        f"  setup ops: {len(p.setup)}, rules: {len(p.rules)}, #VE agent: "
        + (p.on_ve.action if p.on_ve else "none"),
    ]
    if trace_path is None:
        report.warnings += setup_warnings(p)
    else:
        from altp2m_replay.traces import trace_facts, trace_name

        stats, facts = trace_facts(Path(trace_path), needs_page_counts(p), needs_insn_stats(p))
        rep = Replayer(p, facts, stats.vcpus, stats.rows)
        report.warnings += rep.warnings
        res = rep.finish()
        lines.append(
            f"  setup on {trace_name(Path(trace_path))}: RAM {int((rep.ram[:, 1] - rep.ram[:, 0] + 1).sum()):,} pages, "
            f"setup_splits {res.total['setup_splits']:,}, setup_skipped {res.total['setup_skipped']:,}"
        )
        for view, row in res.views.items():
            lines.append(
                f"    view {view} ({p.view_name(view)}): {row['pages_mapped']:,} pages mapped after setup"
            )
    report.summary = "\n".join(lines)
    return report
