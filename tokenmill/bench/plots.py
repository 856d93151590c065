"""PNG plots of the quality evals (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from collections.abc import Sequence


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_ppl(results: Sequence, path: str, title: str = "perplexity") -> None:
    """Bar chart of perplexity by mode (PplResult list), each bar labelled with its value."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(4.0, 1.3 * len(results) + 2), 4.5))
    names = [r.mode for r in results]
    values = [r.perplexity for r in results]
    bars = ax.bar(range(len(values)), values, color="tab:blue")
    ax.bar_label(bars, labels=[f"{v:.3f}" for v in values], fontsize="small")
    ax.set_xticks(range(len(names)), names, rotation=20 if len(names) > 3 else 0, ha="right")
    ax.set_ylabel("perplexity (lower is better)")
    r0 = results[0] if results else None
    if r0 is not None:
        ax.set_title(
            f"{title}\n{r0.num_scored} tokens, window {r0.window}, stride {r0.stride}, chunk {r0.chunk}"
        )
        low, high = min(values), max(values)
        ax.set_ylim(0, high * 1.12 if high > 0 else 1)
        if high > 0 and (high - low) / high < 0.05:  # close values: zoom in so differences show
            ax.set_ylim(low * 0.97, high * 1.02)
    ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_retrieval(results: Sequence, path: str) -> None:
    """Accuracy heat map, length (rows) x depth (columns), one panel per mode (RetrievalResult list)."""
    plt = _pyplot()
    n = max(1, len(results))
    depths = max((len(r.depths) for r in results), default=1)
    lengths = max((len(r.lengths) for r in results), default=1)
    panel_w, panel_h = max(3.6, 0.75 * depths + 1.6), max(3.0, 0.5 * lengths + 1.8)
    fig, axes = plt.subplots(1, n, figsize=(panel_w * n + 1.2, panel_h), squeeze=False, layout="constrained")
    image = None
    for k, (ax, r) in enumerate(zip(axes[0], results, strict=False)):
        grid = r.grid()
        image = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
        ax.set_xticks(range(len(r.depths)), [f"{d:g}" for d in r.depths])
        ax.set_yticks(range(len(r.lengths)), [str(x) for x in r.lengths])
        ax.set_xlabel("depth of the fact")
        if k == 0:
            ax.set_ylabel("prompt tokens")
        ax.set_title(f"{r.mode}: {r.accuracy * 100:.0f}%", fontsize="medium")
        for i, row in enumerate(grid):
            for j, acc in enumerate(row):
                ax.text(j, i, f"{acc * 100:.0f}", ha="center", va="center", fontsize="small")
    if image is not None:
        fig.colorbar(image, ax=list(axes[0]), label="accuracy", shrink=0.9)
    task = results[0].task if results else "retrieval"
    fig.suptitle(f"{task} retrieval accuracy (%) by prompt length and depth")
    fig.savefig(path, dpi=100)
    plt.close(fig)
