"""The ``paraencoder`` command.

``fit | validate`` go to LightningCLI (recipes are LightningCLI YAMLs); every task command
(``chat``, ``teacher``, ``export``, ``data ...``, ``probe``, ``eval``, ``demo``, ``serve``) is a typed
function whose signature is its command line (:mod:`paraencoder.apps.cli.signature`), registered in
:data:`TASK_COMMANDS` and imported only when called.

``paraencoder CMD --help`` never imports torch or transformers (< 1 s); ``fit --help`` is a
short summary (``fit --help-all`` is LightningCLI's full list). Every command takes
``--threads N|auto`` (or ``$PARAENCODER_THREADS``); the default is the policy in
:mod:`paraencoder.threads` (usable cores minus other busy processes, at least 1).
"""

from __future__ import annotations

import importlib
import os
import sys
import warnings

from paraencoder.threads import applied_threads, set_threads

LIGHTNING_COMMANDS = ("fit", "validate")

# name -> ("module:function", help). The function is the command: its typed signature is the command line
# (paraencoder.apps.cli.signature); a dict of functions gives subcommands.
TASK_COMMANDS: dict[str, tuple[str, str]] = {
    "chat": ("paraencoder.apps.cli:chat", "talk to the frozen LLM with speech through an adapter"),
    "teacher": ("paraencoder.apps.cli:teacher", "generate and cache teacher replies for a manifest"),
    "data": ("paraencoder.apps.cli.data:COMMANDS", "build, validate and split manifests from corpora"),
    "probe": ("paraencoder.apps.cli.probe:probe", "layer-wise linear probes of paralinguistic cues"),
    "eval": ("paraencoder.apps.cli.eval:evaluate", "evaluation suites (emotion, age, gender, empathy, content, safety)"),
    "export": ("paraencoder.apps.cli:export", "write what a Lightning checkpoint trained (adapter, LLM LoRA) as safetensors + JSON"),
    "demo": ("paraencoder.apps.demo:demo", "the quickstart: build data, train on the packaged default, evaluate"),
    "serve": ("paraencoder.apps.serve.cli:serve", "OpenAI-compatible chat-completions server for an adapter (speech in dialogue)"),
}


# Warnings ``fit`` would print that a user can do nothing about (each filtered by its exact text).
_UNACTIONABLE_WARNINGS = (
    # we pass args= on purpose (the CLI strips --threads first); sys.argv is kept for DDP re-launches
    r"LightningCLI's args parameter is intended to run from within Python",
    # the frozen LLM / frozen encoder layers are in eval mode by design
    r"Found \d+ module\(s\) in eval mode at the start of training",
    # torch 2.13 deprecation inside Lightning's own code (lightning/pytorch/utilities/_pytree.py)
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",
    # Lightning's advert for its cloud logger / model registry
    r".*litlogger|.*litmodels|.*LitLogger",
)


