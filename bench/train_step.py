"""Time optimizer steps of the real training path, from a naive baseline to the fast path, stage by stage.

Every row runs ``loss, parts = AlignmentModule.compute_loss(batch)`` (or the naive equivalent),
``loss.backward()`` and an AdamW step on the same module, the same clips and the same objective
(CE + KL on the teacher's reply), changing one thing at a time:

    naive: Whisper fed 30 s of padded features, eager attention, full-vocabulary logits at every
           position, random (mixed-length) batches, a teacher forward every step for KL
    + no 30 s padding            (the encoder runs on the clip's real frames)
    + response-only chunked logits (LM head only where the reply is, in vocabulary chunks)
    + SDPA attention
    + length bucketing
    + encoder-output cache       (frozen encoder: steady state from the 2nd epoch)
    + cached teacher top-k logits (no teacher forward; approximation error reported)
    [+ torch.compile]            (--compile)
    then memory rows: train the top encoder layers, without / with gradient checkpointing.

Usage:
    python bench/train_step.py --config cpu-default --steps 3 --warmup 1 --json bench/results/train_step_cpu-default.json
    python bench/train_step.py --config cpu-tiny --steps 3
    python bench/train_step.py --config gpu-llama3-8b --steps 10 --warmup 3   # needs a CUDA GPU

Data loading is excluded: clips are decoded once up front (training decodes in DataLoader workers).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import common  # noqa: E402

from paraencoder.errors import ConfigError  # noqa: E402
from paraencoder.model.forward import reply_hidden  # noqa: E402


# ---------------------------------------------------------------------------------------------
# configurations
# ---------------------------------------------------------------------------------------------


@dataclass
class BenchConfig:
    name: str
    device: str  # "cpu" | "cuda"
    batch_size: int
    llm: str | None = None  # a spec; None = build random weights with llm_config()
    encoder: str | None = None
    llm_dtype: str = "float32"
    layer: str | int = "last"
    stack: int = 4
    projector_dim: int | None = None
    clips: str = "ravdess"  # "ravdess" (falls back to synthetic RAVDESS-like lengths) | "mixed:LO-HI" seconds | "fixed:S"
    reply_tokens: tuple[int, int] = (24, 40)  # teacher reply length range (teacher_max_new_tokens=40 in the recipe)
    tasks: tuple[str, ...] = ("respond", "emotion")
    system_prompt: str | None = "You are a helpful assistant."
    kl_weight: float = 0.5
    temperature: float = 1.0
    topk: int = 64
    chunk_size: int = 1024
    ckpt_layers: str = "4-5"  # encoder layers trained in the memory rows
    train_layers: str = "none"  # what trains in the speed ladder
    random_shapes: dict = field(default_factory=dict)


CONFIGS: dict[str, BenchConfig] = {
    # The packaged default recipe (recipes/quickstart.yaml): Whisper-base (frozen) + SmolLM2-135M, batch 8.
    "cpu-default": BenchConfig(
        "cpu-default", "cpu", 8, llm="smollm2-135m-instruct", encoder="whisper-base", layer="mix", stack=8, projector_dim=1024
    ),
    # Tiny random backbones: seconds per run, for smoke tests of the bench itself.
    "cpu-tiny": BenchConfig(
        "cpu-tiny", "cpu", 4, layer="last", stack=4, projector_dim=64, clips="mixed:0.8-2.0", reply_tokens=(8, 16), topk=16,
        ckpt_layers="1", random_shapes={"llm": "tiny", "encoder": "tiny"},
    ),
    # Real-size shapes, random weights, bf16 (no downloads).
    "gpu-llama3-8b": BenchConfig(
        "gpu-llama3-8b", "cuda", 16, llm_dtype="bfloat16", layer="last", stack=4, projector_dim=4096, clips="mixed:3-15",
        reply_tokens=(48, 96), topk=64, chunk_size=2048, ckpt_layers="24-31", train_layers="24-31",
        random_shapes={"llm": "llama3-8b", "encoder": "whisper-large-v3"},
    ),
    "gpu-qwen2.5-7b": BenchConfig(
        "gpu-qwen2.5-7b", "cuda", 16, llm_dtype="bfloat16", layer="last", stack=4, projector_dim=3584, clips="mixed:3-15",
        reply_tokens=(48, 96), topk=64, chunk_size=2048, ckpt_layers="24-31", train_layers="24-31",
        random_shapes={"llm": "qwen2.5-7b", "encoder": "whisper-large-v3"},
    ),
}


def llm_config(kind: str):
    from transformers import LlamaConfig, Qwen2Config

    if kind == "tiny":
        return LlamaConfig(vocab_size=640, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048, tie_word_embeddings=True)
    if kind == "llama3-8b":
        return LlamaConfig(
            vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
            num_key_value_heads=8, max_position_embeddings=8192, rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=False,
        )
    if kind == "qwen2.5-7b":
        return Qwen2Config(
            vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
            num_key_value_heads=4, max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=False,
        )
    raise ConfigError(f"unknown LLM shape {kind!r}")


def whisper_config(kind: str):
    from transformers import WhisperConfig

    common_ids = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1, decoder_layers=1, decoder_attention_heads=2, decoder_ffn_dim=64)
    if kind == "tiny":
        return WhisperConfig(vocab_size=128, num_mel_bins=80, encoder_layers=2, encoder_attention_heads=2, d_model=32, encoder_ffn_dim=64, max_source_positions=1500, max_target_positions=64, **common_ids)
    if kind == "whisper-large-v3":
        # Only the encoder is used: a 1-layer decoder keeps the throwaway part small.
        return WhisperConfig(
            vocab_size=51866, num_mel_bins=128, encoder_layers=32, encoder_attention_heads=20, d_model=1280, encoder_ffn_dim=5120,
            max_source_positions=1500, max_target_positions=448, **common_ids,
        )
    raise ConfigError(f"unknown encoder shape {kind!r}")


# ---------------------------------------------------------------------------------------------
# stages
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Stage:
    name: str
    pad30: bool = False
    attn: str = "sdpa"
    full_logits: bool = False
    bucket: bool = True
    cache_encoder: bool = True
    teacher: str = "topk"  # "forward" | "topk" | "none"
    compile: bool = False
    train_layers: str | None = None  # None = the config's
    grad_ckpt: bool = False
    group: str = "speed"


def ladder(cfg: BenchConfig, *, baseline: bool, compile_row: bool) -> list[Stage]:
    naive = Stage("naive baseline", pad30=True, attn="eager", full_logits=True, bucket=False, cache_encoder=False, teacher="forward")
    rows = []
    if baseline:
        s1 = replace(naive, name="+ no 30 s padding", pad30=False)
        s2 = replace(s1, name="+ response-only chunked logits", full_logits=False)
        s3 = replace(s2, name="+ SDPA attention", attn="sdpa")
        s4 = replace(s3, name="+ length bucketing", bucket=True)
        rows += [naive, s1, s2, s3, s4]
    else:
        s4 = Stage("SDPA + bucketing + chunked logits", cache_encoder=False, teacher="forward")
    frozen = cfg.train_layers == "none"
    s5 = replace(s4, name="+ encoder-output cache", cache_encoder=True) if frozen else s4
    if frozen:
        rows.append(s5)
    s6 = replace(s5, name="+ cached teacher top-k logits", teacher="topk")
    rows.append(s6)
    if compile_row:
        rows.append(replace(s6, name="+ torch.compile (LLM)", compile=True))
    if frozen:
        rows.append(replace(s6, name="recipe as shipped (CE only, kl_weight=0)", teacher="none", group="info"))
    mem = replace(s6, name=f"train encoder layers {cfg.ckpt_layers}", train_layers=cfg.ckpt_layers, cache_encoder=False, group="memory")
    rows += [mem, replace(mem, name=f"train encoder layers {cfg.ckpt_layers} + gradient checkpointing", grad_ckpt=True)]
    return rows


# ---------------------------------------------------------------------------------------------
# building the module and the data
# ---------------------------------------------------------------------------------------------


def build_module(cfg: BenchConfig, device: torch.device, workdir: Path):
    from paraencoder.train.module import AlignmentModule

    llm_spec, enc_spec = cfg.llm, cfg.encoder
    dtype = getattr(torch, cfg.llm_dtype)
    if cfg.random_shapes:
        llm_spec = common.register_random_llm(workdir, f"random-{cfg.random_shapes['llm']}", llm_config(cfg.random_shapes["llm"]), dtype=dtype, device=device)
        enc_spec = common.register_random_whisper(workdir, f"random-{cfg.random_shapes['encoder']}", whisper_config(cfg.random_shapes["encoder"]), device=device)
    module = AlignmentModule(
        llm=llm_spec,
        encoder=enc_spec,
        layer=cfg.layer,
        stack=cfg.stack,
        projector_dim=cfg.projector_dim,
        train_layers=cfg.train_layers,
        ce_weight=1.0,
        kl_weight=cfg.kl_weight,
        temperature=cfg.temperature,
        chunk_size=cfg.chunk_size,
        llm_dtype=cfg.llm_dtype,
        system_prompt=cfg.system_prompt,
        cache_encoder=False,
    )
    module.to(device)
    module.llm.to(device)
    return module


def make_clips(cfg: BenchConfig, count: int, seed: int) -> tuple[list, str]:
    if cfg.clips == "ravdess":
        clips = common.ravdess_clips(count, seed)
        if clips is not None:
            return clips, "RAVDESS clips from the shared data"
        lengths = common.mixed_synthetic_lengths(count, seed=seed)
        return common.synthetic_clips(count, lengths, seed), "synthetic clips with RAVDESS-like lengths (shared data absent)"
    kind, _, spec = cfg.clips.partition(":")
    if kind == "fixed":
        return common.synthetic_clips(count, float(spec), seed), f"synthetic {spec} s clips"
    lo, hi = (float(x) for x in spec.split("-"))
    lengths = list(np.random.default_rng(seed).uniform(lo, hi, size=count))
    return common.synthetic_clips(count, lengths, seed), f"synthetic clips, uniform {lo}-{hi} s"


def make_examples(cfg: BenchConfig, clips: list, vocab_size: int, seed: int) -> list:
    """One example per clip, tasks cycled; replies are token-id lists of realistic length (only shapes matter)."""
    from paraencoder.data.dataset import AlignmentExample
    from paraencoder.prompts import get_tasks

    tasks = get_tasks(list(cfg.tasks))
    rng = np.random.default_rng(seed)
    hi_id = min(vocab_size, 500) if cfg.random_shapes else min(vocab_size, 20000)
    examples = []
    for i, clip in enumerate(clips):
        task = tasks[i % len(tasks)]
        labels = {"emotion": clip.emotion}
        n = int(rng.integers(cfg.reply_tokens[0], cfg.reply_tokens[1] + 1))
        examples.append(
            AlignmentExample(
                utt_id=clip.key, audio=clip.key, offset=0.0, duration=clip.seconds, task=task.name, student_prompt=task.student,
                teacher_prompt=task.teacher_prompt(clip.transcript, labels), system=None, reply=[int(t) for t in rng.integers(100, hi_id, size=n)],
                labels=labels, transcript=clip.transcript,
            )
        )
    return examples


def make_batches(clips: list, examples: list, batch_size: int, *, bucket: bool, seed: int) -> list[dict]:
    from paraencoder.data.dataset import collate

    if bucket:
        from paraencoder.data.sampling import LengthBucketSampler

        order = list(LengthBucketSampler([c.seconds for c in clips], batch_size=batch_size, shuffle=True, seed=seed, num_replicas=1, rank=0))
    else:
        perm = np.random.default_rng(seed).permutation(len(clips)).tolist()
        order = [perm[i : i + batch_size] for i in range(0, len(perm), batch_size)]
    order = [b for b in order if len(b) == batch_size] or order
    return [collate([{"wave": clips[i].wave, "example": examples[i]} for i in idx]) for idx in order]


# ---------------------------------------------------------------------------------------------
# the step variants
# ---------------------------------------------------------------------------------------------


def padded_whisper_encode(adapter):
    """The naive encoder: features of 30 s of padded audio through transformers' ``WhisperEncoder.forward``."""
    from paraencoder.model.encoders.base import EncoderOutput

    wrapper = adapter.encoder
    samples = 30 * 16000

    def encode(waves: torch.Tensor, lengths: torch.Tensor) -> EncoderOutput:
        padded = torch.zeros(waves.shape[0], samples, device=waves.device, dtype=torch.float32)
        padded[:, : waves.shape[1]] = waves.float()
        with torch.no_grad():
            feats, _ = wrapper.features(padded, torch.full_like(lengths, samples))
        out = wrapper.encoder(input_features=feats.to(wrapper.encoder.conv1.weight.dtype), output_hidden_states=True)
        return EncoderOutput(tuple(out.hidden_states), wrapper.output_lengths(lengths).clamp(max=wrapper.max_frames))

    return encode


