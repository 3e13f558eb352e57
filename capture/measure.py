"""Throughput and slowdown figures of docs/capture.md.

For each workload, at a reduced size (a2m.scale, percent): the recorded window's length
without the plugin (the guest's own uptime around the markers), then a full capture of the
same window (no row limit): rows, host seconds between the plugin's window messages, rows/s,
zstd bytes, import rows/s, and the slowdown (window with the plugin / without). Run from the
repository root after `make guest`:  .venv/bin/python capture/measure.py [SCALE] [WORKLOAD...]
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from altp2m_replay import capture


def main(argv: list[str]) -> None:
    scale = int(argv[0]) if argv else 10
    names = argv[1:] or ["shell", "files"]
    print(f"| workload (scale {scale} %) | window without plugin | window with plugin | rows | "
          f"capture rows/s | zstd bytes/row | import rows/s | Parquet bytes/row | slowdown |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for w in names:
        rep = capture.plain_run(w, scale=scale)
        plain = rep.window[1] - rep.window[0]
        with tempfile.TemporaryDirectory(dir=".") as tmp:
            out = Path(tmp) / f"{w}.parquet"
            res = capture.capture(w, out, scale=scale)
            size = out.stat().st_size
        print(f"| {w} | {plain:.2f} s | {res.window_seconds:.2f} s | {res.rows:,} | "
              f"{res.rows / res.window_seconds / 1e6:.1f} M | {res.raw_bytes / res.rows:.2f} | "
              f"{res.rows / res.import_seconds / 1e6:.1f} M | {size / res.rows:.2f} | "
              f"{res.window_seconds / plain:.0f}x |", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
