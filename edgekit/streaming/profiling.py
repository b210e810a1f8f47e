"""Per-frame latency of a step artifact with its state carried from call to call.

The generic profiler times stateless calls on seeded inputs (states included); this times
the real streaming loop: each timed call advances one ``StreamSession`` by one chunk, the
state never leaving the device. Latency per frame is the per-call latency over the chunk.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


def profile_stream(path: str | Path, warmup: int = 10, repeat: int = 100,
                   duration: float | str | None = None, seed: int = 0) -> dict[str, Any]:
    """``duration`` as in ``edgekit profile`` (seconds, or "auto" until the median is stable)."""
    from edgekit import runtime
    from edgekit.report.record import measure
    from edgekit.report.stats import latency_stats
    from edgekit.verify import TensorSpec, seeded_inputs

    session = runtime.load(path).stream()
    spec = session.frame_spec
    frame = seeded_inputs([TensorSpec.from_dict(spec)],
                          seed)[spec["name"]]
    times, _ = measure(session.prepare(frame), warmup, repeat, duration)
    per_call = latency_stats(times)
    state_bytes = sum(int(np.prod(s["shape"])) * np.dtype(s["dtype"]).itemsize
                      for s in session.states)
    return {
        "chunk": session.chunk,
        "delay": session.delay,
        "frames": session.frames,
        "latency_ms": per_call,
        "per_frame_ms": {k: (v if k == "cv" else v / session.chunk)
                         for k, v in per_call.items()},
        "state_bytes": state_bytes,
    }
