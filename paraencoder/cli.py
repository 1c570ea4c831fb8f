"""The ``paraencoder`` command.

``fit | validate`` go to LightningCLI (recipes are LightningCLI YAMLs); the task commands
(``chat``, ``data``, ``teacher``, ``probe``, ``eval``, ``demo``) are small argparse programs that
live next to what they drive and are imported only when called.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

LIGHTNING_COMMANDS = ("fit", "validate")

# name -> ("module:function", help). Each function takes argv (list[str]) and returns an exit code.
TASK_COMMANDS: dict[str, tuple[str, str]] = {
    "chat": ("paraencoder.cli:chat_main", "talk to the frozen LLM with speech through an adapter"),
    "teacher": ("paraencoder.cli:teacher_main", "generate and cache teacher replies for a manifest"),
    "data": ("paraencoder.data.cli:main", "build, validate and split manifests from corpora"),
    "probe": ("paraencoder.analysis.probe:main", "layer-wise linear probes of paralinguistic cues"),
    "eval": ("paraencoder.eval.cli:main", "evaluation suites (emotion, age, gender, empathy, content, safety)"),
    "export": ("paraencoder.cli:export_main", "write the adapter of a Lightning checkpoint as safetensors + JSON"),
    "demo": ("paraencoder.demo:main", "the quickstart: build data, train on the packaged default, evaluate"),
}


def lightning_main(args: list[str]) -> None:
    """LightningCLI over :class:`AlignmentModule`/:class:`AlignmentData` and their subclasses (recipes pick one)."""
    from lightning.pytorch.cli import LightningCLI

    from paraencoder.training import AlignmentData, AlignmentModule

    class ParaencoderCLI(LightningCLI):
        def add_arguments_to_parser(self, parser) -> None:
            # The data module needs the same frozen LLM to generate teacher replies.
            parser.link_arguments("model.init_args.llm", "data.init_args.llm")
            parser.link_arguments("model.init_args.llm_dtype", "data.init_args.llm_dtype")

    ParaencoderCLI(
        AlignmentModule,
        AlignmentData,
        subclass_mode_model=True,
        subclass_mode_data=True,
        args=args,
        save_config_kwargs={"overwrite": True},
        auto_configure_optimizers=False,
    )


def chat_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="paraencoder chat", description="Reply of the frozen LLM to speech through an adapter.")
    parser.add_argument("audio", nargs="+", help="audio files (wav, flac, ogg, mp3)")
    parser.add_argument("--adapter", required=True, help="adapter directory (adapter.safetensors + adapter_config.json)")
    parser.add_argument("--prompt", default="<speech>", help="user prompt; <speech> marks where the audio goes")
    parser.add_argument("--llm", default=None, help="LLM spec (default: the one recorded in the adapter)")
    parser.add_argument("--encoder", default=None, help="encoder spec (default: the one recorded in the adapter)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    parser.add_argument("--temperature", type=float, default=0.7)
    args = parser.parse_args(argv)
    from paraencoder.adapter import SpeechAdapter

    adapter = SpeechAdapter.from_pretrained(args.adapter, llm=args.llm, encoder=args.encoder)
    replies = adapter.generate(
        args.audio, args.prompt, max_new_tokens=args.max_new_tokens, do_sample=args.sample, temperature=args.temperature
    )
    for path, reply in zip(args.audio, replies):
        print(f"{path}\n  {reply}")
    return 0


def teacher_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="paraencoder teacher", description="Generate (or complete) the teacher-reply cache for a manifest.")
    parser.add_argument("manifest")
    parser.add_argument("--llm", default="smollm2-135m-instruct")
    parser.add_argument("--llm-dtype", default="float32")
    parser.add_argument("--tasks", default="respond,emotion")
    parser.add_argument("--cache", default=None, help="cache directory (default $PARAENCODER_CACHE/teacher)")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--rank", type=int, default=int(os.environ.get("RANK", 0)), help="this process's shard (for parallel generation)")
    parser.add_argument("--world-size", type=int, default=int(os.environ.get("WORLD_SIZE", 1)))
    args = parser.parse_args(argv)
    from paraencoder import backbones
    from paraencoder.data.dataset import build_examples
    from paraencoder.data.manifest import load_manifest
    from paraencoder.data.teacher import Decoding, TeacherCache, TeacherRequest, generate_teacher_replies
    from paraencoder.prompts import get_tasks
    from paraencoder.training import default_cache_dir

    llm = backbones.resolve_llm(args.llm, dtype=args.llm_dtype)
    examples = build_examples(load_manifest(args.manifest), get_tasks(args.tasks), source=args.manifest)
    cache = TeacherCache(args.cache or default_cache_dir() / "teacher")
    requests = [TeacherRequest(ex.teacher_prompt, ex.system) for ex in examples if ex.reply is None]
    before = len(cache)
    generate_teacher_replies(
        llm, requests, cache, decoding=Decoding(max_new_tokens=args.max_new_tokens), batch_size=args.batch_size, rank=args.rank, world_size=args.world_size
    )
    print(f"{len(requests)} teacher requests; cache {cache.directory}: {before} -> {len(cache)} replies")
    return 0


def export_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="paraencoder export", description="Adapter from a (trusted) Lightning checkpoint.")
    parser.add_argument("checkpoint", help="a .ckpt written by paraencoder fit (a pickle: only your own runs)")
    parser.add_argument("--out", required=True, help="adapter directory to write")
    parser.add_argument("--module", default="paraencoder.training:AlignmentModule", help="module class that wrote it (module:Class)")
    args = parser.parse_args(argv)
    from paraencoder.training import export_checkpoint

    module_name, cls_name = args.module.split(":")
    cls = getattr(importlib.import_module(module_name), cls_name)
    print(f"adapter written to {export_checkpoint(args.checkpoint, args.out, module_class=cls)}")
    return 0


def _usage() -> str:
    lines = ["usage: paraencoder COMMAND [...]", "", "commands:"]
    lines.append("  fit        train an adapter: paraencoder fit --config recipes/<name>.yaml")
    lines.append("  validate   validation loss of a recipe/checkpoint")
    for name, (_, help_text) in TASK_COMMANDS.items():
        lines.append(f"  {name:<10} {help_text}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    command, rest = argv[0], argv[1:]
    if command in LIGHTNING_COMMANDS:
        lightning_main([command, *rest])
        return 0
    if command not in TASK_COMMANDS:
        print(f"paraencoder: unknown command {command!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    target, _ = TASK_COMMANDS[command]
    module_name, func_name = target.split(":")
    from paraencoder.errors import ParaencoderError

    try:
        return int(getattr(importlib.import_module(module_name), func_name)(rest) or 0)
    except ParaencoderError as exc:
        print(f"paraencoder {command}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
