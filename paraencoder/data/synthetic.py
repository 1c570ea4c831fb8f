"""Expressive synthetic speech with espeak-ng (through the ``espeakng-loader`` wheel).

espeak-ng is a formant synthesiser: robotic, but its prosody is fully controllable, so each
*preset* sets rate (words/min), pitch (0-100), pitch range (0-100), volume and a voice variant to
mimic an emotion (happy: higher, wider, faster; sad: lower, flatter, slower, quieter; ...) or a
speaking style (whisper, child-like, elderly, emphasis). The labels are known by construction,
which makes it a cheap, licence-free source of expressive training/probing data.

libespeak-ng is global-state C code: it is initialised once per process and every call goes
through one lock. Output is resampled from espeak's rate (22050 Hz) to 16 kHz with soxr.

Determinism: espeak keeps static state across utterances (e.g. its pitch-flutter phase, which
neither espeak_Terminate nor the random seed resets), so within one process the samples of a call
depend on the calls before it. :func:`synthesize_corpus` therefore makes every clip in a freshly
forked child of a worker process that has initialised espeak but never spoken: each clip is then a
pure function of its arguments (same seed, same bytes; a deleted clip is regenerated identically).
On systems without ``fork`` it falls back to in-process synthesis (not byte-reproducible).

Why one module of ~500 lines: the espeak-ng bindings (ctypes), the voice presets and the
forked-worker synthesis are one mechanism; splitting them would spread the ctypes state around.
"""

from __future__ import annotations

import ctypes
import dataclasses
import html
import json
import os
import random
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from paraencoder.data.manifest import Utterance, write_manifest
from paraencoder.errors import BackboneError, ConfigError

__all__ = [
    "Preset",
    "PRESETS",
    "EMOTION_PRESETS",
    "STYLE_PRESETS",
    "SENTENCES",
    "DEFAULT_VOICES",
    "synthesize",
    "synthesize_corpus",
]

SAMPLE_RATE = 16000

