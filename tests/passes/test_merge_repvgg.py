"""merge-repvgg: parallel k×k / 1×1 / identity branches summed by Add -> one k×k conv."""

from __future__ import annotations

import numpy as np
import pytest
from _bn_graphs import Graph, exported, ops, rel_error, run_checked, samples

from edgekit.passes.core import run_pass, run_pipeline
from edgekit.passes.fold_bn import PASS as FOLD_BN
from edgekit.passes.merge_repvgg import PASS

PAD1 = [1, 1, 1, 1]


def _conv(g: Graph, x: str, name: str, cin: int, cout: int, k: int, group: int = 1,
          bias: bool = True, **attrs) -> str:
    inputs = [x, g.rand(f"{name}.w", cout, cin // group, k, k)]
    pads = attrs.pop("pads", [k // 2] * 4)
    return g.node("Conv", inputs + ([g.rand(f"{name}.b", cout)] if bias else []), name,
                  group=group, pads=pads, **attrs)


def test_default_export_of_repvgg_cnn():
    """edgekit's export folds each branch's BN: 12 convs, 3 identity BNs -> 6 convs."""
    _, model = exported("repvgg-cnn")
    new, report, err = run_checked(model, PASS)
    assert ops(model, "Conv") == 12 and ops(new, "Conv") == 6
    assert ops(new, "Add") == ops(new, "BatchNormalization") == 0
    assert dict(report.changed) == {"merge-2-branches": 3, "merge-3-branches": 3}
    assert not report.skipped
    assert err <= 1e-5 and rel_error(new, model) <= 1e-5


def test_training_form_with_bn_on_every_branch():
    """An unoptimised export keeps conv+BN branches; their BNs are folded while merging."""
    _, model = exported("repvgg-cnn", optimize=False)
    assert ops(model, "BatchNormalization") == 15
    new, report, err = run_checked(model, PASS)
    assert ops(new, "Conv") == 6 and ops(new, "BatchNormalization") == 0
    assert err <= 1e-5


def test_after_fold_bn():
    """fold-bn leaves the identity BN as Mul+Add: a scaled identity plus a bias term."""
    _, model = exported("repvgg-cnn")
    new, ledger = run_pipeline(model, [(FOLD_BN, FOLD_BN.params), (PASS, {})], samples(model))
    assert [run.status for run in ledger] == ["applied", "applied"]
    assert ops(new, "Conv") == 6 and ops(new, "Mul") == ops(new, "Add") == 0
    assert rel_error(new, model) <= 1e-5


def test_fp64_export():
    _, model = exported("repvgg-cnn", dtype="float64")
    new, report, err = run_checked(model, PASS)
    assert ops(new, "Conv") == 6 and err <= 1e-10


@pytest.mark.parametrize("dtype, tol", [(np.float32, 1e-5), (np.float64, 1e-10)])
@pytest.mark.parametrize("group, sizes, identity, bias", [
    (1, (3, 1), "bn", True), (2, (3, 1), "bn", False), (4, (3, 1), "plain", True),
    (1, (5, 3, 1), "none", True), (1, (3, 3), "mul", False)])
def test_branch_variants(group, sizes, identity, bias, dtype, tol):
    """Any order of nesting, groups, kernels of several sizes, identity forms, no bias."""
    g = Graph(dtype)
    x = g.node("Relu", [g.input("x", 1, 8, 6, 6)], "relu")
    terms = [_conv(g, x, f"conv{i}", 8, 8, k, group, bias) for i, k in enumerate(sizes)]
    if identity == "bn":
        terms.insert(1, g.bn(x, 8, "id_bn"))
    elif identity == "plain":
        terms.append(x)
    elif identity == "mul":
        terms.append(g.node("Mul", [g.rand("s", 8, 1, 1), x], "id_mul"))
    total = g.node("Add", [terms[0], terms[1]], "add0")
    for i, t in enumerate(terms[2:], 1):
        total = g.node("Add", [t, total] if i % 2 else [total, t], f"add{i}")
    new, report, err = run_checked(g.model(g.node("Relu", [total], "out")), PASS)
    branches = len(terms)
    assert dict(report.changed) == {f"merge-{branches}-branches": 1}
    assert sorted(n.op_type for n in new.graph.node) == ["Conv", "Relu", "Relu"]
    conv, = (n for n in new.graph.node if n.op_type == "Conv")
    assert list(next(a for a in conv.attribute if a.name == "kernel_shape").ints) == \
        [max(sizes)] * 2
    assert err <= tol


def test_stride_two_without_identity():
    g = Graph()
    x = g.input("x", 1, 4, 7, 7)
    y = g.node("Add", [_conv(g, x, "c3", 4, 6, 3, strides=[2, 2]),
                       _conv(g, x, "c1", 4, 6, 1, strides=[2, 2])], "add")
    new, report, err = run_checked(g.model(y), PASS)
    assert dict(report.changed) == {"merge-2-branches": 1} and ops(new, "Conv") == 1
    assert err <= 1e-5


def test_only_the_branches_of_one_input_merge():
    """Add(Add(conv3(x), conv1(x)), y): the inner sum merges, the outer Add stays."""
    g = Graph()
    x = g.input("x", 1, 4, 5, 5)
    inner = g.node("Add", [_conv(g, x, "c3", 4, 4, 3), _conv(g, x, "c1", 4, 4, 1)], "inner")
    model = g.model(g.node("Add", [inner, g.input("y", 1, 4, 5, 5)], "outer"))
    new, report, err = run_checked(model, PASS)
    assert dict(report.changed) == {"merge-2-branches": 1} and not report.skipped
    assert sorted(n.op_type for n in new.graph.node) == ["Add", "Conv"]
    assert err <= 1e-5


@pytest.mark.parametrize("case, reason", [
    ("dilated", "Conv 'c3' is dilated"),
    ("groups", "differ in stride/groups/channels"),
    ("even", "Conv 'c2' (kernel [2, 2], pads [1, 1, 0, 0]) is not centred"),
    ("shared", "term 'c1' is also used by Relu 'relu'")])
def test_refusals(case, reason):
    g = Graph()
    x = g.input("x", 1, 4, 5, 5)
    one = _conv(g, x, "c1", 4, 4, 1)
    if case == "dilated":
        other = _conv(g, x, "c3", 4, 4, 3, pads=[2] * 4, dilations=[2, 2])
    elif case == "groups":
        other = _conv(g, x, "c3", 4, 4, 3, group=2)
    elif case == "even":
        other = _conv(g, x, "c2", 4, 4, 2, pads=[1, 1, 0, 0])
    else:
        other = _conv(g, x, "c3", 4, 4, 3)
    outputs = [g.node("Add", [one, other], "add")]
    outputs += [g.node("Relu", [one], "relu")] if case == "shared" else []
    new, report, err = run_checked(g.model(*outputs), PASS)
    assert not report.modified and ops(new, "Conv") == 2
    (node, why), = report.skipped
    assert node == "add" and reason in why


def test_model_without_branches_is_refused():
    """A ResNet-style residual Add(relu(conv(x)), x) is not a sum of parallel branches."""
    g = Graph()
    x = g.input("x", 1, 4, 5, 5)
    model = g.model(g.node("Add", [g.node("Relu", [_conv(g, x, "c", 4, 4, 3)], "r"), x], "add"))
    _, run = run_pass(model, PASS, {}, samples(model))
    assert run.status == "refused" and "no Add sums parallel conv branches" in run.message
