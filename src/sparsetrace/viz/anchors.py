"""Pictures of a thought-anchors result (``sparsetrace.analysis.anchors.Anchors``): receiver scores, the
sentence maps of the top receiver heads, and the layer x head kurtosis."""

from __future__ import annotations

from pathlib import Path

import torch

from ..analysis.anchors import layer_sentence_matrices
from .plot import pyplot


def label(text: str, n: int = 48) -> str:
    """``text`` on one line, cut to ``n`` characters with an ellipsis."""
    text = " ".join(text.split())
    return text if len(text) <= n else text[: n - 1] + "…"



def plot(out: Path, result, trace, sink_prior: bool = False) -> list[str]:
    """The three PNGs; returns their file names."""
    plt = pyplot()

    files = []
    scores = result.scores.numpy()
    nS = len(result.sentences)
    ranked = torch.argsort(torch.nan_to_num(result.scores, nan=-1e9), descending=True)
    order = [int(i) for i in ranked if not torch.isnan(result.scores[i])][:20]  # last 4 have none
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(11, 9), gridspec_kw={"height_ratios": [1, 2]})
    top.bar(range(nS), scores, color="tab:blue", width=1.0 if nS > 100 else 0.8)
    for i in order[:5]:
        top.annotate(str(i), (i, scores[i]), ha="center", va="bottom", fontsize=8)
    top.set_xlabel("sentence")
    top.set_ylabel("receiver score")
    top.set_title(f"Receiver scores over {len(result.heads)} receiver heads "
                  f"(last {result.proximity_ignore} sentences have none)")
    bottom.barh(range(len(order)), scores[order], color="tab:orange")
    bottom.set_yticks(range(len(order)), [f"[{i}] {label(result.sentences[i].text)}"
                                          for i in order], fontsize=8)
    bottom.invert_yaxis()
    bottom.set_xlabel("receiver score")
    bottom.set_title(f"Top {len(order)} sentences")
    fig.tight_layout()
    fig.savefig(out / "receiver_scores.png", dpi=110)
    plt.close(fig)
    files.append("receiver_scores.png")

    shown = result.heads[:4]
    fig, axes = plt.subplots(1, len(shown), figsize=(4.2 * len(shown), 4.4), squeeze=False)
    by_layer = {}
    for layer, head in shown:
        if layer not in by_layer:
            by_layer[layer] = layer_sentence_matrices(trace, layer, result.sentences, sink_prior)
        m = by_layer[layer][head].clone()
        m[torch.triu(torch.ones(nS, nS, dtype=torch.bool), 1)] = float("nan")
        ax = axes[0][shown.index((layer, head))]
        im = ax.imshow(torch.log10(m.clamp(min=1e-6)).numpy(), cmap="magma", interpolation="nearest")
        ax.set_title(f"L{layer} H{head}  kurtosis {float(result.kurtosis[layer, head]):.1f}")
        ax.set_xlabel("key sentence")
        ax.set_ylabel("query sentence")
        fig.colorbar(im, ax=ax, fraction=0.046, label="log10 mean attention")
    fig.suptitle("Sentence x sentence attention of the top receiver heads (vertical stripes = "
                 "anchors)")
    fig.tight_layout()
    fig.savefig(out / "receiver_heads.png", dpi=110)
    plt.close(fig)
    files.append("receiver_heads.png")

    L, H = result.kurtosis.shape
    fig, ax = plt.subplots(figsize=(max(4, 0.5 * H + 2), max(4, 0.22 * L + 1.5)))
    im = ax.imshow(result.kurtosis.numpy(), cmap="viridis", aspect="auto", interpolation="nearest")
    for layer, head in result.heads:
        ax.scatter(head, layer, marker="o", facecolors="none", edgecolors="red", s=40)
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_title("Kurtosis of vertical scores (red: receiver heads)")
    fig.colorbar(im, ax=ax, label="excess kurtosis")
    fig.tight_layout()
    fig.savefig(out / "kurtosis.png", dpi=110)
    plt.close(fig)
    files.append("kurtosis.png")
    return files
