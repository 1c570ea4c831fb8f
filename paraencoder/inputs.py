"""Cheap checks of a command's inputs, run before any model loads (no torch import).

Loading the backbones takes tens of seconds on a CPU; a typo in an audio path or an adapter
directory should fail in milliseconds, naming the file and the fix.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable, Sequence

from paraencoder.errors import AudioError, ConfigError

__all__ = ["check_audio_files", "check_adapter_dir", "check_manifest", "check_manifest_audio", "check_file"]

ADAPTER_FILES = ("adapter.safetensors", "adapter_config.json")  # = adapter.WEIGHTS_NAME, CONFIG_NAME


def check_file(path: str | os.PathLike, what: str, hint: str = "") -> Path:
    """``path`` as a Path when it is an existing file, else a ConfigError naming ``what``."""
    p = Path(path).expanduser()
    if not p.is_file():
        state = "is a directory, not a file" if p.is_dir() else "does not exist"
        raise ConfigError(f"{what} {p} {state}" + (f"; {hint}" if hint else ""))
    return p


def check_audio_files(paths: Iterable[str | os.PathLike], *, open_headers: bool = True, max_listed: int = 5) -> list[Path]:
    """Every path exists, is a file and (``open_headers``) has an audio header soundfile can read.

    Raises :class:`AudioError` for a single bad file, :class:`ConfigError` listing several.
    """
    checked, bad = [], []
    for path in paths:
        p = Path(path).expanduser()
        if not p.is_file():
            bad.append((p, "is a directory, not an audio file" if p.is_dir() else "does not exist"))
            continue
        if open_headers:
            try:
                import soundfile

                soundfile.info(str(p))
            except Exception as exc:  # soundfile raises RuntimeError / LibsndfileError / TypeError
                if p.suffix.lower() not in (".mp3", ".m4a", ".aac", ".opus", ".webm"):  # decoded by other means
                    bad.append((p, f"is not a readable audio file ({type(exc).__name__}: {str(exc).splitlines()[0][:120]})"))
                    continue
        checked.append(p)
    if len(bad) == 1:
        raise AudioError(bad[0][0], bad[0][1])
    if bad:
        listed = "; ".join(f"{p} {why}" for p, why in bad[:max_listed])
        more = f" (and {len(bad) - max_listed} more)" if len(bad) > max_listed else ""
        raise ConfigError(f"{len(bad)} audio inputs are unusable: {listed}{more}")
    return checked


def check_adapter_dir(directory: str | os.PathLike) -> Path:
    """An adapter directory holds ``adapter.safetensors`` and a parseable ``adapter_config.json``."""
    d = Path(directory).expanduser()
    if not d.is_dir():
        hint = "; pass the directory holding adapter.safetensors + adapter_config.json"
        raise ConfigError(f"adapter directory {d} " + ("is a file, not a directory" if d.exists() else "does not exist") + hint)
    missing = [name for name in ADAPTER_FILES if not (d / name).is_file()]
    if missing:
        hint = " (a Lightning .ckpt? write an adapter with `paraencoder export CKPT --out DIR`)" if list(d.glob("*.ckpt")) else ""
        raise ConfigError(f"adapter directory {d} lacks {', '.join(missing)}{hint}")
    try:
        config = json.loads((d / ADAPTER_FILES[1]).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{d / ADAPTER_FILES[1]} is not valid JSON: {exc}") from None
    if not isinstance(config, dict):
        raise ConfigError(f"{d / ADAPTER_FILES[1]} is not a JSON object")
    return d


def check_manifest(path: str | os.PathLike) -> Path:
    """A manifest path exists and has a manifest suffix (.jsonl, .json, .csv)."""
    p = check_file(path, "manifest", "give a .jsonl or .csv manifest (see `paraencoder data build --help`)")
    if p.suffix.lower() not in (".jsonl", ".json", ".csv", ".tsv"):
        raise ConfigError(f"manifest {p}: expected a .jsonl or .csv file, got {p.suffix or 'no suffix'}")
    return p


def check_manifest_audio(utterances: Sequence, *, max_listed: int = 5) -> None:
    """Every utterance's audio file exists (existence only: cheap even for thousands of clips)."""
    missing = [u for u in utterances if getattr(u, "audio", None) and not Path(u.audio).is_file()]
    if missing:
        listed = ", ".join(f"{u.id}: {u.audio}" for u in missing[:max_listed])
        more = f" (and {len(missing) - max_listed} more)" if len(missing) > max_listed else ""
        raise ConfigError(
            f"{len(missing)} of {len(utterances)} manifest items have no audio file: {listed}{more}; "
            "fix the paths (relative paths are relative to the manifest) or run `paraencoder data validate`"
        )
