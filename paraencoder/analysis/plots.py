"""Plots for probe reports (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

import io


def plot_probe_report(report: dict, *, dpi: int = 120) -> bytes:
    """PNG bytes: held-out accuracy per layer, one line per ``corpus/label``, dotted chance levels.

    One panel per corpus; encoder, projector and LLM layers share the x axis with separators.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    corpora = list(report["corpora"].items())
    fig, axes = plt.subplots(1, len(corpora), figsize=(6.0 * len(corpora), 4.2), squeeze=False)
    for ax, (corpus, section) in zip(axes[0], corpora):
        layers = section["layers"]
        x = list(range(len(layers)))
        for i, (label, entry) in enumerate(section["probes"].items()):
            color = f"C{i}"
            ax.plot(x, entry["accuracy"], marker="o", ms=3, color=color, label=section.get("about", {}).get(label, label))
            ax.axhline(entry["chance"], color=color, ls=":", lw=1)
            best = layers.index(entry["best_layer"])
            ax.plot([best], [entry["best_accuracy"]], marker="*", ms=11, color=color)
        # Separate encoder / projector / LLM blocks.
        for j in range(1, len(layers)):
            if layers[j].split(".")[0] != layers[j - 1].split(".")[0]:
                ax.axvline(j - 0.5, color="grey", lw=0.8)
        step = max(1, len(layers) // 16)
        ax.set_xticks(x[::step])
        ax.set_xticklabels([layers[k] for k in x[::step]], rotation=45, ha="right", fontsize=8)
        ax.set_ylim(0, 1.02)
        ax.set_ylabel("held-out speaker accuracy")
        ax.set_title(f"{corpus} ({section['split']['n_test']} test clips)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    fig.suptitle(f"Linear probes per layer: {report['model']['description']}  (dotted = majority chance, * = peak)", fontsize=10)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    plt.close(fig)
    return buffer.getvalue()
