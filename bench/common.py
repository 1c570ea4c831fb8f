"""Shared helpers of the performance benches (bench/train_step.py, bench/scaling.py).

* random-weight backbones of real shapes registered with :mod:`paraencoder.backbones` without
  writing gigabytes of weights (only ``config.json``, the tokenizer and a marker file go to disk);
* a bench clip pool (RAVDESS clips from the shared data, or synthetic audio of the same lengths);
* timing, peak memory (CPU RSS sampled in a thread; GPU ``max_memory_allocated``);
* analytic FLOP counts for MFU;
* tables (markdown + rich) and atomic JSON output.
"""

from __future__ import annotations

import json
import os
import platform
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("PARAENCODER_SHARED_DATA", REPO.parent / "shared" / "data"))
RESULTS = REPO / "bench" / "results"
H100_BF16_DENSE_TFLOPS = 989.0

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


# ---------------------------------------------------------------------------------------------
# machine, timing, memory
# ---------------------------------------------------------------------------------------------


def machine_info(device: torch.device) -> dict:
    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        # What the kernels can use: bf16 is fast only with AVX-512 BF16 / AMX (docs/performance.md).
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
    }
    try:
        flags = Path("/proc/cpuinfo").read_text().split("\n")
        info["cpu_model"] = next((line.split(":", 1)[1].strip() for line in flags if line.startswith("model name")), None)
        have = set(next((line.split(":", 1)[1].split() for line in flags if line.startswith("flags")), []))
        info["cpu_bf16_instructions"] = sorted(have & {"avx512_bf16", "amx_bf16", "avx512f", "avx2", "avx_vnni"})
    except OSError:  # not Linux
        pass
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:  # pragma: no cover
        pass
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakMemory:
    """Peak memory inside a ``with`` block: GPU allocator peak, or CPU RSS sampled every 5 ms.

    ``ru_maxrss`` is a lifetime peak of the process, useless for comparing stages run one after
    another, so on CPU a thread samples the resident set size instead.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.peak_bytes = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self.peak_bytes = _rss_bytes()

            def sample() -> None:
                while not self._stop.wait(0.005):
                    self.peak_bytes = max(self.peak_bytes, _rss_bytes())

            self._thread = threading.Thread(target=sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            self.peak_bytes = int(torch.cuda.max_memory_allocated(self.device))
        else:
            self._stop.set()
            if self._thread is not None:
                self._thread.join()
            self.peak_bytes = max(self.peak_bytes, _rss_bytes())

    @property
    def kind(self) -> str:
        return "cuda max_memory_allocated" if self.device.type == "cuda" else "process RSS (sampled)"


def time_steps(step: Callable[[int], dict], steps: int, warmup: int, device: torch.device) -> tuple[list[float], list[dict], int]:
    """Run ``warmup`` untimed then ``steps`` timed calls of ``step(i)``; returns (seconds, infos, peak bytes)."""
    for i in range(warmup):
        step(i)
    synchronize(device)
    times, infos = [], []
    with PeakMemory(device) as mem:
        for i in range(steps):
            start, cpu_start = time.perf_counter(), time.process_time()
            info = step(warmup + i)
            synchronize(device)
            times.append(time.perf_counter() - start)
            # CPU seconds of this process (all threads): on a shared machine the wall clock
            # mostly measures the neighbours; the work done is what CPU time shows.
            infos.append({**info, "cpu_seconds": time.process_time() - cpu_start})
    return times, infos, mem.peak_bytes


# ---------------------------------------------------------------------------------------------
# random-weight backbones of real shapes, registered with paraencoder.backbones
# ---------------------------------------------------------------------------------------------


def make_shape_tokenizer(vocab_corpus: Sequence[str] | None = None):
    """A tiny byte-level BPE tokenizer with a ChatML template: only token *counts* matter for shapes.

    The model's vocabulary (and LM head) can be much larger than this tokenizer's; ids stay below
    a few hundred, which every real-size config accepts.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = list(vocab_corpus or _TOKENIZER_CORPUS)
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>"]
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<pad>", bos_token="<|endoftext|>")
    fast.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    return fast


