"""Plots of a needle-in-a-haystack sweep (``sparsetrace.runs.niah``): scores, needle mass, heads, routes."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .plot import pyplot


def plot(out: Path, rows, reports, ks) -> None:
    """scores.png (length x depth per k), needle_mass.png (per layer, per k, success vs failure),
    heads.png (mean needle mass per layer and head), routes.png (the route over layers)."""
    plt = pyplot()
    lengths = sorted({r["length"] for r in rows})
    depths = sorted({r["depth"] for r in rows})

    fig, axes = plt.subplots(1, len(ks), figsize=(2.6 * len(ks) + 1, 2.6), squeeze=False)
    for ax, k in zip(axes[0], ks):
        grid = np.full((len(lengths), len(depths)), np.nan)
        for i, n in enumerate(lengths):
            for j, d in enumerate(depths):
                sel = [r["score"] for r in rows if r["k"] == k and r["length"] == n and r["depth"] == d]
                if sel:
                    grid[i, j] = np.mean(sel)
        ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto", origin="lower")
        sp = [r["sparsity"] for r in rows if r["k"] == k]
        ax.set_title(f"k={k}" + (f" (sparsity {np.mean(sp):.2f})" if k != "dense" else ""), fontsize=8)
        ax.set_xticks(range(len(depths)), [f"{d:g}" for d in depths], fontsize=7)
        ax.set_yticks(range(len(lengths)), [str(n) for n in lengths], fontsize=7)
        ax.set_xlabel("needle depth %", fontsize=7)
        for i in range(len(lengths)):
            for j in range(len(depths)):
                if not np.isnan(grid[i, j]):
                    ax.text(j, i, f"{grid[i, j]:.1f}", ha="center", va="center", fontsize=6)
    axes[0][0].set_ylabel("tokens", fontsize=7)
    fig.suptitle("NIAH score (string_match_all)", fontsize=9)
    fig.tight_layout()
    fig.savefig(out / "scores.png", dpi=120)
    plt.close(fig)

    sparse_ks = [k for k in ks if k != "dense"]
    fig, axes = plt.subplots(1, max(1, len(sparse_ks)), figsize=(3.4 * max(1, len(sparse_ks)), 2.8),
                             squeeze=False)
    for ax, k in zip(axes[0], sparse_ks):
        for ok, color, label in ((True, "tab:green", "answered"), (False, "tab:red", "failed")):
            sel = [r["needle_mass_max"] for r in reports if r["k"] == k and (r["score"] >= 1) == ok]
            if sel:
                ax.plot(np.mean(sel, axis=0), color=color, label=f"{label} ({len(sel)})")
        ax.set_title(f"k={k}: answer block -> needle", fontsize=8)
        ax.set_xlabel("layer", fontsize=7)
        ax.set_ylabel("needle mass (max over heads)", fontsize=7)
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(out / "needle_mass.png", dpi=120)
    plt.close(fig)

    fig, axes = plt.subplots(1, max(1, len(sparse_ks)), figsize=(3.4 * max(1, len(sparse_ks)), 3.2),
                             squeeze=False)
    for ax, k in zip(axes[0], sparse_ks):
        sel = [r["needle_mass"] for r in reports if r["k"] == k]
        if sel:
            im = ax.imshow(np.mean(sel, axis=0).T, aspect="auto", cmap="viridis", vmin=0)
            fig.colorbar(im, ax=ax, fraction=0.05)
        ax.set_title(f"k={k}: mean needle mass", fontsize=8)
        ax.set_xlabel("layer", fontsize=7)
        ax.set_ylabel("head", fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "heads.png", dpi=120)
    plt.close(fig)

    shown = [r for r in reports if r["route"]["blocks"]][:6]
    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    for r in shown:
        blocks = np.array(r["route"]["blocks"]) * r["route"]["block_size"]
        ok = r["score"] >= 1
        ax.plot(range(len(blocks)), blocks, marker=".", ms=3, lw=1,
                ls="-" if ok else "--", label=f"{r['id']} k={r['k']} ({'ok' if ok else 'fail'})")
    ax.set_xlabel("layer boundary (0 = needle at the input, L = answer block)", fontsize=7)
    ax.set_ylabel("token position of the route's block", fontsize=7)
    ax.set_title("best needle -> answer route over layers", fontsize=8)
    if shown:
        ax.legend(fontsize=5)
    fig.tight_layout()
    fig.savefig(out / "routes.png", dpi=120)
    plt.close(fig)