# Everyday statements, questions and requests (none carries an emotion in its words).
SENTENCES: tuple[str, ...] = (
    'The meeting starts at nine tomorrow morning.',
    'Could you pass me the salt, please?',
    'I left my keys on the kitchen table.',
    'Where did you park the car last night?',
    'The train to the city leaves every twenty minutes.',
    'Please close the window before you go out.',
    'We are having pasta for dinner again.',
    'Did you remember to water the plants?',
    'My sister moved to a new apartment last week.',
    'The library closes early on Sundays.',
    'Can you help me carry these boxes upstairs?',
    'It has been raining since this morning.',
    'I think the package arrived yesterday afternoon.',
    'Would you like a cup of tea or coffee?',
    'The children are playing in the garden.',
    'Let me know when you are ready to leave.',
    'Our flight was delayed by two hours.',
    'Have you seen my blue jacket anywhere?',
    'The doctor said I should rest for a few days.',
    'Turn left at the next traffic light.',
    'I finally finished reading that long novel.',
    'Why is the front door open?',
    'The store on the corner sells fresh bread.',
    'Please send me the report by Friday.',
    'We watched a movie about a lost dog.',
    'How much does this bicycle cost?',
    'The soup needs a little more pepper.',
    'He forgot his umbrella at the office.',
    'Remember to bring your passport to the airport.',
    'The neighbors are painting their fence green.',
    'Is there a pharmacy near the station?',
    'I will call you back in ten minutes.',
    'The concert was cancelled because of the storm.',
    'Could you repeat the last question?',
    'She plays the piano every evening after work.',
    'The bus was full, so I walked home.',
    'Do you know what time the bank opens?',
    'Our team won the match on Saturday.',
    'Please put the milk back in the fridge.',
    "I can't find the charger for my phone.",
    'The museum has a new exhibition about ships.',
    'What would you like for your birthday?',
    'The coffee machine is broken again.',
    'We should leave before the traffic gets bad.',
    'My grandmother makes the best apple pie.',
    'Is it going to snow this weekend?',
    'The printer on the second floor is out of paper.',
    'I need to buy new shoes for the wedding.',
    'Could you turn the music down a little?',
    'The cat is sleeping on the sofa.',
    'He has been learning to swim all summer.',
    'Where should we meet for lunch?',
    'The road to the village is closed for repairs.',
    'Please sign your name at the bottom of the page.',
    'I lost my wallet on the way to work.',
    'The baby finally fell asleep.',
    'Did anyone call while I was out?',
    'The hotel room has a view of the sea.',
    "Let's take a short break and get some fresh air.",
    'My computer keeps restarting for no reason.',
    'The tomatoes in the garden are almost ripe.',
    'Would you mind waiting outside for a moment?',
    'The exam results will be posted on Monday.',
    "I haven't seen him since we were in school.",
    'Can we change the appointment to Thursday?',
    'The river is very high after the storm.',
    "Please don't touch the paintings.",
    'Our neighbors adopted a puppy last month.',
    'Which bus goes to the hospital?',
    'I made a reservation for four people at eight.',
    'The lights in the hallway are flickering.',
    'You left the oven on all afternoon.',
    'She is training for a marathon in the spring.',
    'Is this seat taken?',
    'The wind blew the tent away during the night.',
    'Please write down your phone number for me.',
    'We ran out of sugar this morning.',
    'The new bridge opens to traffic next year.',
    'What did the teacher say about the homework?',
    'I have to work late again tonight.',
    'The garden looks beautiful in the evening light.',
    'Could you check whether the door is locked?',
    'The price of train tickets went up again.',
    'He fixed the broken chair with some glue.',
    "Why didn't you tell me about the party?",
    'The elevator is out of order today.',
    "I'd like to return this sweater, please.",
    'The kids built a snowman in the yard.',
    'Our internet connection has been slow all week.',
    'Will you be home in time for dinner?',
    'The festival takes place in the old town square.',
    'Put your bags under the seat in front of you.',
    'I forgot to buy eggs at the market.',
    'The dog barked at the mail carrier again.',
    'How long does it take to drive to the coast?',
    'My brother is coming to visit next month.',
    'The windows need to be cleaned before the guests arrive.',
    'Can I borrow your pen for a second?',
    'The shop gave me the wrong change.',
    'We planted three apple trees behind the house.',
    'Please wait until the green light comes on.',
    'The phone rang in the middle of the night.',
    'Do you want to join us for a walk?',
    'The hospital is at the end of this street.',
    'I spilled coffee all over my notes.',
    'They are building a new school near the park.',
    'Who left these shoes in the hallway?',
    "The heating doesn't work in the bedroom.",
    'Please speak a little more slowly.',
    'The sun came out just as we arrived.',
    "I can't believe the summer is already over.",
    "Let's order pizza tonight instead of cooking.",
    'The tickets are sold out for the whole week.',
    'Have you ever been to the mountains in winter?',
    'My watch stopped working this morning.',
    'The boat leaves the harbor at noon.',
    'Could you show me how this machine works?',
    'The grass is still wet from the rain.',
    'We need more chairs for the guests.',
    'When does the next ferry arrive?',
    'I found an old photograph in the attic.',
    'The baker opens his shop before sunrise.',
    'Please keep the receipt for the warranty.',
    'The parking lot is completely full.',
    'Did you hear the thunder last night?',
    'She painted the kitchen a bright yellow.',
    'The map says the trail is five miles long.',
    'I have an interview at the bank on Tuesday.',
    'Can you recommend a good restaurant nearby?',
    'The water in the lake is very cold.',
    'He always takes the stairs instead of the elevator.',
    'Please leave the package with the neighbor.',
    'The clock in the hall is ten minutes fast.',
    'What are you going to do this weekend?',
    'Our cousins are staying with us for the holidays.',
    'The bakery ran out of croissants early.',
    "I'll pick you up at the station at six.",
    'The floor is slippery, so be careful.',
    'Is the pharmacy open on public holidays?',
    'The birds wake me up every morning.',
    'Please turn off your phones during the show.',
    'We spent the whole afternoon at the beach.',
    'My keys were in my pocket the whole time.',
    'The kettle is boiling, shall I make tea?',
    'The class was moved to a bigger room.',
    'How did you sleep last night?',
    'I want to learn how to cook Thai food.',
    'The bridge was covered in fog this morning.',
    "Don't forget to feed the fish.",
    'The post office is closed until Monday.',
    'Everyone is waiting for you in the car.',
    'Where did you buy that lovely scarf?',
    'The power went out during dinner.',
    'I just got a letter from my old friend.',
    'Could we sit by the window, please?',
    'The streets are quiet on Sunday mornings.',
)


