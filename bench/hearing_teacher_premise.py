"""Where to tell the teacher the attribute: before or after the question? (training bank, text only).

Behavioral alignment trains the student on the frozen LLM's own replies to the question with the
attribute stated as text. The 135M teacher answers from what it read last, so the premise's place
decides how many of its replies are right, and the teacher filter keeps only those: the student
never sees a format the teacher cannot answer. This script builds the recipe's question-bank
examples over the *training* manifest (no held-out clip, no audio, no training) for each premise
position, generates the teacher replies through the same cache a training run uses, and counts per
answer format how many the filter keeps, and how many kept first clauses hedge ("a mix of ...").

    python bench/hearing_teacher_premise.py      # -> bench/results/hearing_teacher_premise.json
"""

from __future__ import annotations

import argparse
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def count_kept(examples) -> dict:
    """Per ``attribute/form``: examples, kept by the teacher filter, and kept replies that hedge first."""
    from paraencoder.train.data import first_clause, teacher_answer_correct

    total, kept, hedged = Counter(), Counter(), Counter()
    for ex in examples:
        key = f"{ex.question['attribute']}/{ex.question['form']}"
        total[key] += 1
        if teacher_answer_correct(ex):
            kept[key] += 1
            hedged[key] += "mix" in first_clause(ex.reply).lower()
    return {k: {"examples": total[k], "kept": kept[k], "hedged": hedged[k]} for k in sorted(total)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", type=Path, default=REPO / "recipes" / "hearing.yaml")
    parser.add_argument("--train", type=Path, default=REPO / "outputs" / "hearing" / "data" / "train.jsonl")
    parser.add_argument("--positions", default="before,after")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "hearing_teacher_premise.json")
    args = parser.parse_args(argv)

    import yaml

    from paraencoder.data.dataset import TASK_ATTRIBUTES, attach_teacher_replies, bank_examples
    from paraencoder.data.manifest import load_manifest
    from paraencoder.data.teacher import Decoding, TeacherCache
    from paraencoder.io import atomic_write_json
    from paraencoder.model.resolve import resolve_llm
    from paraencoder.train.module import default_cache_dir

    recipe = yaml.safe_load(args.recipe.read_text())
    model, data = recipe["model"]["init_args"], recipe["data"]["init_args"]
    llm = resolve_llm(model["llm"], dtype=data.get("llm_dtype", "float32")).with_system_prompt(model.get("system_prompt"))  # the run's teacher
    cache = TeacherCache(data.get("teacher_cache") or default_cache_dir() / "teacher")
    utts = load_manifest(args.train)
    attributes = [TASK_ATTRIBUTES[t] for t in data["tasks"] if t in TASK_ATTRIBUTES]
    results = {}
    for position in args.positions.split(","):
        start = time.perf_counter()
        examples = bank_examples(utts, attributes, per_item=data["questions_per_item"], seed=data.get("seed", 0), premise=position)
        attach_teacher_replies(examples, llm, cache, decoding=Decoding(max_new_tokens=data["teacher_max_new_tokens"]), batch_size=data["teacher_batch_size"])
        counts = count_kept(examples)
        results[position] = {"formats": counts, "kept": sum(c["kept"] for c in counts.values()), "examples": len(examples), "seconds": round(time.perf_counter() - start, 1)}
        print(f"premise {position}: kept {results[position]['kept']} of {len(examples)}")
        for key, c in counts.items():
            print(f"  {key:22s} kept {c['kept']:4d} of {c['examples']:4d}  hedged {c['hedged']}")
    atomic_write_json(args.out, {"recipe": str(args.recipe.relative_to(REPO)) if args.recipe.is_relative_to(REPO) else str(args.recipe), "train_manifest": str(args.train), "positions": results})
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
