"""The report card of a run (`llmjax-report`): prompts answered by every stage, held-out
scores, curves, time and settings per stage, written as `<workdir>/report/report.md`."""

from llmjax.report.card import write_report  # noqa: F401
