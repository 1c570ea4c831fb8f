"""Training data for every method: :class:`AlignmentData` (a LightningDataModule) and the teacher-answer filter.

It turns manifests + tasks (+ the question bank, contextual QA, dialogues) into
:class:`~paraencoder.data.dataset.AlignmentExample` objects with the frozen LLM's teacher replies
(generated once and cached, :mod:`paraencoder.data.teacher`), and serves them as resumable,
optionally length-bucketed batches.
"""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import torch

from paraencoder.data.dataset import AlignmentDataset, AlignmentExample, attach_teacher_replies, build_examples, collate
from paraencoder.data.teacher import Decoding, TeacherCache
from paraencoder.errors import ConfigError
from paraencoder.prompts import get_tasks
from paraencoder.train.module import default_cache_dir


def first_clause(text: str | None) -> str:
    """The reply up to its first comma, semicolon, colon or sentence end (``"The speaker is sad, ..."`` -> ``"The speaker is sad"``)."""
    import re

    return re.split(r"[,;:.!?]", text or "", maxsplit=1)[0]


def teacher_answer_correct(ex: AlignmentExample, reply: str | None = None) -> bool:
    """Whether a question-bank example's teacher reply (or ``reply``) gives the right answer in its first clause.

    Yes/no replies are scored whole ("The speaker is not sad." answers "no").
    """
    from paraencoder.labels import score_answer

    q = ex.question
    reply = ex.reply if reply is None else reply
    # The answer must come first: a reply that hedges before naming the class ("a mix of emotions,
    # but the most fitting choice is ...") teaches the student to hedge, and the label comes late.
    reply = reply if q["form"] == "yesno" else first_clause(reply)
    return score_answer(q["attribute"], q["form"], reply, ex.labels.get(q["attribute"]), q.get("candidate"))[1]


def resample_teacher_answers(
    examples: list[AlignmentExample],
    llm,
    cache: TeacherCache,
    *,
    decoding: Decoding,
    samples: int,
    temperature: float = 1.0,
    batch_size: int = 16,
    source: str = "manifest",
    progress: bool = True,
) -> dict:
    """Give question-bank examples whose greedy teacher reply is wrong the teacher's first *right* sampled reply.

    Rejection sampling from the frozen LLM's own distribution: round ``r`` (1..``samples``) samples
    one reply (``temperature``, seed ``r``; cached like every teacher reply, so a rerun redoes
    nothing) for each teacher prompt that has no right reply yet, and an example takes the first
    reply that :func:`teacher_answer_correct` accepts. The target stays the LLM's own answer to the
    stated cue - only its most likely *wrong* one is replaced - so the student learns formats the
    greedy teacher gets wrong (SmolLM2-135M's multiple choice) instead of never seeing them.
    Examples still wrong after every round keep their greedy reply (the filter drops them).
    Returns ``{task: [fixed, wrong]}``.
    """
    from collections import Counter
    from dataclasses import replace

    from paraencoder.data.teacher import TeacherRequest, generate_teacher_replies

    if samples < 0 or temperature <= 0:
        raise ConfigError(f"data.teacher_resample={samples}, data.teacher_resample_temperature={temperature}: give samples >= 0 and a temperature > 0")
    groups: dict[tuple, list[AlignmentExample]] = {}
    for ex in examples:
        if ex.question and not teacher_answer_correct(ex):
            groups.setdefault((ex.teacher_prompt, ex.system), []).append(ex)
    wrong = Counter(ex.task for group in groups.values() for ex in group)
    fixed: Counter = Counter()
    for round_ in range(1, samples + 1):
        if not groups:
            break
        keys = sorted(groups, key=lambda k: (k[0], k[1] or ""))
        replies = generate_teacher_replies(
            llm, [TeacherRequest(prompt, system) for prompt, system in keys], cache,
            decoding=replace(decoding, do_sample=True, temperature=temperature, top_p=1.0, seed=round_),
            batch_size=batch_size, progress=progress,
        )
        for key, reply in zip(keys, replies):
            group = groups[key]
            if reply is not None and teacher_answer_correct(group[0], reply):
                for ex in group:
                    ex.reply = reply
                    fixed[ex.task] += 1
                del groups[key]
    if wrong:
        summary = ", ".join(f"{t} {fixed[t]}/{wrong[t]}" for t in sorted(wrong))
        print(f"{source}: {sum(fixed.values())} of {sum(wrong.values())} wrong teacher answers replaced by a right sampled one within {samples} samples ({summary})")
    return {t: [fixed[t], wrong[t]] for t in sorted(wrong)}


