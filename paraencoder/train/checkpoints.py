"""Checkpoints of a training run: verified writes, safe loading, output-location checks and export.

A Lightning checkpoint holds only what trains (:meth:`AlignmentModule.on_save_checkpoint
<paraencoder.train.module.AlignmentModule.on_save_checkpoint>`); :func:`export_checkpoint` turns one
into a released adapter directory (safetensors + JSON, every part the run trained).
"""

from __future__ import annotations

import importlib
import inspect
import os
from pathlib import Path

import torch
from lightning.pytorch.plugins.io import CheckpointIO

from paraencoder.errors import ConfigError
from paraencoder.train.module import AlignmentModule


class VerifiedCheckpointIO(CheckpointIO):
    """Checkpoint IO that makes a failed save loud.

    Lightning's ``_atomic_save`` swallows a ``PermissionError`` from the filesystem (it re-raises
    only cross-device errors), so a periodic checkpoint into a directory that became unwritable
    mid-run is skipped silently and the run exits 0. This wrapper checks the directory first and
    verifies after the save that the file was really (re)written; otherwise it raises.
    """

    def __init__(self, inner: CheckpointIO):
        self.inner = inner

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        from paraencoder.errors import ParaencoderError
        from paraencoder.io import check_writable

        path = Path(path)
        if "://" not in str(path):  # local paths only; remote filesystems report their own errors
            check_writable(path.parent, "the checkpoint directory")
        before = _file_identity(path)
        self.inner.save_checkpoint(checkpoint, path, storage_options=storage_options)
        after = _file_identity(path)
        if "://" not in str(path) and (after is None or after == before):
            raise ParaencoderError(
                f"checkpoint {path} was not written (the save failed without an error; is {path.parent} still "
                "writable and is there free space?); the run stops here so no further work goes unsaved: fix the "
                "directory and resume with --ckpt_path last"
            )

    def load_checkpoint(self, path, map_location=None, **kwargs):
        return self.inner.load_checkpoint(path, map_location=map_location, **kwargs)

    def remove_checkpoint(self, path) -> None:
        self.inner.remove_checkpoint(path)

    def teardown(self) -> None:
        self.inner.teardown()


def _file_identity(path: Path) -> tuple[int, int, int] | None:
    try:
        info = os.stat(path)
    except OSError:
        return None
    return info.st_ino, info.st_mtime_ns, info.st_size


def check_output_locations(trainer, export_dir: str | os.PathLike) -> list[Path]:
    """Check, before the first step, that every place the run writes to is writable, and make
    checkpoint saves verified (:class:`VerifiedCheckpointIO`). Returns the directories checked."""
    from paraencoder.io import check_writable

    if not trainer.is_global_zero:
        return []
    checked = [check_writable(export_dir, "the adapter export directory (model.export_dir)")]
    for callback in trainer.checkpoint_callbacks:
        if getattr(callback, "dirpath", None):
            checked.append(check_writable(callback.dirpath, "the checkpoint directory (ModelCheckpoint.dirpath)"))
    for logger in trainer.loggers:
        log_dir = getattr(logger, "log_dir", None)
        if log_dir:
            checked.append(check_writable(log_dir, f"the log directory of {type(logger).__name__}"))
    strategy = trainer.strategy
    if not isinstance(strategy.checkpoint_io, VerifiedCheckpointIO):
        strategy.checkpoint_io = VerifiedCheckpointIO(strategy.checkpoint_io)
    return checked


