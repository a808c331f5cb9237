"""Scaling-efficiency report: a Markdown table and a PNG plot from benchmark JSON files.

Each JSON file holds ``{"card": ..., "rows": [{"name", "sp" (or "gpus"), "tokens_per_s",
"mfu", ...}, ...]}`` as written by benchmarks/sp_scaling.py. Efficiency of a row is its MFU
over the MFU of the same ``name`` at one GPU (weak scaling).
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

from launch.config import ConfigError

__all__ = ["scaling_rows", "write_scaling_report"]


def scaling_rows(paths: list[str]) -> list[dict]:
    rows: list[dict] = []
    for p in paths:
        path = Path(p)
        if not path.is_file():
            raise ConfigError(f"results file {p!r} does not exist")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"results file {p!r} is not JSON: {e}") from None
        for r in data.get("rows", []):
            if "tokens_per_s" not in r or not ("sp" in r or "gpus" in r):
                raise ConfigError(f"{p}: every row needs tokens_per_s and sp (or gpus)")
            rows.append({**r, "gpus": r.get("gpus", r.get("sp")), "card": data.get("card")})
    by_name: dict[str, dict[int, dict]] = defaultdict(dict)
    for r in rows:
        by_name[r.get("name", "run")][r["gpus"]] = r
    for r in rows:
        base = by_name[r.get("name", "run")].get(1)
        key = "mfu" if base and base.get("mfu") and r.get("mfu") else None
        if base and key:
            r["efficiency"] = r[key] / base[key]
        elif base:
            r["efficiency"] = r["tokens_per_s"] / (base["tokens_per_s"] * r["gpus"])
        else:
            r["efficiency"] = None
    return rows


def write_scaling_report(paths: list[str], out_prefix: str) -> Path:
    rows = scaling_rows(paths)
    lines = [
        "| name | GPUs | tokens/s | tokens/s/GPU | MFU | efficiency |",
        "|---|---|---|---|---|---|",
    ]
    for r in sorted(rows, key=lambda r: (r.get("name", ""), r["gpus"])):
        eff = f"{r['efficiency']:.3f}" if r["efficiency"] is not None else "-"
        mfu = f"{r['mfu']:.3f}" if r.get("mfu") is not None else "-"
        lines.append(
            f"| {r.get('name', 'run')} | {r['gpus']} | {r['tokens_per_s']:,.0f} | "
            f"{r['tokens_per_s'] / r['gpus']:,.0f} | {mfu} | {eff} |"
        )
    md = Path(out_prefix + ".md")
    md.write_text("\n".join(lines) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    names = sorted({r.get("name", "run") for r in rows})
    for n in names:
        pts = sorted(
            (r["gpus"], r["efficiency"])
            for r in rows
            if r.get("name", "run") == n and r["efficiency"] is not None
        )
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=n)
    ax.axhline(1.0, color="grey", lw=0.8, ls="--")
    ax.set_xlabel("GPUs")
    ax.set_ylabel("scaling efficiency")
    ax.set_ylim(0, 1.1)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_prefix + ".png", dpi=120)
    plt.close(fig)
    return md
