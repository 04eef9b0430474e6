"""PNG plots of the JSON in bench/results (needs matplotlib, which the engine does not):

    python bench/plot.py [bench/results]
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot_attention(path: Path) -> Path:
    r = json.loads(path.read_text())
    fig, ax = plt.subplots(figsize=(6, 4))
    for ctx in sorted({row["ctx_len"] for row in r["rows"]}):
        rows = sorted((x for x in r["rows"] if x["ctx_len"] == ctx), key=lambda x: x["batch"])
        ax.plot([x["batch"] for x in rows], [x["tb_s"] for x in rows], marker="o", label=f"context {ctx}")
    ax.axhline(r["ceilings"]["copy_bytes_per_s"] / 1e12, color="gray", ls="--", label="measured copy bandwidth")
    ax.set(xscale="log", xlabel="batch (sequences)", ylabel="effective TB/s (K+V bytes / time)",
           title=f"paged decode attention, {r['machine'].get('gpu', '')}")
    ax.legend()
    out = path.with_suffix(".png")
    fig.savefig(out, dpi=120, bbox_inches="tight")
    return out


def plot_offline(path: Path) -> Path:
    r = json.loads(path.read_text())
    names = ["HF generate", "NanoForge", "roofline ceiling"]
    vals = [r.get("hf", {}).get("output_tok_s", 0), r["nanoforge"]["output_tok_s"], r["roofline"]["output_tok_s"]]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.bar(names, vals, color=["gray", "tab:blue", "lightgray"])
    for i, v in enumerate(vals):
        ax.text(i, v, f"{v:,.0f}", ha="center", va="bottom")
    ax.set(ylabel="output tokens / s", title=f"offline workload, {r['model']}, {r['machine'].get('gpu', '')}")
    out = path.with_suffix(".png")
    fig.savefig(out, dpi=120, bbox_inches="tight")
    return out


def main() -> None:
    root = Path(sys.argv[1] if len(sys.argv) > 1 else "bench/results")
    for p in sorted(root.glob("attention-decode-*.json")):
        print(plot_attention(p))
    for p in sorted(root.glob("offline-*-cuda-*.json")):
        print(plot_offline(p))


if __name__ == "__main__":
    main()
