"""Benchmark of the tuning database under faults: N rounds on one database, each round two
concurrent `edgekit tune` processes (two models sharing a kernel, so their workload lists
differ), a third tune killed with SIGKILL once it has written a record, then `edgekit compile`
of both models. A round counts as usable when both tunes and both compiles exit 0 with no
traceback, every compile is verified against onnxruntime, and the database has no bad line.
Issue 18's goal: 10 rounds of 10.

    python bench/faults_tune.py                  # 10 rounds, 2 trials per tune
    python bench/faults_tune.py --rounds 1 --trials 1

Each tune is a real MetaSchedule session: on a busy 2-core machine a round takes minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from edgekit.compiler import tuning_db

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from _tiny_graphs import chain  # noqa: E402  (the tests' graph: one kernel per layer shape)

EDGEKIT = [sys.executable, "-c", "from edgekit.cli import main; main()"]


def start_tune(model: Path, db: Path, trials: int) -> subprocess.Popen:
    return subprocess.Popen([*EDGEKIT, "tune", str(model), "--trials", str(trials),
                             "--tuning-db", str(db)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def records(db: Path) -> int:
    try:
        return len((db / "database_tuning_record.json").read_bytes().splitlines())
    except FileNotFoundError:
        return 0


def one_round(models: list[Path], db: Path, out: Path, trials: int) -> str | None:
    """None when the database stayed usable, else why not."""
    before = records(db)
    victim = start_tune(models[0], db, 10_000)
    tunes = [start_tune(m, db, trials) for m in models]
    deadline = time.monotonic() + 900
    while records(db) == before and victim.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    if victim.poll() is not None:
        return f"the tune to be killed ended first (exit {victim.returncode})"
    os.killpg(victim.pid, signal.SIGKILL)
    victim.wait()
    for proc in tunes:
        stdout, stderr = proc.communicate()
        if proc.returncode != 0 or "Traceback" in stderr:
            return f"tune exit {proc.returncode}: {(stderr or stdout).strip()[-300:]}"
    for m in models:
        art = out / f"{m.stem}.edgekit"
        done = subprocess.run([*EDGEKIT, "compile", str(m), "-o", str(art), "--tuning-db",
                               str(db)], capture_output=True, text=True)
        if done.returncode != 0 or "Traceback" in done.stderr:
            return f"compile exit {done.returncode}: {done.stderr.strip()[-300:]}"
        manifest = json.loads((art / "manifest.json").read_text())
        if not all(c["ok"] for c in manifest["verification"]["outputs"]):
            return f"compile of {m.name} not verified"
    bad = tuning_db.read(db).bad
    return f"{len(bad)} bad line(s): {bad[0]}" if bad else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--trials", type=int, default=2, help="trials per concurrent tune")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="edgekit-faults-tune-") as tmp:
        d = Path(tmp)
        models = [chain(d / "a.onnx", [16, 32, 8]), chain(d / "b.onnx", [8, 16, 32], 1)]
        db, usable = d / "db", 0
        for i in range(args.rounds):
            t0 = time.perf_counter()
            why = one_round(models, db, d, args.trials)
            usable += why is None
            print(f"round {i + 1}: {'usable' if why is None else 'BROKEN: ' + why} "
                  f"({time.perf_counter() - t0:.0f} s, {records(db)} records)", flush=True)
        print(f"{usable} of {args.rounds} rounds left the database usable")


if __name__ == "__main__":
    main()
