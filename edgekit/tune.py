"""MetaSchedule tuning with a persistent, shared tuning database.

Why: TVM's default CPU pipeline does no scheduling, so untuned kernels are far slower than
onnxruntime. MetaSchedule searches schedules per kernel ("task", one fused PrimFunc) by
measuring candidates on this machine, guided by an xgboost cost model.

The database lives in one directory per target (``<root>/<target-hash>/``, root default
``$XDG_CACHE_HOME/edgekit/tuning`` or ``~/.cache/edgekit/tuning``). MetaSchedule keys records
by the structural hash of each kernel, so any later compile for the same target whose model
shares a kernel (same op, shapes, dtypes, constants folded the same way) reuses its record,
with or without ``--tune``.

Which kernel is tuned next, and how a ``--tune-minutes`` budget ends the session:
``edgekit.tune_budget``. Tuning never makes a kernel slower than edgekit's default
schedule: see ``edgekit.tune_check``.

    prepare(mod, target, request)      what ``compile`` does before ``tvm.compile`` on CPUs:
                                       lower, tune if asked, apply records, default schedules
    lower(mod, tvm_target)             Relax -> legalized, fused TIR kernels (what is tuned)
    tune(mod, target, db, ...)         measure and record schedules (needs to run here)
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.util
import json
import logging
import math
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from edgekit.errors import EdgekitError, last_line
from edgekit.targets import Target
from edgekit.tune_budget import Budget

Progress = Callable[[str], None]
SCHEDULED = "tirx.is_scheduled"
_WORKLOADS = "database_workload.json"
_RECORDS = "database_tuning_record.json"


def no_progress(_: str) -> None:
    pass


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
    tasks_tuned: int = 0  # kernels measured at least once (a short time budget may end first)
    records_kept: int = 0  # kernels whose record beat the default schedule
    records_rejected: int = 0  # kernels whose default schedule was as fast or faster

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class TuningRequest:
    """``--tune [--trials N | --tune-minutes M] [--tuning-db DIR]`` as data."""

    tune: bool = False
    trials: int | None = None
    minutes: float | None = None
    db: str | Path | None = None


def prepare(mod, target: Target, request: TuningRequest | None = None,
            progress: Progress = no_progress) -> tuple[Any, dict[str, Any]]:
    """Lower a Relax module for a CPU target and schedule every kernel: tune first when asked,
    then tuning records from the database, then default schedules for the rest.
    Returns (module ready for ``tvm.compile``, the manifest's ``tuning`` record)."""
    from edgekit import schedules
    from edgekit.tune_check import apply_database

    request = request or TuningRequest()
    tvm_target = target.tvm_target()
    db = db_dir(target, request.db)
    progress("lowering and fusing")
    mod = lower(mod, tvm_target)
    kernels = _kernel_count(mod)
    info: dict[str, Any] = {"tuned": False, "db": str(db), "kernels": kernels}
    if request.tune:
        stats = tune(mod, target, db, request.trials, request.minutes, progress)
        info.update(tuned=True, **stats.to_dict())
    progress("applying tuning records")
    mod, counts = apply_database(mod, tvm_target, db)
    progress("default schedules")
    mod, scheduled = schedules.apply_default(mod, tvm_target)
    # records_rejected: kernels with a record that use the default schedule, which the
    # check measured faster; records_unchecked: records applied without such a check
    info.update(records_applied=counts.applied, records_rejected=counts.rejected,
                records_unchecked=counts.unchecked, default_schedules=scheduled)
    return mod, info


def tune_model(onnx_path: str | Path, target: str, inputs=(), trials: int | None = None,
               minutes: float | None = None, db: str | Path | None = None,
               progress: Progress = no_progress) -> dict[str, Any]:
    """``edgekit tune``: tune an ONNX model's kernels into the database, write no artifact."""
    from edgekit import compile as tvm_compile
    from edgekit import intake, verify
    from edgekit.targets import load_target
    from edgekit.tune_check import apply_database

    tgt = load_target(target)
    model = intake.load_onnx(onnx_path, inputs)
    specs = verify.onnx_input_specs(model, inputs)
    progress("importing into TVM Relax")
    mod = lower(tvm_compile.to_relax(model, specs), tgt.tvm_target())
    path = db_dir(tgt, db)
    stats = tune(mod, tgt, path, trials, minutes, progress)
    _, counts = apply_database(mod, tgt.tvm_target(), path)
    return {**stats.to_dict(), "kernels": _kernel_count(mod), "kernels_with_records":
            counts.applied, "target": tgt.name}


def _kernel_count(mod) -> int:
    import tvm

    return sum(1 for _, f in mod.functions.items() if isinstance(f, tvm.tirx.PrimFunc))


def default_root() -> Path:
    """``$EDGEKIT_TUNING_DB`` or the user's cache directory + ``edgekit/tuning``."""
    if os.environ.get("EDGEKIT_TUNING_DB"):
        return Path(os.environ["EDGEKIT_TUNING_DB"]).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "edgekit" / "tuning"


def target_key(target: Target) -> str:
    """A short stable hash of the resolved TVM target (the CPU LLVM detected, the core count)
    and the TVM version (records are TIR traces)."""
    import tvm

    text = json.dumps({"tvm": str(target.tvm_target()), "version": tvm.__version__},
                      sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def db_dir(target: Target, root: str | Path | None = None) -> Path:
    """The database directory for ``target`` under ``root`` (default: ``default_root()``)."""
    return Path(root).expanduser() if root is not None else default_root() / target_key(target)


def has_records(db: Path) -> bool:
    f = db / _RECORDS
    return f.is_file() and f.stat().st_size > 0


def open_database(db: Path):
    """The MetaSchedule JSON database in ``db`` (created when missing)."""
    from tvm.s_tir import meta_schedule as ms

    try:
        db.mkdir(parents=True, exist_ok=True)
        return ms.database.JSONDatabase(path_workload=str(db / _WORKLOADS),
                                        path_tuning_record=str(db / _RECORDS),
                                        allow_missing=True)
    except OSError as exc:
        raise EdgekitError(f"cannot use tuning database {db}: {exc.strerror or exc}") from None
    except Exception as exc:
        raise EdgekitError(f"cannot read tuning database {db}: "
                           f"{last_line(exc)}") from None


def lower(mod, tvm_target):
    """Decompose, legalize and fuse: the TIR kernels MetaSchedule tunes and the DB is keyed on."""
    import tvm
    from tvm import relax

    seq = tvm.transform.Sequential([
        relax.transform.DecomposeOpsForInference(),
        relax.transform.CanonicalizeBindings(),
        relax.transform.LegalizeOps(),
        relax.transform.AnnotateTIROpPattern(),
        relax.transform.FoldConstant(),
        relax.transform.FuseOps(),
        relax.transform.FuseTIR(),
    ])
    with tvm_target:
        return seq(mod)


def scheduled_count(mod) -> int:
    import tvm

    return sum(1 for _, f in mod.functions.items()
               if isinstance(f, tvm.tirx.PrimFunc) and f.attrs and f.attrs.get(SCHEDULED))


def tune(
    mod,
    target: Target,
    db: Path,
    trials: int | None = None,
    minutes: float | None = None,
    progress: Progress = no_progress,
    seed: int | None = 0,
) -> TuneStats:
    """Tune the kernels of a lowered module (see ``lower``) and add the records to ``db``.

    Budget: ``trials`` measured candidates in all, or ``minutes`` of wall time (the running
    batch finishes first), or both (whichever ends first); default 64 trials per kernel.
    Then every kernel with a record is checked against its default schedule
    (``check_records``; a few seconds per kernel, outside the budget)."""
    from tvm.s_tir import meta_schedule as ms

    from edgekit.tune_check import check_records

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
    database = open_database(db)
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
    return TuneStats(tasks=len(tasks), tasks_tuned=len(budget.batches), trials=budget.done,
                     seconds=round(time.perf_counter() - budget.t0, 1), budget_trials=trials,
                     budget_minutes=minutes, cost_model=cost_model, db=str(db),
                     records_kept=kept, records_rejected=rejected)


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


def build_kernel(mod, target, _params=None):
    """MetaSchedule's build step without importing every tensor intrinsic (CUDA, ARM...)
    in each worker: that import alone takes ~1 min of CPU, and fp32 CPU schedules use none."""
    from tvm.driver import build as tir_build
    from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock

    mod = RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(mod)
    return tir_build(mod, target=target)


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