def naive_loss(module, batch: dict, kl_weight: float, temperature: float):
    """CE + KL from full logits at every position of student and teacher (the textbook implementation)."""
    from paraencoder.objectives.ce import response_ce_from_logits
    from paraencoder.objectives.kl import kl_from_logits

    examples = batch["examples"]
    replies = [ex.reply for ex in examples]
    student = module.student_batch(batch, replies)
    enc, embeds = student.batch, student.embeds
    model = module.llm.model  # the baseline row: full logits from the plain HF forward, on purpose
    logits = model(inputs_embeds=embeds, attention_mask=enc.attention_mask, position_ids=module.llm.position_ids(enc.attention_mask), use_cache=False).logits
    loss = response_ce_from_logits(logits, enc.labels)
    if kl_weight > 0:
        with torch.no_grad():
            tenc = module.llm.encode([ex.teacher_prompt for ex in examples], replies=replies, system=examples[0].system).to(module.device)
            tlogits = model(inputs_embeds=module.llm.embed(tenc), attention_mask=tenc.attention_mask, position_ids=module.llm.position_ids(tenc.attention_mask), use_cache=False).logits
        s = logits[:, :-1][enc.labels[:, 1:] != -100]
        t = tlogits[:, :-1][tenc.labels[:, 1:] != -100]
        kl = kl_from_logits(s, t, temperature, "forward").mean()
        loss = loss + kl_weight * kl
    return loss


