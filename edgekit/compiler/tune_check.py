"""Tuning records against edgekit's default schedules: check once, apply only the winners.

Tuning never makes a kernel slower than edgekit's default schedule (``schedules``): after a
session (``tune.tune``), every kernel of the model that has a record is built twice, with the
record's schedule and with the default schedule, and the two are timed alternately in this
process on the same random inputs (best of several runs each). The result goes into
``edgekit_default_check.json`` next to the records, keyed by the kernel's workload and the
structural hashes of both schedules; a compile applies a record only if that check did not
find the default faster (a record with no check for the current default, e.g. one from before
this check or after the default schedules changed, is applied as before and counted as
unchecked).

    check_records(mod, tvm_target, db)  time each kernel with a record against its default
    apply_database(mod, tvm_target, db) put recorded schedules that won (or were never checked)
                                        into the module
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from edgekit.compiler.progress import Progress, no_progress
from edgekit.compiler.schedules import SCHEDULED, apply_default, scheduled_count
from edgekit.compiler.tuning_db import has_records, locked, read, report, write_atomic
from edgekit.errors import last_line

_CHECKS = "edgekit_default_check.json"


def apply_database(mod, tvm_target, db: Path, quiet: bool = False):
    """Replace kernels that have a record in ``db``, except those whose check found the default
    schedule faster. Returns (module, ``ApplyCounts``). Bad database lines are skipped, counted
    and (unless ``quiet``: a tuning session already said so) reported."""
    import tvm
    from tvm import relax

    if not has_records(db):
        return mod, ApplyCounts()
    before = scheduled_count(mod)
    contents = read(db)
    if not quiet:
        report(db, contents.bad)
    database = contents.database
    with tvm_target, database, tvm.transform.PassContext(opt_level=3):
        out = relax.transform.MetaScheduleApplyDatabase(enable_warning=False)(mod)
    checks, counts = load_checks(db), ApplyCounts(skipped=[str(b) for b in contents.bad])
    for gv, (norm, default, tuned) in _kernels_with_records(mod, tvm_target, database).items():
        check = checks.get(_hash(norm))
        if check is None or check.default != _hash(default) or check.tuned != _hash(tuned):
            counts.unchecked += 1
        elif not check.tuned_wins:  # keep the original kernel: apply_default schedules it
            out.update_func(gv, mod[gv])
            counts.rejected += 1
    counts.applied = scheduled_count(out) - before
    return out, counts


@dataclass
class ApplyCounts:
    """Kernels given a tuning record's schedule, and records left out or not checked."""

    applied: int = 0
    rejected: int = 0  # the default schedule measured faster than the record
    unchecked: int = 0  # applied with no check against the current default schedule
    skipped: list[str] = field(default_factory=list)  # bad database lines passed over


@dataclass(frozen=True)
class KernelCheck:
    """A tuning record against the default schedule of the same kernel, timed together."""

    default_us: float
    tuned_us: float
    default: str  # structural hashes of the two schedules that were timed
    tuned: str

    @property
    def tuned_wins(self) -> bool:
        return self.tuned_us < self.default_us


def _hash(obj) -> str:
    from tvm_ffi import structural_hash

    return f"{structural_hash(obj) & 0xFFFFFFFFFFFFFFFF:016x}"


def workload_module(func):
    """The one-kernel module MetaSchedule keys a kernel's records by."""
    import tvm

    return tvm.get_global_func("tvm.s_tir.meta_schedule.normalize_mod")(func)


def _kernels_with_records(mod, tvm_target, database) -> dict:
    """{global var: (workload module, default-scheduled kernel, record-scheduled kernel)} for
    every unscheduled kernel of ``mod`` that ``database`` has a record for."""
    import tvm

    out = {}
    for gv, func in mod.functions.items():
        if not isinstance(func, tvm.tirx.PrimFunc) or (func.attrs and func.attrs.get(SCHEDULED)):
            continue
        norm = workload_module(func)
        sch = database.query_schedule(norm, tvm_target, "main")
        if sch is None:
            continue
        default, _ = apply_default(tvm.IRModule({"main": norm["main"]}), tvm_target)
        out[gv] = (norm, default["main"], sch.mod["main"])
    return out


def build_kernel(mod, target, _params=None):
    """MetaSchedule's build step without importing every tensor intrinsic (CUDA, ARM...)
    in each worker: that import alone takes ~1 min of CPU, and fp32 CPU schedules use none.
    Tuning builds its candidates with it, and the check below the two schedules it times."""
    from tvm.driver import build as tir_build
    from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock

    mod = RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(mod)
    return tir_build(mod, target=target)


def load_checks(db: Path) -> dict[str, KernelCheck]:
    try:
        raw = json.loads((db / _CHECKS).read_text())
        return {k: KernelCheck(**v) for k, v in raw.items()}
    except (OSError, ValueError, TypeError):
        return {}


def _time_kernels(funcs: list, tvm_target, rounds: int = 2) -> list[float]:
    """Best seconds per call of each kernel, timed alternately on the same random inputs
    (so a busy machine slows all of them alike)."""
    import numpy as np
    import tvm
    from tvm.s_tir import meta_schedule as ms

    dev, rng = tvm.cpu(), np.random.default_rng(0)
    args = []
    for info in ms.arg_info.ArgInfo.from_prim_func(funcs[0]):
        shape, dtype = [int(d) for d in info.shape], str(info.dtype)
        # integer arguments are indices (Gather...): zeros are always in range
        data = rng.uniform(-1, 1, shape) if "float" in dtype else np.zeros(shape)
        args.append(tvm.runtime.tensor(data.astype(dtype), dev))
    timers = []
    for func in funcs:
        built = build_kernel(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}),
                             tvm_target)
        timers.append(built.time_evaluator("main", dev, number=1, repeat=3, min_repeat_ms=20))
    best = [math.inf] * len(funcs)
    for _ in range(rounds):
        for i, timer in enumerate(timers):
            best[i] = min(best[i], min(timer(*args).results))
    return best


def check_records(mod, tvm_target, db: Path, progress: Progress = no_progress) -> tuple[int, int]:
    """Time every kernel of ``mod`` that has a record against its default schedule and save
    the outcome for ``apply_database``. Returns (records kept, records the default beat); a
    kernel that cannot be timed here (symbolic shapes) is in neither and stays unchecked."""
    kernels = _kernels_with_records(mod, tvm_target, read(db).database)
    checks, kept, rejected = {}, 0, 0
    for i, (norm, default, tuned) in enumerate(kernels.values()):
        progress(f"checking tuned kernels against default schedules: {i + 1}/{len(kernels)}")
        try:
            default_s, tuned_s = _time_kernels([default, tuned], tvm_target)
        except Exception as exc:  # noqa: BLE001 - e.g. symbolic shapes: the record stays unchecked
            progress(f"cannot time kernel {i + 1} against its default: {last_line(exc)}")
            continue
        check = KernelCheck(round(default_s * 1e6, 3), round(tuned_s * 1e6, 3), _hash(default),
                            _hash(tuned))
        checks[_hash(norm)] = check
        kept, rejected = kept + check.tuned_wins, rejected + (not check.tuned_wins)
    # under the lock, merged into what is there now (another session may have added checks);
    # a unique temp name and a rename: a compile reading it never sees half a file
    with locked(db):
        merged = {**load_checks(db), **checks}
        write_atomic(db / _CHECKS, json.dumps({k: asdict(v) for k, v in merged.items()},
                                              indent=1).encode())
    return kept, rejected
