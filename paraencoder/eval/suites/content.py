"""The ``content`` suite: does the LLM still get the words (WER of "repeat exactly", next to the encoder's own ASR)."""

from __future__ import annotations


from paraencoder.errors import ConfigError
from paraencoder.eval.metrics import normalize_text, wer, word_errors
from paraencoder.model.llm import SPEECH
from paraencoder.prompts import TASKS
from paraencoder.eval.suites.common import speech_replies, text_replies, transcript_prompt


def _encoder_asr(adapter, utts) -> dict:
    """WER of the adapter's encoder's own Whisper decoder (greedy), when the encoder is Whisper."""
    from paraencoder import backbones

    spec = (adapter.config.get("encoder") or {}).get("spec")
    if not spec:
        return {"skipped": "the adapter config records no encoder spec"}
    try:
        if not backbones.is_whisper_spec(spec):
            return {"skipped": f"encoder {spec!r} is not Whisper (no decoder to transcribe with)"}
        import torch

        from paraencoder.audio import load_audio
        from paraencoder.model.features import whisper_log_mel

        loaded = backbones.load_whisper(spec)
        if loaded.tokenizer is None:
            return {"skipped": f"Whisper {spec!r} has no tokenizer"}
        n_mels = int(loaded.model.config.num_mel_bins)
        hyps = []
        for start in range(0, len(utts), 8):
            chunk = utts[start : start + 8]
            waves = torch.zeros(len(chunk), 480000)
            for j, u in enumerate(chunk):
                w = load_audio(u.audio, offset=u.offset or 0.0, duration=u.duration)[:480000]
                waves[j, : len(w)] = torch.from_numpy(w)
            feats, _ = whisper_log_mel(waves, None, n_mels)
            hyps += backbones.whisper_greedy_transcribe(loaded, feats)
        return {"wer": wer([u.transcript for u in utts], hyps), "hypotheses": hyps}
    except Exception as exc:  # an optional comparison must not sink the suite; the reason is reported
        return {"skipped": f"{type(exc).__name__}: {exc}"}


def run(adapter, utts, *, batch_size, max_new_tokens, baselines, progress, system, **_) -> dict:
    """The ``content`` suite; arguments as :func:`~paraencoder.eval.suites.run_suite`."""
    task = TASKS["repeat"]
    sel = [u for u in utts if u.transcript]
    if not sel:
        raise ConfigError("suite 'content' needs utterances with a transcript")
    speech, errors = speech_replies(adapter, sel, task.student, batch_size=batch_size, max_new_tokens=max_new_tokens, progress=progress, desc="content: speech", system=system)
    views = {"speech": speech}
    if baselines:
        views["transcript"] = text_replies(adapter.llm, [transcript_prompt(task.student, u.transcript) for u in sel], batch_size=batch_size, max_new_tokens=max_new_tokens, progress=progress, desc="content: transcript only", system=system)
    refs = [u.transcript for u in sel]
    metrics: dict = {"n": len(sel)}
    for view, replies in views.items():
        hyps = [r or "" for r in replies]
        metrics[view] = {"wer": wer(refs, hyps), "exact_match": sum(normalize_text(r) == normalize_text(h) for r, h in zip(refs, hyps)) / len(sel)}
    asr = _encoder_asr(adapter, sel)
    metrics["encoder_asr"] = {k: v for k, v in asr.items() if k != "hypotheses"}
    rows = []
    for i, u in enumerate(sel):
        row = {"id": u.id, "transcript": u.transcript}
        for view, replies in views.items():
            row[f"{view}_reply"] = replies[i]
            row[f"{view}_wer"] = (lambda e: e[0] / max(1, e[1]))(word_errors(u.transcript, replies[i] or ""))
        if "hypotheses" in asr:
            row["encoder_asr"] = asr["hypotheses"][i]
        if errors[i]:
            row["error"] = errors[i]
        rows.append(row)
    return {
        "description": f"The frozen LLM is asked {task.student.replace(SPEECH, '').strip()!r}; WER after lower-casing and removing punctuation.",
        "headline": ["wer", "exact_match"],
        "metrics": metrics,
        "rows": rows,
        "notes": ["WER = word edits / reference words over the whole set (can exceed 100% when the LLM rambles)"],
    }
