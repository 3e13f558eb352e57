"""Throughput and slowdown figures of docs/capture.md.

For each workload, at a reduced size (a2m.scale, percent): the recorded window's length
without the plugin (the guest's own uptime around the markers), then a full capture of the
same window (no row limit): rows, host seconds between the plugin's window messages, rows/s,
zstd bytes, import rows/s, and the slowdown (window with the plugin / without). Each figure
is the best of REPEAT runs (on a shared machine the worst ones measure the neighbours).
Run from the repository root after `make guest`:
    .venv/bin/python capture/measure.py [SCALE [REPEAT [WORKLOAD...]]]
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from altp2m_replay import capture


def main(argv: list[str]) -> None:
    scale = int(argv[0]) if argv else 10
    repeat = int(argv[1]) if len(argv) > 1 else 3
    names = argv[2:] or ["shell", "files"]
    print(f"| workload (scale {scale} %) | window without plugin | window with plugin | rows | "
          f"capture rows/s | zstd bytes/row | import rows/s | Parquet bytes/row | slowdown |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for w in names:
        plain = min(_window(capture.plain_run(w, scale=scale)) for _ in range(repeat))
        runs = []
        for _ in range(repeat):
            with tempfile.TemporaryDirectory(dir=".") as tmp:
                out = Path(tmp) / f"{w}.parquet"
                res = capture.capture(w, out, scale=scale)
                runs.append((res, out.stat().st_size))
        best = min(runs, key=lambda r: r[0].window_seconds)[0]
        imp = max(r.rows / r.import_seconds for r, _ in runs)
        size = runs[0][1] / runs[0][0].rows
        print(f"| {w} | {plain:.2f} s | {best.window_seconds:.2f} s | {best.rows:,} | "
              f"{best.rows / best.window_seconds / 1e6:.1f} M | {best.raw_bytes / best.rows:.2f} | "
              f"{imp / 1e6:.1f} M | {size:.2f} | {best.window_seconds / plain:.0f}x |", flush=True)


def _window(report) -> float:
    return report.window[1] - report.window[0]


if __name__ == "__main__":
    main(sys.argv[1:])
