"""Proof that the packaged weights were converted right.

1. Whisper (tiny.en, base) from CTranslate2 files: greedy-decode a sample of real speech (RAVDESS,
   speechocean762) and compute the word error rate against the reference transcripts.
2. SmolLM2-135M-Instruct from GGUF: answers simple factual questions, and replies differently when
   the text says the speaker is sad or happy.

    python bench/asr_check.py [--n-ravdess 40] [--n-speechocean 40] [--models whisper-tiny.en whisper-base]

Prints tables and writes bench/results/asr_check.json (atomically).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from paraencoder import backbones  # noqa: E402
from paraencoder.audio import load_audio  # noqa: E402
from paraencoder.io import atomic_write_json  # noqa: E402

SHARED = Path(os.environ.get("PARAENCODER_SHARED_DATA", REPO.parent / "shared" / "data"))
DIGITS = "zero one two three four five six seven eight nine".split()


def normalise(text: str) -> list[str]:
    """Lower case, digits spelled one by one (speechocean762 writes "ZERO THREE"), no punctuation."""
    text = text.lower().replace("'", "")
    text = re.sub(r"\d", lambda m: f" {DIGITS[int(m.group())]} ", text)
    return re.sub(r"[^a-z]+", " ", text).split()


def word_errors(ref: list[str], hyp: list[str]) -> int:
    """Levenshtein distance over words (substitutions + deletions + insertions)."""
    row = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        prev, row[0] = row[0], i
        for j, h in enumerate(hyp, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (r != h))
    return row[-1]


def sample(corpus: str, n: int) -> list[dict]:
    """n rows spread evenly over the metadata (covers speakers and emotions, deterministic)."""
    rows = [json.loads(line) for line in (SHARED / corpus / "metadata.jsonl").read_text().splitlines() if line.strip()]
    step = max(1, len(rows) // n)
    return rows[::step][:n]


def run_asr(name: str, corpora: dict[str, list[dict]], batch: int) -> dict:
    from transformers import WhisperFeatureExtractor

    start = time.perf_counter()
    loaded = backbones.load_whisper(name)
    load_s = time.perf_counter() - start
    extractor = WhisperFeatureExtractor(feature_size=loaded.model.config.num_mel_bins)
    result = {"load_s": round(load_s, 2), "identity": loaded.identity, "corpora": {}}
    for corpus, rows in corpora.items():
        errors = words = 0
        examples = []
        start = time.perf_counter()
        for i in range(0, len(rows), batch):
            chunk = rows[i : i + batch]
            waves = [load_audio(SHARED / corpus / row["audio"]) for row in chunk]
            feats = extractor(waves, sampling_rate=16000, return_tensors="pt").input_features
            for row, hyp in zip(chunk, backbones.whisper_greedy_transcribe(loaded, feats)):
                ref_words, hyp_words = normalise(row["text"]), normalise(hyp)
                errs = word_errors(ref_words, hyp_words)
                errors, words = errors + errs, words + len(ref_words)
                examples.append({"id": row["id"], "ref": row["text"], "hyp": hyp, "errors": errs})
        result["corpora"][corpus] = {
            "clips": len(rows),
            "words": words,
            "wer": round(errors / max(words, 1), 4),
            "seconds": round(time.perf_counter() - start, 1),
            "examples": examples,
        }
    return result


def chat(llm, text: str, max_new_tokens: int = 40) -> str:
    tok = llm.tokenizer
    inputs = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = llm.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return tok.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()


def run_llm() -> dict:
    start = time.perf_counter()
    llm = backbones.load_causal_lm("smollm2-135m-instruct")
    load_s = time.perf_counter() - start
    questions = [
        ("What is the capital of France?", ["paris"]),
        ("How many days are there in a week?", ["seven", "7"]),
        ("What color is the sky on a clear sunny day?", ["blue"]),
    ]
    facts = []
    for question, answers in questions:
        reply = chat(llm, question)
        facts.append({"question": question, "reply": reply, "correct": any(a in reply.lower() for a in answers)})
    said = "I got the results of my exam today."
    moods = {mood: chat(llm, f'Someone told me: "{said}" They said it in a {mood} voice. Reply to them in one or two sentences.', 48) for mood in ("sad", "happy")}
    return {"load_s": round(load_s, 2), "identity": llm.identity, "facts": facts, "emotion": moods, "emotion_replies_differ": moods["sad"] != moods["happy"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n-ravdess", type=int, default=40)
    parser.add_argument("--n-speechocean", type=int, default=40)
    parser.add_argument("--models", nargs="+", default=["whisper-tiny.en", "whisper-base"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-llm", action="store_true")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "asr_check.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    corpora = {"ravdess": sample("ravdess", args.n_ravdess), "speechocean762": sample("speechocean762", args.n_speechocean)}
    report: dict = {"cache": str(backbones.cache_root()), "threads": args.threads, "asr": {}, "wer_normalisation": normalise.__doc__}
    print(f"{'model':18} {'corpus':15} {'clips':>5} {'words':>5} {'WER':>7} {'time s':>7}")
    for name in args.models:
        result = run_asr(name, corpora, args.batch)
        report["asr"][name] = result
        for corpus, r in result["corpora"].items():
            print(f"{name:18} {corpus:15} {r['clips']:5d} {r['words']:5d} {r['wer']:7.1%} {r['seconds']:7.1f}")
        worst = sorted((e for r in result["corpora"].values() for e in r["examples"]), key=lambda e: -e["errors"])[:3]
        for e in worst:
            print(f"    worst: {e['ref']!r} -> {e['hyp']!r}")
    if not args.no_llm:
        llm = run_llm()
        report["llm"] = llm
        print(f"\nsmollm2-135m-instruct (load {llm['load_s']} s)")
        for f in llm["facts"]:
            print(f"  [{'ok' if f['correct'] else 'WRONG'}] {f['question']} -> {f['reply']!r}")
        for mood, reply in llm["emotion"].items():
            print(f"  {mood:5}: {reply!r}")
        print(f"  replies differ: {llm['emotion_replies_differ']}")
    atomic_write_json(args.out, report)
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