class TopKCache:
    """Teacher top-k logits per example at its reply tokens, computed once (untimed, like teacher replies)."""

    def __init__(self, k: int):
        self.k = k
        self.values: dict[str, torch.Tensor] = {}
        self.indices: dict[str, torch.Tensor] = {}

    @staticmethod
    def key(ex) -> str:
        return f"{ex.audio}|{ex.task}"

    def fill(self, module, batches: list[dict]) -> None:
        from paraencoder.objectives.kl import topk_teacher_logits

        head = module.llm.lm_head
        for batch in batches:
            todo = [ex for ex in batch["examples"] if self.key(ex) not in self.values]
            if not todo:
                continue
            hidden = module.teacher_hidden(todo, [ex.reply for ex in todo])
            with torch.no_grad():
                values, indices = topk_teacher_logits(hidden, head.weight, self.k, bias=getattr(head, "bias", None), chunk_size=module.hparams.chunk_size)
            start = 0
            for ex in todo:
                n = len(ex.reply) + 1  # + end-of-turn token
                self.values[self.key(ex)] = values[start : start + n]
                self.indices[self.key(ex)] = indices[start : start + n]
                start += n
            if start != values.shape[0]:
                raise RuntimeError(f"top-k cache: {values.shape[0]} teacher positions but replies sum to {start}")

    def batch(self, examples) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.cat([self.values[self.key(ex)] for ex in examples]), torch.cat([self.indices[self.key(ex)] for ex in examples])


