"""HTML report and figures of a run."""

from .html import render, write_report

__all__ = ["render", "write_report"]
