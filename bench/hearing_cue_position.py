"""Diagnostic: does the frozen LLM read the verbal cue better after the question than before it?

No training. First, text only on the *training* bank (the cue sentence before vs after each naming
question). Then, for a trained cue adapter, every reported clip is asked the trained phrasing and the
unseen naming bank (the rotation of ``bench/hearing_eval.py``) three ways, in one run:

* ``soft``: the adapter as trained (the cue's posterior mixed into word embeddings after the frames);
* ``text_after_frames``: the frame tokens only, then the cue classifier's *argmax* written as text
  where the soft cue sat (``<speech>(The speaker is an adult, feeling sad.)`` + newline + question);
* ``text_end``: the frame tokens, the question, then the same text cue after it.

The two text rows differ only in where the (identical) cue sentence stands, so their difference is
the position effect; ``soft`` vs ``text_after_frames`` is what mixing the posterior (instead of
writing the argmax) does. The frames were trained with the cue after them, which favours the first
two rows; a gain of ``text_end`` is therefore a lower bound of what training with the cue at the end
could give.

    python bench/hearing_cue_position.py --adapter checkpoints/hearing-whisper-base-smollm2
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.common import RESULTS, machine_info  # noqa: E402


@contextlib.contextmanager
def without_cue(adapter):
    """The adapter's frame tokens only (its cue taken out for the duration)."""
    cue, adapter.cue = adapter.cue, None
    try:
        yield adapter
    finally:
        adapter.cue = cue


def cue_sentence(adapter, probs: dict[str, dict[str, float]]) -> str:
    """The cue template with each attribute's argmax class phrase, as plain text."""
    words = {a: adapter.cue.classes[a][max(p, key=p.get)].strip() for a, p in probs.items()}
    return adapter.cue.template.format(**words)


def text_check_on_training_bank(llm, template: str, max_new_tokens: int) -> dict:
    """Text only, the *training* bank (what a setting may be chosen on): the cue sentence for each
    emotion before vs after each naming question (multiple choice in its 4 option orders)."""
    from paraencoder.labels import score_answer
    from paraencoder.prompts import LABEL_WORDS, QUESTION_BANK, question_slots

    out = {}
    for q in QUESTION_BANK["emotion"]["train"]:
        if q.form == "yesno":
            continue
        row = {}
        for where in ("before", "after"):
            prompts, labels = [], []
            for label, word in LABEL_WORDS["emotion"].items():
                for k in range(4 if q.form == "choice" else 1):
                    text, cue = q.render(**question_slots(q, label, f"order{k}")), template.format(age_group="an adult", emotion=word)
                    prompts.append(f"{cue}\n{text}" if where == "before" else f"{text}\n{cue}")
                    labels.append(label)
            replies = llm.generate_text(prompts, max_new_tokens=max_new_tokens)
            row[where] = sum(score_answer("emotion", q.form, r, label)[1] for r, label in zip(replies, labels))
        row["n"] = len(prompts)
        out[q.text] = row
        print(f"training bank, text only: {q.text[:50]!r}: cue before {row['before']}/{row['n']}, after {row['after']}/{row['n']}", flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    from paraencoder.eval.phrasings import EVAL_BATCH_SIZE

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--adapter", type=Path, default=REPO / "checkpoints" / "hearing-whisper-base-smollm2")
    parser.add_argument("--data", type=Path, default=REPO / "outputs" / "hearing" / "data", help="folder with test_ravdess.jsonl and test_speechocean.jsonl")
    parser.add_argument("--suites", default="emotion,age")
    parser.add_argument("--batch-size", type=int, default=EVAL_BATCH_SIZE)
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS / "hearing_cue_position.json")
    parser.add_argument("--text-only", action="store_true", help="only the training-bank text check (kept next to earlier results in --out)")
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    from paraencoder.data.manifest import load_manifest
    from paraencoder.eval.phrasings import ask_bank
    from paraencoder.io import atomic_write_json
    from paraencoder.model.adapter import SpeechAdapter

    adapter = SpeechAdapter.from_pretrained(args.adapter)
    if adapter.cue is None:
        raise SystemExit(f"{args.adapter} has no verbal cue")
    sources = {"emotion": ("test_ravdess.jsonl", "emotion"), "age": ("test_speechocean.jsonl", "age_group")}
    results = {"adapter": str(args.adapter), "machine": machine_info(torch.device("cpu"))}
    if args.text_only:
        results = json.loads(args.out.read_text()) if args.out.is_file() else results
    results["training_bank_text"] = text_check_on_training_bank(adapter.llm, adapter.cue.template, args.max_new_tokens)
    if args.text_only:
        atomic_write_json(args.out, results)
        return 0
    for suite in [s.strip() for s in args.suites.split(",") if s.strip()]:
        file, field = sources[suite]
        utts = [u for u in load_manifest(args.data / file) if getattr(u, field)]
        heard = []
        for start in range(0, len(utts), args.batch_size):
            heard += adapter.heard([u.audio for u in utts[start : start + args.batch_size]])
        cues = [cue_sentence(adapter, h) for h in heard]
        attr = field if field in adapter.cue.labels else "age_group"
        cue_right = sum(max(h[attr], key=h[attr].get) == getattr(u, field) for h, u in zip(heard, utts)) / len(utts)
        rows = {"cue_classifier": round(cue_right, 4)}
        hooks = {
            "soft": (contextlib.nullcontext(adapter), None),
            "text_after_frames": (without_cue(adapter), lambda i, p: p.replace("<speech>\n", "<speech>" + cues[i] + "\n", 1)),
            "text_end": (without_cue(adapter), lambda i, p: p + "\n" + cues[i]),
        }
        for name, (ctx, hook) in hooks.items():
            with ctx as model, model.reusing_speech_tokens():  # one encoder pass per clip for both phrasings
                for split in ("trained", "eval"):
                    start = time.perf_counter()
                    res = ask_bank(model, utts, field, split, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens, prompt_hook=hook)
                    res.pop("rows")
                    res["seconds"] = round(time.perf_counter() - start, 1)
                    rows[f"{name}/{'trained' if split == 'trained' else 'unseen'}"] = res
                    print(f"{suite} {name} {split}: {res['accuracy']:.3f} (no label {res['no_label']:.3f}) {json.dumps({k[:30]: round(v, 3) for k, v in res['per_phrasing'].items()})}", flush=True)
        results[suite] = rows
        atomic_write_json(args.out, results)
    print(table(results))
    return 0


def table(results: dict) -> str:
    lines = ["| suite | view | trained phrasing | unseen naming bank | no label (trained / unseen) |", "|---|---|---|---|---|"]
    for suite, rows in results.items():
        if not isinstance(rows, dict) or "cue_classifier" not in rows:
            continue
        for view in ("soft", "text_after_frames", "text_end"):
            t, u = rows[f"{view}/trained"], rows[f"{view}/unseen"]
            lines.append(f"| {suite} | {view} | {100 * t['accuracy']:.1f}% | {100 * u['accuracy']:.1f}% | {100 * t['no_label']:.1f}% / {100 * u['no_label']:.1f}% |")
        lines.append(f"| {suite} | cue classifier | {100 * rows['cue_classifier']:.1f}% | | |")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
