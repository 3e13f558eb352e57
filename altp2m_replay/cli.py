"""Command line: parse options, call one library function, print. Nothing else lives here."""

from __future__ import annotations

import sys

import click

from altp2m_replay import __version__
from altp2m_replay.errors import ReplayError


class _Group(click.Group):
    """A group that turns library errors into one ``Error:`` line and the SPEC §12 exit code."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except ReplayError as exc:
            click.echo(f"Error: {exc}", err=True)
            sys.exit(exc.exit_code)
        except FileNotFoundError as exc:
            click.echo(f"Error: {exc.filename}: no such file or directory", err=True)
            sys.exit(2)


CONTEXT = {"help_option_names": ["-h", "--help"]}


@click.group(cls=_Group, context_settings=CONTEXT)
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
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--vcpus", type=click.IntRange(1, 4096), default=1, show_default=True)
@click.option("-o", "--output", type=click.Path(dir_okay=False), required=True)
def trace_generate(workload, rows, seed, vcpus, output):
    """Write a seeded synthetic trace of WORKLOAD (see `trace generate --help`)."""
    from altp2m_replay import generate

    generate.generate(workload, rows, seed=seed, vcpus=vcpus, output=output)
    click.echo(f"wrote {output}: {rows:,} rows of {workload}")


@trace.command("import")
@click.argument("fmt", metavar="FORMAT", type=click.Choice(["lackey", "qemu-mem", "csv"]))
@click.argument("input_path", metavar="INPUT", type=click.Path(dir_okay=False))
@click.option("-o", "--output", type=click.Path(dir_okay=False), required=True)
@click.option("--base-gfn", type=int, default=0x1000, show_default=True,
              help="First gfn of the first-touch page allocator (lackey).")
def trace_import(fmt, input_path, output, base_gfn):
    """Convert INPUT in FORMAT into a trace Parquet file."""
    from altp2m_replay import importers

    rows = importers.import_trace(fmt, input_path, output, base_gfn=base_gfn)
    click.echo(f"wrote {output}: {rows:,} rows")