_TOKENIZER_CORPUS = [
    "You are a helpful assistant.",
    "Kids are talking by the door. Dogs are sitting by the door.",
    "How does the speaker feel? Answer in one sentence.",
    "The speaker sounds happy and cheerful, with a bright and lively voice.",
    "The speaker sounds sad; the voice trembles and the pace is slow.",
    "I am sorry to hear that. Is there anything I can do to help you feel better today?",
    "That is wonderful news! Congratulations, you must be very proud.",
    "Someone said it in an angry, harsh voice. Was it a child or an adult?",
] * 8


def _marker_dir(root: Path, name: str, config) -> Path:
    """A directory that passes ``backbones._is_hf_dir``: config.json + an empty safetensors marker."""
    from safetensors.torch import save_file

    path = root / name
    path.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(path)
    marker = path / "shapes-only.safetensors"
    if not marker.exists():
        save_file({"shapes_only": torch.zeros(1)}, str(marker))
    return path


def register_random_llm(root: Path, name: str, config, *, dtype: torch.dtype, device: torch.device, attn: str = "sdpa") -> str:
    """Build a random-weight causal LM of ``config``'s shape on ``device`` and make ``str(dir)`` a valid LLM spec.

    The model is put into :mod:`paraencoder.backbones`' per-process memo under the key a spec of
    that directory resolves to, so ``AlignmentModule(llm=str(dir))`` uses it without any weights on
    disk. Returns the spec.
    """
    from transformers import AutoModelForCausalLM

    from paraencoder import backbones

    tokenizer = make_shape_tokenizer()
    config.pad_token_id = tokenizer.pad_token_id
    config.eos_token_id = tokenizer.eos_token_id
    config.bos_token_id = tokenizer.bos_token_id
    path = _marker_dir(root, name, config).resolve()
    tokenizer.save_pretrained(path)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn)
    model.eval()
    identity = {
        "name": name,
        "source": str(path),
        "weights_sha256": f"random-{name}",  # skip hashing billions of random weights
        "hidden_size": int(config.hidden_size),
        "vocab_size": int(config.vocab_size),
        "model_type": config.model_type,
    }
    loaded = backbones.LoadedLLM(model, tokenizer, identity, path)
    backbones._MEMO[("llm", str(path), dtype)] = loaded
    return str(path)


