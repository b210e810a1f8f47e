"""The profile command's terminal tables (rich): latency per engine, and per-op kernels."""

from __future__ import annotations

from typing import Any

_STATS = ("min", "mean", "median", "p90", "p95", "p99", "max", "std", "cv")


def latency_table(result: dict[str, Any]) -> None:
    """Statistics per engine, the ratio of medians, load / first run, notes and warnings."""
    from rich.console import Console
    from rich.table import Table

    engines = [("edgekit (TVM)", result["latency_ms"])]
    engines += list(result.get("baselines", {}).items())
    table = Table(title=f"latency in ms: {result['threads']} threads, "
                        f"{result['iterations']} timed calls")
    table.add_column("statistic")
    for name, _ in engines:
        table.add_column(name, justify="right")
    for s in _STATS:
        table.add_row(s, *(f"{lat[s]:.1%}" if s == "cv" else f"{lat[s]:.3f}"
                           for _, lat in engines))
    median = result["latency_ms"]["median"]
    table.add_row("edgekit ÷ engine (median)", "1.00",
                  *(f"{median / lat['median']:.2f}" for _, lat in engines[1:]))
    console = Console()
    console.print(table)
    console.print(f"load {result['load_ms']:.1f} ms, first run {result['first_run_ms']:.2f} ms")
    for note in result.get("notes", []):
        console.print(note)
    if "stream" in result:  # step artifacts: the streaming loop, state carried between calls
        st = result["stream"]
        console.print(f"streaming: {st['per_frame_ms']['median']:.3f} ms per frame (median; "
                      f"{st['chunk']} frame(s) per call, {st['state_bytes']} bytes of state)")
    for warning in result.get("warnings", []):
        console.print(f"warning: {warning}", style="yellow")


def per_op_table(result: dict[str, Any], top: int = 15) -> None:
    """The top kernels by time, with their share and ONNX nodes (``api.per_op``'s rows)."""
    from rich.console import Console
    from rich.table import Table

    info = result["per_op_info"]
    table = Table(title=f"per-op: top kernels of {info['calls_per_run']} calls per run "
                        f"(sum {info['kernel_sum_ms']:.3f} ms, instrumented run "
                        f"{info['instrumented_run_ms']:.3f} ms)")
    for col, justify in (("kernel", "left"), ("calls", "right"), ("total ms", "right"),
                         ("mean ms", "right"), ("share", "right"), ("int8", "left"),
                         ("ONNX nodes", "left")):
        table.add_column(col, justify=justify)  # type: ignore[arg-type]
    for row in result["per_op"][:top]:
        nodes = ", ".join(row["onnx_nodes"][:4]) + (" ..." if len(row["onnx_nodes"]) > 4 else "")
        table.add_row(row["kernel"], str(row["calls"]), f"{row['total_ms']:.3f}",
                      f"{row['mean_ms']:.4f}", f"{row['share']:.1%}",
                      "int8" if row.get("int8") else "", nodes or "-")
    console = Console()
    console.print(table)
    console.print(f"kernels mapped to ONNX nodes {info['mapping']}")