def quiet_lightning() -> None:
    """Filter exactly the warnings and log lines of ``fit`` that a user cannot act on (nothing else)."""
    import logging

    for pattern in _UNACTIONABLE_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)

    class _DropAdverts(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            text = record.getMessage()
            return not ("litlogger" in text.lower() or "litmodels" in text.lower() or "💡 Tip" in text)

    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero", "lightning.pytorch", "lightning.fabric"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropAdverts) for f in logger.filters):
            logger.addFilter(_DropAdverts())


def _pop_threads(args: list[str]) -> tuple[str | None, list[str]]:
    """(the value of ``--threads N`` / ``--threads=N`` if given, args without it)."""
    value, rest, i = None, [], 0
    while i < len(args):
        arg = args[i]
        if arg == "--threads" and i + 1 < len(args):
            value, i = args[i + 1], i + 2
            continue
        if arg.startswith("--threads="):
            value = arg.split("=", 1)[1]
        else:
            rest.append(arg)
        i += 1
    return value, rest


def _lightning_help(command: str) -> str:
    # paraencoder/apps/cli/__init__.py -> the repository's recipes/ (a source checkout; none in a wheel)
    recipes = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))), "recipes")
    names = sorted(n[:-5] for n in os.listdir(recipes) if n.endswith(".yaml")) if os.path.isdir(recipes) else []
    what = "train an adapter" if command == "fit" else "validation loss of a recipe / checkpoint"
    return "\n".join([
        f"usage: paraencoder {command} --config RECIPE.yaml [--section.key VALUE ...] [--threads N|auto]",
        "",
        f"{what} with LightningCLI (recipes are LightningCLI YAML files).",
        "",
        "options:",
        "  --config FILE          a recipe: " + (", ".join(f"recipes/{n}.yaml" for n in names) if names else "recipes/<name>.yaml"),
        "  --trainer.max_steps N  any recipe value can be overridden as --section.key VALUE",
        "  --ckpt_path PATH       resume from a checkpoint (e.g. <log dir>/checkpoints/last.ckpt)",
        "  --print_config         print the resolved recipe and exit (validates every key)",
        "  --threads N|auto       CPU threads for torch (default: $PARAENCODER_THREADS, else usable cores",
        "                         minus other busy processes, at least 1)",
        "  --help-all             LightningCLI's full option list (loads torch and Lightning: slower)",
        "",
        "Progress: a bar over optimizer steps with loss and ETA on a terminal; in a log, a line every",
        "$PARAENCODER_PROGRESS_INTERVAL seconds (default 30). Set PARAENCODER_PROGRESS=off to silence it.",
    ])


def _config_value(config, dotted: str):
    """``config[a][b][c]`` for ``"a.b.c"`` in a jsonargparse Namespace / dict; None when absent."""
    value = config
    for part in dotted.split("."):
        try:
            value = value[part] if isinstance(value, dict) else getattr(value, part)
        except (KeyError, AttributeError, TypeError):
            return None
        if value is None:
            return None
    return value


def lightning_main(args: list[str]) -> None:
    """LightningCLI over :class:`AlignmentModule`/:class:`AlignmentData` and their subclasses (recipes pick one).

    ``--threads N|auto`` anywhere in ``args`` is applied (:func:`paraencoder.set_threads`) and removed.
    """
    threads, args = _pop_threads(list(args))
    if threads is not None or applied_threads() is None:  # e.g. called from `demo` or Python
        set_threads(threads)
    quiet_lightning()
    from lightning.pytorch.callbacks.progress.progress_bar import ProgressBar
    from lightning.pytorch.cli import LightningCLI

    from paraencoder.train.progress_callback import StepProgress

    from paraencoder.train.data import AlignmentData
    from paraencoder.train.module import AlignmentModule

    class ParaencoderCLI(LightningCLI):
        def add_arguments_to_parser(self, parser) -> None:
            # The data module needs the same frozen LLM to generate teacher replies.
            parser.link_arguments("model.init_args.llm", "data.init_args.llm")
            parser.link_arguments("model.init_args.llm_dtype", "data.init_args.llm_dtype")
            # Teacher and student share the system prompt (never through the shared LLM object).
            parser.link_arguments("model.init_args.system_prompt", "data.init_args.system_prompt")

        def before_instantiate_classes(self) -> None:
            # Manifests, their audio files and an init adapter are checked before the backbones load.
            from paraencoder.data.manifest import load_manifest
            from paraencoder.inputs import check_adapter_dir, check_manifest, check_manifest_audio

            config = self.config.get(str(self.subcommand), self.config) if self.subcommand else self.config
            for key in ("data.init_args.train_manifest", "data.init_args.val_manifest"):
                path = _config_value(config, key)
                if path and self.subcommand in ("fit", "validate"):
                    check_manifest_audio(load_manifest(check_manifest(path)))
            init_adapter = _config_value(config, "model.init_args.init_adapter")
            if init_adapter:
                check_adapter_dir(init_adapter)

        def instantiate_trainer(self, **kwargs):
            # Step progress with ETA (plain lines when stdout is not a terminal), unless the recipe
            # turned the progress bar off or brought its own.
            config = self._get(self.config_init, "trainer", default={}) or {}
            callbacks = config.get("callbacks") or []
            callbacks = callbacks if isinstance(callbacks, list) else [callbacks]
            if config.get("enable_progress_bar", True) is not False and not any(isinstance(c, ProgressBar) for c in callbacks):
                kwargs.setdefault("callbacks", [*callbacks, StepProgress()])
            return super().instantiate_trainer(**kwargs)

    ParaencoderCLI(
        AlignmentModule,
        AlignmentData,
        subclass_mode_model=True,
        subclass_mode_data=True,
        args=args,
        save_config_kwargs={"overwrite": True},
        auto_configure_optimizers=False,
    )


