"""Suite results on disk: ``<suite>.json``, ``<suite>.md`` and ``<suite>.png``, each written atomically."""

from __future__ import annotations

import io
import math
from pathlib import Path

from paraencoder.io import atomic_write_bytes, atomic_write_json, atomic_write_text

__all__ = ["write_report", "render_markdown", "plot_png", "fmt"]

VIEWS = (("speech", "speech (adapter)"), ("transcript", "transcript only"), ("stated", "text + stated cue"))


def fmt(value, percent: bool = True) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, (int, float)):
        return f"{100 * value:.1f}%" if percent else f"{value:.3f}"
    return str(value)


def _table(rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    out += ["| " + " | ".join(r) + " |" for r in rows[1:]]
    return out


def render_markdown(result: dict) -> str:
    """A short human-readable summary of one suite result."""
    suite = result["suite"]
    metrics = result["metrics"]
    lines = [f"# {suite} suite", ""]
    if result.get("description"):
        lines += [result["description"], ""]
    lines += [f"Items: {metrics.get('n', len(result.get('rows', [])))}. " + (f"Chance: {fmt(metrics.get('chance'))}." if metrics.get("chance") is not None else ""), ""]
    keys = result.get("headline", [])
    views = [(v, label) for v, label in VIEWS if isinstance(metrics.get(v), dict)]
    if keys and views:
        rows = [["metric"] + [label for _, label in views]]
        for key in keys:
            percent = not key.endswith(("score", "wer_raw"))
            rows.append([key] + [fmt(metrics[v].get(key), percent and "score" not in key) for v, _ in views])
        lines += _table(rows) + [""]
    for extra_key in ("encoder_asr", "judge", "per_voice", "label_set"):
        if metrics.get(extra_key) is not None:
            lines += [f"**{extra_key}**: `{metrics[extra_key]}`", ""]
    speech = metrics.get("speech", {})
    if isinstance(speech, dict) and speech.get("confusion"):
        lines += ["## Confusion (speech; rows = true, columns = named)", ""]
        rows = [["true \\ named"] + speech["columns"]]
        rows += [[label] + [str(c) for c in row] for label, row in zip(speech["labels"], speech["confusion"])]
        lines += _table(rows) + [""]
        lines += ["Per-class recall: " + ", ".join(f"{k} {fmt(v['recall'])}" for k, v in speech["per_class"].items()), ""]
    if result.get("notes"):
        lines += ["## Notes", ""] + [f"- {n}" for n in result["notes"]] + [""]
    sample = result.get("rows", [])[:8]
    if sample:
        lines += ["## Sample replies", ""]
        for row in sample:
            label = row.get("label") or row.get("voice") or ""
            lines.append(f"- `{row.get('id')}` ({label}): speech → {row.get('speech_reply')!r}")
        lines.append("")
    return "\n".join(lines)


def plot_png(result: dict) -> bytes:
    """Confusion matrix (classification suites) or grouped bars of the headline metrics, as PNG bytes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    metrics = result["metrics"]
    speech = metrics.get("speech", {})
    if isinstance(speech, dict) and speech.get("confusion"):
        matrix = np.array(speech["confusion"], dtype=float)
        labels, columns = speech["labels"], speech["columns"]
        fig, ax = plt.subplots(figsize=(1.0 + 0.7 * len(columns), 1.0 + 0.6 * len(labels)))
        rates = matrix / np.maximum(matrix.sum(1, keepdims=True), 1)
        ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
        for i in range(matrix.shape[0]):
            for j in range(matrix.shape[1]):
                ax.text(j, i, int(matrix[i, j]), ha="center", va="center", color="white" if rates[i, j] > 0.5 else "black", fontsize=8)
        ax.set_xticks(range(len(columns)), columns, rotation=45, ha="right")
        ax.set_yticks(range(len(labels)), labels)
        ax.set_xlabel("named by the LLM")
        ax.set_ylabel("true")
        ax.set_title(f"{result['suite']}: acc {fmt(speech.get('accuracy'))}, chance {fmt(metrics.get('chance'))}")
    else:
        keys = [k for k in result.get("headline", []) if any(isinstance(metrics.get(v), dict) and isinstance(metrics[v].get(k), (int, float)) for v, _ in VIEWS)]
        views = [(v, label) for v, label in VIEWS if isinstance(metrics.get(v), dict)]
        fig, ax = plt.subplots(figsize=(2 + 1.5 * max(1, len(keys)), 3.5))
        width = 0.8 / max(1, len(views))
        for n, (view, label) in enumerate(views):
            values = [metrics[view].get(k) or 0.0 for k in keys]
            ax.bar([i + n * width for i in range(len(keys))], values, width, label=label)
        ax.set_xticks([i + width * (len(views) - 1) / 2 for i in range(len(keys))], keys)
        ax.legend(fontsize=8)
        ax.set_title(result["suite"])
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    return buffer.getvalue()


def write_report(result: dict, out_dir: str | Path) -> dict[str, Path]:
    """Write ``<suite>.json``, ``<suite>.md`` and ``<suite>.png`` into ``out_dir`` (atomically)."""
    out = Path(out_dir)
    suite = result["suite"]
    paths = {"json": out / f"{suite}.json", "md": out / f"{suite}.md", "png": out / f"{suite}.png"}
    atomic_write_json(paths["json"], result)
    atomic_write_text(paths["md"], render_markdown(result))
    atomic_write_bytes(paths["png"], plot_png(result))
    return paths
