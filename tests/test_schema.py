"""schema.py names the SPEC §7 counters the way tests/reference.py spells them from the SPEC."""

from __future__ import annotations

from reference import GFN_COUNTERS, TOTAL_COUNTERS, VIEW_COUNTERS

from altp2m_replay import schema


def test_schema_counters_are_the_spec_names_in_spec_order():
    assert schema.COUNTERS == TOTAL_COUNTERS
    assert schema.VIEW_COUNTERS == VIEW_COUNTERS
    assert schema.GFN_COUNTERS == GFN_COUNTERS
