"""The HTML report (``report.html``) of a replay output folder."""

from altp2m_replay.report.html import render_html, write_report

__all__ = ["render_html", "write_report"]
