"""Profile runs people look at: the versioned run schema (``schema``), the timing loop with its
statistics, bootstrap intervals and the ``--duration auto`` stopping rule (``stats``), building
a run from measurements taken here or on a device (``record``), A/B comparison and the CI gate
(``compare``), and the self-contained HTML report with inline SVG charts (``html``, ``svg``)."""
