"""The LLM LoRA of a speech adapter: one file format (peft's own), one writer, one reader.

Every method that trains a LoRA on the frozen LLM (PE-FT, ParaBridge) saves it through
:func:`save_lora`, and :meth:`paraencoder.model.adapter.SpeechAdapter.from_pretrained` applies it through
:func:`load_lora`. Inside an adapter directory::

    adapter_config.json               the speech adapter's config; its "lora" section pins the LoRA:
                                      {"format": "peft", "path": "lora", "weights_sha256": ...,
                                       "config_sha256": ..., "llm": {identity of the LLM it trained on}}
    lora/adapter_config.json          peft's LoraConfig, as LoraConfig.save_pretrained writes it
    lora/adapter_model.safetensors    peft's tensors, as PeftModel.save_pretrained names them
                                      (base_model.model.<module>.lora_A.weight, ...)

So ``PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(llm_dir), "<adapter>/lora")``
reads it too. The LoRA always goes on a *private copy* of the LLM (:func:`private_copy`): the LLM
that :func:`paraencoder.model.resolve.resolve_llm` memoises is shared by every adapter, the data module
and teacher-reply generation, and must stay the bit-identical frozen base.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import os
from pathlib import Path
from typing import Iterator, Sequence

import torch
from torch import nn

from paraencoder.errors import AdapterMismatchError, ConfigError, UnsafeFileError, shorten
from paraencoder.io import atomic_write_bytes
from paraencoder.model.llm import FrozenLLM

LORA_DIR = "lora"
PEFT_CONFIG_NAME = "adapter_config.json"
PEFT_WEIGHTS_NAME = "adapter_model.safetensors"
LEGACY_FILES = ("lora_config.json", "lora.safetensors")
"""The two home-made layouts before 0.5 (PE-FT and ParaBridge); no longer read."""
ADAPTER_NAME = "default"
_PREFIX = "base_model.model."
MAX_PEFT_CONFIG_BYTES = 1024**2


def private_copy(llm: FrozenLLM) -> FrozenLLM:
    """A :class:`FrozenLLM` on a copy of ``llm``'s module tree (same tokenizer, identity and system prompt).

    LoRA layers go on this copy, never on the shared memoised LLM. The frozen weights and buffers are
    *shared*, not copied: they never change (no gradient, never merged), so the copy costs the
    module objects and the LoRA matrices only, not a second LLM in memory (a 7B LoRA run would
    otherwise hold two). Moving either copy to another device or dtype moves the shared tensors.
    """
    model = llm.model
    frozen = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    return FrozenLLM(copy.deepcopy(model, memo=frozen), llm.tokenizer, dict(llm.identity), llm.system_prompt)


def make_lora_config(rank: int, alpha: float, target_modules: Sequence[str], layers: Sequence[int] | None):
    """peft's ``LoraConfig`` for a LoRA on a causal LM's ``target_modules`` in decoder ``layers`` (``None`` = all)."""
    from peft import LoraConfig

    return LoraConfig(
        r=int(rank), lora_alpha=float(alpha), lora_dropout=0.0, target_modules=list(target_modules),
        layers_to_transform=None if layers is None else [int(i) for i in layers], bias="none", task_type="CAUSAL_LM",
    )


def inject_lora(llm: FrozenLLM, config, adapter_name: str = ADAPTER_NAME) -> list[tuple[str, torch.nn.Module]]:
    """Put LoRA layers named ``adapter_name`` into ``llm``'s model in place; returns the wrapped layers with their module paths.

    Call it on a :func:`private_copy`. Raises :class:`ConfigError` when the targets match nothing.
    """
    from peft import inject_adapter_in_model
    from peft.tuners.lora import LoraLayer

    try:
        inject_adapter_in_model(config, llm.model, adapter_name=adapter_name)
    except ValueError as exc:
        raise ConfigError(
            f"cannot put LoRA on {shorten(sorted(config.target_modules or []))} (layers {config.layers_to_transform}) "
            f"of LLM {shorten(llm.identity.get('name'))}: {exc}"
        ) from None
    layers = [(path, m) for path, m in llm.model.named_modules() if isinstance(m, LoraLayer) and adapter_name in m.lora_A]
    if not layers:
        raise ConfigError(f"LoRA targets {shorten(sorted(config.target_modules or []))} matched no module in layers {config.layers_to_transform}")
    return layers


def _file_key(name: str, adapter_name: str) -> str:
    """A parameter name of the LLM with LoRA -> its name in peft's file (no adapter name, ``base_model.model.`` prefix)."""
    return _PREFIX + ".".join(part for part in name.split(".") if part != adapter_name)