@dataclass(frozen=True)
class Preset:
    """espeak-ng prosody settings for one emotion or style.

    ``rate`` in words per minute (espeak default 175), ``pitch`` and ``range`` 0..100 (default 50),
    ``volume`` 0..200 (default 100), ``variant`` an espeak voice variant (``whisper``, ``croak``,
    ...) that replaces the voice's own, ``emphasis`` wraps one word in SSML ``<emphasis>``.
    """

    name: str
    rate: int = 170
    pitch: int = 50
    range: int = 50
    volume: int = 100
    variant: str | None = None
    emphasis: bool = False
    emotion: str | None = None
    style: str | None = None
    age_group: str | None = "adult"


EMOTION_PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset("neutral", rate=170, pitch=50, range=50, volume=100, emotion="neutral"),
        Preset("calm", rate=145, pitch=44, range=30, volume=80, emotion="calm"),
        Preset("happy", rate=195, pitch=72, range=90, volume=115, emotion="happy"),
        Preset("sad", rate=120, pitch=28, range=12, volume=70, emotion="sad"),
        Preset("angry", rate=205, pitch=58, range=80, volume=170, emotion="angry"),
        Preset("fearful", rate=215, pitch=80, range=22, volume=95, emotion="fearful"),
        Preset("surprised", rate=180, pitch=76, range=100, volume=125, emotion="surprised"),
    )
}

STYLE_PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset("whisper", rate=160, pitch=50, range=40, volume=120, variant="whisper", emotion="neutral", style="whisper"),
        Preset("child", rate=200, pitch=98, range=75, volume=100, emotion="neutral", style="child-like", age_group="child"),
        Preset("elderly", rate=125, pitch=22, range=35, volume=90, variant="croak", emotion="neutral", style="elderly", age_group="elderly"),
        Preset("emphasis", rate=165, pitch=52, range=70, volume=110, emphasis=True, emotion="neutral", style="emphasis"),
    )
}

PRESETS: dict[str, Preset] = {**EMOTION_PRESETS, **STYLE_PRESETS}

# espeak voice = language + variant; the variant sets the speaker's timbre (m* male, f* female).
DEFAULT_VOICES: tuple[str, ...] = ("en-us+m3", "en-us+f3", "en+m1", "en+f2", "en-us+m5", "en-us+f4")

_RATE, _VOLUME, _PITCH, _RANGE = 1, 2, 3, 4
_AUDIO_OUTPUT_SYNCHRONOUS = 2
_INITIALIZE_DONT_EXIT = 0x8000
_POS_CHARACTER = 1
_CHARS_UTF8, _SSML = 1, 0x10

_LOCK = threading.Lock()
_ENGINE: dict[str, object] = {}
_CALLBACK_TYPE = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)


def _engine() -> dict[str, object]:
    """Load and initialise libespeak-ng once (call with ``_LOCK`` held)."""
    if _ENGINE:
        return _ENGINE
    try:
        import espeakng_loader
    except ImportError as exc:
        raise BackboneError("synthetic speech needs espeak-ng: pip install espeakng-loader (or paraencoder[models])") from exc
    lib = ctypes.cdll.LoadLibrary(espeakng_loader.get_library_path())
    lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
    lib.espeak_Initialize.restype = ctypes.c_int
    lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
    lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
    lib.espeak_Synth.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int, ctypes.c_uint, ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p]
    rate = lib.espeak_Initialize(_AUDIO_OUTPUT_SYNCHRONOUS, 0, espeakng_loader.get_data_path().encode(), _INITIALIZE_DONT_EXIT)
    if rate <= 0:
        raise BackboneError(f"espeak-ng failed to initialise (returned {rate}) with data at {espeakng_loader.get_data_path()}")
    chunks: list[np.ndarray] = []

    def collect(samples, count, events):  # called by espeak from inside espeak_Synth
        if samples and count > 0:
            chunks.append(np.ctypeslib.as_array(samples, shape=(count,)).copy())
        return 0

    callback = _CALLBACK_TYPE(collect)  # kept referenced in _ENGINE so it is never garbage-collected
    lib.espeak_SetSynthCallback(callback)
    # espeak-ng draws random numbers (pitch flutter, whisper noise); seeding before every utterance
    # makes the output a pure function of (text, preset, voice, seed). Older builds lack the call.
    set_seed = getattr(lib, "espeak_ng_SetRandSeed", None)
    if set_seed is not None:
        set_seed.argtypes = [ctypes.c_long]
    _ENGINE.update(lib=lib, rate=rate, chunks=chunks, callback=callback, set_seed=set_seed)
    return _ENGINE


