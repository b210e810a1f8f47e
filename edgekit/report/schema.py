"""The versioned JSON schema of a profile run (``edgekit profile --json`` / ``--save``).

``SCHEMA`` is a JSON Schema (draft 2020-12) document; ``validate`` checks a run against it
with a small built-in validator for the keywords the schema uses (so reading a run needs no
extra package), ``load_run`` reads and checks a run file (or the demo's ``report.json``),
``save_run`` writes one atomically. Field meanings: ``docs/profile-schema.md``.
Top-level objects allow extra keys, so features may add fields without a version bump; a
change to an existing field's meaning or type bumps ``SCHEMA_VERSION``. Version 2 added
``memory``; a version 1 run is still read (``READ_VERSIONS``): it is a version 2 run without it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from edgekit.errors import EdgekitError
from edgekit.files import replacing

SCHEMA_NAME = "edgekit-profile"
SCHEMA_VERSION = 2
READ_VERSIONS = (1, 2)
STAT_KEYS = ("min", "mean", "median", "p90", "p95", "p99", "max", "std", "cv")

_NUM = {"type": "number"}
_MS = {"type": "number", "minimum": 0}
_STR_OR_NULL = {"type": ["string", "null"]}
_STATS = {"type": "object", "required": list(STAT_KEYS),
          "properties": {k: _MS for k in STAT_KEYS}, "additionalProperties": False}
_PAIR = {"type": "array", "items": _MS, "minItems": 2, "maxItems": 2}
_PER_ENGINE = {"type": "object", "additionalProperties": True}
_BYTES = {"type": "integer", "minimum": 0}
_GROWTH = {"type": "integer"}  # a difference of two RSS readings
_MEMORY = {
    "type": "object", "required": ["artifact", "runs", "engines", "planned_workspace"],
    "properties": {
        "artifact": {"type": "object", "required": ["library_bytes", "total_bytes", "files"],
                     "properties": {"library_bytes": _BYTES, "total_bytes": _BYTES,
                                    "files": {"type": "integer", "minimum": 1}}},
        "runs": {"type": "integer", "minimum": 1},
        "engines": {"type": "object", "additionalProperties": {
            "type": "object",
            "required": ["base_rss_bytes", "load_bytes", "run_bytes", "total_bytes",
                         "resident_bytes", "runs"],
            "properties": {"base_rss_bytes": _BYTES, "load_bytes": _GROWTH,
                           "run_bytes": _GROWTH, "total_bytes": _GROWTH,
                           "resident_bytes": _GROWTH,
                           "runs": {"type": "integer", "minimum": 1}}}},
        "planned_workspace": {"type": ["object", "null"], "required": ["bytes", "storages"],
                              "properties": {"bytes": _BYTES,
                                             "storages": {"type": "integer", "minimum": 0}}},
    },
}

SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "$id": f"https://edgekit.dev/schema/{SCHEMA_NAME}-v{SCHEMA_VERSION}.json",
    "title": "edgekit profile run",
    "type": "object",
    "required": ["schema", "schema_version", "created", "artifact", "target", "threads",
                 "environment", "phases", "load_ms", "first_run_ms", "iterations",
                 "latency_ms", "times_ms", "median_ci_ms", "ci", "passes", "notes",
                 "warnings"],
    "properties": {
        "schema": {"const": SCHEMA_NAME},
        "schema_version": {"enum": list(READ_VERSIONS)},
        "created": {"type": "string"},
        "artifact": {"type": "string"},
        "target": {"type": "string"},
        "threads": {"type": "integer", "minimum": 1},
        "environment": {
            "type": "object",
            "required": ["cpu", "physical_cores", "logical_cpus", "threads", "os", "machine",
                         "python", "hostname", "versions", "target", "device_key"],
            "properties": {
                "cpu": {"type": "string"},
                "physical_cores": {"type": ["integer", "null"]},
                "logical_cpus": {"type": "integer", "minimum": 1},
                "threads": {"type": "integer", "minimum": 1},
                "os": {"type": "string"},
                "machine": {"type": "string"},
                "python": {"type": "string"},
                "hostname": {"type": "string"},
                "versions": {"type": "object", "additionalProperties": {"type": "string"}},
                "built_with": {"type": "object", "additionalProperties": {"type": "string"}},
                "target": {"type": "object", "required": ["name"]},
                "device_key": _STR_OR_NULL,
            },
            "additionalProperties": True,
        },
        "phases": {
            "type": "object",
            "required": ["load_ms", "first_run_ms", "warmup_calls", "steady"],
            "properties": {
                "load_ms": _MS, "first_run_ms": _MS,
                "warmup_calls": {"type": "integer", "minimum": 0},
                "steady": {"type": "object", "additionalProperties": {
                    "type": "object", "required": ["iterations", "seconds", "stopped"],
                    "properties": {
                        "iterations": {"type": "integer", "minimum": 1},
                        "seconds": _MS,
                        "stopped": {"enum": ["repeat", "duration", "ci", "time cap"]},
                    }}},
            },
        },
        "load_ms": _MS,
        "first_run_ms": _MS,
        "iterations": {"type": "integer", "minimum": 1},
        "latency_ms": _STATS,
        "times_ms": {"type": "object", "required": ["edgekit"], "additionalProperties": {
            "type": "array", "items": _MS, "minItems": 1}},
        "median_ci_ms": {"type": "object", "required": ["edgekit"],
                         "additionalProperties": _PAIR},
        "ci": {"type": "object", "required": ["level", "method", "resamples"],
               "properties": {"level": {"type": "number", "minimum": 0, "maximum": 1},
                              "method": {"type": "string"},
                              "resamples": {"type": "integer", "minimum": 1}}},
        "baselines": {"type": "object", "additionalProperties": _STATS},
        "ratios": {"type": "object", "additionalProperties": _NUM},
        "passes": {"type": "array", "items": {
            "type": "object", "required": ["pass", "status"],
            "properties": {"pass": {"type": "string"}, "status": {"type": "string"},
                           "changed": {"type": "object"},
                           "ops_before": {"type": ["object", "null"]},
                           "ops_after": {"type": ["object", "null"]},
                           "max_rel_error": {"type": ["number", "null"]}}}},
        "per_op": {"type": "array", "items": {
            "type": "object", "required": ["kernel", "calls", "total_ms"],
            "properties": {"kernel": {"type": "string"},
                           "onnx_nodes": {"type": "array", "items": {"type": "string"}},
                           "calls": {"type": "integer", "minimum": 0},
                           "total_ms": _MS, "mean_ms": _MS, "share": _NUM}}},
        "memory": _MEMORY,
        "notes": {"type": "array", "items": {"type": "string"}},
        "warnings": {"type": "array", "items": {"type": "string"}},
    },
    "additionalProperties": True,
}

_TYPES = {"object": dict, "array": list, "string": str, "boolean": bool, "null": type(None),
          "integer": int, "number": (int, float)}


def _is(value: Any, name: str) -> bool:
    if name in ("integer", "number") and isinstance(value, bool):
        return False
    return isinstance(value, _TYPES[name])


def _errors(value: Any, schema: dict, where: str) -> list[str]:
    if "const" in schema and value != schema["const"]:
        return [f"{where}: expected {schema['const']!r}, got {value!r}"]
    if "enum" in schema and value not in schema["enum"]:
        return [f"{where}: {value!r} is not one of {schema['enum']}"]
    types = schema.get("type")
    if types is not None:
        types = [types] if isinstance(types, str) else types
        if not any(_is(value, t) for t in types):
            return [f"{where}: expected {' or '.join(types)}, got {type(value).__name__}"]
    errs: list[str] = []
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if "minimum" in schema and value < schema["minimum"]:
            errs.append(f"{where}: {value} is below {schema['minimum']}")
        if "maximum" in schema and value > schema["maximum"]:
            errs.append(f"{where}: {value} is above {schema['maximum']}")
    if isinstance(value, list):
        if len(value) < schema.get("minItems", 0):
            errs.append(f"{where}: fewer than {schema['minItems']} items")
        if len(value) > schema.get("maxItems", len(value)):
            errs.append(f"{where}: more than {schema['maxItems']} items")
        if "items" in schema:
            for i, item in enumerate(value):
                errs += _errors(item, schema["items"], f"{where}[{i}]")
    if isinstance(value, dict):
        props = schema.get("properties", {})
        errs += [f"{where}: missing {k!r}" for k in schema.get("required", ()) if k not in value]
        extra = schema.get("additionalProperties", True)
        for k, v in value.items():
            if k in props:
                errs += _errors(v, props[k], f"{where}.{k}")
            elif extra is False:
                errs.append(f"{where}: unexpected key {k!r}")
            elif isinstance(extra, dict):
                errs += _errors(v, extra, f"{where}.{k}")
    return errs


def validate(run: Any) -> list[str]:
    """Every way ``run`` violates ``SCHEMA`` (empty when it conforms)."""
    return _errors(run, SCHEMA, "run")


def load_run(path: str | Path) -> dict[str, Any]:
    """Read a run file written by ``profile --save`` / ``--json`` (or a demo ``report.json``,
    whose ``profile`` member is the run) and check it against the schema."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise EdgekitError(f"run file not found: {path}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise EdgekitError(f"cannot read {path} as JSON: {exc}") from None
    if isinstance(data, dict) and "schema" not in data and isinstance(data.get("profile"), dict):
        data = data["profile"]
    if not isinstance(data, dict) or data.get("schema") != SCHEMA_NAME:
        raise EdgekitError(f"{path} is not an edgekit profile run (no \"schema\": "
                           f"\"{SCHEMA_NAME}\"); write one with edgekit profile --save")
    version = data.get("schema_version")
    if version not in READ_VERSIONS:
        raise EdgekitError(f"{path}: profile schema version {version!r} is not supported "
                           f"(this edgekit reads versions "
                           f"{', '.join(map(str, READ_VERSIONS))})")
    errs = validate(data)
    if errs:
        more = f" (and {len(errs) - 1} more)" if len(errs) > 1 else ""
        raise EdgekitError(f"{path} does not match the profile schema: {errs[0]}{more}")
    return data


def save_text(text: str, path: str | Path) -> Path:
    """Write ``text`` to ``path`` atomically (temp file in the same directory, then rename)."""
    path = Path(path)
    with replacing(path) as tmp:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(text, encoding="utf-8")
    return path


def save_run(run: dict[str, Any], path: str | Path) -> Path:
    """Write ``run`` as JSON to ``path`` atomically."""
    return save_text(json.dumps(run, indent=2, default=str) + "\n", path)
