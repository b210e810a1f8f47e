"""Symbolic dimensions: a dim written as a name, bounded by the user (``--dim seq=1..256``).

A shape is a tuple of ints and names: ``(1, "seq")``. Inputs that share a name share the
length. Every name must have bounds ``lo..hi`` (inclusive, 1 <= lo <= hi); one artifact then
serves every length inside them. Checks (export against torch, each pass, the compiled
library against onnxruntime) run at ``check_points``: the low end, the high end and a length
in between that is not a multiple of any vector width, so a kernel's tail is exercised.

Needs numpy only: the runtime (no onnx, no torch) checks lengths with it too.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, TypeVar

from edgekit.errors import EdgekitError

Dim = int | str
Bounds = dict[str, tuple[int, int]]
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*$")
NAME = _NAME  # what a symbolic dim's name may be
_DIM_OPTION = re.compile(r"^([^=]+)=(\d+)\.\.(\d+)$")
S = TypeVar("S")  # anything with a ``shape`` field (verify.TensorSpec)


def is_symbolic(dim: Any) -> bool:
    return isinstance(dim, str)


def parse_dim_option(text: str) -> tuple[str, tuple[int, int]]:
    """``seq=1..256`` -> ("seq", (1, 256)); one-line error otherwise."""
    m = _DIM_OPTION.match(text.strip())
    if not m or not _NAME.match(m.group(1)):
        raise EdgekitError(f"bad --dim {text!r}: expected NAME=LO..HI, e.g. seq=1..256")
    lo, hi = int(m.group(2)), int(m.group(3))
    if not 1 <= lo <= hi:
        raise EdgekitError(f"bad --dim {text!r}: bounds must satisfy 1 <= LO <= HI")
    return m.group(1), (lo, hi)


def parse_dim_options(texts: Iterable[str]) -> Bounds:
    out: Bounds = {}
    for text in texts:
        name, bounds = parse_dim_option(text)
        if name in out and out[name] != bounds:
            raise EdgekitError(f"--dim {name} given twice with different bounds")
        out[name] = bounds
    return out


def symbolic_names(shapes: Iterable[Sequence[Dim]]) -> list[str]:
    """The symbolic names of ``shapes``, in order of first appearance."""
    seen: list[str] = []
    for shape in shapes:
        seen += [d for d in shape if is_symbolic(d) and d not in seen]
    return seen


def check_bounds(shapes: Mapping[str, Sequence[Dim]], bounds: Mapping[str, tuple[int, int]]
                 ) -> Bounds:
    """Bounds of exactly the names used in ``shapes`` (input name -> shape); a name without
    bounds, or bounds for a name no input uses, is a one-line error."""
    used = symbolic_names(shapes.values())
    for name in used:
        if name not in bounds:
            where = next(k for k, s in shapes.items() if name in s)
            raise EdgekitError(f"input {where!r} has the symbolic dim {name!r}: bound it with "
                               f"--dim {name}=LO..HI")
    unused = sorted(set(bounds) - set(used))
    if unused:
        raise EdgekitError(f"--dim {unused[0]}: no input has a dim named {unused[0]!r}")
    return {name: tuple(bounds[name]) for name in used}  # type: ignore[misc]


def check_points(bounds: Mapping[str, tuple[int, int]]) -> list[dict[str, int]]:
    """Lengths to check a symbolic model at: every dim at its low end, at its high end, and
    at an odd length in between (a vector tail). Empty bounds: one point, ``{}``."""
    if not bounds:
        return [{}]
    points = []
    for pick in (lambda lo, hi: lo, lambda lo, hi: hi, _middle):
        point = {name: pick(lo, hi) for name, (lo, hi) in bounds.items()}
        if point not in points:
            points.append(point)
    return points


def _middle(lo: int, hi: int) -> int:
    mid = (lo + hi) // 2
    if mid % 2 == 0:  # odd: not a multiple of any vector width
        mid = mid + 1 if mid + 1 < hi else mid - 1
    return min(max(mid, lo), hi)


def concrete_shape(shape: Sequence[Dim], values: Mapping[str, int]) -> tuple[int, ...]:
    return tuple(values[d] if is_symbolic(d) else int(d) for d in shape)


def concrete(specs: Sequence[S], values: Mapping[str, int]) -> list[S]:
    """Copies of ``specs`` (dataclasses with a ``shape``) with each name replaced by its value."""
    return [dataclasses.replace(s, shape=concrete_shape(s.shape, values))  # type: ignore[type-var]
            for s in specs]


def bind(shapes: Mapping[str, Sequence[Dim]], actual: Mapping[str, Sequence[int]],
         bounds: Mapping[str, tuple[int, int]]) -> dict[str, int]:
    """Match actual array shapes against declared ones: the value of each symbolic name.
    A rank, fixed-dim or out-of-bounds mismatch, or one name with two values, is a one-line
    error naming the input, the dim and its bounds."""
    values: dict[str, int] = {}
    for name, declared in shapes.items():
        got = tuple(actual[name])
        if len(got) != len(declared):
            raise EdgekitError(f"input {name!r} has rank {len(got)}, the model expects rank "
                               f"{len(declared)} ({format_shape(declared)})")
        for axis, (want, have) in enumerate(zip(declared, got, strict=True)):
            if not is_symbolic(want):
                if int(want) != have:
                    raise EdgekitError(f"input {name!r} has shape {format_shape(got)}, the "
                                       f"model expects {format_shape(declared)} (axis {axis})")
                continue
            lo, hi = bounds[want]
            if not lo <= have <= hi:
                raise EdgekitError(f"input {name!r}: dim {want!r} (axis {axis}) is {have}, "
                                   f"outside its bounds {lo}..{hi}")
            if values.setdefault(want, have) != have:
                raise EdgekitError(f"dim {want!r} is {values[want]} in one input and {have} in "
                                   f"{name!r}: inputs that share a dim name share its length")
    return values


def format_point(values: Mapping[str, int]) -> str:
    """``seq=17, batch=2`` (one length per name)."""
    return ", ".join(f"{k}={v}" for k, v in values.items())


def format_bounds(bounds: Mapping[str, tuple[int, int]]) -> str:
    """``seq=1..256, batch=1..8`` (the ``--dim`` spelling)."""
    return ", ".join(f"{k}={lo}..{hi}" for k, (lo, hi) in bounds.items())


def bounds_from_json(data: Any) -> Bounds:
    """``{"seq": [1, 256]}`` (a manifest's or a model's record) -> bounds; a malformed record
    is a one-line error."""
    if not isinstance(data, Mapping):
        raise EdgekitError("dims must be an object of name -> [lo, hi]")
    out: Bounds = {}
    for name, pair in data.items():
        ok = (isinstance(name, str) and _NAME.match(name) and isinstance(pair, list | tuple)
              and len(pair) == 2 and all(isinstance(v, int) and not isinstance(v, bool)
                                         for v in pair) and 1 <= pair[0] <= pair[1])
        if not ok:
            raise EdgekitError(f"dims[{name!r}] must be [lo, hi]: integers, 1 <= lo <= hi")
        out[name] = (pair[0], pair[1])
    return out


def format_shape(shape: Sequence[Dim]) -> str:
    return "x".join(str(d) for d in shape) or "scalar"


def fits(specs: Sequence[Any], arrays: Mapping[str, Any], bounds: Mapping[str, tuple[int, int]]
         ) -> bool:
    """Whether ``arrays`` (name -> array) fit ``specs`` (shapes with names) within ``bounds``."""
    try:
        bind({s.name: s.shape for s in specs}, {s.name: arrays[s.name].shape for s in specs},
             bounds)
    except (EdgekitError, KeyError):
        return False
    return True