def _voice_name(voice: str, preset: Preset) -> str:
    if preset.variant:
        return voice.split("+", 1)[0] + "+" + preset.variant
    return voice


def _ssml(text: str, emphasis_word: int | None) -> str:
    words = text.split()
    if emphasis_word is not None and words:
        words = [html.escape(w) if i != emphasis_word else f"<emphasis level=\"strong\">{html.escape(w)}</emphasis>" for i, w in enumerate(words)]
    else:
        words = [html.escape(w) for w in words]
    return "<speak>" + " ".join(words) + "</speak>"


def synthesize(text: str, preset: Preset | str = "neutral", voice: str = "en-us+m3", *, emphasis_word: int | None = None, seed: int = 0) -> np.ndarray:
    """Speak ``text`` with a preset; float32 mono 16 kHz samples in [-1, 1].

    ``emphasis_word`` (index into ``text.split()``) is wrapped in SSML ``<emphasis>``; for a preset
    with ``emphasis=True`` and no index given, the last word is emphasised.
    """
    import soxr

    preset = PRESETS[preset] if isinstance(preset, str) else preset
    if not text.strip():
        raise ConfigError("synthesize: text is empty")
    if preset.emphasis and emphasis_word is None:
        emphasis_word = len(text.split()) - 1
    payload = _ssml(text, emphasis_word).encode("utf-8")
    with _LOCK:
        engine = _engine()
        lib, chunks = engine["lib"], engine["chunks"]
        name = _voice_name(voice, preset)
        if lib.espeak_SetVoiceByName(name.encode()) != 0:
            raise ConfigError(f"synthesize: espeak-ng has no voice {name!r}; use a language code with an optional +variant, e.g. 'en-us+f3'")
        for param, value in ((_RATE, preset.rate), (_PITCH, preset.pitch), (_RANGE, preset.range), (_VOLUME, preset.volume)):
            lib.espeak_SetParameter(param, int(value), 0)
        if engine["set_seed"] is not None:
            engine["set_seed"](int(seed))
        chunks.clear()
        status = lib.espeak_Synth(payload, len(payload) + 1, 0, _POS_CHARACTER, 0, _CHARS_UTF8 | _SSML, None, None)
        pcm = np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.int16)
        chunks.clear()
        source_rate = int(engine["rate"])
    if status != 0 or pcm.size == 0:
        raise BackboneError(f"espeak-ng produced no audio for {text!r} (status {status}, voice {name!r})")
    wave = pcm.astype(np.float32) / 32768.0
    wave = soxr.resample(wave, source_rate, SAMPLE_RATE, quality="HQ").astype(np.float32)
    return np.clip(wave, -1.0, 1.0)


def _jitter(preset: Preset, rng: random.Random, amount: float) -> Preset:
    """Small seeded variation of rate/pitch so clips of one preset are not all identical."""
    if amount <= 0:
        return preset
    def vary(value: int, hi: int) -> int:
        return int(min(hi, max(0, round(value * (1.0 + rng.uniform(-amount, amount))))))
    return dataclasses.replace(preset, rate=max(80, vary(preset.rate, 450)), pitch=vary(preset.pitch, 100), range=vary(preset.range, 100))


def _existing_ok(path: Path) -> float | None:
    """Duration of an existing, readable clip (for resumption), else None."""
    from paraencoder.audio import audio_info
    from paraencoder.errors import AudioError

    if not path.is_file():
        return None
    try:
        frames, rate, _ = audio_info(path)
    except AudioError:
        return None
    return frames / rate if frames > 0 else None