def topk_loss(module, batch: dict, cache: TopKCache):
    """``compute_loss`` with the teacher's cached top-k logits in place of a teacher forward."""
    examples = batch["examples"]
    h, targets = reply_hidden(module.llm, module.student_batch(batch, [ex.reply for ex in examples]))
    values, indices = cache.batch(examples)
    head = module.llm.lm_head
    loss, _ = module.objective(h, head.weight, targets, teacher_topk=(values.to(h.device), indices.to(h.device)), bias=getattr(head, "bias", None))
    return loss


def ce_only_loss(module, batch: dict):
    """``compute_loss`` as the shipped recipe runs it: ``kl_weight=0``, so no teacher at all."""
    saved_hp, saved_w = module.hparams.kl_weight, module.objective.weights["kl"]
    module.hparams.kl_weight, module.objective.weights["kl"] = 0.0, 0.0
    try:
        loss, _ = module.compute_loss(batch)
    finally:
        module.hparams.kl_weight, module.objective.weights["kl"] = saved_hp, saved_w
    return loss


def configure(module, stage: Stage, cfg: BenchConfig, device: torch.device) -> None:
    """Put the module into the stage's configuration (attention, encoder path, trained layers)."""
    module.llm.model.set_attn_implementation(stage.attn)
    encoder = module.adapter.encoder
    if hasattr(encoder, "encoder") and hasattr(encoder.encoder, "set_attn_implementation"):
        encoder.encoder.set_attn_implementation(stage.attn)
    module.adapter.__dict__.pop("encode", None)
    if stage.pad30:
        if encoder.family != "whisper":
            raise ConfigError("the 30 s padding baseline needs a Whisper encoder")
        module.adapter.encode = padded_whisper_encode(module.adapter)
    layers = stage.train_layers or cfg.train_layers
    encoder.set_trainable_layers(layers)
    encoder.gradient_checkpointing = stage.grad_ckpt
    module.hparams.cache_encoder = stage.cache_encoder
    module._encoder_cache.clear()
    module.train()
    if device.type == "cuda":
        # Frozen weights in bf16; trained ones stay fp32 masters under autocast.
        for name, p in encoder.named_parameters():
            p.data = p.data.to(torch.float32 if p.requires_grad else torch.bfloat16)


