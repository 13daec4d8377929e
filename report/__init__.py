"""The BERT case study, measured: every resource-efficiency strategy's effect on memory, compute and
fidelity on this machine, beside what users would pick instead. ``make report`` (``python -m
ambert.report``) writes ``build/report/index.html``, ``report.md`` and ``report.json``."""
