"""Command line: parse options, call one library function, print. Nothing else lives here."""

from __future__ import annotations

import os
import sys
from typing import ClassVar

import click

from altp2m_replay import __version__
from altp2m_replay.errors import ReplayError, escape
from altp2m_replay.schema import GFN_LIMIT, VCPU_LIMIT


def _fail(message: str, code: int):
    """Print ``Error: message`` as exactly one line and exit: control characters (a newline
    in a file name, terminal escapes from a file) are shown escaped, never acted on."""
    click.echo(f"Error: {escape(message)}", err=True)
    sys.exit(code)


def _reader_left():
    """Standard output's reader went away (``policy list | head``): stop quietly, as a tool
    killed by SIGPIPE would, with the shell's code for it. Standard output now points at
    /dev/null, so flushing it at exit raises nothing more."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    sys.exit(128 + 13)


class _Group(click.Group):
    """A group that turns library errors into one ``Error:`` line and the SPEC §12 exit code."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except ReplayError as exc:
            _fail(str(exc), exc.exit_code)
        except KeyboardInterrupt:  # Ctrl-C: one line, the shell's code for SIGINT
            _fail("interrupted", 130)
        except FileNotFoundError as exc:
            _fail(f"{exc.filename}: no such file or directory", 2)
        except BrokenPipeError:
            _reader_left()
        except (OSError, MemoryError) as exc:
            # a path that is not a folder, no permission, a full disk, not enough memory
            where = f"{exc.filename}: " if getattr(exc, "filename", None) else ""
            reason = (
                exc.strerror
                if isinstance(exc, OSError) and exc.strerror
                else (str(exc) or type(exc).__name__)
            )
            _fail(f"{where}{reason}", 2)
        except RecursionError:  # readers catch it and name the file; this is the backstop
            _fail("input nested too deeply to read", 2)


class _Root(_Group):
    """The top-level group: also makes Click's usage errors one ``Error:`` line (SPEC §12)."""

    invoked_args: ClassVar[list[str]] = []

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        args = list(sys.argv[1:] if args is None else args)
        _Root.invoked_args = args
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode, **extra)
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.UsageError as exc:
            hint = f" (see {exc.ctx.command_path} --help)" if exc.ctx is not None else ""
            _fail(f"{exc.format_message()}{hint}", 2)
        except click.ClickException as exc:
            _fail(exc.format_message(), exc.exit_code)
        except click.Abort:
            click.echo("Aborted.", err=True)
            sys.exit(1)
        try:
            sys.stdout.flush()  # what is still buffered meets a closed pipe here, not at exit
        except BrokenPipeError:
            _reader_left()
        sys.exit(rv if isinstance(rv, int) else 0)


class _GfnType(click.ParamType):
    """A gfn given in decimal or with a 0x prefix, below 2^36."""

    name = "gfn"

    def convert(self, value, param, ctx):
        if isinstance(value, int):
            return value
        try:
            g = int(str(value), 0)
        except ValueError:
            self.fail(f"{value!r} is not a gfn (decimal or 0x hex)", param, ctx)
        if not 0 <= g < GFN_LIMIT:
            self.fail(f"{value} is outside 0 .. 2^36-1", param, ctx)
        return g


_GFN = _GfnType()
CONTEXT = {"help_option_names": ["-h", "--help"]}


@click.group(cls=_Root, context_settings=CONTEXT)
@click.version_option(__version__, prog_name="altp2m-replay")
def main():
    """Replay memory-access traces through Xen altp2m views and price introspection policies."""


# --------------------------------------------------------------------------- trace
@main.group(cls=_Group)
def trace():
    """Inspect, validate, generate and import traces (SPEC §2)."""


@trace.command("info")
@click.argument("file", type=click.Path(dir_okay=False))
def trace_info(file):
    """Rows, row groups, vCPUs, distinct gfns, access mix and metadata of FILE."""
    from altp2m_replay import traces

    click.echo(traces.info_text(file))


