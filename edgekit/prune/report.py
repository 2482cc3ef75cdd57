"""Per-layer widths and parameters before/after, as rows for a table and a JSON report."""

from __future__ import annotations

from edgekit.arch import Geometry


def layer_report(before: Geometry, after: Geometry) -> list[dict]:
    rows = []
    for i, (b, a) in enumerate(zip(before.layers, after.layers)):
        pb = sum(before.layer_params(b).values())
        pa = sum(after.layer_params(a).values())
        rows.append({"layer": i, "intermediate": [b.intermediate_size, a.intermediate_size],
                     "heads": [b.num_attention_heads, a.num_attention_heads],
                     "kv_heads": [b.num_key_value_heads, a.num_key_value_heads], "params": [pb, pa]})
    return rows


def table_rows(report: dict) -> list[tuple]:
    rows = []
    for r in report["layers"]:
        rows.append((r["layer"], "{} -> {}".format(*r["intermediate"]), "{} -> {}".format(*r["heads"]),
                     "{} -> {}".format(*r["kv_heads"]), "{:,} -> {:,}".format(*r["params"])))
    return rows
