"""Training progress for ``paraencoder fit`` / ``demo``: one bar over optimizer steps, or plain lines in a log.

:class:`StepProgress` replaces Lightning's default bar (which counts batches per epoch, shows
``Epoch 0/-2`` when training is bounded by ``max_steps``, and in a redirected log prints nothing
until the end). On a terminal it is a tqdm bar over *all* optimizer steps with loss and ETA;
otherwise (or with ``PARAENCODER_PROGRESS=lines``) it prints every ``interval`` seconds
(``$PARAENCODER_PROGRESS_INTERVAL``, default 30)::

    [train] step 120/600 (20%) loss 2.314, 1.9 s/step, elapsed 3:48, eta 15:12

and a final ``[train] done: ...`` line. ``paraencoder fit`` adds it unless the recipe turns the
progress bar off or brings its own.
"""

from __future__ import annotations

import math
import sys
import time

from lightning.pytorch.callbacks.progress.progress_bar import ProgressBar

from paraencoder.progress import format_seconds, line_interval, progress_style

__all__ = ["StepProgress"]


class StepProgress(ProgressBar):
    """Progress over optimizer steps with loss and ETA (tqdm on a TTY, plain lines otherwise).

    Args:
        interval: seconds between plain lines (default ``$PARAENCODER_PROGRESS_INTERVAL`` or 30).
        style: ``"bar"``, ``"lines"`` or ``None`` (decide from whether stdout is a terminal).
    """

    def __init__(self, interval: float | None = None, style: str | None = None):
        super().__init__()
        self.interval = interval
        self.style = style
        self._enabled = True
        self._bar = None
        self._t0 = 0.0
        self._step0 = 0
        self._last_line = 0.0
        self._loss: float | None = None
        self._total: int | None = None
        self._val_seen = 0

    # -- ProgressBar API ---------------------------------------------------------------------------
    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    @property
    def is_enabled(self) -> bool:
        return self._enabled

    def print(self, *args, **kwargs) -> None:
        if self._bar is not None:
            self._bar.write(" ".join(map(str, args)), file=kwargs.get("file"))
        else:
            print(*args, **kwargs)

    # -- helpers -------------------------------------------------------------------------------------
    def _style(self) -> str:
        return self.style or progress_style(sys.stdout)

    def _interval(self) -> float:
        return line_interval() if self.interval is None else self.interval

    def _total_steps(self, trainer) -> int | None:
        if trainer.max_steps is not None and trainer.max_steps > 0:
            return int(trainer.max_steps)
        try:
            total = trainer.estimated_stepping_batches
        except Exception:  # dataloader without a length
            return None
        return int(total) if total is not None and math.isfinite(total) else None

    def _line(self, trainer, final: bool = False) -> str:
        step, total = trainer.global_step, self._total
        elapsed = time.monotonic() - self._t0
        done = step - self._step0
        head = f"[train] {'done: ' if final else ''}step {step}" + (f"/{total} ({100 * step / total:.0f}%)" if total else "")
        parts = [head + (f" loss {self._loss:.4g}" if self._loss is not None else "")]
        if done > 0 and elapsed > 0:
            per = elapsed / done
            parts.append(f"{per:.2f} s/step" if per >= 1 else f"{1 / per:.2f} step/s")
        parts.append(f"elapsed {format_seconds(elapsed)}")
        if not final and total and done > 0:
            parts.append(f"eta {format_seconds((total - step) * elapsed / done)}")
        return ", ".join(parts)

    # -- hooks -----------------------------------------------------------------------------------------
    def on_train_start(self, trainer, pl_module) -> None:
        self._t0 = self._last_line = time.monotonic()
        self._step0 = trainer.global_step
        self._total = self._total_steps(trainer)
        if not self._enabled:
            return
        if self._style() == "bar":
            from tqdm.auto import tqdm

            self._bar = tqdm(total=self._total, initial=self._step0, desc="train", unit="step", dynamic_ncols=True, mininterval=0.5, file=sys.stdout)
        elif self._style() == "lines":
            print(f"[train] {self._total if self._total else '?'} steps to go from step {self._step0}; a line every {self._interval():.0f} s", flush=True)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        try:
            self._loss = float(loss.detach()) if hasattr(loss, "detach") else (float(loss) if loss is not None else self._loss)
        except (TypeError, ValueError, RuntimeError):
            pass
        if not self._enabled:
            return
        if self._bar is not None:
            self._bar.n = trainer.global_step
            if self._loss is not None:
                self._bar.set_postfix_str(f"loss {self._loss:.4g}", refresh=False)
            now = time.monotonic()
            if now - self._last_line >= 0.5 or trainer.global_step == self._total:
                self._bar.refresh()
                self._last_line = now
        elif self._style() == "lines":
            now = time.monotonic()
            if now - self._last_line >= self._interval() or trainer.global_step - self._step0 == 1:
                self._last_line = now
                print(self._line(trainer), flush=True)

    def on_train_end(self, trainer, pl_module) -> None:
        if self._bar is not None:
            self._bar.n = trainer.global_step
            self._bar.close()
            self._bar = None
        if self._enabled and self._style() != "off":
            print(self._line(trainer, final=True), flush=True)

    def on_validation_start(self, trainer, pl_module) -> None:
        self._val_seen = 0

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx: int = 0) -> None:
        self._val_seen += 1

    def on_validation_end(self, trainer, pl_module) -> None:
        if not self._enabled or trainer.sanity_checking or self._style() == "off":
            return
        value = trainer.callback_metrics.get("val/loss")
        shown = f" val/loss {float(value):.4g}" if value is not None else ""
        self.print(f"[validate] {self._val_seen} batches{shown} at step {trainer.global_step}", flush=True)
