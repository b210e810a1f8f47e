"""Where a 16-bit float graph (``convert-fp16`` / ``convert-bf16``) may be compiled: only
where the target computes in that format natively.

A target without native 16-bit arithmetic would get each fp16/bf16 op as conversions to fp32
and back around fp32 arithmetic: slower than the fp32 graph it came from, so the compile is
refused with the reason instead. Native means, from the target's own description (its LLVM
CPU and ``mattr``, never this machine's CPU unless the target is ``host``):

* float16: aarch64 with ``fullfp16`` (Armv8.2-A FP16: Cortex-A76/A78, rpi5, Jetson Orin's
  host), x86 with ``avx512fp16`` (Sapphire Rapids and later), CUDA ``sm_53`` and later;
* bfloat16: aarch64 with ``bf16`` (Armv8.6-A), x86 with ``avx512bf16`` or ``amx-bf16``
  (Cooper Lake, Zen 4, Sapphire Rapids), CUDA ``sm_80`` and later.

A CUDA target's host code only moves pointers, so its host CPU is not asked.
"""

from __future__ import annotations

import onnx
from onnx import TensorProto

from edgekit.errors import EdgekitError
from edgekit.targets import Target

FORMATS = {TensorProto.FLOAT16: "float16", TensorProto.BFLOAT16: "bfloat16"}
# LLVM features, any one of which runs the format natively, per CPU architecture
CPU_FEATURES = {
    ("aarch64", "float16"): ("fullfp16",),
    ("aarch64", "bfloat16"): ("bf16",),
    ("x86_64", "float16"): ("avx512fp16",),
    ("x86_64", "bfloat16"): ("avx512bf16", "amx-bf16"),
}
CUDA_ARCH = {"float16": 53, "bfloat16": 80}  # first sm_XX with native arithmetic
# The compile check's relative tolerance for a 16-bit graph: the budgets of convert-fp16 and
# convert-bf16 (max norm-wise error against fp32). The library and onnxruntime both run the
# 16-bit graph but round in different places (TVM keeps fp32 inside a fused kernel;
# onnxruntime, bfloat16 emulated by ``passes._half.ort_form``, rounds at every op output),
# so they differ by up to what the format itself costs, not by fp32's 1e-4.
CHECK_RTOL = {"float16": 0.01, "bfloat16": 0.05}


def formats(model: onnx.ModelProto) -> set[str]:
    """The 16-bit float formats the graph computes in (its constants, Casts and values)."""
    g = model.graph
    types = {t.data_type for t in g.initializer}
    types |= {a.i for n in g.node if n.op_type == "Cast" for a in n.attribute if a.name == "to"}
    types |= {a.t.data_type for n in g.node for a in n.attribute if a.type == a.TENSOR}
    types |= {v.type.tensor_type.elem_type for v in [*g.input, *g.output, *g.value_info]}
    return {FORMATS[t] for t in types if t in FORMATS}


def check_rtol(model: onnx.ModelProto, rtol: float) -> float:
    """The compile check's relative tolerance for ``model``: ``rtol``, widened to its 16-bit
    format's ``CHECK_RTOL`` when it computes in one."""
    return max([rtol, *(CHECK_RTOL[f] for f in formats(model))])


def arithmetic_note(model: onnx.ModelProto, tgt: Target) -> str:
    """What the compiled code of a 16-bit graph really computes in, where that is not the
    format itself ('' elsewhere): TVM 0.27 widens bfloat16 arithmetic to fp32 on every CPU
    (``BF16ComputeLegalize``), so a CPU bfloat16 artifact saves memory, not time."""
    if "bfloat16" not in formats(model) or tgt.device == "cuda":
        return ""
    return ("bfloat16 arithmetic runs as fp32 on CPUs (TVM 0.27 widens it): the weights are "
            "halved, but the artifact is not faster than fp32 (measured 0.53-0.62x its speed on "
            "an AVX512-BF16 Zen 4, docs/half-precision.md)")


def _cpu_problem(fmt: str, tgt: Target) -> str:
    from edgekit.compiler.int8_intrin import cpu_features

    needed = CPU_FEATURES.get((tgt.machine, fmt))
    tvm_target = tgt.tvm_target()
    cpu = str(tvm_target.attrs.get("mcpu", "") or "generic")
    if needed is None:
        return f"{tgt.machine} has no native {fmt} arithmetic edgekit knows of"
    features = cpu_features(tvm_target)
    if any(f in features for f in needed):
        return ""
    return (f"its LLVM CPU {cpu!r} ({tgt.machine}) lacks {' / '.join(needed)}, so {fmt} would "
            "be emulated through fp32 conversions, slower than the fp32 model")


def native_problem(fmt: str, tgt: Target) -> str:
    """Why ``tgt`` does not compute ``fmt`` ("float16" / "bfloat16") natively, or ''."""
    if tgt.device == "cuda":
        arch = str(tgt.tvm.get("arch", ""))
        if arch.startswith("sm_") and arch[3:].isdigit():
            if int(arch[3:]) >= CUDA_ARCH[fmt]:
                return ""
            return f"its GPU {arch} predates native {fmt} (sm_{CUDA_ARCH[fmt]})"
        return f"its GPU architecture {arch!r} is not an sm_XX edgekit can judge"
    return _cpu_problem(fmt, tgt)


def check_native(model: onnx.ModelProto, tgt: Target) -> None:
    """Refuse (``EdgekitError``) a 16-bit float graph for a target that would emulate it."""
    for fmt in sorted(formats(model)):
        why = native_problem(fmt, tgt)
        if why:
            hint = ("a target with +fullfp16 (rpi5), a CUDA target, or x86 with avx512fp16"
                    if fmt == "float16" else
                    "a CUDA sm_80+ target, or x86 with avx512bf16 (x86-64-v4 lacks it)")
            raise EdgekitError(f"the model computes in {fmt} but target {tgt.name!r} does not run "
                               f"it natively: {why}; compile the fp32 model, or use {hint}")


def vector_lanes(func, fp32_lanes: int) -> int:
    """Lanes of one vector register for ``func``'s arithmetic: twice ``fp32_lanes`` when every
    float buffer of the kernel is float16 (a register holds twice as many), else unchanged
    (bfloat16 kernels compute in fp32 lanes: TVM widens bfloat16 arithmetic to fp32)."""
    from tvm import s_tir
    from tvm.s_tir.dlight.analysis import normalize_prim_func

    sch = s_tir.Schedule(func)
    dtypes = {str(region.source.dtype) for info in normalize_prim_func(sch) or ()
              for region in (*sch.get(info.block_rv).reads, *sch.get(info.block_rv).writes)}
    floats = {d for d in dtypes if d.startswith(("float", "bfloat"))}
    return fp32_lanes * 2 if floats == {"float16"} else fp32_lanes
