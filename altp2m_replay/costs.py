"""Cost model (SPEC §8): counters times cycles per event, with profiles and overrides."""

from __future__ import annotations

from collections.abc import Mapping

from altp2m_replay.errors import PolicyError, did_you_mean, shown

# key -> (default cycles, counters it is charged per). Order is the report's order.
COSTS: dict[str, tuple[float, tuple[str, ...]]] = {
    "ept_exit": (5000, ("ept_exits",)),
    "lazy_copy": (500, ("lazy_copies",)),
    "vm_event_sync": (
        90000,
        ("mem_access_events", "singlestep_events", "breakpoint_events", "cr3_events"),
    ),
    "monitor_callback": (
        30000,
        ("mem_access_events", "singlestep_events", "breakpoint_events", "cr3_events"),
    ),
    "int3_exit": (5000, ("int3_exits",)),
    "cr3_exit": (3000, ("cr3_exits",)),
    "vmfunc_exit": (5000, ("vmfunc_exits",)),
    "view_reset": (20000, ("view_resets",)),
    "ept_sync_ipi": (4000, ("ept_sync_ipis",)),
    "vm_event_async": (5000, ("async_events",)),
    "mtf_exit": (3000, ("mtf_exits",)),
    "view_switch": (200, ("switches_vm_event", "switches_fast_ss")),
    "vmfunc": (150, ("switches_vmfunc",)),
    "ve_delivery": (500, ("ve_delivered",)),
    "ve_agent": (2500, ("ve_delivered",)),
    "emulation": (10000, ("emulations", "ve_emulations")),
    "access_change": (3000, ("access_changes",)),
    "superpage_split": (8000, ("superpage_splits", "shatters")),
    "mmio": (40000, ("mmio_accesses",)),
}
PROFILES: dict[str, dict[str, float]] = {
    "xen-dom0": {},
    "polling-agent": {"vm_event_sync": 15000, "monitor_callback": 0},
}
DEFAULT_GHZ = 3.0
# Bounds that keep every total finite: a counter is below 2^63, so 14 keys of at most 1e15
# cycles per event sum to below 1.3e35, and overhead_us = cycles / (cpu_ghz * 1e3) stays finite.
MAX_COST = 1e15
MIN_GHZ, MAX_GHZ = 1e-3, 1e3
EXTRA_KEYS = ("cpu_ghz", "profile")


def check_cost_table(table: Mapping, where: str) -> None:
    """Refuse unknown keys and non-numeric or negative values in a ``[costs]`` table."""
    allowed = list(COSTS) + list(EXTRA_KEYS)
    for key, value in table.items():
        if key not in allowed:
            raise PolicyError(f'{where}: unknown cost key "{key}"{did_you_mean(key, allowed)}')
        if key == "profile":
            if not isinstance(value, str) or value not in PROFILES:
                raise PolicyError(
                    f"{where}: unknown profile {shown(value)}{did_you_mean(value, PROFILES)}"
                )
            continue
        lo, hi = (MIN_GHZ, MAX_GHZ) if key == "cpu_ghz" else (0, MAX_COST)
        # compared before any float(): an integer too large for a float stays an int here
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not lo <= value <= hi:
            what = f'"{key}"' if key == "cpu_ghz" else f'cost "{key}"'
            raise PolicyError(
                f"{where}: {what} must be a number in {lo:g}..{hi:g}, found {shown(value)}"
            )


def parse_cost_options(items) -> dict[str, float]:
    """``--cost KEY=VALUE`` strings -> a checked dict."""
    out: dict[str, float] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise PolicyError(f"--cost {item}: expected KEY=VALUE")
        try:
            out[key.strip()] = float(value)
        except ValueError:
            raise PolicyError(f"--cost {item}: {value!r} is not a number") from None
    check_cost_table(out, "--cost")
    return out


def effective_costs(
    policy_costs: Mapping, profile: str | None = None, overrides: Mapping | None = None
) -> dict[str, float]:
    """Defaults, then the profile, then the policy's ``[costs]``, then ``--cost`` values.

    The profile is ``--profile`` if given, else the policy's ``profile`` key, else
    ``xen-dom0``. Values the policy sets itself win over any profile; the command line's
    ``--cost`` wins over everything. Returns every cost key plus ``cpu_ghz``.
    """
    name = profile or policy_costs.get("profile") or "xen-dom0"
    if name not in PROFILES:
        raise PolicyError(f"--profile: unknown profile {name!r}{did_you_mean(name, PROFILES)}")
    out = {k: float(v[0]) for k, v in COSTS.items()}
    out["cpu_ghz"] = DEFAULT_GHZ
    out.update(PROFILES[name])
    out.update({k: float(v) for k, v in policy_costs.items() if k != "profile"})
    out.update({k: float(v) for k, v in (overrides or {}).items()})
    return out


def cycles(counters: Mapping[str, float], costs: Mapping[str, float]) -> dict[str, float]:
    """``cycles_<key>`` per cost key and ``cycles_total``; counters may be ints or arrays."""
    out = {}
    total = 0.0
    for key, (_, charged) in COSTS.items():
        c = costs[key] * sum(counters[name] for name in charged)
        out[f"cycles_{key}"] = c
        total += c
    out["cycles_total"] = total
    return out
