"""ParaBridge-style on-policy self-distillation from a privileged scaffold, in the frozen-LLM setting.

A speech model often *perceives* a paralinguistic cue yet ignores it in open dialogue; an
inference-time instruction scaffold ("pay attention to the speaker's emotion and age...") fixes
that but is brittle. ParaBridge trains the scaffold-free model to behave like the scaffolded one:

1. the **student** (speech soft tokens, no scaffold) samples its own reply (a *rollout*);
2. the **teacher view** scores the same trajectory: either the same soft tokens plus the scaffold
   instruction (``teacher_view="scaffold"``, label-free) or the transcript plus stated cues as text
   (``teacher_view="text"``, our behavioral-alignment teacher);
3. loss = generalized Jensen-Shannon divergence per token over the full vocabulary at the rollout
   positions (``beta`` 0.5, temperature 1.2 in the paper). Gradient flows only through the student.

Here the LLM is frozen: what trains is the speech adapter (projector, chosen encoder layers) and
optionally a LoRA on a *private copy* of the LLM, exported in peft's layout into the adapter's
``lora/`` folder and pinned by hash in its config (:mod:`paraencoder.model.lora`), so the base weights stay
bit-identical and ``SpeechAdapter.from_pretrained`` serves adapter + LoRA. The teacher view always runs the base
LLM (LoRA disabled) on detached soft tokens.
"""

from __future__ import annotations

import contextlib
import os
import time
from typing import Sequence

import torch

from paraencoder.data.dataset import AlignmentExample
from paraencoder.errors import ConfigError
from paraencoder.model.forward import generate, reply_hidden, speech_inputs
from paraencoder.model.llm import FrozenLLM
from paraencoder.model.lora import LLMLoRA
from paraencoder.objectives import ObjectiveMix
from paraencoder.prompts import SCAFFOLD
from paraencoder.train.data import AlignmentData
from paraencoder.train.module import AlignmentModule

TEACHER_VIEWS = ("scaffold", "text")
SCAFFOLD_POSITIONS = ("system", "prefix")


def scaffold_system(base: str | None, scaffold: str) -> str:
    """The teacher's system prompt: the student's own system prompt followed by the scaffold."""
    return f"{base}\n\n{scaffold}" if base else scaffold