def synthesize_corpus(
    out_dir: str | Path,
    n: int,
    seed: int = 0,
    *,
    presets: Sequence[str | Preset] | None = None,
    voices: Sequence[str] = DEFAULT_VOICES,
    sentences: Sequence[str] = SENTENCES,
    jitter: float = 0.05,
    manifest: str | None = "manifest.jsonl",
) -> list[Utterance]:
    """Write ``n`` synthetic clips (FLAC, 16 kHz) to ``out_dir`` and return their utterances.

    Clip ``i`` uses preset ``presets[i % len(presets)]`` (balanced labels) and a voice, sentence,
    emphasised word and prosody jitter drawn from ``Random(f"{seed}:{i}")``, so the same seed gives
    the same bytes and any clip can be regenerated on its own. Existing readable files are kept
    (resumable). Labels: emotion, style, age_group, gender (from the voice variant), with
    ``extra={"synthetic": True, "preset": name, "voice": voice}``. The manifest (if ``manifest``) is
    written atomically into ``out_dir``.
    """

    if n < 0:
        raise ConfigError(f"synthesize_corpus: n must be >= 0, got {n}")
    chosen = [PRESETS[p] if isinstance(p, str) else p for p in (presets or list(PRESETS))]
    if not chosen or not voices or not sentences:
        raise ConfigError("synthesize_corpus: presets, voices and sentences must be non-empty")
    out = Path(out_dir).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    utts = []
    jobs: list[dict] = []
    for i in range(n):
        rng = random.Random(f"{seed}:{i}")
        base = chosen[i % len(chosen)]
        voice = rng.choice(list(voices))
        text = rng.choice(list(sentences))
        emphasis = rng.randrange(len(text.split())) if base.emphasis else None
        preset = _jitter(base, rng, jitter)
        utt_id = f"syn{seed}-{i:06d}-{base.name}"
        path = out / f"{utt_id}.flac"
        duration = _existing_ok(path)
        clip_seed = rng.randrange(2**31)
        if duration is None:
            jobs.append({"path": str(path), "text": text, "preset": dataclasses.asdict(preset), "voice": voice, "emphasis": emphasis, "seed": clip_seed})
        variant = voice.split("+", 1)[1] if "+" in voice else ""
        gender = "female" if variant.startswith("f") else "male" if variant.startswith("m") else None
        extra = {"synthetic": True, "preset": base.name, "voice": _voice_name(voice, base), "rate_wpm": preset.rate, "pitch": preset.pitch, "range": preset.range}
        if emphasis is not None:
            extra["emphasized_word"] = text.split()[emphasis]
        utts.append(
            Utterance(
                id=utt_id,
                audio=str(path),
                transcript=text,
                duration=None if duration is None else round(duration, 4),
                speaker=f"espeak-{voice}",
                language="en",
                emotion=base.emotion,
                gender=gender,
                age_group=base.age_group,
                style=base.style,
                corpus="espeak-synthetic",
                extra=extra,
            )
        )
    if jobs:
        _run_jobs(jobs)
        for utt in utts:
            if utt.duration is None:
                utt.duration = round(_existing_ok(Path(utt.audio)) or 0.0, 4)
    if manifest:
        write_manifest(out / manifest, utts)
    return utts


def _do_job(job: dict) -> None:
    from paraencoder.audio import write_audio

    wave = synthesize(job["text"], Preset(**job["preset"]), job["voice"], emphasis_word=job["emphasis"], seed=job["seed"])
    write_audio(job["path"], wave, SAMPLE_RATE)


def _run_jobs(jobs: list[dict]) -> None:
    """Synthesize jobs in a worker process that forks a pristine child per clip (see module doc)."""
    if not hasattr(os, "fork"):
        for job in jobs:
            _do_job(job)
        return
    proc = subprocess.run(
        [sys.executable, "-m", "paraencoder.data.synthetic"], input=json.dumps(jobs), capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    if proc.returncode != 0:
        raise BackboneError(f"espeak-ng synthesis worker failed (exit {proc.returncode}): {proc.stderr.strip()[-2000:]}")


def _worker_main() -> None:
    jobs = json.loads(sys.stdin.read())
    import paraencoder.audio  # noqa: F401  (import once here, not in every forked child)
    import soxr  # noqa: F401

    with _LOCK:
        _engine()  # initialise once, but never speak in this process: children start pristine
    for job in jobs:
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                _do_job(job)
            except BaseException as exc:  # report and exit the child whatever happens
                print(f"{job['path']}: {exc}", file=sys.stderr)
                code = 1
            finally:
                sys.stderr.flush()
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        if status != 0:
            sys.exit(1)


if __name__ == "__main__":
    _worker_main()
