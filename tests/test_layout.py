"""The package's layout keeps its promises (docs/architecture.md): one import direction, one speech forward,
long modules say why they are long."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "paraencoder"


def _modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        name = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        yield (name[: -len(".__init__")] if name.endswith(".__init__") else name), path


def _unit(module: str) -> str:
    """The folder (``model``, ``train``, ...) or base module (``judge``, ``labels``, ...) a module belongs to."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "(package)"


def _imports(path: Path) -> set[str]:
    """Every paraencoder module ``path`` imports, at module level or inside functions."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("paraencoder"):
            out |= {f"{node.module}.{a.name}" for a in node.names} if node.module == "paraencoder" else {node.module}
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("paraencoder.")}
    return out


def _graph() -> dict[str, set[str]]:
    edges: dict[str, set[str]] = defaultdict(set)
    for module, path in _modules():
        for target in _imports(path):
            a, b = _unit(module), _unit(target)
            if a != b and "(package)" not in (a, b):
                edges[a].add(b)
    return edges


def test_no_two_folders_or_base_modules_import_each_other():
    edges = _graph()

    def reachable(start: str) -> set[str]:
        seen, todo = set(), [start]
        while todo:
            for nxt in edges.get(todo.pop(), ()):
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        return seen

    cycles = sorted({tuple(sorted((a, b))) for a in edges for b in edges[a] if a in reachable(b)})
    assert not cycles, f"import cycles between {cycles}"
    # The cycle this layout removed: data/ (QA generation) and eval/ both use the judge client and labels.
    assert "eval" not in reachable("data") and "data" not in reachable("judge")


def test_the_library_never_imports_the_apps():
    offenders = [m for m, path in _modules() if _unit(m) not in ("apps", "__main__") and any(_unit(t) == "apps" for t in _imports(path))]
    assert not offenders, offenders


def test_only_the_llm_wrapper_and_the_one_forward_touch_input_embeddings():
    allowed = {"paraencoder.model.llm", "paraencoder.model.forward"}
    offenders = []
    for module, path in _modules():
        if module in allowed:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.keyword) and node.arg == "inputs_embeds":
                offenders.append(f"{module}:{node.value.lineno}")
            if isinstance(node, ast.Attribute) and node.attr in ("embed", "get_input_embeddings") and isinstance(node.ctx, ast.Load):
                if isinstance(node.value, ast.Name) and node.value.id == "llm" or node.attr == "get_input_embeddings":
                    offenders.append(f"{module}:{node.lineno} .{node.attr}")
    assert not offenders, f"build LLM inputs with paraencoder.model.forward instead: {offenders}"


def test_every_speech_forward_says_where_the_llm_reads_a_cue_placed_at_the_end():
    """A verbal cue placed "end" is read after the question only if each forward passes the adapter's
    ``tail_tokens``: a call that forgot it would silently read the cue next to the frames."""
    offenders = []
    for module, path in _modules():
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Call):
                continue
            name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", None)
            keywords = {k.arg for k in node.keywords}
            if name == "speech_inputs" and len(node.args) >= 3 and "tail" not in keywords:  # soft tokens given
                offenders.append(f"{module}:{node.lineno} speech_inputs")
            if name == "encode_dialogues" and "num_speech_tokens" in keywords and "tail_speech_tokens" not in keywords:
                offenders.append(f"{module}:{node.lineno} encode_dialogues")
    assert not offenders, f"pass tail=adapter.tail_tokens (tail_speech_tokens=...): {offenders}"


def test_long_modules_say_why_they_are_one_module():
    unexplained = []
    for module, path in _modules():
        lines = path.read_text().count("\n")
        doc = ast.get_docstring(ast.parse(path.read_text())) or ""
        if lines > 520 and "Why one module" not in doc:
            unexplained.append(f"{module} ({lines} lines)")
    assert not unexplained, unexplained