@trace.command("validate")
@click.argument("file", type=click.Path(dir_okay=False))
def trace_validate(file):
    """Check FILE against the trace format; exit 0 when valid."""
    from altp2m_replay import traces

    stats = traces.validate(file)
    click.echo(f"{file}: valid, {stats.rows:,} rows")


@trace.command("generate")
@click.argument("workload")
@click.option("-n", "rows", type=click.IntRange(min=1), required=True, help="Number of rows.")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True)
@click.option("--vcpus", type=click.IntRange(1, VCPU_LIMIT), default=1, show_default=True)
@click.option("-o", "--output", type=click.Path(dir_okay=False), required=True)
def trace_generate(workload, rows, seed, vcpus, output):
    """Write a seeded synthetic trace of WORKLOAD to FILE (same seed, same bytes).

    \b
    WORKLOAD is one of:
      kernel  hot kernel code, Zipf data, stacks, page-table writes
      scan    memcpy-like sequential walk through two large buffers
      random  uniform random gfns and access kinds over 4 GiB
      jit     kernel mix plus code written then executed (W then X)
      sandbox kernel mix with control rows: CR3 writes, guest VMFUNCs, a balloon
              phase (host drops, then maps); symbols and processes metadata
    """
    from altp2m_replay import generate

    generate.generate(workload, rows, seed=seed, vcpus=vcpus, output=output)
    click.echo(f"wrote {output}: {rows:,} rows of {workload}")


@trace.command("import")
@click.argument(
    "fmt", metavar="FORMAT", type=click.Choice(["lackey", "qemu-mem", "csv", "qemu-capture"])
)
@click.argument("input_path", metavar="INPUT", type=click.Path(dir_okay=False))
@click.option("-o", "--output", type=click.Path(dir_okay=False), required=True)
@click.option(
    "--base-gfn",
    type=_GFN,
    default="0x1000",
    show_default=True,
    help="First gfn of the first-touch page allocator (decimal or 0x hex).",
)
def trace_import(fmt, input_path, output, base_gfn):
    """Convert INPUT in FORMAT into a trace Parquet file."""
    from altp2m_replay import importers

    rows = importers.import_trace(fmt, input_path, output, base_gfn=base_gfn)
    click.echo(f"wrote {output}: {rows:,} rows")


@trace.command("capture")
@click.argument("workload")
@click.option("-o", "--output", type=click.Path(dir_okay=False), required=True)
@click.option("--vcpus", type=int, default=2, show_default=True, help="Guest vCPUs (1..64).")
@click.option(
    "--memory", type=int, default=256, show_default=True, help="Guest RAM in MiB (64..3072)."
)
@click.option(
    "--rows",
    type=click.IntRange(min=1),
    default=None,
    help="Stop recording at the first instruction boundary after this many rows.",
)
@click.option(
    "--keep-raw",
    type=click.Path(dir_okay=False),
    default=None,
    help="Also keep the plugin's zstd record stream in this file.",
)
def trace_capture(workload, output, vcpus, memory, rows, keep_raw):
    """Record WORKLOAD in a Linux guest under QEMU TCG into a trace (see `make guest`).

    \b
    WORKLOAD is one of:
      shell   shell loops: fork/exec of busybox applets, pipes
      files   sha256sum, gzip and sort over a few MiB in tmpfs
      idle    short sleeps: timers and the idle loop
    """
    from altp2m_replay import capture
    from altp2m_replay.progress import Progress

    progress = Progress.for_terminal()
    if progress is not None:
        progress.label = "import"
    res = capture.capture(
        workload,
        output,
        vcpus=vcpus,
        memory=memory,
        rows=rows,
        echo=lambda m: click.echo(m, err=True),
        progress=progress,
        keep_raw=keep_raw,
    )
    click.echo(capture.summary_text(res))


