"""MetaSchedule tuning of a lowered module's kernels into the tuning database.

Why: TVM's default CPU pipeline does no scheduling, so untuned kernels are far slower than
onnxruntime. MetaSchedule searches schedules per kernel ("task", one fused PrimFunc) by
measuring candidates on this machine, guided by an xgboost cost model. Records go into the
per-target database (``tuning_db``), where any later compile that shares a kernel finds them;
each record is written through to the files as it is measured, under the database's lock, so
concurrent sessions share the files and a killed one loses only its unmeasured candidates.

Which kernel is tuned next, and how a ``--tune-minutes`` budget ends the session:
``tune_budget``. Tuning never makes a kernel slower than edgekit's default schedule: see
``tune_check``. What runs before and after tuning (lowering, applying records, default
schedules): ``pipeline``.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import logging
import math
import platform
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from edgekit.compiler.progress import Progress, no_progress
from edgekit.compiler.schedules import SCHEDULED
from edgekit.compiler.tune_budget import Budget
from edgekit.compiler.tune_check import build_kernel, check_records
from edgekit.compiler.tuning_db import read, report, shared_database
from edgekit.errors import EdgekitError, last_line
from edgekit.targets import Target


@dataclass
class TuneStats:
    """What one tuning session did (goes into the manifest's ``tuning`` field)."""

    tasks: int
    trials: int
    seconds: float
    budget_trials: int | None
    budget_minutes: float | None
    cost_model: str
    db: str
    tasks_tuned: int = 0  # kernels with at least one candidate measured without error
    tasks_sent: int = 0  # kernels given at least one batch (a batch may fail to build or run)
    records_kept: int = 0  # kernels whose record beat the default schedule
    records_rejected: int = 0  # kernels whose default schedule was as fast or faster
    records_skipped: list[str] = field(default_factory=list)  # bad database lines passed over

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class TuningRequest:
    """``--tune [--trials N | --tune-minutes M] [--tuning-db DIR]`` as data."""

    tune: bool = False
    trials: int | None = None
    minutes: float | None = None
    db: str | Path | None = None


def tune(
    mod,
    target: Target,
    db: Path,
    trials: int | None = None,
    minutes: float | None = None,
    progress: Progress = no_progress,
    seed: int | None = 0,
) -> TuneStats:
    """Tune the kernels of a lowered module (``pipeline.lower``) and add the records to ``db``.

    Budget: ``trials`` measured candidates in all, or ``minutes`` of wall time (the running
    batch finishes first), or both (whichever ends first); default 64 trials per kernel.
    Then every kernel with a record is checked against its default schedule
    (``check_records``; a few seconds per kernel, outside the budget)."""
    from tvm.s_tir import meta_schedule as ms

    if not target.runs_on_host or target.device != "cpu":
        raise EdgekitError(f"tuning measures on this machine; target {target.name!r} does not "
                           "run here (tune on the device, then reuse its --tuning-db)")
    if trials is not None and trials < 1:
        raise EdgekitError("--trials must be at least 1")
    if minutes is not None and minutes <= 0:
        raise EdgekitError("--tune-minutes must be positive")
    tvm_target = target.tvm_target()
    tasks = [t for t in ms.relax_integration.extract_tasks(mod, tvm_target)
             if not t.dispatched[0].attrs or not t.dispatched[0].attrs.get(SCHEDULED)]
    if not tasks:
        raise EdgekitError("nothing to tune: the model has no TIR kernels left unscheduled")
    per_task = 64
    if trials is not None:
        total = trials
        per_task = max(1, math.ceil(trials / len(tasks)))
    elif minutes is None:
        total = per_task * len(tasks)
    else:  # the clock is the budget
        per_task, total = 10_000, 10_000 * len(tasks)
    cost_model = _cost_model()
    try:
        db.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise EdgekitError(f"cannot use tuning database {db}: {exc.strerror or exc}") from None
    contents = read(db)  # bad lines are skipped, reported once here and in the stats
    report(db, contents.bad)
    database = shared_database(db, contents.database)
    budget = Budget(total, minutes, progress)
    progress(f"tuning {len(tasks)} kernels, {total if trials or not minutes else '∞'} trials")
    logging.getLogger("tvm.s_tir.meta_schedule").setLevel(logging.WARNING)
    with (tempfile.TemporaryDirectory(prefix="edgekit-tune-") as work,
          _host_tensor_intrinsics(), _unnamed_log_handlers_detached()):
        try:
            ms.relax_integration.tune_relax(
                mod=mod, params={}, target=tvm_target, work_dir=work,
                max_trials_global=total, max_trials_per_task=per_task,
                num_trials_per_iter=min(16, per_task), database=database,
                cost_model=cost_model, builder=_builder(), runner=_runner(),
                measure_callbacks=[*ms.measure_callback.MeasureCallback.create("default"),
                                   budget.measure_callback()],
                task_scheduler=budget.scheduler(), seed=seed)
        except EdgekitError:
            raise
        except Exception as exc:
            raise EdgekitError(f"MetaSchedule tuning failed: {last_line(exc)}") from exc
    kept, rejected = check_records(mod, tvm_target, db, progress)
    return TuneStats(tasks=len(tasks), tasks_tuned=len(budget.best),
                     tasks_sent=len(budget.batches), trials=budget.done,
                     seconds=round(time.perf_counter() - budget.t0, 1), budget_trials=trials,
                     budget_minutes=minutes, cost_model=cost_model, db=str(db),
                     records_kept=kept, records_rejected=rejected,
                     records_skipped=[str(b) for b in contents.bad])


@contextlib.contextmanager
def _unnamed_log_handlers_detached():
    """MetaSchedule's ``create_loggers`` hands dictConfig the names of the handlers already on
    its logger and fails ("'NoneType' object has no attribute 'format'") on one without a name,
    e.g. pytest's capture handler or an application's own. Such handlers sit out the session."""
    log = logging.getLogger("tvm.s_tir.meta_schedule")
    unnamed = [h for h in log.handlers if h.get_name() is None]
    for handler in unnamed:
        log.removeHandler(handler)
    try:
        yield
    finally:
        for handler in unnamed:
            log.addHandler(handler)


@contextlib.contextmanager
def _host_tensor_intrinsics():
    """MetaSchedule's TuneContext imports every tensor-intrinsic table (CUDA, ARM, ROCm,
    Hexagon...: ~45 s of CPU here); tuning on this machine needs only its own architecture's.
    For the session the package is just that table; then the package entry is dropped, so a
    later full import runs as usual (tables already loaded are reused, not registered twice)."""
    name = "tvm.s_tir.tensor_intrin"
    table = {"x86_64": "x86", "amd64": "x86", "aarch64": "arm_cpu", "arm64": "arm_cpu",
             "riscv64": "riscv_cpu"}.get(platform.machine().lower())
    spec = importlib.util.find_spec(name) if table and name not in sys.modules else None
    if spec is None:
        yield
        return
    package = importlib.util.module_from_spec(spec)  # not executed: its __init__ loads all
    sys.modules[name] = package
    try:
        importlib.import_module(f"{name}.{table}")
        yield
    finally:
        if sys.modules.get(name) is package:
            del sys.modules[name]


def _builder():
    from tvm.s_tir import meta_schedule as ms

    return ms.builder.LocalBuilder(f_build=build_kernel, timeout_sec=120.0)


def _runner():
    from tvm.s_tir import meta_schedule as ms

    config = ms.runner.EvaluatorConfig(number=3, repeat=1, min_repeat_ms=40,
                                       enable_cpu_cache_flush=False)
    return ms.runner.LocalRunner(timeout_sec=120.0, evaluator_config=config)


def _cost_model() -> str:
    """xgboost when installed (a learned model), else MetaSchedule's random model."""
    try:
        import xgboost  # noqa: F401
    except ImportError:
        return "random"
    return "xgb"