def _lora_parameters(model: torch.nn.Module, adapter_name: str) -> dict[str, torch.nn.Parameter]:
    """peft file key -> the LoRA parameter of ``adapter_name`` in ``model``."""
    return {
        _file_key(name, adapter_name): p
        for name, p in model.named_parameters()
        if "lora_" in name and adapter_name in name.split(".")
    }


def lora_state_dict(model: torch.nn.Module, adapter_name: str = ADAPTER_NAME) -> dict[str, torch.Tensor]:
    """The LoRA tensors of ``adapter_name`` under the names peft's ``save_pretrained`` gives them (on CPU)."""
    return {k: p.detach().cpu().contiguous() for k, p in sorted(_lora_parameters(model, adapter_name).items())}


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def save_lora(directory: str | os.PathLike, llm: FrozenLLM, config, adapter_name: str = ADAPTER_NAME) -> dict:
    """Write ``llm``'s LoRA ``adapter_name`` in peft's layout into ``directory/lora``; returns the config section.

    The returned section goes into the speech adapter's ``adapter_config.json`` (``extra_config={"lora": ...}``
    of :meth:`~paraencoder.model.adapter.SpeechAdapter.save_pretrained`, which writes the config last), so
    the config pins both files by hash and records the LLM the LoRA was trained on.
    """
    from safetensors.torch import save

    state = lora_state_dict(llm.model, adapter_name)
    if not state:
        raise ConfigError(f"the LLM has no LoRA named {adapter_name!r} to save")
    blob = save(state, metadata={"format": "pt"})
    described = config.to_dict()
    for key, value in described.items():  # as peft's PeftConfigMixin.save_pretrained, with a stable order
        if isinstance(value, set):
            described[key] = sorted(value)
    described["base_model_name_or_path"] = llm.identity.get("source") or llm.identity.get("name")
    described["inference_mode"] = True
    text = (json.dumps(described, indent=2, sort_keys=True) + "\n").encode("utf-8")
    sub = Path(directory) / LORA_DIR
    atomic_write_bytes(sub / PEFT_WEIGHTS_NAME, blob)
    atomic_write_bytes(sub / PEFT_CONFIG_NAME, text)
    return {"format": "peft", "path": LORA_DIR, "weights_sha256": _sha256(blob), "config_sha256": _sha256(text), "llm": dict(llm.identity)}


def check_lora_section(path: Path, section) -> dict:
    """Validate the ``lora`` section of an adapter config (``path``); :class:`UnsafeFileError` names the field."""
    if not isinstance(section, dict):
        raise UnsafeFileError(f"{path}: lora={shorten(section)} must be an object (the LoRA section written by export)")
    if section.get("format") != "peft":
        raise UnsafeFileError(f"{path}: lora.format={shorten(section.get('format'))} is unknown; this version reads \"peft\"")
    sub = section.get("path")
    if not (isinstance(sub, str) and sub and len(sub) <= 255 and sub not in (".", "..") and "/" not in sub and "\\" not in sub):
        raise UnsafeFileError(f"{path}: lora.path={shorten(sub)} must be the name of a folder inside the adapter directory")
    for key in ("weights_sha256", "config_sha256"):
        sha = section.get(key)
        if not (isinstance(sha, str) and len(sha) == 64 and all(c in "0123456789abcdef" for c in sha)):
            raise UnsafeFileError(f"{path}: lora.{key}={shorten(sha)} must be 64 lowercase hex digits")
    if not isinstance(section.get("llm"), dict):
        raise UnsafeFileError(f"{path}: lora.llm={shorten(section.get('llm'))} must be an object (the LLM the LoRA was trained on)")
    return section


def check_no_legacy_lora(directory: Path) -> None:
    """Refuse an adapter directory holding a LoRA in a pre-0.5 layout its config does not pin (it would be ignored)."""
    legacy = [name for name in LEGACY_FILES if (directory / name).exists()]
    if legacy:
        raise ConfigError(
            f"{directory} holds an LLM LoRA in the old layout ({', '.join(legacy)}), which this version no longer reads; "
            f"re-export the run (`paraencoder export CKPT --out DIR`) to write it as {LORA_DIR}/{PEFT_WEIGHTS_NAME}, "
            "or load the adapter without its LoRA (from_pretrained(..., lora=False))"
        )