def register_random_whisper(root: Path, name: str, config, *, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> str:
    """Like :func:`register_random_llm` for a Whisper model (only its encoder is used)."""
    from transformers import WhisperForConditionalGeneration

    from paraencoder import backbones

    path = _marker_dir(root, name, config).resolve()
    with torch.device(device):
        model = WhisperForConditionalGeneration._from_config(config, dtype=dtype, attn_implementation="sdpa")
    model.eval()
    identity = {"name": name, "source": str(path), "weights_sha256": f"random-{name}"}
    backbones._MEMO[("whisper", str(path), dtype)] = backbones.LoadedWhisper(model, None, identity, path)
    return str(path)


# ---------------------------------------------------------------------------------------------
# the clip pool
# ---------------------------------------------------------------------------------------------


@dataclass
class Clip:
    key: str
    wave: np.ndarray
    emotion: str
    transcript: str

    @property
    def seconds(self) -> float:
        return len(self.wave) / 16000


def ravdess_clips(count: int, seed: int = 0) -> list[Clip] | None:
    """``count`` RAVDESS clips (about 3-4 s each) from the shared data, or ``None`` if absent."""
    root = SHARED_DATA / "ravdess"
    meta = root / "metadata.jsonl"
    if not meta.is_file():
        return None
    from paraencoder.audio import load_audio

    rows = [json.loads(line) for line in meta.read_text().splitlines() if line.strip()]
    rng = np.random.default_rng(seed)
    chosen = rng.choice(len(rows), size=min(count, len(rows)), replace=False)
    clips = []
    for i in chosen:
        row = rows[int(i)]
        clips.append(Clip(f"ravdess/{row['id']}", load_audio(root / row["audio"]), row.get("emotion", "neutral"), row.get("text", "")))
    return clips


def synthetic_clips(count: int, seconds: float | Sequence[float] = 3.0, seed: int = 0) -> list[Clip]:
    """Harmonic tones with noise: ``seconds`` is one length for all, or a list cycled over the clips."""
    rng = np.random.default_rng(seed)
    lengths = [seconds] * count if isinstance(seconds, (int, float)) else [seconds[i % len(seconds)] for i in range(count)]
    emotions = ["happy", "sad", "angry", "neutral"]
    clips = []
    for i, sec in enumerate(lengths):
        t = np.arange(int(sec * 16000)) / 16000
        f0 = 110 + 40 * (i % 5)
        wave = sum(0.3 / k * np.sin(2 * np.pi * f0 * k * t) for k in range(1, 4)) + 0.01 * rng.standard_normal(t.shape)
        clips.append(Clip(f"synthetic/{i}-{sec:.2f}s", wave.astype(np.float32), emotions[i % 4], "Kids are talking by the door."))
    return clips


def mixed_synthetic_lengths(count: int, lo: float = 2.9, hi: float = 5.3, seed: int = 0) -> list[float]:
    """RAVDESS-like clip lengths (3.3-4.1 s interdecile) when the real clips are absent."""
    rng = np.random.default_rng(seed)
    return list(np.clip(rng.gamma(20.0, 0.18, size=count) + 0.1, lo, hi))


# ---------------------------------------------------------------------------------------------
# analytic FLOPs (2 per multiply-add; matmuls and attention only)
# ---------------------------------------------------------------------------------------------


def whisper_layer_flops(frames: int, d: int, ffn: int) -> float:
    """Forward FLOPs of one Whisper encoder layer on one clip of ``frames`` frames (bidirectional attention)."""
    proj = 2 * frames * (4 * d * d + 2 * d * ffn)
    attn = 2 * 2 * frames * frames * d
    return float(proj + attn)


def whisper_frontend_flops(frames: int, n_mels: int, d: int) -> float:
    mel_frames = 2 * frames
    return float(2 * mel_frames * n_mels * d * 3 + 2 * frames * d * d * 3)


def llm_forward_flops(tokens_per_seq: Sequence[int], hidden: int, layers: int, heads: int, kv_heads: int, intermediate: int) -> float:
    """Forward FLOPs of a Llama-style decoder (no LM head) over sequences of the given real lengths (causal attention)."""
    head_dim = hidden // heads
    per_token = 2 * layers * (2 * hidden * hidden + 2 * hidden * kv_heads * head_dim + 3 * hidden * intermediate)
    total = 0.0
    for t in tokens_per_seq:
        total += per_token * t + layers * 2 * 2 * (t * (t + 1) / 2) * hidden  # QK^T and AV over the causal triangle
    return float(total)


def run_under_tcmalloc(script: str, argv: Sequence[str], what: str) -> tuple[dict, str] | None:
    """Run ``script argv --json OUT`` in a child process with tcmalloc preloaded; ``(its JSON, the library)``.

    ``None`` (and a line saying why) where the machine has no tcmalloc or this process runs under it
    already: the bench's own rows then keep the allocator they were measured with.
    """
    import subprocess
    import sys
    import tempfile

    from paraencoder.allocator import find_tcmalloc, loaded, preload_env

    library = find_tcmalloc()
    if library is None or loaded():
        print("[tcmalloc] not run: " + ("no tcmalloc library on this machine" if library is None else "this process has it already"), file=sys.stderr)
        return None
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "child.json"
        print(f"[tcmalloc] {what} with LD_PRELOAD={library} ...", file=sys.stderr, flush=True)
        subprocess.run([sys.executable, script, *argv, "--json", str(out)], env=preload_env(library, os.environ), check=True)
        return json.loads(out.read_text()), library


def write_json(path: str | os.PathLike, payload: dict) -> None:
    from paraencoder.io import atomic_write_json

    atomic_write_json(Path(path), payload)


def markdown_table(rows: Sequence[dict], columns: Sequence[tuple[str, str, str]]) -> str:
    """``columns`` = (key, header, format spec). Missing values print as ``-``."""
    head = "| " + " | ".join(h for _, h, _ in columns) + " |"
    sep = "|" + "|".join("---" for _ in columns) + "|"
    lines = [head, sep]
    for row in rows:
        cells = []
        for key, _, fmt in columns:
            value = row.get(key)
            cells.append("-" if value is None else (format(value, fmt) if fmt else str(value)))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def print_table(title: str, rows: Sequence[dict], columns: Sequence[tuple[str, str, str]]) -> None:
    try:
        from rich.console import Console
        from rich.table import Table

        table = Table(title=title)
        for _, header, _ in columns:
            table.add_column(header)
        for row in rows:
            table.add_row(*["-" if row.get(k) is None else (format(row[k], f) if f else str(row[k])) for k, _, f in columns])
        Console(width=200).print(table)
    except ImportError:  # pragma: no cover
        print(title)
        print(markdown_table(rows, columns))
