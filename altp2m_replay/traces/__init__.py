"""Trace files (SPEC §2): open, stream, validate, describe and write Parquet traces.

One module per job: ``layout`` (columns, dtypes, bounds, metadata), ``reader`` (open and
stream as numpy batches), ``checker`` (validate values, gather statistics), ``facts`` (what
a replay needs before its first batch), ``info`` (``trace info``'s text) and ``writer``.
This package and the report/table writers are the only places that touch pyarrow for
traces; everything else sees numpy arrays through :class:`Batch`. The public names of
every module are re-exported here: ``from altp2m_replay.traces import open_trace``.
"""

from altp2m_replay.traces.checker import TraceStats, Validator, quick_stats, validate
from altp2m_replay.traces.facts import facts_of, replay_facts, trace_facts
from altp2m_replay.traces.info import info_text
from altp2m_replay.traces.layout import (
    ACCESS_NAMES,
    COMPRESSION,
    DEFAULT_ROW_GROUP,
    FORMAT_VERSION,
    INSN_ROW_LIMIT,
    META_KEY,
    OP_NAMES,
    TRACE_SCHEMA,
    TraceMeta,
    parse_meta,
)
from altp2m_replay.traces.reader import Batch, Trace, open_trace, trace_name
from altp2m_replay.traces.writer import TraceWriter, write_trace

__all__ = [
    "ACCESS_NAMES",
    "COMPRESSION",
    "DEFAULT_ROW_GROUP",
    "FORMAT_VERSION",
    "INSN_ROW_LIMIT",
    "META_KEY",
    "OP_NAMES",
    "TRACE_SCHEMA",
    "Batch",
    "Trace",
    "TraceMeta",
    "TraceStats",
    "TraceWriter",
    "Validator",
    "facts_of",
    "info_text",
    "open_trace",
    "parse_meta",
    "quick_stats",
    "replay_facts",
    "trace_facts",
    "trace_name",
    "validate",
    "write_trace",
]
