"""A/B comparison of two runs and the CI gate (``--assert``, ``--baseline``/``--max-regress``).

Two runs are compared engine by engine on the ratio of medians ``new / old`` with a bootstrap
interval. A difference is *significant* when the interval excludes 1 and the ratio is at least
``min_effect`` away from 1 (a steady 0.3% drift on a busy machine is real but not worth a
failed build). ``--max-regress 5%`` fails when the new run is significantly slower and its
median is more than 5% above the baseline's.
"""

from __future__ import annotations

import operator
import re
from dataclasses import asdict, dataclass
from typing import Any

from edgekit.errors import EdgekitError
from edgekit.report.schema import STAT_KEYS
from edgekit.report.stats import CI_LEVEL, bootstrap_ratio_ci

MIN_EFFECT = 0.01


@dataclass(frozen=True)
class Comparison:
    engine: str
    old_median_ms: float
    new_median_ms: float
    ratio: float  # new / old: above 1 means the new run is slower
    ci: tuple[float, float]
    level: float
    significant: bool

    @property
    def verdict(self) -> str:
        if not self.significant:
            return "no significant difference"
        return f"{self.ratio:.3f}x {'slower' if self.ratio > 1 else 'faster'}"

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ci": list(self.ci), "verdict": self.verdict}

    def line(self) -> str:
        return (f"{self.engine}: median {self.old_median_ms:.4g} -> {self.new_median_ms:.4g} ms, "
                f"ratio {self.ratio:.3f} ({self.level:.0%} CI {self.ci[0]:.3f}-{self.ci[1]:.3f}): "
                f"{self.verdict}")


def compare_runs(old: dict[str, Any], new: dict[str, Any], min_effect: float = MIN_EFFECT,
                 level: float = CI_LEVEL) -> list[Comparison]:
    """Compare every engine measured in both runs (edgekit first)."""
    engines = [e for e in old["times_ms"] if e in new["times_ms"]]
    if not engines:
        raise EdgekitError("the two runs share no engine to compare")
    out = []
    for e in engines:
        a, b = old["times_ms"][e], new["times_ms"][e]
        ratio, lo, hi = bootstrap_ratio_ci(b, a, level=level)
        significant = not (lo <= 1.0 <= hi) and abs(ratio - 1) >= min_effect
        out.append(Comparison(e, _median(old, e), _median(new, e), ratio, (lo, hi), level,
                              significant))
    return out


def environment_differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """What differs between the machines/settings/versions of two runs (``"threads: 2 -> 1"``):
    a difference in latency may come from these rather than from the model."""
    a, b = old["environment"], new["environment"]
    keys = ["cpu", "threads", "logical_cpus", "os", "hostname", "device_key"]
    out = [f"{k}: {a.get(k)} -> {b.get(k)}" for k in keys if a.get(k) != b.get(k)]
    if a["target"].get("name") != b["target"].get("name"):
        out.append(f"target: {a['target'].get('name')} -> {b['target'].get('name')}")
    va, vb = a.get("versions", {}), b.get("versions", {})
    out += [f"{k}: {va.get(k)} -> {vb.get(k)}" for k in sorted(set(va) | set(vb))
            if va.get(k) != vb.get(k)]
    return out


def _median(run: dict[str, Any], engine: str) -> float:
    s = run["latency_ms"] if engine == "edgekit" else run["baselines"][engine]
    return float(s["median"])


def parse_percent(text: str) -> float:
    """``"5%"`` or ``"0.05"`` -> 0.05."""
    t = text.strip()
    try:
        value = float(t[:-1]) / 100 if t.endswith("%") else float(t)
    except ValueError:
        raise EdgekitError(f"{text!r}: expected a percentage such as 5%") from None
    if value < 0:
        raise EdgekitError(f"{text!r}: must not be negative")
    return value