# --------------------------------------------------------------------------- replay
@main.command()
@click.argument("traces", nargs=-1, required=True, metavar="TRACE_OR_DIR...")
@click.option(
    "-p",
    "--policy",
    "policies",
    multiple=True,
    required=True,
    help="Policy file or built-in name (repeatable).",
)
@click.option(
    "-o",
    "--output",
    "out_dir",
    default="reports/latest",
    show_default=True,
    type=click.Path(file_okay=False),
    help="Output folder.",
)
@click.option(
    "--cost", "costs", multiple=True, metavar="KEY=VALUE", help="Override one cost (repeatable)."
)
@click.option("--profile", default=None, help="Cost profile: xen-dom0 (default) or polling-agent.")
@click.option(
    "--window",
    type=click.IntRange(min=1),
    default=None,
    help="Timeline window in rows (default: rows / 256).",
)
@click.option(
    "--jobs",
    type=click.IntRange(min=1),
    default=None,
    help="Local processes, each replaying whole traces (default: number of cores, "
    "at most one per trace). More jobs than traces also splits each trace's "
    "policies over processes, each decoding the trace.",
)
@click.option(
    "--threads",
    type=click.IntRange(min=1),
    default=None,
    help="Threads per process replaying a trace's policies side by side on one "
    "decode (default: number of cores / processes in use). Cores used: about "
    "jobs x threads.",
)
@click.option(
    "--scheduler",
    default=None,
    metavar="ADDRESS",
    help="Run cells on an existing Dask cluster (tcp://HOST:PORT).",
)
@click.option("--resume", is_flag=True, help="Skip cells already finished in the output folder.")
@click.option("--no-html", is_flag=True, help="Skip report.html.")
@click.option(
    "--max-memory",
    default=None,
    metavar="SIZE",
    help="Memory budget of each process, such as 8G or 512M (default: half the RAM).",
)
def replay(
    traces,
    policies,
    out_dir,
    costs,
    profile,
    window,
    jobs,
    threads,
    scheduler,
    resume,
    no_html,
    max_memory,
):
    """Replay every TRACE (file, or folder of .parquet) under every POLICY.

    Each trace is decoded once for all its policies. Traces run in --jobs processes; within
    a process the policies of a trace run in --threads threads. The defaults use every core
    once: one trace with several policies runs them in threads, many traces run in processes.
    """
    from altp2m_replay import budget, run
    from altp2m_replay import costs as cost_mod
    from altp2m_replay.progress import Progress

    if max_memory is not None:
        budget.set_limit(budget.parse_size(max_memory))

    overrides = cost_mod.parse_cost_options(costs)
    manifest = run.replay(
        traces,
        policies,
        out_dir,
        cost_overrides=overrides,
        profile=profile,
        window=window,
        jobs=jobs,
        threads=threads,
        scheduler=scheduler,
        resume=resume,
        html=not no_html,
        progress=Progress.for_terminal(),
        warn=lambda m: click.echo(f"warning: {m}", err=True),
        note=lambda m: click.echo(f"note: {m}", err=True),
        command="altp2m-replay " + " ".join(_Root.invoked_args),
    )
    cells = manifest["cells"]
    rate = manifest["timings"]["records_per_second"]
    click.echo(
        f"{len(cells)} cells, {sum(c['records'] for c in cells):,} records "
        f"in {manifest['timings']['seconds']:.2f} s ({rate or 0:,} records/s) -> {out_dir}"
    )
    for c in cells:
        for w in c["warnings"]:
            click.echo(f"warning: {c['trace']} x {c['policy']}: {w}", err=True)
    if cells:
        from altp2m_replay.terminal_summary import summary_text

        click.echo(summary_text(out_dir, html=not no_html))


