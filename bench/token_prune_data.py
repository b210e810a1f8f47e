"""Inputs and timing for bench/token_prune.py: MiniLM text windows, interleaved latency medians."""

from __future__ import annotations

import importlib
import inspect
import re
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

# Standard-library modules whose docstrings give MiniLM real English text that ships with every
# Python (no download); fixed order so the windows are the same on every run of one Python.
DOC_MODULES = ("argparse", "asyncio", "bisect", "calendar", "collections", "configparser",
               "contextlib", "csv", "dataclasses", "datetime", "decimal", "difflib", "email",
               "fractions", "functools", "gzip", "heapq", "http.client", "inspect", "ipaddress",
               "itertools", "json", "logging", "mailbox", "os", "pathlib", "pickle", "random",
               "re", "sched", "shutil", "socket", "sqlite3", "statistics", "string",
               "subprocess", "tarfile", "tempfile", "textwrap", "threading", "typing",
               "unittest", "urllib.request", "uuid", "warnings", "zipfile")

def _from_stdlib(obj) -> bool:
    """Defined by the standard library: torch and TVM replace ``inspect.getfile`` when imported,
    and the windows must not depend on what the process imported before."""
    module = getattr(obj, "__module__", None) or "builtins"
    return module.split(".")[0] in sys.stdlib_module_names


def doc_windows(tok, seq: int, count: int) -> list[str]:
    """``count`` prose windows (1.25·``seq`` words each: 40 for 32 tokens) from stdlib docstrings,
    each filling all ``seq`` tokens, spread evenly over everything found."""
    words: list[str] = []
    for name in DOC_MODULES:
        module = importlib.import_module(name)
        docs = [inspect.getdoc(module)] + [inspect.getdoc(obj) for key, obj in
                                           sorted(vars(module).items())
                                           if callable(obj) and not key.startswith("_")
                                           and _from_stdlib(obj)]
        for doc in docs:
            for para in (doc or "").split("\n\n"):
                if ">>>" in para or para.count("(") > 4 or len(para.split()) < 12:
                    continue  # code examples and signatures are not prose
                words.extend(re.sub(r"\s+", " ", para).split())
    per = round(1.25 * seq)
    windows = [" ".join(words[i:i + per]) for i in range(0, len(words) - per, per)]
    full = [w for w in windows if len(tok(w, verbose=False)["input_ids"]) >= seq]
    if len(full) < count:
        raise SystemExit(f"only {len(full)} text windows found, {count} asked")
    pick = np.linspace(0, len(full) - 1, count).round().astype(int)
    return [full[i] for i in pick]


def latencies(models: dict[str, tuple[onnx.ModelProto, dict]], d: Path,
              repeat: int) -> dict[str, tuple[float, float]]:
    """Median (TVM, onnxruntime) ms per model. Each is compiled for the host (untuned, verified
    against onnxruntime by ``api.compile``); then the calls are interleaved, one of each per
    round, so a load change on the machine hits every model alike."""
    import os

    from edgekit import api, runtime
    from edgekit.export import save_onnx
    from edgekit.verify import ort_session

    threads = int(os.environ.get("TVM_NUM_THREADS", "1"))
    d = Path(tempfile.mkdtemp(dir=d))  # artifact paths must be unique per process (dlopen)
    calls = {}
    for tag, (model, sample) in models.items():
        print(f"compile {tag}", file=sys.stderr)
        save_onnx(model, d / f"{len(calls)}.onnx")
        api.compile(d / f"{len(calls)}.onnx", "host", d / f"{len(calls)}.edgekit")
        tvm_call = runtime.load(d / f"{len(calls)}.edgekit").prepare(**sample)
        sess = ort_session(model, threads=threads)
        calls[tag] = (tvm_call, lambda sess=sess, sample=sample: sess.run(None, sample))
    times: dict[str, tuple[list, list]] = {tag: ([], []) for tag in calls}
    for i in range(repeat + 5):
        for tag, pair in calls.items():
            for fn, out in zip(pair, times[tag], strict=True):
                start = time.perf_counter()
                fn()
                if i >= 5:  # warm-up rounds
                    out.append((time.perf_counter() - start) * 1e3)
    return {tag: (float(np.median(t)), float(np.median(o))) for tag, (t, o) in times.items()}
