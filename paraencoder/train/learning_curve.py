"""Learning curves: what the frozen LLM *says* about validation speakers as training goes on.

:class:`HearingCurve` is a Lightning callback. Every ``every_n_steps`` optimizer steps it asks the
frozen LLM, through the adapter being trained, about a fixed class-stratified set of validation
clips (greedy, short replies), parses the answers and appends one row per attribute and phrasing
set to ``curve.jsonl`` (atomic rewrite; a resumed run keeps its earlier rows). At the end of
training it draws ``curve.png``. The loss alone does not say whether the LLM names the emotion:
this does. Validation clips must come from speakers the run does not train on.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import lightning as L
import torch

from paraencoder.io import atomic_write_bytes, atomic_write_text

__all__ = ["HearingCurve", "stratified_sample", "plot_curve"]

_FIELDS = {"emotion": "emotion", "age": "age_group", "gender": "gender"}


def stratified_sample(utts: list, field: str, per_class: int, seed: int = 0) -> list:
    """``per_class`` clips of every class of ``field`` (fewer where a class has fewer), in a seeded order."""
    import random

    rng = random.Random(seed)
    by_class: dict[str, list] = {}
    for u in utts:
        label = getattr(u, field)
        if label:
            by_class.setdefault(label, []).append(u)
    out = []
    for label in sorted(by_class):
        group = sorted(by_class[label], key=lambda u: u.id)
        out += rng.sample(group, min(per_class, len(group)))
    return out


class HearingCurve(L.Callback):
    """Validation accuracy of the LLM's parsed answers against optimizer step, as JSONL + PNG.

    Args:
        manifests: ``{"emotion": path, "age": path}``: validation manifests per attribute (speakers
            the run does not train on).
        out_dir: where ``curve.jsonl`` and ``curve.png`` go (default: the trainer's log dir).
        every_n_steps: evaluation period in optimizer steps (also at step 0 and at the end).
        per_class: validation clips per class.
        phrasings: which phrasings to ask: ``trained`` (the fixed question) and/or ``eval`` (the
            held-out bank, naming formats).
        max_new_tokens: reply length (the answer comes first; a short reply is enough to parse it).
    """

    def __init__(
        self,
        manifests: dict[str, str],
        out_dir: str | None = None,
        every_n_steps: int = 100,
        per_class: int = 6,
        phrasings: list[str] = ["trained", "eval"],  # noqa: B006 - jsonargparse needs a literal default
        max_new_tokens: int = 20,
    ):
        super().__init__()
        from paraencoder.data.manifest import load_manifest
        from paraencoder.errors import ConfigError

        unknown = set(manifests) - set(_FIELDS)
        if unknown:
            raise ConfigError(f"HearingCurve manifests: unknown attribute(s) {sorted(unknown)}; use {sorted(_FIELDS)}")
        self.sets = {task: stratified_sample(load_manifest(path), _FIELDS[task], per_class) for task, path in manifests.items()}
        self.out_dir, self.every, self.phrasings, self.max_new_tokens = out_dir, int(every_n_steps), list(phrasings), int(max_new_tokens)
        self.rows: list[dict] = []
        self._last_step = -1

    def _path(self, trainer, name: str) -> Path:
        root = Path(self.out_dir or trainer.log_dir or ".")
        return root / name

    def _evaluate(self, trainer, module) -> None:
        step = trainer.global_step
        if step == self._last_step or not trainer.is_global_zero:
            return
        self._last_step = step
        path = self._path(trainer, "curve.jsonl")
        # Rows come from this run only: a resumed run gets its own back from the checkpoint
        # (state_dict below); a file left by another run in the same out_dir is replaced, not merged.
        wanted = {(task, split) for task in self.sets for split in self.phrasings}
        if wanted <= {(r["task"], r["phrasing"]) for r in self.rows if r["step"] == step}:
            return  # measured before this run was resumed: not redone
        start = time.perf_counter()
        from paraencoder.eval.phrasings import ask_bank

        with module.adapter.reusing_speech_tokens():  # a clip asked in every phrasing is encoded once per point
            for task, utts in self.sets.items():
                for split in self.phrasings:
                    result = ask_bank(module.adapter, utts, _FIELDS[task], split, max_new_tokens=self.max_new_tokens)
                    self.rows.append({"step": step, "task": task, "phrasing": split, "accuracy": result["accuracy"], "no_label": result["no_label"], "n": result["n"]})
        self.rows = sorted({(r["step"], r["task"], r["phrasing"]): r for r in self.rows}.values(), key=lambda r: (r["step"], r["task"], r["phrasing"]))
        atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in self.rows))
        latest = ", ".join(f"{r['task']}/{r['phrasing']} {r['accuracy']:.2f}" for r in self.rows if r["step"] == step)
        print(f"curve step {step}: {latest} ({time.perf_counter() - start:.0f} s)", flush=True)

    def state_dict(self) -> dict:
        return {"rows": list(self.rows)}

    def load_state_dict(self, state_dict: dict) -> None:
        self.rows = list(state_dict.get("rows", []))

    def on_train_start(self, trainer, module) -> None:
        with torch.no_grad():
            self._evaluate(trainer, module)

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        if self.every > 0 and trainer.global_step % self.every == 0:
            with torch.no_grad():
                self._evaluate(trainer, module)

    def on_train_end(self, trainer, module) -> None:
        with torch.no_grad():
            self._evaluate(trainer, module)
        if trainer.is_global_zero and self.rows:
            atomic_write_bytes(self._path(trainer, "curve.png"), plot_curve(self.rows))


def plot_curve(rows: list[dict], *, title: str = "validation speakers: the LLM's parsed answers", dpi: int = 110) -> bytes:
    """PNG bytes: accuracy against step, one line per (task, phrasing), no-label rate dashed."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.0, 4.2))
    series: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        series.setdefault((r["task"], r["phrasing"]), []).append(r)
    for i, ((task, phrasing), points) in enumerate(sorted(series.items())):
        points.sort(key=lambda r: r["step"])
        steps = [p["step"] for p in points]
        ax.plot(steps, [p["accuracy"] for p in points], marker="o", ms=3, color=f"C{i}", label=f"{task}, {phrasing} phrasing")
        ax.plot(steps, [p["no_label"] for p in points], ls="--", lw=0.8, color=f"C{i}")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("accuracy (solid) / no-label rate (dashed)")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=10)
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=dpi)
    plt.close(fig)
    return buf.getvalue()