class ParaBridgeModule(AlignmentModule):
    """On-policy self-distillation of a speech adapter towards a privileged (scaffolded) teacher view.

    Every argument of :class:`~paraencoder.train.module.AlignmentModule` is accepted too (``llm``,
    ``encoder``, ``layer``, ``stack``, ``lr``, ...).

    Args:
        beta: generalized JSD mixing weight (0 = forward KL(teacher||student), 1 = reverse KL).
        jsd_temperature: temperature applied to both distributions in the JSD.
        on_policy_share: lambda, the share of batches trained on the student's own rollouts; the rest
            use the dataset's (teacher) replies. 1.0 = fully on-policy, as in the paper.
        rollout_max_new_tokens: length cap of a rollout.
        rollout_temperature: sampling temperature of rollouts (0 = greedy).
        rollout_top_p: nucleus sampling threshold of rollouts.
        rollout_reuse_steps: a rollout is reused for this many optimizer steps (keyed by example);
            1 = fresh rollouts every step.
        rollout_seed: seed of rollout sampling (combined with the step, so resumed runs repeat it).
        teacher_view: ``"scaffold"`` (same soft tokens + scaffold instruction, label-free) or
            ``"text"`` (transcript + stated cues as text, i.e. each example's ``teacher_prompt``).
        scaffold: the scaffold instruction (default :data:`paraencoder.prompts.SCAFFOLD`).
        scaffold_position: ``"system"`` (appended to the system prompt) or ``"prefix"`` (before the user turn).
        init_adapter: an adapter directory whose weights initialise the adapter (on-policy
            distillation starts from an adapter that already hears, e.g. a behavioral-alignment one).
        lora_rank: rank of a LoRA on the LLM (0 = none; the LLM stays entirely frozen).
        lora_alpha: LoRA scaling numerator (scale = alpha / rank).
        lora_target_modules: LLM linear layers that get LoRA.
        lora_layers: LLM decoder layers that get LoRA (``"12-23"``, ``"0,3"``; ``None`` = all).
        ce_weight: cross-entropy on the dataset reply in off-policy batches (0 = JSD only).
    """

    def __init__(
        self,
        *,
        # the loss: generalized JSD to the teacher view (+ CE on the dataset reply in off-policy batches)
        beta: float = 0.5, jsd_temperature: float = 1.2, ce_weight: float = 0.0,
        # on-policy rollouts
        on_policy_share: float = 1.0, rollout_max_new_tokens: int = 48, rollout_temperature: float = 1.0,
        rollout_top_p: float = 1.0, rollout_reuse_steps: int = 1, rollout_seed: int = 0,
        # the privileged teacher view, and where the student starts
        teacher_view: str = "scaffold", scaffold: str | None = None, scaffold_position: str = "system", init_adapter: str | None = None,
        # an optional LoRA on the LLM (on a private copy)
        lora_rank: int = 0, lora_alpha: float = 16.0, lora_layers: str | None = None,
        lora_target_modules: list[str] = ["q_proj", "v_proj"],  # noqa: B006 - jsonargparse needs a literal default
        **kwargs,
    ):
        if teacher_view not in TEACHER_VIEWS:
            raise ConfigError(f"teacher_view={teacher_view!r}: choose one of {TEACHER_VIEWS}")
        if scaffold_position not in SCAFFOLD_POSITIONS:
            raise ConfigError(f"scaffold_position={scaffold_position!r}: choose one of {SCAFFOLD_POSITIONS}")
        if not 0.0 <= on_policy_share <= 1.0:
            raise ConfigError(f"on_policy_share={on_policy_share}: must lie in [0, 1] (share of on-policy batches)")
        if not 0.0 <= beta <= 1.0:
            raise ConfigError(f"beta={beta}: the generalized JSD needs 0 <= beta <= 1")
        if rollout_reuse_steps < 1 or rollout_max_new_tokens < 1:
            raise ConfigError("rollout_reuse_steps and rollout_max_new_tokens must be >= 1")
        if lora_rank < 0:
            raise ConfigError(f"lora_rank={lora_rank}: must be >= 0")
        super().__init__(ce_weight=ce_weight, init_adapter=init_adapter, **kwargs)
        self.scaffold_text = SCAFFOLD if scaffold is None else scaffold
        # example key -> (step it was sampled at, token ids)
        self._rollout_cache: dict[tuple, tuple[int, list[int]]] = {}
        self.last_step_stats: dict[str, float] = {}
        # The loss of a step, in the one ObjectiveMix: JSD on every batch, + CE on the dataset reply off-policy.
        mix = dict(jsd_weight=1.0, beta=beta, temperature=jsd_temperature, chunk_size=self.hparams.chunk_size)
        self.on_policy_objective = ObjectiveMix(ce_weight=0.0, **mix)
        self.off_policy_objective = ObjectiveMix(ce_weight=ce_weight, **mix)
        self.lora: LLMLoRA | None = None
        if lora_rank > 0:
            try:
                self.lora = LLMLoRA(self.llm, lora_layers, lora_rank, lora_alpha, lora_target_modules, enabled=True)
            except ConfigError as exc:
                raise ConfigError(f"lora_target_modules={list(lora_target_modules)} / lora_layers={lora_layers!r}: {exc}") from None
            self.llm = self.lora.llm
            self.adapter.attach_llm(self.llm)

    # -- LoRA on a private copy of the LLM (paraencoder.model.lora.LLMLoRA) -------------------------
    def base_llm(self):
        """Run the LLM without its LoRA (the teacher view always uses the frozen base)."""
        return self.lora.active(False) if self.lora is not None else contextlib.nullcontext()

    def export_parts(self, directory: str | os.PathLike) -> dict:
        """Write the LoRA in peft's layout into ``directory/lora``; returns the ``lora`` section pinning it (none without LoRA)."""
        return {"lora": self.lora.save(directory)} if self.lora is not None else {}

    def upgrade_state_dict(self, state: dict) -> dict:
        """Checkpoints written before the one :class:`LLMLoRA` kept the LoRA as ``lora_params.<peft name>``."""
        out = {}
        for key, value in state.items():
            if key.startswith("lora_params.") and ("__lora_A__" in key or "__lora_B__" in key):
                matrix = "A" if "__lora_A__" in key else "B"
                key = f"lora.weights.{key[len('lora_params.'):].split(f'__lora_{matrix}__')[0]}.{matrix}.weight"
            out[key] = value
        return out

    def param_groups(self) -> list[dict]:
        """The spine's groups plus the LoRA (no weight decay, at ``lr``)."""
        groups = super().param_groups()
        if self.lora is not None:
            groups.append({"params": list(self.lora.parameters()), "weight_decay": 0.0, "lr": self.hparams.lr})
        return groups

    # -- prompts of the two views ------------------------------------------------------------------
    def _system(self, examples: Sequence[AlignmentExample]) -> str | None:
        return examples[0].system if examples and examples[0].system is not None else self.llm.system_prompt

    def teacher_prompts(self, examples: Sequence[AlignmentExample]) -> tuple[list[str], str | None]:
        """User prompts and system prompt of the teacher view."""
        base = self._system(examples)
        if self.hparams.teacher_view == "text":
            return [ex.teacher_prompt for ex in examples], base
        if self.hparams.scaffold_position == "system":
            return [ex.student_prompt for ex in examples], scaffold_system(base, self.scaffold_text)
        return [f"{self.scaffold_text}\n\n{ex.student_prompt}" for ex in examples], base

    def _forward_hidden(self, prompts, replies, system, soft, soft_lengths, histories=None):
        """Response-position hidden states ``[N, H]`` and targets ``[N]`` for prompts + replies."""
        tail = self.adapter.tail_tokens if soft is not None else 0
        return reply_hidden(self.llm, speech_inputs(self.llm, prompts, soft, soft_lengths, replies=replies, system=system, histories=histories, tail=tail))

    def student_hidden(self, examples, replies, soft, soft_lengths, histories=None):
        """Scaffold-free student view (differentiable in ``soft``)."""
        return self._forward_hidden([ex.student_prompt for ex in examples], replies, self._system(examples), soft, soft_lengths, histories)

    def teacher_view_hidden(self, examples, replies, soft, soft_lengths, histories=None) -> torch.Tensor:
        """Teacher-view hidden states at the same reply tokens: base LLM, detached soft tokens, no gradient."""
        prompts, system = self.teacher_prompts(examples)
        with torch.no_grad(), self.base_llm():
            if self.hparams.teacher_view == "text":
                h, _ = self._forward_hidden(prompts, replies, system, None, None, histories)
            else:
                h, _ = self._forward_hidden(prompts, replies, system, soft.detach(), soft_lengths, histories)
        return h

    # -- rollouts ----------------------------------------------------------------------------------
    @staticmethod
    def example_key(ex: AlignmentExample) -> tuple:
        return (ex.utt_id, ex.task, ex.audio, ex.offset, ex.student_prompt)

    @torch.no_grad()
    def sample_rollouts(self, examples, soft, soft_lengths, *, seed: int, histories=None) -> list[list[int]]:
        """Batched KV-cached sampling from the scaffold-free student (left-padded ``inputs_embeds``)."""
        hp = self.hparams
        inputs = speech_inputs(
            self.llm, [ex.student_prompt for ex in examples], soft.detach(), soft_lengths, system=self._system(examples),
            histories=histories, padding_side="left", tail=self.adapter.tail_tokens,
        )
        greedy = hp.rollout_temperature <= 0
        devices = [self.device.index or 0] if self.device.type == "cuda" else []
        # A private RNG stream per step: reproducible on resume, and training randomness is untouched.
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            _, ids = generate(
                self.llm, inputs, max_new_tokens=hp.rollout_max_new_tokens, do_sample=not greedy,
                temperature=max(hp.rollout_temperature, 1e-5), top_p=hp.rollout_top_p, return_ids=True,
            )
        return ids

    def rollouts(self, examples, soft, soft_lengths, step: int, *, use_cache: bool = True) -> list[list[int]]:
        """Rollout ids per example, reusing cached ones younger than ``rollout_reuse_steps`` steps."""
        reuse = self.hparams.rollout_reuse_steps
        keys = [self.example_key(ex) for ex in examples]
        fresh = [i for i, k in enumerate(keys) if not (use_cache and k in self._rollout_cache and step - self._rollout_cache[k][0] < reuse)]
        out: list[list[int] | None] = [None] * len(examples)
        for i, k in enumerate(keys):
            if i not in fresh:
                out[i] = list(self._rollout_cache[k][1])
        if fresh:
            idx = torch.tensor(fresh, device=soft.device)
            sampled = self.sample_rollouts(
                [examples[i] for i in fresh], soft.detach()[idx], soft_lengths[idx], seed=self.hparams.rollout_seed * 1_000_003 + step
            )
            for i, ids in zip(fresh, sampled):
                out[i] = list(ids)
                if use_cache and reuse > 1:
                    self._rollout_cache[keys[i]] = (step, list(ids))
        if use_cache and reuse > 1:
            # Forget rollouts too old to be reused again (bounded memory).
            self._rollout_cache = {k: v for k, v in self._rollout_cache.items() if step - v[0] < reuse}
        self.last_step_stats.update(generated=len(fresh), reused=len(examples) - len(fresh))
        return out  # type: ignore[return-value]

    def is_on_policy(self, step: int) -> bool:
        """Whether batch ``step`` trains on rollouts (a seeded draw with probability ``on_policy_share``)."""
        share = self.hparams.on_policy_share
        if share >= 1.0 or share <= 0.0:
            return share >= 1.0
        g = torch.Generator().manual_seed(self.hparams.rollout_seed * 7919 + step)
        return bool(torch.rand(1, generator=g).item() < share)

    def _step(self) -> int:
        return int(self.trainer.global_step) if self._trainer is not None else 0

    # -- the loss ------------------------------------------------------------------------------------
    def compute_loss(
        self, batch: dict, *, step: int | None = None, on_policy: bool | None = None, use_cache: bool = True,
        replies: list[list[int] | str] | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Generalized JSD between student and teacher view at reply positions (rollouts or dataset replies).

        ``replies`` fixes the trajectories (e.g. a fixed evaluation set); otherwise ``on_policy``
        (default: the seeded lambda draw for ``step``) picks rollouts or the dataset's replies.
        """
        examples: list[AlignmentExample] = batch["examples"]
        step = self._step() if step is None else step
        start = time.perf_counter()
        soft, soft_lengths = self.soft_tokens(batch)
        rollout_s = 0.0
        if replies is None:
            on_policy = self.is_on_policy(step) if on_policy is None else on_policy
            if on_policy:
                t0 = time.perf_counter()
                replies = self.rollouts(examples, soft, soft_lengths, step, use_cache=use_cache)
                rollout_s = time.perf_counter() - t0
            else:
                missing = [ex.utt_id for ex in examples if ex.reply is None]
                if missing:
                    raise ConfigError(
                        f"off-policy batch but examples {missing[:3]} have no dataset reply; generate teacher replies "
                        "(ParaBridgeData teacher_replies: true) or set on_policy_share: 1.0"
                    )
                replies = [ex.reply for ex in examples]
        h, targets = self.student_hidden(examples, replies, soft, soft_lengths)
        teacher = self.teacher_view_hidden(examples, replies, soft, soft_lengths)
        head = self.llm.lm_head
        objective = self.on_policy_objective if on_policy else self.off_policy_objective
        loss, parts = objective(h, head.weight, targets, teacher_hidden=teacher, bias=getattr(head, "bias", None))
        parts["on_policy"] = torch.tensor(float(bool(on_policy)))
        parts["reply_tokens"] = torch.tensor(float(targets.numel()) / max(1, len(examples)))
        self.last_step_stats.update(on_policy=float(bool(on_policy)), rollout_s=rollout_s, forward_s=time.perf_counter() - start - rollout_s)
        return loss, parts

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        # Validation rollouts are seeded by the batch index and never cached.
        on_policy = self.hparams.on_policy_share > 0
        loss, _ = self.compute_loss(batch, step=batch_idx, on_policy=on_policy, use_cache=False)
        self.log("val/loss", loss, prog_bar=True, batch_size=len(batch["examples"]), sync_dist=True)


class ParaBridgeData(AlignmentData):
    """:class:`~paraencoder.train.data.AlignmentData` that can skip teacher replies (label-free, fully on-policy runs).

    Args:
        teacher_replies: generate/cache the text teacher's replies (needed when ``on_policy_share < 1``).
    """

    def __init__(self, *, teacher_replies: bool = True, **kwargs):
        super().__init__(**kwargs)

    def _examples(self, manifest: str) -> list[AlignmentExample]:
        if self.hparams.teacher_replies:
            return super()._examples(manifest)
        from paraencoder.data.dataset import build_examples
        from paraencoder.data.manifest import load_manifest
        from paraencoder.prompts import get_tasks

        examples = build_examples(load_manifest(manifest), get_tasks(self.hparams.tasks), source=manifest)
        if self.hparams.max_examples:
            g = torch.Generator().manual_seed(self.hparams.seed)
            order = torch.randperm(len(examples), generator=g).tolist()
            examples = [examples[i] for i in order[: self.hparams.max_examples]]
        return examples


# -- loading -------------------------------------------------------------------------------------------
def load_parabridge(directory: str | os.PathLike, llm: str | FrozenLLM | None = None, **kwargs):
    """Load a ParaBridge adapter directory: :meth:`SpeechAdapter.from_pretrained <paraencoder.model.adapter.SpeechAdapter.from_pretrained>`,
    which applies the LoRA the config pins (kept for older callers)."""
    from paraencoder.model.adapter import SpeechAdapter

    return SpeechAdapter.from_pretrained(directory, llm=llm, **kwargs)