def filter_teacher_answers(examples: list[AlignmentExample], *, source: str = "manifest") -> list[AlignmentExample]:
    """Keep question-bank examples whose teacher reply gives the right answer in its first clause (others untouched); prints counts per format.

    Yes/no replies are scored whole ("The speaker is not sad." answers "no").
    """
    from collections import Counter

    kept, dropped, total = [], Counter(), Counter()
    for ex in examples:
        q = ex.question
        if not q:
            kept.append(ex)
            continue
        total[ex.task] += 1
        if teacher_answer_correct(ex):
            kept.append(ex)
        else:
            dropped[ex.task] += 1
    if dropped:
        summary = ", ".join(f"{t} {dropped[t]}/{total[t]}" for t in sorted(total) if dropped[t])
        print(f"{source}: dropped {sum(dropped.values())} of {sum(total.values())} question-bank examples whose teacher reply gives a wrong or no answer ({summary})")
    if total and not any(ex.question for ex in kept):
        raise ConfigError(f"{source}: the teacher answered none of the {sum(total.values())} question-bank examples correctly; check the LLM or set data.filter_teacher: false")
    return kept


class AlignmentData(L.LightningDataModule):
    """Manifests → alignment examples with cached teacher replies → length-bucketed batches.

    Args:
        train_manifest: JSONL/CSV manifest of training utterances.
        val_manifest: optional manifest for validation loss.
        tasks: alignment tasks, e.g. ``["respond", "emotion"]`` (see ``paraencoder.prompts.TASKS``).
        llm: the frozen LLM spec (linked from ``model.llm``; the same loaded model is shared).
        llm_dtype: its dtype (linked from ``model.llm_dtype``).
        batch_size: examples per batch.
        num_workers: DataLoader worker processes (audio decoding).
        teacher_cache: directory of the teacher-reply cache (default in ``$PARAENCODER_CACHE``).
        teacher_max_new_tokens, teacher_batch_size: teacher generation settings.
        max_examples: cap for quick runs (taken after a seeded shuffle).
        seed: shuffling seed.
        bucket: group examples of similar length into batches (bounded padding).
        bucket_by: what "length" means: ``"tokens"`` (default) is each example's LLM training row
            (prompt, soft tokens, reply: :meth:`AlignmentModule.row_tokens`, counted from the
            tokenizer before training), which is what a step pays for; ``"seconds"`` is the clip's
            duration, the only measure before this option existed, and blind to reply and question
            lengths (on ``recipes/hearing.yaml`` 14.7% of the LLM's token slots were padding by
            seconds, 3.7% by tokens: docs/performance.md). Without a training module attached
            (a bare datamodule), or with dialogue examples, ``"tokens"`` falls back to seconds.
        bucket_ratio: the longest example of a bucket is at most ``1 + bucket_ratio`` times its
            shortest (:class:`~paraencoder.data.sampling.LengthBucketSampler`'s ``max_padding_ratio``).
        qa_mode: contextual paralinguistic QA (Wang et al. 2025): ``"none"``, ``"explicit"``
            (categorical + dimensional metadata rendered into the teacher prompt), ``"implicit"``
            (generated QA pairs that need words and voice) or ``"both"``.
        qa_generator: who writes implicit QA pairs: ``"templates"`` (deterministic contextual
            questions, :class:`paraencoder.data.qa.TemplateQAWriter`; the default), ``"local"`` (an
            in-process LLM: ``qa_generator_model`` names it, e.g. the packaged judge
            ``qwen2.5-coder-1.5b-instruct``; without one the frozen LLM writes, and SmolLM2-135M
            writes no valid pair) or an OpenAI-compatible URL (``qa_generator_model`` names the model).
        qa_pairs: QA pairs per utterance (implicit mode).
        questions_per_item: with ``> 0``, the speaker-attribute tasks (``emotion``, ``age``,
            ``gender``) ask that many phrasings per clip drawn from the training question bank
            (:data:`paraencoder.prompts.QUESTION_BANK`: one word, sentence, open, multiple choice,
            yes/no) instead of their single fixed question; ``0`` keeps the fixed question.
        filter_teacher: drop question-bank examples whose teacher reply (to the stated cue) does not
            parse to the right answer: the student never learns a wrong target. Counts are printed.
        teacher_resample: before the filter, give each question-bank example whose greedy teacher
            reply is wrong the first right one of up to this many sampled replies of the same
            prompt (:func:`resample_teacher_answers`; ``0``: off). The greedy 135M teacher gets
            most multiple-choice answers wrong, so without it the student hardly sees that format.
        teacher_resample_temperature: sampling temperature of those replies.
        teacher_premise: where the teacher's stated attribute goes in question-bank prompts:
            ``"before"`` the question (the original layout) or ``"after"`` it, on its own line;
            one position for all attributes or a mapping per attribute (``{emotion: after}``; an
            attribute not named keeps ``before``). ``bench/hearing_teacher_premise.py`` counts, on
            the training bank, how many teacher replies each position gets right.
        system_prompt: system message of the teacher prompts (linked from ``model.system_prompt``;
            ``None`` = the model's, when a trainer attaches one, else the template's default).
        bad_items: what to do with manifest items that cannot be trained on (schema errors, missing,
            truncated or non-finite audio, clips under 25 ms or over 10 min, ``<speech>`` in a
            transcript), found by decoding every clip before training: ``"fail"`` (default: stop
            before the first step with the file, line and reason of each), ``"skip"`` (train on the
            rest and write every bad item to ``bad_items_report``) or ``"off"`` (no check up front).
        bad_items_report: JSONL file for the skipped items (default
            ``<log dir>/bad_items-<manifest name>.jsonl``).
        dialogue_manifest: optional JSONL of multi-turn dialogue examples (speech in any user turn,
            schema in docs/data.md, :mod:`paraencoder.data.dialogues`), mixed into the training
            batches; their targets are literal or teacher replies to a text view of the dialogue.
            ``train_manifest`` may then be omitted. Not affected by ``tasks``/``max_examples``.
        val_dialogue_manifest: the same for validation.
    """

    def __init__(
        self,
        train_manifest: str | None = None,
        val_manifest: str | None = None,
        tasks: list[str] = ["respond", "emotion"],  # noqa: B006 - jsonargparse needs a literal default
        llm: str = "smollm2-135m-instruct",
        llm_dtype: str = "float32",
        batch_size: int = 8,
        num_workers: int = 0,
        teacher_cache: str | None = None,
        teacher_max_new_tokens: int = 48,
        teacher_batch_size: int = 16,
        max_examples: int | None = None,
        seed: int = 0,
        bucket: bool = True,
        bucket_by: str = "tokens",
        bucket_ratio: float = 0.1,
        qa_mode: str = "none",
        qa_generator: str = "templates",
        qa_generator_model: str | None = None,
        qa_pairs: int = 2,
        questions_per_item: int = 0,
        filter_teacher: bool = True,
        teacher_resample: int = 0,
        teacher_resample_temperature: float = 1.0,
        teacher_premise: str | dict[str, str] = "before",
        system_prompt: str | None = None,
        bad_items: str = "fail",
        bad_items_report: str | None = None,
        dialogue_manifest: str | None = None,
        val_dialogue_manifest: str | None = None,
    ):
        super().__init__()
        if bad_items not in ("fail", "skip", "off"):
            raise ConfigError(f"data.bad_items={bad_items!r}; choose fail (stop on the first bad item), skip (train without them, listed in a report) or off")
        from paraencoder.prompts import teacher_premises

        teacher_premises(teacher_premise, "data.teacher_premise")  # a bad value fails here, before any model loads
        if bucket_by not in ("tokens", "seconds"):
            raise ConfigError(f"data.bucket_by={bucket_by!r}; choose tokens (LLM row length, the default) or seconds (clip duration)")
        if not (isinstance(bucket_ratio, (int, float)) and bucket_ratio >= 0):
            raise ConfigError(f"data.bucket_ratio={bucket_ratio!r}; give a number >= 0 (0.1: a bucket's longest example is at most 1.1x its shortest)")
        self.save_hyperparameters()
        self.train_set: AlignmentDataset | None = None
        self.train_utterances: list | None = None  # the training manifest's clips, kept by setup() for clip_examples()
        self.val_set: AlignmentDataset | None = None

    def _examples(self, manifest: str) -> list[AlignmentExample]:
        from paraencoder.model.resolve import resolve_llm
        from paraencoder.data.manifest import load_manifest

        utts = self._good_utterances(manifest) if self.hparams.get("bad_items", "fail") != "off" else load_manifest(manifest)
        if manifest == self.hparams.train_manifest:
            self.train_utterances = list(utts)
        tasks = all_tasks = get_tasks(self.hparams.tasks)
        banked: list[str] = []
        if self.hparams.questions_per_item > 0:
            from paraencoder.data.dataset import TASK_ATTRIBUTES

            banked = [TASK_ATTRIBUTES[t.name] for t in tasks if t.name in TASK_ATTRIBUTES]
            tasks = [t for t in tasks if t.name not in TASK_ATTRIBUTES]
        examples = build_examples(utts, tasks, source=manifest) if tasks else []
        if banked:
            from paraencoder.data.dataset import bank_examples

            examples += bank_examples(utts, banked, per_item=self.hparams.questions_per_item, seed=self.hparams.seed, premise=self.hparams.get("teacher_premise", "before"))
        # Explicit metadata examples ask every task's own question, banked attributes included.
        examples += self._qa_examples(utts, all_tasks)
        if self.hparams.max_examples:
            g = torch.Generator().manual_seed(self.hparams.seed)
            order = torch.randperm(len(examples), generator=g).tolist()
            examples = [examples[i] for i in order[: self.hparams.max_examples]]
        llm = resolve_llm(self.hparams.llm, dtype=self.hparams.llm_dtype).with_system_prompt(self.system_prompt())
        cache = TeacherCache(self.hparams.teacher_cache or default_cache_dir() / "teacher")
        decoding = Decoding(max_new_tokens=self.hparams.teacher_max_new_tokens)
        examples = attach_teacher_replies(examples, llm, cache, decoding=decoding, batch_size=self.hparams.teacher_batch_size)
        if banked and self.hparams.get("teacher_resample", 0):
            resample_teacher_answers(
                examples, llm, cache, decoding=decoding, samples=self.hparams.teacher_resample,
                temperature=self.hparams.get("teacher_resample_temperature", 1.0), batch_size=self.hparams.teacher_batch_size, source=manifest,
            )
        if banked and self.hparams.filter_teacher:
            examples = filter_teacher_answers(examples, source=manifest)
        return examples

    def clip_examples(self) -> list[AlignmentExample]:
        """One example per clip of the training manifest (its audio window and labels; no prompt, no reply)."""
        utts = self.train_utterances
        if utts is None:
            raise ConfigError("AlignmentData.clip_examples() is available after setup('fit') with data.train_manifest")
        return [AlignmentExample.of(u, "clip", "", "") for u in utts]

    def _qa_examples(self, utts, tasks) -> list[AlignmentExample]:
        """Extra alignment examples for the contextual-QA modes (cached and resumable like teacher replies)."""
        mode = self.hparams.qa_mode
        if mode not in ("none", "explicit", "implicit", "both"):
            raise ConfigError(f"qa_mode={mode!r}; choose none, explicit, implicit or both")
        extra: list[AlignmentExample] = []
        if mode in ("explicit", "both"):
            from paraencoder.data.qa import explicit_examples

            extra += explicit_examples([u for u in utts if u.emotion or u.age_group], tasks)
        if mode in ("implicit", "both"):
            from paraencoder.model.resolve import resolve_llm
            from paraencoder.data.qa import generate_qa, make_qa_generator, qa_examples

            # "local" with no model named writes with the frozen LLM being trained; a named model
            # (the packaged judge) is loaded by make_qa_generator itself.
            local_self = self.hparams.qa_generator == "local" and not self.hparams.qa_generator_model
            llm = resolve_llm(self.hparams.llm, dtype=self.hparams.llm_dtype) if local_self else None
            generator = make_qa_generator(self.hparams.qa_generator, self.hparams.qa_generator_model, llm=llm)
            cache_dir = Path(self.hparams.teacher_cache or default_cache_dir() / "teacher").parent / "qa"
            with_emotion = [u for u in utts if u.transcript and u.emotion]
            qa, report = generate_qa(with_emotion, generator, TeacherCache(cache_dir), n=self.hparams.qa_pairs)
            if report.requested and not report.pairs:
                raise ConfigError(
                    f"qa_generator={self.hparams.qa_generator!r} wrote no valid QA pair for {report.requested} utterances "
                    f"({report.failed} failed, {report.invalid} invalid; first: {report.dropped[:1]}); use "
                    "data.qa_generator=templates or a stronger model (an OpenAI-compatible URL + qa_generator_model)"
                )
            summary = {k: v for k, v in vars(report).items() if k != "dropped"}
            print(f"implicit QA: {json.dumps({**summary, 'dropped': len(report.dropped)})}")
            for reason in report.dropped[:3]:
                print(f"  dropped: {reason[:200]}")
            # The target is the frozen LLM's own answer given transcript + metadata (behavioral alignment).
            extra += qa_examples(with_emotion, qa, reply="teacher")
        return extra

    def _good_utterances(self, manifest: str) -> list:
        """The manifest's utterances after decoding every clip: fail on bad items, or skip and report them."""
        from paraencoder.data.manifest import validate_manifest
        from paraencoder.errors import ManifestError

        report = validate_manifest(manifest, check_audio=True, decode=True, max_bad_fraction=1.0, vocabularies={}, progress=True)
        if not report.issues:
            return report.utterances
        listed = "; ".join(str(issue) for issue in report.issues[:5]) + (f" (and {len(report.issues) - 5} more)" if len(report.issues) > 5 else "")
        if self.hparams.bad_items == "fail":
            first = report.issues[0]
            raise ManifestError(
                manifest, first.line, first.field,
                f"{report.bad_items} of {report.total} items cannot be trained on: {listed}. Fix them (paraencoder data "
                "validate lists all), or set data.bad_items=skip to train without them (they are written to a report)",
            )
        target = self.hparams.bad_items_report
        if not target:
            log_dir = getattr(self.trainer, "log_dir", None) if self.trainer is not None else None
            target = Path(log_dir or ".") / f"bad_items-{Path(manifest).stem}.jsonl"
        report.write_issues(target)
        print(f"{manifest}: skipping {report.bad_items} of {report.total} bad items (data.bad_items=skip), listed in {target}: {listed}")
        if not report.utterances:
            raise ManifestError(manifest, None, None, f"all {report.total} items are bad; see {target}")
        return report.utterances

    def system_prompt(self) -> str | None:
        """The teacher's system prompt: this module's, else the attached model's (they must agree)."""
        mine = self.hparams.get("system_prompt")
        module = getattr(self.trainer, "lightning_module", None) if self.trainer is not None else None
        theirs = getattr(getattr(module, "hparams", None), "get", lambda key: None)("system_prompt")
        if mine is not None and theirs is not None and mine != theirs:
            raise ConfigError(
                f"data.system_prompt={mine[:80]!r} but model.system_prompt={theirs[:80]!r}: teacher and student must "
                "share one system prompt; set model.system_prompt only (the CLI links it to the data)"
            )
        return mine if mine is not None else theirs

    def setup(self, stage: str | None = None) -> None:
        hp = self.hparams
        if self.train_set is None and stage in (None, "fit"):
            if not hp.train_manifest and not hp.get("dialogue_manifest"):
                raise ConfigError("give data.train_manifest (utterances) and/or data.dialogue_manifest (dialogues)")
            examples = self._examples(hp.train_manifest) if hp.train_manifest else []
            self.train_set = AlignmentDataset(examples + self._dialogue_examples(hp.get("dialogue_manifest")), seed=hp.seed)
        if self.val_set is None and (hp.val_manifest or hp.get("val_dialogue_manifest")) and stage in (None, "fit", "validate"):
            examples = self._examples(hp.val_manifest) if hp.val_manifest else []
            self.val_set = AlignmentDataset(examples + self._dialogue_examples(hp.get("val_dialogue_manifest")), seed=hp.seed)

    def _dialogue_examples(self, manifest: str | None) -> list[AlignmentExample]:
        """Dialogue examples of a dialogue manifest with their targets (teacher replies cached like all others)."""
        if not manifest:
            return []
        from paraencoder.model.resolve import resolve_llm
        from paraencoder.data.dialogues import load_dialogue_examples

        llm = resolve_llm(self.hparams.llm, dtype=self.hparams.llm_dtype).with_system_prompt(self.system_prompt())
        cache = TeacherCache(self.hparams.teacher_cache or default_cache_dir() / "teacher")
        decoding = Decoding(max_new_tokens=self.hparams.teacher_max_new_tokens)
        return load_dialogue_examples(manifest, llm, cache, decoding=decoding, batch_size=self.hparams.teacher_batch_size)

    def _loader(self, dataset: AlignmentDataset, shuffle: bool) -> torch.utils.data.DataLoader:
        hp = self.hparams
        world = self.trainer.world_size if self.trainer else 1
        rank = self.trainer.global_rank if self.trainer else 0
        if world > 1 and getattr(getattr(self.trainer, "_accelerator_connector", None), "use_distributed_sampler", False):
            raise ConfigError(
                "distributed training: set trainer.use_distributed_sampler: false (paraencoder's batch samplers "
                "already shard by rank; Lightning cannot wrap a batch sampler)"
            )
        if hp.bucket:
            from paraencoder.data.sampling import LengthBucketSampler

            lengths, unit = self.bucket_lengths(dataset)
            sampler = LengthBucketSampler(
                lengths, batch_size=hp.batch_size, max_padding_ratio=hp.get("bucket_ratio", 0.2), shuffle=shuffle, seed=hp.seed,
                num_replicas=world, rank=rank,
            )
            if shuffle and rank == 0:
                batches = sampler.batches(0)
                real = sum(lengths[i] for b in batches for i in b)
                padded = sum(max(lengths[i] for i in b) * len(b) for b in batches)
                print(f"[data] {len(batches)} batches of {len(dataset)} examples, bucketed by {'LLM row tokens' if unit == 'tokens' else 'clip seconds'}: "
                      f"{1 - real / padded:.1%} of the batches' {unit} are padding")
        else:
            # Batch order is a function of (seed, epoch) only, so a resumed process sees the same order.
            from paraencoder.train.resume import EpochBatchSampler

            sampler = EpochBatchSampler(len(dataset), hp.batch_size, shuffle=shuffle, seed=hp.seed, num_replicas=world, rank=rank)
        kwargs = dict(collate_fn=collate, num_workers=hp.num_workers, persistent_workers=hp.num_workers > 0)
        if not shuffle:
            return torch.utils.data.DataLoader(dataset, batch_sampler=sampler, **kwargs)
        # Reliability: the training loader's position (epoch, batches consumed) goes into Lightning
        # checkpoints, so resuming mid-epoch continues with the next unseen batch (paraencoder.train.resume).
        from paraencoder.train.resume import ResumableDataLoader

        return ResumableDataLoader(dataset, sampler, progress=self._train_progress, **kwargs)

    def bucket_lengths(self, dataset: AlignmentDataset) -> tuple[list[float], str]:
        """``(lengths, unit)`` that ``data.bucket_by`` buckets ``dataset`` by: LLM row tokens where the
        attached module can count them (``"tokens"``), else clip durations (``"seconds"``).

        Runs written before ``bucket_by`` existed resume with seconds, the batches they trained on."""
        seconds = dataset.durations()
        module = getattr(self.trainer, "lightning_module", None) if self.trainer is not None else None
        if self.hparams.get("bucket_by", "seconds") != "tokens" or not hasattr(module, "row_tokens"):
            return seconds, "seconds"
        tokens = module.row_tokens(dataset.examples, seconds)
        if tokens is None:
            print("data.bucket_by=tokens: dialogue examples present, bucketing by clip seconds instead")
            return seconds, "seconds"
        return [float(n) for n in tokens], "tokens"

    def _train_progress(self) -> tuple[int, int]:
        """(epoch, batches of it already trained on) from the trainer's loop counters, for resumption."""
        trainer = self.trainer
        if trainer is None:
            return 0, 0
        return trainer.current_epoch, trainer.fit_loop.epoch_loop.batch_progress.current.processed

    def train_dataloader(self):
        if self.train_set is None:
            raise ConfigError("AlignmentData.setup('fit') was not run")
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self):
        return self._loader(self.val_set, shuffle=False) if self.val_set is not None else []