def load_checkpoint_safely(checkpoint: str | os.PathLike, *, trust: bool = False) -> dict:
    """A Lightning checkpoint loaded without unpickling arbitrary objects where possible.

    paraencoder's own checkpoints hold only tensors, numbers, strings, lists and dicts, so
    ``torch.load(weights_only=True)`` reads them and a hostile file cannot run code. A checkpoint
    that needs full unpickling (custom classes in its hyper-parameters or callback state) is
    refused unless ``trust=True``, which warns: unpickling can run any code the file holds.
    """
    import pickle
    import warnings

    from paraencoder.errors import UnsafeFileError

    try:
        return torch.load(checkpoint, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        globals_ = [line.strip() for line in str(exc).splitlines() if "global" in line.lower() and "unsupported" in line.lower()]
        if not globals_:  # not a checkpoint: random bytes, a truncated file, a pickle of something else
            reason = next((line.strip() for line in str(exc).splitlines() if "unsupported" in line.lower()), str(exc).splitlines()[0] if str(exc) else "")
            raise UnsafeFileError(f"{checkpoint} is not a readable checkpoint ({reason[:200]})") from None
        if not trust:
            detail = globals_[0][:200]
            raise UnsafeFileError(
                f"{checkpoint} holds Python objects beyond tensors and plain values ({detail}); loading it would "
                "unpickle them, which can run arbitrary code. If you wrote it yourself, pass --trust-checkpoint "
                "(export_checkpoint(..., trust_checkpoint=True)); never do so for a downloaded checkpoint"
            ) from None
    except Exception as exc:  # noqa: BLE001 - damaged bytes make the unpickler raise anything (KeyError, EOFError, ...)
        raise UnsafeFileError(f"{checkpoint} is not a readable checkpoint ({type(exc).__name__}: {str(exc)[:200]})") from None
    warnings.warn(f"unpickling {checkpoint} with weights_only=False (--trust-checkpoint): only do this for your own runs", stacklevel=2)
    return torch.load(checkpoint, map_location="cpu", weights_only=False)


def export_checkpoint(
    checkpoint: str | os.PathLike, out_dir: str | os.PathLike, *, module_class: type | None = None, trust_checkpoint: bool = False
) -> Path:
    """Write the adapter held in a Lightning checkpoint as a released adapter (safetensors + JSON).

    The checkpoint is read with ``weights_only=True`` (no arbitrary unpickling); one that needs more
    is refused unless ``trust_checkpoint`` (:func:`load_checkpoint_safely`). It must hold every
    tensor the adapter trains: an empty or partial state dict would export an untrained adapter.
    The adapter written here is safetensors + JSON, safe to share.
    """
    ckpt = load_checkpoint_safely(checkpoint, trust=trust_checkpoint)
    if not isinstance(ckpt, dict):
        raise ConfigError(f"{checkpoint} is not a Lightning checkpoint (a {type(ckpt).__name__}, not a dict)")
    hparams = dict(ckpt.get("hyper_parameters") or {})
    if not hparams:
        raise ConfigError(f"{checkpoint} has no hyper_parameters; it was not written by a paraencoder training run")
    state = ckpt.get("state_dict")
    if not isinstance(state, dict) or not state:
        raise ConfigError(f"{checkpoint} has an empty state_dict: it holds no trained weights, and exporting it would write an untrained adapter")
    cls = module_class or checkpoint_module_class(hparams)
    known = set(inspect.signature(cls.__init__).parameters) - {"self"}
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in inspect.signature(cls.__init__).parameters.values()):
        known |= set(inspect.signature(AlignmentModule.__init__).parameters) - {"self"}
    module = cls(**{k: v for k, v in hparams.items() if k in known})
    missing, unexpected = module.load_state_dict(module.upgrade_state_dict(state), strict=False)
    if unexpected:
        raise ConfigError(
            f"{checkpoint} holds tensors {unexpected[:5]} that {cls.__name__} does not have; pass the module class that "
            "wrote it (--module, e.g. paraencoder.train.methods.pe_ft:PEFTAlignmentModule or paraencoder.train.methods.parabridge:ParaBridgeModule)"
        )
    trained = {f"adapter.{k}" for k in module.adapter.trainable_state_dict()}
    untrained = sorted(trained & set(missing))
    if untrained:
        raise ConfigError(
            f"{checkpoint} lacks {len(untrained)} of the adapter's {len(trained)} trained tensors (e.g. {untrained[:3]}); "
            f"exporting it would write untrained weights. Use a checkpoint written by paraencoder fit with the same "
            f"model settings (--module names the class that wrote it; now {cls.__name__})"
        )
    step = ckpt.get("global_step")
    training = {k: v for k, v in hparams.items() if not k.startswith("_")}
    return module.export(out_dir, extra_config={"training": {**training, "global_step": step, "checkpoint": str(checkpoint)}})


MOVED_CLASS_PATHS = {
    "paraencoder.training.AlignmentModule": "paraencoder.train.module.AlignmentModule",
    "paraencoder.parabridge.ParaBridgeModule": "paraencoder.train.methods.parabridge.ParaBridgeModule",
    "paraencoder.peft_tuning.PEFTAlignmentModule": "paraencoder.train.methods.pe_ft.PEFTAlignmentModule",
}
"""Where the module classes of checkpoints written before the ``paraencoder/train/`` layout live now."""


def checkpoint_module_class(hparams: dict) -> type:
    """The module class that wrote a checkpoint: LightningCLI records it as ``_class_path``; default :class:`AlignmentModule`.

    Only paraencoder's own :class:`AlignmentModule` subclasses are imported (a checkpoint never picks arbitrary code).
    """
    path = hparams.get("_class_path")
    if not isinstance(path, str) or not path.startswith("paraencoder."):
        return AlignmentModule
    path = MOVED_CLASS_PATHS.get(path, path)
    module_name, _, name = path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError):
        raise ConfigError(f"the checkpoint was written by {path}, which this version lacks; pass --module module:Class") from None
    if not (isinstance(cls, type) and issubclass(cls, AlignmentModule)):
        raise ConfigError(f"the checkpoint names {path}, not a paraencoder training module; pass --module module:Class")
    return cls
