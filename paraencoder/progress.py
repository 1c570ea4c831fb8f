"""Progress a user can read anywhere: tqdm bars on a terminal, plain lines in a log.

On a terminal :func:`progress_bar` is a tqdm bar with rate and ETA. When the output is not a
terminal (``make demo > log``, a batch job, CI) a tqdm bar would write carriage returns that show
up as one line at the end; there it prints a plain line instead every ``interval`` seconds::

    [teacher replies] 48/320 (15%) 1.9 reply/s, elapsed 0:25, eta 2:23

and one when it finishes. ``$PARAENCODER_PROGRESS`` = ``bar`` | ``lines`` | ``off`` forces a
style; ``$PARAENCODER_PROGRESS_INTERVAL`` (seconds, default 30) sets the line period.

No heavy imports: the Lightning callback lives in :mod:`paraencoder.train.progress_callback`.
"""

from __future__ import annotations

import os
import sys
import time
from typing import IO

__all__ = ["progress_bar", "progress_style", "line_interval", "format_seconds", "PlainProgress"]


def progress_style(stream: IO | None = None) -> str:
    """``bar`` on a terminal, ``lines`` otherwise (or what ``$PARAENCODER_PROGRESS`` says)."""
    forced = os.environ.get("PARAENCODER_PROGRESS", "").strip().lower()
    if forced in ("bar", "lines", "off"):
        return forced
    stream = stream if stream is not None else sys.stderr
    try:
        return "bar" if stream.isatty() else "lines"
    except (AttributeError, ValueError):  # closed or file-like without isatty
        return "lines"


def line_interval(default: float = 30.0) -> float:
    """Seconds between plain progress lines (``$PARAENCODER_PROGRESS_INTERVAL``, default 30)."""
    try:
        return max(0.0, float(os.environ.get("PARAENCODER_PROGRESS_INTERVAL", default)))
    except ValueError:
        return default


def format_seconds(seconds: float | None) -> str:
    """``1:02:03`` / ``2:03``; ``?`` when unknown."""
    if seconds is None or seconds != seconds or seconds == float("inf"):
        return "?"
    seconds = int(round(max(0.0, seconds)))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class PlainProgress:
    """The tqdm subset the library uses (``update``, ``set_postfix_str``, ``close``, context manager),
    printing a line every ``interval`` seconds and one at the end."""

    def __init__(self, total: int | None, desc: str, unit: str = "it", *, interval: float | None = None, file: IO | None = None, initial: int = 0):
        self.total, self.desc, self.unit = total, desc, unit
        self.n = initial
        self._start_n = initial
        self.interval = line_interval() if interval is None else interval
        self.file = file
        self.postfix = ""
        self.start = self._last = time.monotonic()
        self.closed = False
        self._lines = 0

    def __enter__(self) -> "PlainProgress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def set_postfix_str(self, text: str, refresh: bool = True) -> None:
        self.postfix = text

    def set_description(self, desc: str, refresh: bool = True) -> None:
        self.desc = desc

    def line(self) -> str:
        elapsed = time.monotonic() - self.start
        done = self.n - self._start_n
        rate = done / elapsed if elapsed > 0 and done > 0 else None
        parts = [f"[{self.desc}] {self.n}" + (f"/{self.total}" if self.total else "") + (f" ({100 * self.n / self.total:.0f}%)" if self.total else "")]
        if rate:
            parts.append(f"{rate:.2f} {self.unit}/s" if rate >= 1 else f"{1 / rate:.1f} s/{self.unit}")
        parts.append(f"elapsed {format_seconds(elapsed)}")
        if self.total and rate and self.n < self.total:
            parts.append(f"eta {format_seconds((self.total - self.n) / rate)}")
        if self.postfix:
            parts.append(self.postfix)
        return ", ".join(parts)

    def _print(self) -> None:
        self._lines += 1
        print(self.line(), file=self.file if self.file is not None else sys.stderr, flush=True)

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        first = self._lines == 0  # the first update gives an early rate and ETA
        if (first or now - self._last >= self.interval) and not (self.total and self.n >= self.total):
            self._last = now
            self._print()

    def refresh(self) -> None:
        self._print()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            if self.n > self._start_n or not self.total:
                self._print()


class _Off:
    n = 0

    def __init__(self, *args, **kwargs):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass

    def update(self, n: int = 1) -> None:
        self.n += n

    def set_postfix_str(self, *args, **kwargs) -> None:
        pass

    def set_description(self, *args, **kwargs) -> None:
        pass

    def refresh(self) -> None:
        pass

    def close(self) -> None:
        pass


def progress_bar(total: int | None, desc: str, unit: str = "it", *, enabled: bool = True, interval: float | None = None, file: IO | None = None, **tqdm_kwargs):
    """A tqdm bar with rate and ETA on a terminal, :class:`PlainProgress` lines otherwise.

    ``enabled=False`` (or ``$PARAENCODER_PROGRESS=off``) gives an object with the same methods that
    prints nothing.
    """
    style = progress_style(file) if enabled else "off"
    if style == "off":
        return _Off()
    if style == "lines":
        return PlainProgress(total, desc, unit, interval=interval, file=file)
    from tqdm.auto import tqdm

    tqdm_kwargs.setdefault("mininterval", 0.5)
    tqdm_kwargs.setdefault("dynamic_ncols", True)
    return tqdm(total=total, desc=desc, unit=unit, file=file, **tqdm_kwargs)
