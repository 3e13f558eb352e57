"""The HTML report (``report.html``) of a replay output folder.

``render_html`` and ``write_report`` load the template engine when first used, so that
``compare``, which reads results through ``report.data``, does not import jinja2.
"""

__all__ = ["render_html", "write_report"]


def __getattr__(name: str):
    if name in __all__:
        from altp2m_replay.report import html

        return getattr(html, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