# ---------------------------------------------------------------------------------------------
# FLOPs for MFU
# ---------------------------------------------------------------------------------------------


def step_flops(module, batch: dict, stage: Stage, cfg: BenchConfig) -> dict:
    """Useful FLOPs of one step (real frames and tokens; padding and the naive path's waste not counted)."""
    adapter, llm = module.adapter, module.llm
    examples = batch["examples"]
    lengths = batch["lengths"]
    frames = adapter.encoder.output_lengths(lengths).tolist()
    tokens = adapter.token_lengths(lengths)
    enc = llm.encode([ex.student_prompt for ex in examples], num_speech_tokens=tokens.tolist(), replies=[ex.reply for ex in examples], system=examples[0].system)
    student = enc.attention_mask.sum(1).tolist()
    response = int((enc.labels[:, 1:] != -100).sum())
    out = {"response_tokens": response, "student_tokens": int(sum(student)), "audio_seconds": float(lengths.sum()) / 16000, "samples": len(examples)}
    if not hasattr(adapter.encoder, "encoder"):
        return out
    ec = adapter.encoder.encoder.config
    depth = adapter.layer_select.deepest_layer
    trained = [i for i in adapter.encoder.trainable_layers if i < depth]
    enc_fwd = sum(common.whisper_frontend_flops(f, ec.num_mel_bins, ec.d_model) + depth * common.whisper_layer_flops(f, ec.d_model, ec.encoder_ffn_dim) for f in frames)
    enc_bwd = sum(2 * len(trained) * common.whisper_layer_flops(f, ec.d_model, ec.encoder_ffn_dim) for f in frames)
    cached = stage.cache_encoder and not trained
    p = adapter.projector
    n_tok = int(tokens.sum())
    proj = 3 * 2 * n_tok * (p.stack * p.in_dim * (2 * p.hidden_dim if p.activation == "swiglu" else p.hidden_dim) + p.hidden_dim * p.out_dim)
    lc = llm.model.config
    shape = (lc.hidden_size, lc.num_hidden_layers, lc.num_attention_heads, getattr(lc, "num_key_value_heads", lc.num_attention_heads), lc.intermediate_size)
    llm_fwd = common.llm_forward_flops(student, *shape)
    head = 2 * response * lc.hidden_size * llm.vocab_size
    flops = {"encoder": 0.0 if cached else enc_fwd + enc_bwd, "projector": float(proj), "llm": 2 * llm_fwd, "lm_head": 2 * head}
    if stage.teacher == "forward":
        tenc = llm.encode([ex.teacher_prompt for ex in examples], replies=[ex.reply for ex in examples], system=examples[0].system)
        flops["teacher"] = common.llm_forward_flops(tenc.attention_mask.sum(1).tolist(), *shape) + head
    elif stage.teacher == "topk":
        flops["teacher"] = 0.0
    out["flops"] = flops
    out["flops_total"] = float(sum(flops.values()))
    return out


