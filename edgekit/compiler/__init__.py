"""The TVM backend: ONNX -> Relax -> scheduled TIR kernels -> a shared library.

    to_relax(model, specs)            ONNX -> Relax: tidy-ups, the unsupported-op report,
                                      edgekit's Relax passes (``frontend``)
    build(mod, target, tuning)        schedule the kernels (CPU) and ``tvm.compile`` (``build``)
    export_library(exe, target, path) link, cross-compiling when needed; PTX for CUDA
    check_library(path, model, ...)   the linked library against onnxruntime
    tune_model(onnx_path, target)     ``edgekit tune``: tune kernels into the database
    TuningRequest                     ``--tune`` and its budget, as ``build`` takes them
    unsupported_nodes(model)          ops TVM's ONNX frontend cannot convert

Inside, imports run one way (imports inside functions too):

    build -> pipeline -> frontend -> bounded_take, fast_math, grouped_conv, channels_last,
                                     conv_layout, matmul_layout, qdq, int8_kernels,
                                     gather_dequantize, softmax_rows,
                                     nan_propagation (layouts -> constant_weights)
                      -> tune -> tune_budget
                              -> tune_check -> schedules -> tiling, symbolic, gemv,
                                                            conv_schedule, int8_schedule,
                                                            reductions, half,
                                                            softmax_rows
                                                         -> machine, cache_blocking
                                            -> tuning_db

Importing this package imports no TVM: these modules import it inside their functions, and
the Relax pass modules, which import it at the top, are imported by ``frontend`` when it runs.
"""

from edgekit.compiler.build import build, check_library, export_library
from edgekit.compiler.frontend import to_relax, unsupported_nodes
from edgekit.compiler.pipeline import tune_model
from edgekit.compiler.tune import TuningRequest

__all__ = ["TuningRequest", "build", "check_library", "export_library", "to_relax",
           "tune_model", "unsupported_nodes"]
