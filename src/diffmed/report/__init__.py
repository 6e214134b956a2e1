"""Run reports (Markdown + self-contained HTML) and their figures."""
from diffmed.report.report import write_report

__all__ = ["write_report"]