def chat(
    audio: list[str],
    *,
    adapter: str,
    prompt: str = "<speech>",
    llm: str | None = None,
    encoder: str | None = None,
    max_new_tokens: int = 64,
    sample: bool = False,
    temperature: float = 0.7,
) -> int:
    """Reply of the frozen LLM to speech through an adapter.

    Args:
        audio: audio files (wav, flac, ogg, mp3).
        adapter: adapter directory (adapter.safetensors + adapter_config.json).
        prompt: user prompt; <speech> marks where the audio goes.
        llm: LLM spec (default: the one recorded in the adapter).
        encoder: encoder spec (default: the one recorded in the adapter).
        max_new_tokens: longest reply, in tokens.
        sample: sample instead of greedy decoding.
        temperature: sampling temperature (with --sample).
    """
    from paraencoder.inputs import check_adapter_dir, check_audio_files

    # Seconds, not the ~40 s of loading the backbones, to learn that a path is wrong.
    check_audio_files(audio)
    check_adapter_dir(adapter)
    from paraencoder.model.adapter import SpeechAdapter

    model = SpeechAdapter.from_pretrained(adapter, llm=llm, encoder=encoder)
    replies = model.generate(audio, prompt, max_new_tokens=max_new_tokens, do_sample=sample, temperature=temperature)
    for path, reply in zip(audio, replies):
        print(f"{path}\n  {reply}")
    return 0


def teacher(
    manifest: str,
    *,
    llm: str = "smollm2-135m-instruct",
    llm_dtype: str = "float32",
    tasks: str = "respond,emotion",
    cache: str | None = None,
    max_new_tokens: int = 48,
    batch_size: int = 16,
    rank: int | None = None, world_size: int | None = None,  # sharding for parallel generation
) -> int:
    """Generate (or complete) the teacher-reply cache for a manifest.

    Args:
        manifest: the manifest (JSONL/CSV) whose teacher prompts are answered.
        llm: the frozen LLM (a packaged name, a transformers directory or a .gguf file).
        llm_dtype: float32, bfloat16 or auto.
        tasks: comma-separated tasks (paraencoder.prompts.TASKS).
        cache: cache directory (default $PARAENCODER_CACHE/teacher).
        max_new_tokens: longest teacher reply, in tokens.
        batch_size: prompts per batched generation.
        rank: this process's shard for parallel generation (default $RANK, else 0).
        world_size: number of shards (default $WORLD_SIZE, else 1).
    """
    from paraencoder.inputs import check_manifest

    check_manifest(manifest)
    from paraencoder.data.dataset import build_examples
    from paraencoder.data.manifest import load_manifest
    from paraencoder.data.teacher import Decoding, TeacherCache, TeacherRequest, generate_teacher_replies
    from paraencoder.model.resolve import resolve_llm
    from paraencoder.prompts import get_tasks
    from paraencoder.train.module import default_cache_dir

    rank = int(os.environ.get("RANK", 0)) if rank is None else rank
    world_size = int(os.environ.get("WORLD_SIZE", 1)) if world_size is None else world_size
    frozen = resolve_llm(llm, dtype=llm_dtype)
    examples = build_examples(load_manifest(manifest), get_tasks(tasks), source=manifest)
    store = TeacherCache(cache or default_cache_dir() / "teacher")
    requests = [TeacherRequest(ex.teacher_prompt, ex.system) for ex in examples if ex.reply is None]
    before = len(store)
    generate_teacher_replies(frozen, requests, store, decoding=Decoding(max_new_tokens=max_new_tokens), batch_size=batch_size, rank=rank, world_size=world_size)
    print(f"{len(requests)} teacher requests; cache {store.directory}: {before} -> {len(store)} replies")
    return 0


