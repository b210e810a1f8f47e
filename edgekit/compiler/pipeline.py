"""What happens to a Relax module between import and ``tvm.compile`` on CPU targets.

    prepare(mod, target, request)   lower -> tune if asked -> apply records -> default
                                    schedules (``build.build`` calls it for CPU targets)
    tune_model(onnx_path, target)   ``edgekit tune``: import, lower, tune; no artifact
    repair_db(target, db)           ``edgekit tune --repair``: drop the database's bad lines
    lower(mod, tvm_target)          Relax -> legalized, fused TIR kernels (what is tuned and
                                    what the tuning database is keyed on)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from edgekit.compiler.progress import Progress, no_progress
from edgekit.compiler.schedules import apply_default
from edgekit.compiler.tune import TuningRequest, tune
from edgekit.compiler.tune_check import apply_database
from edgekit.compiler.tuning_db import db_dir, repair
from edgekit.errors import EdgekitError
from edgekit.targets import Target


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


def refuse_symbolic(mod) -> None:
    """One-line ``EdgekitError`` when ``mod`` has symbolic input dims: MetaSchedule measures
    candidates at one shape and its records are keyed by static kernel shapes, so a symbolic
    kernel has no meaningful tuning (its default schedule is ``compiler.symbolic``'s)."""
    attrs = mod["main"].attrs or {}
    names = sorted(str(k) for k in (attrs.get("tir_var_upper_bound") or {}))
    if names:
        raise EdgekitError(f"tuning needs static shapes; dim {names[0]!r} is symbolic: compile "
                           f"without --tune, or tune a copy with --input fixing {names[0]!r}")


def kernel_count(mod) -> int:
    """TIR kernels (PrimFuncs) in a lowered module."""
    import tvm

    return sum(1 for _, f in mod.functions.items() if isinstance(f, tvm.tirx.PrimFunc))


def prepare(mod, target: Target, request: TuningRequest | None = None,
            progress: Progress = no_progress) -> tuple[Any, dict[str, Any]]:
    """Lower a Relax module for a CPU target and schedule every kernel: tune first when asked,
    then tuning records from the database, then default schedules for the rest.
    Returns (module ready for ``tvm.compile``, the manifest's ``tuning`` record)."""
    request = request or TuningRequest()
    if request.tune:
        refuse_symbolic(mod)
    tvm_target = target.tvm_target()
    db = db_dir(target, request.db)
    progress("lowering and fusing")
    mod = lower(mod, tvm_target)
    info: dict[str, Any] = {"tuned": False, "db": str(db), "kernels": kernel_count(mod)}
    if request.tune:
        stats = tune(mod, target, db, request.trials, request.minutes, progress)
        info.update(tuned=True, **stats.to_dict())
    progress("applying tuning records")
    mod, counts = apply_database(mod, tvm_target, db, quiet=request.tune)
    progress("default schedules")
    mod, scheduled = apply_default(mod, tvm_target)
    # records_rejected: kernels with a record that use the default schedule, which the
    # check measured faster; records_unchecked: records applied without such a check
    info.update(records_applied=counts.applied, records_rejected=counts.rejected,
                records_unchecked=counts.unchecked, default_schedules=scheduled,
                records_skipped=counts.skipped)
    return mod, info


def tune_model(onnx_path: str | Path, target: str, inputs=(), trials: int | None = None,
               minutes: float | None = None, db: str | Path | None = None,
               progress: Progress = no_progress) -> dict[str, Any]:
    """``edgekit tune``: tune an ONNX model's kernels into the database, write no artifact."""
    from edgekit import intake, verify
    from edgekit.compiler.frontend import to_relax
    from edgekit.targets import load_target

    tgt = load_target(target)
    model = intake.load_onnx(onnx_path, inputs)
    specs = verify.onnx_input_specs(model, inputs)
    names = sorted({d for s in specs for d in s.shape if isinstance(d, str)})
    if names:
        raise EdgekitError(f"tuning needs static shapes; dim {names[0]!r} is symbolic: tune "
                           f"with --input fixing it to a typical length")
    progress("importing into TVM Relax")
    mod = lower(to_relax(model, specs, progress, tgt.tvm_target()), tgt.tvm_target())
    path = db_dir(tgt, db)
    stats = tune(mod, tgt, path, trials, minutes, progress)
    _, counts = apply_database(mod, tgt.tvm_target(), path, quiet=True)
    return {**stats.to_dict(), "kernels": kernel_count(mod), "kernels_with_records":
            counts.applied, "target": tgt.name}


def repair_db(target: str, db: str | Path | None = None) -> dict[str, Any]:
    """``edgekit tune --repair``: rewrite the database without its bad lines."""
    from edgekit.targets import load_target

    path = db_dir(load_target(target), db)
    kept = repair(path)
    return {"db": str(path), "removed": [str(b) for b in kept.bad],
            "workloads": len(kept.workload_lines), "records": len(kept.record_lines)}
