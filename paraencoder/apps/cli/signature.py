"""A command from a typed function: the signature is the command line, the docstring is its help.

Every ``paraencoder`` task command is a plain function with typed parameters and a Google-style
docstring (``Args:``), callable from Python; :func:`run` turns it into its command line, so each
default lives in one place (the signature) and ``--help`` shows it. The rules:

* parameters before ``*`` are positional (a ``list[...]`` one takes one or more values);
* keyword-only parameters are options spelled with dashes (``max_new_tokens`` -> ``--max-new-tokens``;
  a one-letter name -> ``-n``); no default means required;
* ``bool`` is a flag (``--no-audio`` sets ``no_audio=True``); ``list[X]`` takes one or more values;
  ``Literal[...]`` gives the choices; ``X | None`` is an optional ``X``;
* a ``*extra: str`` parameter receives the arguments the command does not know (passed on, e.g. to
  ``fit``);
* every command also takes ``--threads N|auto`` (:mod:`paraencoder.threads`), applied as it is parsed.

This is argparse underneath, not jsonargparse's grammar (``--flag true``, ``--list [a,b]``), so the
documented command lines stay as they are; ``fit``/``validate`` are LightningCLI (recipes).
Importing this module imports no torch: ``--help`` stays instant.
"""

from __future__ import annotations

import argparse
import inspect
import re
import types
import typing
from pathlib import Path
from typing import Any, Callable, Literal, Union

from paraencoder.threads import add_threads_argument

__all__ = ["build_parser", "run"]


def _doc_parts(func: Callable) -> tuple[str, dict[str, str]]:
    """(the docstring's first paragraph, ``{parameter: help}`` from its ``Args:`` section)."""
    doc = inspect.getdoc(func) or ""
    summary = doc.split("\n\n")[0].replace("\n", " ").strip()
    helps: dict[str, str] = {}
    match = re.search(r"^Args:\s*$(.*?)(?=^\S|\Z)", doc, flags=re.M | re.S)
    if match:
        names: list[str] = []
        for line in match.group(1).splitlines():
            head = re.match(r"^    ([\w, ]+):\s*(.*)$", line)
            if head:
                names = [n.strip() for n in head.group(1).split(",")]
                for name in names:
                    helps[name] = head.group(2).strip()
            elif line.strip() and names:
                for name in names:
                    helps[name] = f"{helps[name]} {line.strip()}".strip()
    return summary, helps


class _Help(argparse.HelpFormatter):
    """Shows the signature's default after the help text, unless it is None/False or the text already names it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "(default" in text or action.default is None or action.default is False or action.default is argparse.SUPPRESS or (not action.option_strings and action.nargs != "?"):
            return text
        return f"{text} (default: %(default)s)"


def _base(hint: Any) -> Any:
    """``X`` for ``X | None`` / ``Optional[X]``; the hint itself otherwise."""
    if typing.get_origin(hint) in (Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return hint


def _add(parser: argparse.ArgumentParser, param: inspect.Parameter, hint: Any, help_text: str | None) -> None:
    base = _base(hint)
    kwargs: dict[str, Any] = {"help": help_text.replace("%", "%%") if help_text else None}
    required = param.default is inspect.Parameter.empty
    if typing.get_origin(base) is list:
        (item,) = typing.get_args(base) or (str,)
        kwargs.update(nargs="+", type=item)
    elif typing.get_origin(base) is Literal:
        choices = list(typing.get_args(base))
        kwargs.update(choices=choices, type=type(choices[0]))
    elif base is bool:
        kwargs["action"] = "store_true" if param.default is not True else "store_false"
    elif base in (int, float, str, Path):
        kwargs["type"] = base
    else:
        raise TypeError(f"{param.name}: no command-line form for type {hint!r}")
    if param.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD:
        if not required:
            kwargs.update(nargs=kwargs.get("nargs", "?"), default=param.default)
        parser.add_argument(param.name, **kwargs)
        return
    flag = f"-{param.name}" if len(param.name) == 1 else "--" + param.name.replace("_", "-")
    if base is bool and param.default is True:
        flag = "--no-" + param.name.replace("_", "-")
    if required:
        kwargs["required"] = True
    else:
        kwargs["default"] = param.default
    parser.add_argument(flag, dest=param.name, **kwargs)


def _fill(parser: argparse.ArgumentParser, func: Callable) -> bool:
    """Add ``func``'s parameters to ``parser``; True when it takes the unknown arguments (``*extra``)."""
    hints = typing.get_type_hints(func)
    _, helps = _doc_parts(func)
    passthrough = False
    for param in inspect.signature(func).parameters.values():
        if param.kind is inspect.Parameter.VAR_POSITIONAL:
            passthrough = True
            continue
        _add(parser, param, hints.get(param.name, str), helps.get(param.name))
    add_threads_argument(parser)
    return passthrough


def build_parser(target: Callable | dict[str, Callable], *, prog: str, description: str | None = None) -> argparse.ArgumentParser:
    """The argparse parser of a command function, or of ``{subcommand: function}``."""
    formatter = _Help
    if callable(target):
        parser = argparse.ArgumentParser(prog=prog, description=description or _doc_parts(target)[0], formatter_class=formatter)
        parser.set_defaults(_func=target, _extra=_fill(parser, target))
        return parser
    parser = argparse.ArgumentParser(prog=prog, description=description, formatter_class=formatter)
    add_threads_argument(parser)
    sub = parser.add_subparsers(dest="_command", required=True)
    for name, func in target.items():
        summary = _doc_parts(func)[0]
        child = sub.add_parser(name, help=summary, description=summary, formatter_class=formatter)
        child.set_defaults(_func=func, _extra=_fill(child, func))
    return parser


def run(target: Callable | dict[str, Callable], argv: list[str] | None, *, prog: str, description: str | None = None) -> int:
    """Parse ``argv`` for ``target`` (usage errors and ``--help`` exit here, before anything heavy loads), then call it."""
    parser = build_parser(target, prog=prog, description=description)
    args, unknown = parser.parse_known_args(argv)
    values = vars(args)
    func, passthrough = values.pop("_func"), values.pop("_extra")
    values.pop("_command", None)
    values.pop("threads", None)  # applied while parsing
    if unknown and not passthrough:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    positional = [values.pop(p.name) for p in inspect.signature(func).parameters.values() if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD]
    return int(func(*positional, *(unknown if passthrough else ()), **values) or 0)