def _missing(directory: Path, path: Path) -> ConfigError:
    return ConfigError(
        f"{directory / 'adapter_config.json'} names an LLM LoRA but {path} is missing; restore the {path.parent.name}/ "
        "folder exported with this adapter, re-export the run (`paraencoder export CKPT --out DIR`), "
        "or load the adapter without its LoRA (from_pretrained(..., lora=False))"
    )


def _check_pinned(directory: Path, path: Path, sha256: str, key: str) -> None:
    """``path`` exists, is a regular file and has the hash ``lora.<key>`` of the adapter config pins."""
    from paraencoder.model.adapter_files import _file_sha256, _regular_file

    if not os.path.lexists(path):
        raise _missing(directory, path)
    _regular_file(path, "a LoRA file")
    if _file_sha256(path) != sha256:
        raise UnsafeFileError(
            f"{path} does not match lora.{key} in {directory / 'adapter_config.json'} (a replaced file or an "
            f"interrupted export); restore the {path.parent.name}/ folder exported with this adapter, or re-export the run"
        )


def load_lora(directory: str | os.PathLike, section: dict, llm: FrozenLLM) -> FrozenLLM:
    """A private copy of ``llm`` with the LoRA that ``section`` (of ``directory``'s adapter config) pins; ``llm`` is untouched.

    Checked before the LLM is copied: the LoRA was trained on this LLM, both files exist and match
    their hashes, and the config is a plain peft LoRA. The weights' header must then hold exactly the
    tensors (names, shapes) that this config's LoRA has on this LLM before any tensor is read.
    """
    from peft import LoraConfig

    from paraencoder.model.adapter_files import check_llm_identity, read_safetensors_checked

    directory = Path(directory)
    sub = directory / section["path"]
    config_path, weights_path = sub / PEFT_CONFIG_NAME, sub / PEFT_WEIGHTS_NAME
    try:
        check_llm_identity(section["llm"], llm.identity)
    except AdapterMismatchError as exc:
        raise AdapterMismatchError(f"LLM LoRA {weights_path}: {exc}") from None
    _check_pinned(directory, config_path, section["config_sha256"], "config_sha256")
    _check_pinned(directory, weights_path, section["weights_sha256"], "weights_sha256")
    raw = config_path.read_bytes()[: MAX_PEFT_CONFIG_BYTES + 1]
    if len(raw) > MAX_PEFT_CONFIG_BYTES:
        raise UnsafeFileError(f"{config_path} is over {MAX_PEFT_CONFIG_BYTES:,} bytes; a LoRA config is a few KB")
    try:
        described = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise UnsafeFileError(f"{config_path} is not valid JSON ({str(exc)[:120]})") from None
    kind = described.get("peft_type") if isinstance(described, dict) else described
    if kind != "LORA":
        raise UnsafeFileError(f"{config_path} is not a peft LoRA config (peft_type={shorten(kind)})")
    if described.get("modules_to_save"):
        raise UnsafeFileError(f"{config_path}: modules_to_save={shorten(described['modules_to_save'])}: only LoRA matrices go on a frozen LLM")
    try:
        config = LoraConfig.from_peft_type(**described)
    except (TypeError, ValueError) as exc:
        raise UnsafeFileError(f"{config_path} is not a usable LoRA config ({str(exc)[:200]})") from None
    private = private_copy(llm)
    try:
        inject_lora(private, config)
    except ConfigError as exc:
        raise AdapterMismatchError(f"{config_path} does not fit this LLM: {exc}") from None
    params = _lora_parameters(private.model, ADAPTER_NAME)
    state = read_safetensors_checked(weights_path, {k: tuple(p.shape) for k, p in params.items()}, complete=True)
    with torch.no_grad():
        for key, p in params.items():
            p.copy_(state[key])
    private.model.requires_grad_(False)
    return private