# ---------------------------------------------------------------------------------------------
# running
# ---------------------------------------------------------------------------------------------


def run_stage(module, stage: Stage, cfg: BenchConfig, clips, examples, device, steps: int, warmup: int, seed: int, topk: TopKCache) -> dict:
    configure(module, stage, cfg, device)
    batches = make_batches(clips, examples, cfg.batch_size, bucket=stage.bucket, seed=seed)
    if stage.cache_encoder and module.adapter.encoder_frozen:
        # Steady state from the second epoch on: every clip's encoder output is already cached.
        with torch.no_grad():
            for b in batches:
                module.soft_tokens({**b, "waves": b["waves"].to(device), "lengths": b["lengths"].to(device)})
    if stage.teacher == "topk":
        topk.fill(module, [{**b} for b in batches])
    params = [p for p in module.adapter.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    if stage.compile:
        base = getattr(module.llm.model, module.llm.model.base_model_prefix)
        base.forward = torch.compile(base.forward, dynamic=True)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    stats = [step_flops(module, b, stage, cfg) for b in batches]
    losses = []

    def step(i: int) -> dict:
        j = i % len(batches)
        batch = {**batches[j], "waves": batches[j]["waves"].to(device, non_blocking=True), "lengths": batches[j]["lengths"].to(device)}
        optimizer.zero_grad(set_to_none=True)
        with autocast:
            if stage.full_logits or stage.pad30:
                loss = naive_loss(module, batch, cfg.kl_weight if stage.teacher == "forward" else 0.0, cfg.temperature)
            elif stage.teacher == "topk":
                loss = topk_loss(module, batch, topk)
            elif stage.teacher == "none":
                loss = ce_only_loss(module, batch)
            else:
                loss, _ = module.compute_loss(batch)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
        return stats[j]

    times, infos, peak = common.time_steps(step, steps, warmup, device)
    if stage.compile:
        base.__dict__.pop("forward", None)
    total = sum(times)
    row = {
        "stage": stage.name,
        "group": stage.group,
        "settings": {k: v for k, v in stage.__dict__.items() if k not in ("name", "group")},
        "steps": steps,
        "step_seconds": times,
        "step_s_median": float(np.median(times)),
        "cpu_s_per_step": float(np.median([i["cpu_seconds"] for i in infos])),
        "audio_s_per_s": sum(i["audio_seconds"] for i in infos) / total,
        "samples_per_s": sum(i["samples"] for i in infos) / total,
        "response_tokens_per_s": sum(i["response_tokens"] for i in infos) / total,
        "peak_memory_mb": peak / 2**20,
        "loss_last": losses[-1],
        "loss_finite": bool(np.isfinite(losses).all()),
    }
    if "flops_total" in infos[0]:
        row["tflops_per_step"] = float(np.mean([i["flops_total"] for i in infos]) / 1e12)
        row["flops_breakdown_tflop"] = {k: float(np.mean([i["flops"][k] for i in infos]) / 1e12) for k in infos[0]["flops"]}
        row["achieved_tflops"] = sum(i["flops_total"] for i in infos) / total / 1e12
        if device.type == "cuda":
            row["mfu"] = row["achieved_tflops"] / common.H100_BF16_DENSE_TFLOPS
    return row


def topk_error(module, batches: list[dict], cache: TopKCache, cfg: BenchConfig) -> dict | None:
    """KL(full teacher || student) vs the top-k estimate on a few batches, if the objectives provide the helper."""
    try:
        from paraencoder.objectives.kl import topk_approximation_error
    except ImportError:
        return None
    head = module.llm.lm_head
    results = []
    with torch.no_grad():
        for batch in batches[:2]:
            examples = batch["examples"]
            replies = [ex.reply for ex in examples]
            if not cfg.random_shapes:
                # A real LLM: measure where training measures, on the teacher's own greedy replies
                # (the timing rows use random reply tokens; only their shapes matter there).
                replies = module.llm.generate_text([ex.teacher_prompt for ex in examples], system=cfg.system_prompt, max_new_tokens=cfg.reply_tokens[1])
            b = {**batch, "waves": batch["waves"].to(module.device), "lengths": batch["lengths"].to(module.device)}
            h, _ = reply_hidden(module.llm, module.student_batch(b, replies))
            t = module.teacher_hidden(examples, replies)
            bias = getattr(head, "bias", None)
            results.append(topk_approximation_error(h.float(), head.weight.float(), t.float(), cfg.topk, temperature=cfg.temperature, bias=bias, chunk_size=cfg.chunk_size))
    return {"k": cfg.topk, "replies": "random tokens (random weights)" if cfg.random_shapes else "teacher's greedy replies", "batches": results}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="cpu-default", choices=sorted(CONFIGS))
    parser.add_argument("--steps", type=int, default=3, help="timed optimizer steps per row")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per row")
    parser.add_argument("--baseline", default="naive", choices=["naive", "none"], help="run the naive baseline ladder too")
    parser.add_argument("--compile", action="store_true", help="add a torch.compile row (slow to compile on CPU)")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (the machine is shared)")
    parser.add_argument("--only", default=None, help="comma-separated row numbers to run (0-based), for quick checks")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="output JSON (default bench/results/train_step_<config>.json)")
    args = parser.parse_args(argv)

    cfg = CONFIGS[args.config]
    if args.batch_size:
        cfg = replace(cfg, batch_size=args.batch_size)
    if cfg.device == "cuda" and not torch.cuda.is_available():
        print(
            f"bench/train_step.py: config {cfg.name!r} needs a CUDA GPU (real-size shapes in bf16) and none is visible; "
            "run it on a GPU machine (see docs/performance.md), or use --config cpu-default / cpu-tiny here.",
            file=sys.stderr,
        )
        return 2
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    device = torch.device(cfg.device)
    stages = ladder(cfg, baseline=args.baseline == "naive", compile_row=args.compile)
    if args.only:
        keep = {int(x) for x in args.only.split(",")}
        stages = [s for i, s in enumerate(stages) if i in keep]

    with tempfile.TemporaryDirectory(prefix="paraencoder-bench-") as tmp:
        t0 = time.perf_counter()
        module = build_module(cfg, device, Path(tmp))
        build_s = time.perf_counter() - t0
        pool = cfg.batch_size * max(args.steps + args.warmup, 4)
        clips, clip_source = make_clips(cfg, pool, args.seed)
        examples = make_examples(cfg, clips, module.llm.vocab_size, args.seed)
        topk = TopKCache(cfg.topk)
        rows = []
        partial = (Path(args.json) if args.json else common.RESULTS / f"train_step_{cfg.name}.json").with_suffix(".partial.json")
        for stage in stages:
            print(f"[{cfg.name}] {stage.name} ...", file=sys.stderr, flush=True)
            rows.append(run_stage(module, stage, cfg, clips, examples, device, args.steps, args.warmup, args.seed, topk))
            common.write_json(partial, {"config": cfg.name, "partial": True, "rows": rows})  # survive an interrupted run
        error = topk_error(module, make_batches(clips, examples, cfg.batch_size, bucket=True, seed=args.seed), topk, cfg) if any(s.teacher == "topk" for s in stages) else None

    base = next((r for r in rows if r["stage"] == "naive baseline"), None)
    for r in rows:
        if base:
            r["speedup_vs_naive"] = base["step_s_median"] / r["step_s_median"]
            r["cpu_speedup_vs_naive"] = base["cpu_s_per_step"] / r["cpu_s_per_step"]
    speed_rows = [r for r in rows if r["group"] == "speed"]
    result = {
        "config": cfg.name,
        "bench_config": {k: v for k, v in cfg.__dict__.items()},
        "device": str(device),
        "machine": common.machine_info(device),
        "clips": clip_source,
        "mean_clip_seconds": float(np.mean([c.seconds for c in clips])),
        "steps": args.steps,
        "warmup": args.warmup,
        "build_seconds": build_s,
        "memory_kind": common.PeakMemory(device).kind,
        "rows": rows,
        "topk_approximation": error,
    }
    if base and speed_rows:
        fast = speed_rows[-1]
        result["headline"] = {
            "naive_step_s": base["step_s_median"], "fast_stage": fast["stage"], "fast_step_s": fast["step_s_median"], "speedup": base["step_s_median"] / fast["step_s_median"],
            "naive_cpu_s": base["cpu_s_per_step"], "fast_cpu_s": fast["cpu_s_per_step"], "cpu_time_speedup": base["cpu_s_per_step"] / fast["cpu_s_per_step"],
        }
    out = Path(args.json) if args.json else common.RESULTS / f"train_step_{cfg.name}.json"
    common.write_json(out, result)
    partial.unlink(missing_ok=True)

    columns = [
        ("stage", "stage", ""),
        ("step_s_median", "step s", ".3f"),
        ("speedup_vs_naive", "x naive", ".2f"),
        ("cpu_s_per_step", "CPU s", ".2f"),
        ("cpu_speedup_vs_naive", "x naive (CPU s)", ".2f"),
        ("audio_s_per_s", "audio s/s", ".1f"),
        ("samples_per_s", "samples/s", ".2f"),
        ("response_tokens_per_s", "resp tok/s", ".0f"),
        ("peak_memory_mb", "peak MB", ".0f"),
        ("achieved_tflops", "TFLOP/s", ".2f"),
    ]
    if device.type == "cuda":
        columns.append(("mfu", "MFU", ".1%"))
    common.print_table(f"{cfg.name}: {args.steps} timed steps after {args.warmup} warm-up, batch {cfg.batch_size}, {clip_source}", rows, columns)
    if "headline" in result:
        h = result["headline"]
        print(f"headline: naive {h['naive_step_s']:.3f} s/step -> {h['fast_stage']} {h['fast_step_s']:.3f} s/step = {h['speedup']:.2f}x")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