def check_regression(run: dict[str, Any], baseline: dict[str, Any],
                     max_regress: float) -> tuple[Comparison, str | None]:
    """The edgekit engine of ``run`` against ``baseline``: the comparison and a failure
    message (None when it passes)."""
    c = compare_runs(baseline, run, min_effect=max_regress)[0]
    if c.engine != "edgekit":
        raise EdgekitError("the baseline has no edgekit timings")
    if c.significant and c.ratio > 1 + max_regress:
        return c, (f"regression: median {c.new_median_ms:.4g} ms is {c.ratio - 1:.1%} above "
                   f"the baseline's {c.old_median_ms:.4g} ms (allowed {max_regress:.1%}; "
                   f"{c.level:.0%} CI of the ratio {c.ci[0]:.3f}-{c.ci[1]:.3f})")
    return c, None


_OPS = {"<": operator.lt, "<=": operator.le, ">": operator.gt, ">=": operator.ge}
_UNITS = {"ms": 1.0, "us": 1e-3, "s": 1e3, "": 1.0}
_ASSERT = re.compile(r"^\s*(?:(?P<engine>[a-z]+)\.)?(?P<stat>[a-z0-9_]+)\s*(?P<op><=|>=|<|>)"
                     r"\s*(?P<value>[0-9.eE+-]+)\s*(?P<unit>ms|us|s|%|x)?\s*$")


def parse_assertion(text: str) -> tuple[str, str, str, float, str]:
    """``"ort.p99<20ms"`` -> (engine, statistic, operator, value, unit); checked before any
    timing so a typo fails fast. ``ratio.ENGINE`` reads as (ENGINE, "ratio", ...)."""
    m = _ASSERT.match(text.lower())
    if not m:
        raise EdgekitError(f"--assert {text!r}: expected STAT<VALUE, e.g. p99<20ms or cv<5%")
    engine, stat, unit = m["engine"] or "edgekit", m["stat"], m["unit"] or ""
    if engine == "ratio":
        engine, stat = stat, "ratio"
    elif stat == "ratio":
        engine = "ort" if engine == "edgekit" else engine
    try:
        value = float(m["value"])
    except ValueError:
        raise EdgekitError(f"--assert {text!r}: {m['value']!r} is not a number") from None
    allowed = {"ratio": ("", "x"), "cv": ("", "%")}.get(stat, ("", "ms", "us", "s"))
    if unit not in allowed:
        raise EdgekitError(f"--assert {text!r}: {stat} does not take unit {unit!r}")
    if stat not in ("ratio", *STAT_KEYS):
        raise EdgekitError(f"--assert {text!r}: unknown statistic {stat!r} "
                           f"(choose from ratio, {', '.join(STAT_KEYS)})")
    return engine, stat, m["op"], value, unit


def check_assertion(run: dict[str, Any], text: str) -> str | None:
    """Evaluate one ``--assert`` such as ``p99<20ms``, ``median<=1.5ms``, ``cv<5%``,
    ``ratio.ort<1.0x`` (edgekit median / ort median) or ``ort.p99<30ms``.
    Returns a failure message, or None when it holds."""
    engine, stat, op, value, unit = parse_assertion(text)
    if stat == "ratio":
        if engine not in run.get("ratios", {}):
            raise EdgekitError(f"--assert {text!r}: no ratio to {engine!r}; "
                               f"add --compare {engine}")
        got = run["ratios"][engine]
        shown, limit = f"edgekit/{engine} median ratio {got:.3f}", f"{value:g}"
    else:
        stats = run["latency_ms"] if engine == "edgekit" else run.get("baselines", {}).get(engine)
        if stats is None:
            raise EdgekitError(f"--assert {text!r}: engine {engine!r} was not measured")
        if stat == "cv":
            got, value = stats["cv"], value / 100 if unit == "%" else value
            shown, limit = f"cv {got:.1%}", f"{value:.1%}"
        else:
            got, value = stats[stat], value * _UNITS[unit]
            shown, limit = f"{stat} {got:.4g} ms", f"{value:.4g} ms"
        shown = shown if engine == "edgekit" else f"{engine} {shown}"
    if _OPS[op](got, value):
        return None
    return f"assertion {text.strip()!r} failed: {shown}, required {op} {limit}"
