"""Sigmoid attention (graphs/digits_sigmoid_vit.py): no row reduction in its attention, so
``poly-act`` alone turns it polynomial; he-check then names no attention offender."""

from __future__ import annotations

import numpy as np
from _bn_graphs import exported
from edgekit.graphs.digits_vit import digits_split

from edgekit import api
from edgekit.he.check import check
from edgekit.verify import run_ort


def test_attention_has_no_row_reduction():
    _, model = exported("digits-sigmoid-vit")
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("Sigmoid") == 2 and "Softmax" not in ops
    assert not {"ReduceMax", "ReduceSum", "Exp"} & set(ops)
    offenders = {o.op for o in check(model).offenders}
    assert "Sigmoid" in offenders and "Softmax" not in offenders


def test_poly_act_makes_the_attention_polynomial():
    """Calibrated on 32 training digits, checked on 16 held-out ones: the sigmoids become
    Chebyshev polynomials; what he-check still names is the LayerNorms and GELUs only."""
    _, model = exported("digits-sigmoid-vit")
    x_tr, _, x_te, _ = digits_split()
    result = api.rewrite(model, "poly-act", calibration={"image": x_tr[:32, None]})
    run = result.ledger[0]
    assert run.status == "applied" and run.max_rel <= run.budget, run.message
    assert dict(run.report.changed) == {"poly-act": 2}
    offenders = {o.op for o in check(result.model).offenders}
    assert "Sigmoid" not in offenders and offenders <= {"LayerNormalization", "Gelu", "Div",
                                                         "Sqrt", "Erf", "ReduceMean", "Pow"}
    agree = [np.argmax(run_ort(model, {"image": x})[0]) ==
             np.argmax(run_ort(result.model, {"image": x})[0]) for x in x_te[:16, None]]
    assert np.mean(agree) >= 0.9


def test_compiler_fuses_the_sigmoid_into_the_score_matmul(tmp_path):
    """TVM's fusion puts QK^T, the 1/sqrt(d) scale, the -log n bias and the sigmoid in one
    kernel, and no kernel reduces a row (no max, no exp sum); the library matches
    onnxruntime."""
    import onnx
    import tvm

    from edgekit import verify
    from edgekit.compiler import to_relax
    from edgekit.compiler.pipeline import lower
    from edgekit.targets import load_target

    _, model = exported("digits-sigmoid-vit")
    target = load_target("host").tvm_target()
    mod = lower(to_relax(model, verify.onnx_input_specs(model), tvm_target=target), target)
    kernels = [gv.name_hint for gv, f in mod.functions.items()
               if isinstance(f, tvm.tirx.PrimFunc)]
    sigmoid = [k for k in kernels if "sigmoid" in k]
    assert sigmoid and all("matmul" in k for k in sigmoid), kernels
    assert not [k for k in kernels if "softmax" in k or "exp" in k or "max" in k], kernels
    onnx.save(model, tmp_path / "m.onnx")
    result = api.compile(tmp_path / "m.onnx", "host", tmp_path / "m.edgekit")
    assert all(c["ok"] for c in result.manifest["verification"]["outputs"])
