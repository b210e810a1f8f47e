"""Classify a stream as it arrives with a step artifact (numpy + TVM only, as on a device).

Build the artifact once (on the development machine):

    edgekit export lmuformer --streaming -o step.onnx
    edgekit compile step.onnx --target host -o step.edgekit

then feed it frames one by one, here read from a (batch, time, features) .npy file standing
in for a sensor; a new stream starts with ``session.reset()``:

    python examples/stream_classify.py step.edgekit seq.npy
"""

from __future__ import annotations

import sys
import time

import numpy as np

from edgekit import runtime


def main(artifact: str, sequence: str) -> int:
    session = runtime.load(artifact).stream()
    frames = np.load(sequence, allow_pickle=False).astype(session.frame_spec["dtype"])
    k = session.chunk
    for start in range(0, frames.shape[1] - frames.shape[1] % k, k):
        t0 = time.perf_counter()
        logits = session.step(frames[:, start:start + k])  # state stays inside the session
        ms = (time.perf_counter() - t0) * 1e3
        frame = start + k - 1 - session.delay
        if frame >= 0:  # the first `delay` outputs are the model's look-ahead warm-up
            print(f"frame {frame:4d}: class {int(logits[0, -1].argmax())}  ({ms:.3f} ms)")
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 3:
        print(__doc__)
        sys.exit(2)
    sys.exit(main(sys.argv[1], sys.argv[2]))
