"""``bench``: runs end to end on a small trace and reports every rate (values not asserted:
timings depend on the machine)."""

from __future__ import annotations

import re

from click.testing import CliRunner

from altp2m_replay.cli import main


def test_bench_command_prints_each_rate():
    result = CliRunner().invoke(main, ["bench", "-n", "20000", "--rounds", "2"])
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "20,000 rows of kernel on 4 vCPUs, policy xen-access-altp2m-write" in out
    exits = int(re.search(r"\(([\d,]+) EPT exits\)", out).group(1).replace(",", ""))
    assert exits > 0
    for label in ("bare scan", "kernel", "first pass", "end-to-end"):
        m = re.search(rf"^\s*{label}\s+([\d.]+) M rows/s", out, re.M)
        assert m and float(m.group(1)) > 0, label
    assert "(best of 2 passes each)" in out