# --------------------------------------------------------------------------- bench
@main.command()
@click.option("-n", "rows", type=click.IntRange(min=1000), default=20_000_000, show_default=True)
@click.option("--vcpus", type=click.IntRange(1, VCPU_LIMIT), default=4, show_default=True)
@click.option("-p", "--policy", default="xen-access-altp2m-write", show_default=True)
@click.option("--workload", default="kernel", show_default=True)
@click.option(
    "--rounds",
    type=click.IntRange(min=1),
    default=3,
    show_default=True,
    help="Passes per figure; the best is reported.",
)
@click.option(
    "--threads",
    type=click.IntRange(min=0),
    default=None,
    help="Threads of the side-by-side figure (default: number of cores; 0 skips it).",
)
def bench(rows, vcpus, policy, workload, rounds, threads):
    """Replay throughput (SPEC §13): bare scan, kernel and end-to-end rows/s, and every
    built-in policy side by side versus one after the other."""
    from altp2m_replay.bench import format_bench, run_bench

    click.echo(
        format_bench(
            run_bench(
                rows,
                vcpus,
                policy,
                workload,
                rounds=rounds,
                threads=threads,
                echo=lambda m: click.echo(m, err=True),
            )
        )
    )


# --------------------------------------------------------------------------- policy
@main.group(cls=_Group)
def policy():
    """List, show and check introspection policies (SPEC §9)."""


@policy.command("list")
def policy_list():
    """Built-in policies and what each models."""
    from altp2m_replay.policy import builtin_names, load_policy

    for name in builtin_names():
        p = load_policy(name)
        first = " ".join(p.description.split()).split(": ")[0]
        click.echo(f"{name:34s} {first[:90]}")


@policy.command("show")
@click.argument("name")
def policy_show(name):
    """Print a policy's TOML."""
    from altp2m_replay.policy import load_policy

    click.echo(load_policy(name).text.rstrip())


@policy.command("check")
@click.argument("ref", metavar="FILE_OR_NAME")
@click.option(
    "--trace",
    "trace_path",
    type=click.Path(dir_okay=False),
    default=None,
    help="Resolve trace-dependent gfn selectors and run setup against this trace.",
)
def policy_check(ref, trace_path):
    """Check a policy; with --trace also run its setup on that trace's RAM."""
    from altp2m_replay import checks

    report = checks.check_policy(ref, trace_path)
    for w in report.warnings:
        click.echo(f"warning: {w}", err=True)
    click.echo(report.summary)


# --------------------------------------------------------------------------- report / compare
@main.command("report")
@click.argument("out_dir", metavar="DIR", type=click.Path())
def report_cmd(out_dir):
    """Re-render DIR/report.html from the Parquet tables in DIR."""
    from altp2m_replay.report import write_report

    click.echo(f"wrote {write_report(out_dir)}")


@main.command("compare")
@click.argument("base_dir", type=click.Path())
@click.argument("new_dir", type=click.Path())
@click.option(
    "--metric",
    "metrics",
    multiple=True,
    metavar="NAME",
    help="Numeric summary column to gate on (repeatable; default: cycles_total, "
    "ept_exits, vm_events).",
)
@click.option(
    "--max-increase",
    type=click.FloatRange(min=0),
    default=0.0,
    show_default=True,
    metavar="PCT",
    help="Allowed growth in percent before the gate fails.",
)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["text", "markdown", "json"]),
    default="text",
    show_default=True,
)
def compare_cmd(base_dir, new_dir, metrics, max_increase, fmt):
    """CI gate: compare two replay outputs; exit 1 when a metric grew past the threshold."""
    from altp2m_replay.compare import compare
    from altp2m_replay.errors import GateFailed

    text, failed = compare(base_dir, new_dir, metrics, max_increase, fmt)
    click.echo(text)
    if failed:
        raise GateFailed(
            f"{new_dir}: a metric grew more than {max_increase:g}% over {base_dir}, "
            f"has no usable value (null, NaN, infinite), or a cell of {base_dir} "
            f"is missing (see above)"
        )