class LLMLoRA(nn.Module):
    """A trainable LoRA (``peft``) on a private copy of a frozen LLM: the one LoRA every method trains.

    The copy is :attr:`llm` (the LLM passed in, shared and memoised, is never modified). The LoRA
    matrices live inside the copy's modules (where ``peft`` puts them) *and* in this module's
    ``weights`` ModuleDict, so registering an ``LLMLoRA`` in a LightningModule puts exactly the LoRA
    parameters in the optimizer and in checkpoints; the copy's base weights are not parameters of
    this module and never change. :meth:`save` writes peft's layout (:func:`save_lora`), which
    :meth:`SpeechAdapter.from_pretrained <paraencoder.model.adapter.SpeechAdapter.from_pretrained>`
    applies.

    Args:
        llm: the frozen LLM to copy.
        layers: LLM decoder layers that get LoRA (``"all"`` or ``None``, ``"10-20"``, ``"0,3"``, a list).
        rank, alpha: LoRA rank and scaling numerator (scaling = alpha / rank).
        targets: module names to wrap (``q_proj``, ``v_proj``, ...).
        enabled: whether the LoRA path is on outside :meth:`active` (PE-FT: off, on for the student's
            forward; ParaBridge: on, off for the teacher view).
    """

    def __init__(self, llm: FrozenLLM, layers: str | Sequence[int] | None = "all", rank: int = 8, alpha: float = 16.0,
                 targets: Sequence[str] = ("q_proj", "v_proj"), *, enabled: bool = False):
        super().__init__()
        from paraencoder.model.encoders.base import parse_layer_spec

        if rank < 1:
            raise ConfigError(f"lora_rank={rank} must be >= 1")
        config = llm.model.config
        num_layers = int(getattr(config, "num_hidden_layers", None) or config.get_text_config().num_hidden_layers)
        spec = "all" if layers is None else (list(layers) if isinstance(layers, (list, tuple)) else layers)
        chosen = parse_layer_spec(spec, num_layers, name="lora_layers")
        if not chosen:
            raise ConfigError("lora_layers selects no LLM layer; use 'all', a range like '10-20' or leave LoRA off")
        private = private_copy(llm)
        self.config = {"layers": chosen, "rank": int(rank), "alpha": float(alpha), "targets": list(targets), "llm": dict(llm.identity)}
        self.peft_config = make_lora_config(rank, alpha, targets, chosen)
        self._layers = inject_lora(private, self.peft_config, ADAPTER_NAME)
        self._llm = [private]  # a list: keep the LLM out of this module's submodules (and state_dict)
        self.weights = nn.ModuleDict(
            {path.replace(".", "__"): nn.ModuleDict({"A": m.lora_A[ADAPTER_NAME], "B": m.lora_B[ADAPTER_NAME]}) for path, m in self._layers}
        )
        self.enabled_by_default = bool(enabled)
        self.set_enabled(self.enabled_by_default)

    @property
    def llm(self) -> FrozenLLM:
        """The private LLM copy that carries this LoRA."""
        return self._llm[0]

    def set_enabled(self, enabled: bool) -> None:
        """Switch the LoRA path on or off in every wrapped layer (parameters stay trainable)."""
        for _, layer in self._layers:
            if enabled:
                layer.set_adapter(ADAPTER_NAME)
            layer.enable_adapters(enabled)
        # peft's toggles also flip requires_grad; the LoRA must stay trainable for the optimizer and DDP.
        for p in self.weights.parameters():
            p.requires_grad_(True)

    @contextlib.contextmanager
    def active(self, enabled: bool = True) -> Iterator[None]:
        """``with lora.active(): ...`` runs the LLM with the LoRA (``active(False)``: the frozen base), then
        returns to the default state (``enabled`` at construction), also when the block raises."""
        self.set_enabled(enabled)
        try:
            yield
        finally:
            self.set_enabled(self.enabled_by_default)

    def lora_state_dict(self) -> dict[str, torch.Tensor]:
        """``{"<llm module path>.lora_A.weight": ..., ".lora_B.weight": ...}`` on CPU: :func:`lora_state_dict`'s
        tensors without peft's ``base_model.model.`` prefix."""
        return {k[len(_PREFIX):]: v for k, v in lora_state_dict(self.llm.model, ADAPTER_NAME).items()}

    def save(self, directory: str | os.PathLike) -> dict:
        """Write the LoRA in peft's layout into ``directory/lora`` (:func:`save_lora`); returns the ``lora``
        section for the adapter config."""
        return save_lora(directory, self.llm, self.peft_config, ADAPTER_NAME)


def copy_lora(source: str | os.PathLike, target: str | os.PathLike, section: dict) -> None:
    """Copy the LoRA files ``section`` pins from adapter directory ``source`` to ``target`` (bytes, hence hashes, kept)."""
    src, dst = Path(source) / section["path"], Path(target) / section["path"]
    for name in (PEFT_WEIGHTS_NAME, PEFT_CONFIG_NAME):
        if not (src / name).is_file():
            raise _missing(Path(source), src / name)
        atomic_write_bytes(dst / name, (src / name).read_bytes())