def export(checkpoint: str, *, out: str, trust_checkpoint: bool = False, module: str | None = None) -> int:
    """Adapter and LLM LoRA from a (trusted) Lightning checkpoint.

    Args:
        checkpoint: a .ckpt written by paraencoder fit (read with weights_only=True: no code runs).
        out: adapter directory to write.
        trust_checkpoint: allow full unpickling for a checkpoint that holds more than tensors and plain values (can run code: only your own runs).
        module: module class that wrote it (module:Class; default: the class the checkpoint records, else paraencoder.train.module:AlignmentModule).
    """
    from paraencoder.inputs import check_file

    check_file(checkpoint, "checkpoint", "give a .ckpt written by paraencoder fit (<log dir>/checkpoints/last.ckpt)")
    from paraencoder.train.checkpoints import export_checkpoint

    cls = None
    if module:
        module_name, cls_name = module.split(":")
        cls = getattr(importlib.import_module(module_name), cls_name)
    print(f"adapter written to {export_checkpoint(checkpoint, out, module_class=cls, trust_checkpoint=trust_checkpoint)}")
    return 0


def _usage() -> str:
    lines = ["usage: paraencoder COMMAND [...]", "", "commands:"]
    lines.append("  fit        train an adapter: paraencoder fit --config recipes/<name>.yaml")
    lines.append("  validate   validation loss of a recipe/checkpoint")
    for name, (_, help_text) in TASK_COMMANDS.items():
        lines.append(f"  {name:<10} {help_text}")
    lines += ["", "every command: --help, and --threads N|auto (default $PARAENCODER_THREADS, else usable cores minus", "other busy processes, at least 1); see `paraencoder COMMAND --help`"]
    return "\n".join(lines)


def command() -> int:
    """The ``paraencoder`` executable: :func:`main` on ``sys.argv``, under tcmalloc where the machine has it.

    The allocator must be chosen before the process starts (:mod:`paraencoder.allocator`), so this
    re-executes once; :func:`main` called from Python never does.
    """
    from paraencoder.allocator import reexec_with_tcmalloc

    try:
        reexec_with_tcmalloc(sys.argv[1:])
    except (ValueError, FileNotFoundError) as exc:
        print(f"paraencoder: error: {exc}", file=sys.stderr)
        return 2
    return main()


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    # transformers' per-load "Loading weights 20/20" bars say nothing a user can use; ours remain.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    command, rest = argv[0], argv[1:]
    wants_help = any(a in ("-h", "--help") for a in rest)
    from paraencoder.errors import ParaencoderError

    if command in LIGHTNING_COMMANDS:
        if wants_help and "--help-all" not in rest:
            print(_lightning_help(command))  # without importing torch / Lightning
            return 0
        rest = ["--help" if a == "--help-all" else a for a in rest]
        threads, rest = _pop_threads(rest)
        try:
            if "--help" not in rest:
                set_threads(threads, verbose=True)
            lightning_main([command, *rest])
        except ParaencoderError as exc:
            print(f"paraencoder {command}: error: {exc}", file=sys.stderr)
            return 1
        return 0
    if command not in TASK_COMMANDS:
        print(f"paraencoder: unknown command {command!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    path, help_text = TASK_COMMANDS[command]
    module_name, func_name = path.split(":")
    try:
        if not wants_help:
            # Applied here, wherever --threads stands (also after a `data` subcommand); the
            # commands' own --threads options do the same when their main() is called directly.
            threads, rest = _pop_threads(rest)
            set_threads(threads, verbose=True)
        from paraencoder.apps.cli.signature import run

        target = getattr(importlib.import_module(module_name), func_name)
        return run(target, rest, prog=f"paraencoder {command}", description=None if callable(target) else help_text)
    except ParaencoderError as exc:
        print(f"paraencoder {command}: error: {exc}", file=sys.stderr)
        return 1

