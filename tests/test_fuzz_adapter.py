"""Fuzzing ``SpeechAdapter.from_pretrained`` with mutated ``adapter.safetensors`` and ``adapter_config.json``.

A released adapter comes from strangers. Loading a mutated one must either load cleanly or raise a
:class:`ParaencoderError` (``UnsafeFileError`` / ``ConfigError`` / ``AdapterMismatchError`` /
``BackboneError``): never another exception, never unpickling (``pickle``/``torch.load`` are made
to raise during every load), never a huge allocation (the projector is guarded: building one with
more than :data:`MAX_ELEMENTS` parameters counts as a violation without allocating it; peak RSS is
checked too).

Each category's examples all run, violations are collected, and the category asserts none at the
end, so the printed counts are complete. Counts go to PARAENCODER_RELIABILITY_REPORT when set.
"""

from __future__ import annotations

import json
import os
import pickle
import resource
import shutil
import struct
from collections import defaultdict
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import paraencoder.model.adapter as adapter_module
from paraencoder.model.resolve import resolve_llm
from paraencoder.model.adapter import CONFIG_NAME, WEIGHTS_NAME, SpeechAdapter
from paraencoder.errors import ParaencoderError

pytestmark = pytest.mark.timeout(180)

MAX_ELEMENTS = 50_000_000  # 200 MB of float32: far above the tiny adapter, far below a blow-up
RSS_GROWTH_LIMIT_MB = 300.0
STATS: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
VIOLATIONS: dict[str, list[str]] = defaultdict(list)

class Forbidden(BaseException):
    """Raised by the guards; a BaseException so no ``except Exception`` in the loader can swallow it."""


def fuzz(n: int):
    return settings(max_examples=n, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture])


def maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


@pytest.fixture(scope="module")
def base(tmp_path_factory, tiny_whisper_dir, tiny_llm_dir):
    """The saved tiny adapter's bytes, its parsed header and config, and the loaded LLM."""
    llm = resolve_llm(str(tiny_llm_dir))
    root = tmp_path_factory.mktemp("fuzz_adapter")
    adapter = SpeechAdapter.build(str(tiny_whisper_dir), llm, stack=2, hidden_dim=32)
    adapter.save_pretrained(root / "clean")
    # Without the config's weights_sha256 pin, so mutated headers reach the header validator
    # (with it, every changed byte is refused before parsing; test_core checks the pin).
    config = json.loads((root / "clean" / CONFIG_NAME).read_text())
    config.pop("weights_sha256")
    (root / "clean" / CONFIG_NAME).write_text(json.dumps(config))
    raw = (root / "clean" / WEIGHTS_NAME).read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return {
        "root": root,
        "llm": llm,
        "raw": raw,
        "header_len": n,
        "header": json.loads(raw[8 : 8 + n]),
        "data": raw[8 + n :],
        "config_bytes": (root / "clean" / CONFIG_NAME).read_bytes(),
        "config": json.loads((root / "clean" / CONFIG_NAME).read_text()),
    }


@pytest.fixture(scope="module", autouse=True)
def guards():
    """No unpickling and no giant projector while the module runs; report counts at the end."""
    mp = pytest.MonkeyPatch()

    def refuse(*args, **kwargs):
        raise Forbidden("unpickling attempted")

    for target, name in [(pickle, "loads"), (pickle, "load"), (pickle, "Unpickler"), (torch, "load"), (torch.serialization, "load")]:
        mp.setattr(target, name, refuse)
    real_projector = adapter_module.Projector

    def guarded_projector(in_dim, out_dim, stack=4, hidden_dim=None, activation="swiglu"):
        numbers = [x for x in (in_dim, out_dim, stack, hidden_dim or 1024) if isinstance(x, int)]
        if len(numbers) == 4:
            elements = in_dim * stack * 2 * (hidden_dim or 1024) + (hidden_dim or 1024) * out_dim
            if elements > MAX_ELEMENTS:
                raise Forbidden(f"projector with {elements:,} parameters would be allocated")
        return real_projector(in_dim, out_dim, stack, hidden_dim, activation)

    mp.setattr(adapter_module, "Projector", guarded_projector)
    rss_before = maxrss_mb()
    yield
    mp.undo()
    growth = maxrss_mb() - rss_before
    summary = {
        "categories": {k: dict(v) for k, v in sorted(STATS.items())},
        "total_cases": sum(v["cases"] for v in STATS.values()),
        "violations": {k: len(v) for k, v in sorted(VIOLATIONS.items())},
        "maxrss_growth_mb": round(growth, 1),
    }
    print("\nadapter loader fuzz cases:")
    for name, counts in summary["categories"].items():
        detail = ", ".join(f"{k}={v}" for k, v in sorted(counts.items()) if k != "cases")
        print(f"  {name:<18} {counts['cases']:>5} cases  ({detail})")
    print(f"  total {summary['total_cases']}, violations {summary['violations']}, peak RSS growth {growth:.1f} MB")
    target = os.environ.get("PARAENCODER_RELIABILITY_REPORT")
    if target and summary["total_cases"]:
        from paraencoder.io import atomic_write_json

        existing = json.loads(Path(target).read_text()) if Path(target).is_file() else {}
        existing["adapter_fuzz"] = summary
        atomic_write_json(target, existing)
    assert growth < RSS_GROWTH_LIMIT_MB, f"peak RSS grew by {growth:.0f} MB while fuzzing the adapter loader"


def attempt(base, category: str, weights: bytes | None = None, config: bytes | None = None) -> str:
    """Write the (mutated) adapter, load it, classify the outcome; record violations instead of raising."""
    directory = base["root"] / "case"
    directory.mkdir(exist_ok=True)
    (directory / WEIGHTS_NAME).write_bytes(base["raw"] if weights is None else weights)
    (directory / CONFIG_NAME).write_bytes(base["config_bytes"] if config is None else config)
    STATS[category]["cases"] += 1
    try:
        SpeechAdapter.from_pretrained(directory, llm=base["llm"])
        outcome = "loaded"
    except ParaencoderError as exc:
        outcome = type(exc).__name__
        if str(directory) not in str(exc) and type(exc).__name__ in ("UnsafeFileError", "ConfigError"):
            VIOLATIONS[category].append(f"error does not name the adapter: {exc}")
    except Forbidden as exc:
        outcome = "violation"
        VIOLATIONS[category].append(str(exc))
    except Exception as exc:  # noqa: BLE001 - exactly what the contract forbids
        outcome = "violation"
        VIOLATIONS[category].append(f"{type(exc).__name__}: {str(exc)[:120]}")
    STATS[category][outcome] += 1
    return outcome


def with_header(base, header, data: bytes | None = None) -> bytes:
    body = json.dumps(header).encode()
    return struct.pack("<Q", len(body)) + body + (base["data"] if data is None else data)


def finish(category: str) -> None:
    found = VIOLATIONS.get(category, [])
    assert not found, f"{len(found)} violations in {category}, e.g. {sorted(set(found))[:5]}"


def tensor_names(base) -> list[str]:
    return sorted(k for k in base["header"] if k != "__metadata__")


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8,
)


def test_clean_adapter_loads_without_pickle(base):
    assert attempt(base, "clean") == "loaded"
    finish("clean")


# -- adapter.safetensors ------------------------------------------------------------------------


def test_header_length_field(base):
    n, size = base["header_len"], len(base["raw"])

    @fuzz(80)
    @given(value=st.one_of(st.integers(0, 2**64 - 1), st.sampled_from([0, 1, n - 1, n + 1, size - 8, size, 2**63, 2**64 - 1]), st.integers(n - 16, n + 16).filter(lambda v: v >= 0)))
    def run(value):
        outcome = attempt(base, "header_length", struct.pack("<Q", value) + base["raw"][8:])
        if value != n:
            assert outcome != "loaded", value

    run()
    finish("header_length")


def test_header_json_bytes(base):
    n = base["header_len"]

    @fuzz(150)
    @given(edits=st.lists(st.tuples(st.integers(0, n - 1), st.integers(0, 255), st.sampled_from(["set", "insert", "delete"])), min_size=1, max_size=4))
    def run(edits):
        header = bytearray(base["raw"][8 : 8 + n])
        for pos, byte, op in edits:
            pos = min(pos, len(header) - 1)
            if op == "set":
                header[pos] = byte
            elif op == "insert":
                header.insert(pos, byte)
            elif len(header) > 1:
                del header[pos]
        attempt(base, "header_bytes", struct.pack("<Q", len(header)) + bytes(header) + base["data"])

    run()
    finish("header_bytes")


def test_whole_header_replaced(base):
    @fuzz(100)
    @given(header=json_values)
    def run(header):
        attempt(base, "header_json", with_header(base, header))

    run()
    finish("header_json")


def test_header_entry_fields(base):
    """dtype / shape / data_offsets of one tensor set to arbitrary JSON."""
    names = tensor_names(base)

    @fuzz(220)
    @given(name=st.sampled_from(names), key=st.sampled_from(["dtype", "shape", "data_offsets"]), value=json_values | st.sampled_from(
        ["F64", "I64", "U8", "BOOL", "F8_E4M3", "F16", "BF16", "F32", [0, 1, 2], [5], [-1, 7], [2**40, 2**41]]))
    def run(name, key, value):
        header = json.loads(json.dumps(base["header"]))
        header[name][key] = value
        attempt(base, "header_fields", with_header(base, header))

    run()
    finish("header_fields")


def test_huge_declared_sizes(base):
    """Huge shapes with self-consistent offsets, and offsets far past the file: refused before allocating."""
    names = tensor_names(base)

    @fuzz(80)
    @given(name=st.sampled_from(names), dims=st.lists(st.integers(1, 2**31), min_size=1, max_size=4), dtype=st.sampled_from(["F32", "F16", "BF16"]))
    def run(name, dims, dtype):
        header = json.loads(json.dumps(base["header"]))
        start = header[name]["data_offsets"][0]
        itemsize = {"F32": 4, "F16": 2, "BF16": 2}[dtype]
        elements = 1
        for d in dims:
            elements *= d
        header[name] = {"dtype": dtype, "shape": dims, "data_offsets": [start, start + elements * itemsize]}
        assert attempt(base, "huge_sizes", with_header(base, header)) != "loaded"

    run()
    finish("huge_sizes")


def test_extra_and_missing_tensors(base):
    names = tensor_names(base)

    @fuzz(80)
    @given(extra=st.lists(st.text(min_size=1, max_size=24), max_size=3), drop=st.sets(st.sampled_from(names), max_size=2))
    def run(extra, drop):
        header = {k: v for k, v in json.loads(json.dumps(base["header"])).items() if k not in drop}
        data = base["data"]
        for name in extra:
            if name in header:
                continue
            header[name] = {"dtype": "F32", "shape": [1], "data_offsets": [len(data), len(data) + 4]}
            data += b"\0\0\0\0"
        changed = bool(drop) or any(e not in base["header"] for e in extra)
        outcome = attempt(base, "extra_missing", with_header(base, header, data))
        assert (outcome != "loaded") == changed, (extra, drop, outcome)

    run()
    finish("extra_missing")


def test_overlapping_offsets(base):
    names = tensor_names(base)

    @fuzz(80)
    @given(name=st.sampled_from(names), shift=st.integers(-20_000, 20_000).filter(lambda s: s != 0))
    def run(name, shift):
        header = json.loads(json.dumps(base["header"]))
        start, end = header[name]["data_offsets"]
        header[name]["data_offsets"] = [start + shift, end + shift]
        assert attempt(base, "offsets", with_header(base, header)) != "loaded"

    run()
    finish("offsets")


def test_truncated_files(base):
    @fuzz(100)
    @given(cut=st.integers(0, len(base["raw"]) - 1), which=st.sampled_from(["weights", "config"]))
    def run(cut, which):
        if which == "weights":
            assert attempt(base, "truncation", weights=base["raw"][:cut]) != "loaded"
        else:
            attempt(base, "truncation", config=base["config_bytes"][: cut % len(base["config_bytes"])])

    run()
    finish("truncation")


# -- adapter_config.json ------------------------------------------------------------------------

CONFIG_PATHS = [
    ("encoder",), ("projector",), ("llm",), ("library",), ("weights",),
    ("encoder", "spec"), ("encoder", "hidden_size"), ("encoder", "num_layers"), ("encoder", "family"), ("encoder", "weights_sha256"),
    ("encoder", "train_layers"), ("encoder", "train_frontend"),
    ("projector", "layer"), ("projector", "mix_layers"), ("projector", "stack"), ("projector", "hidden_dim"),
    ("projector", "activation"), ("projector", "in_dim"), ("projector", "out_dim"),
    ("llm", "name"), ("llm", "hidden_size"), ("llm", "vocab_size"), ("llm", "weights_sha256"), ("llm", "source"),
]


def set_path(config: dict, path: tuple, value) -> dict:
    config = json.loads(json.dumps(config))
    target = config
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return config


def dump(config) -> bytes:
    return json.dumps(config).encode()


def test_config_types(base):
    @fuzz(220)
    @given(path=st.sampled_from(CONFIG_PATHS), value=json_values)
    def run(path, value):
        attempt(base, "config_types", config=dump(set_path(base["config"], path, value)))

    run()
    finish("config_types")


def test_config_absurd_sizes(base):
    """Sizes within or beyond the config's sane range; anything whose projector would be huge must be refused."""
    keys = [("projector", "stack"), ("projector", "hidden_dim"), ("projector", "in_dim"), ("projector", "out_dim"),
            ("encoder", "hidden_size"), ("encoder", "num_layers"), ("llm", "hidden_size"), ("llm", "vocab_size")]

    @fuzz(100)
    @given(changes=st.lists(st.tuples(st.sampled_from(keys), st.sampled_from([0, -1, 1, 2, 3, 65536, 65537, 2**31, 2**63, 10**30])), min_size=1, max_size=3))
    def run(changes):
        config = base["config"]
        for path, value in changes:
            config = set_path(config, path, value)
        attempt(base, "config_sizes", config=dump(config))

    run()
    finish("config_sizes")


def test_config_missing_sections(base):
    removable = [p for p in CONFIG_PATHS if p != ("weights",)]

    @fuzz(80)
    @given(drop=st.sets(st.sampled_from(removable), min_size=1, max_size=3))
    def run(drop):
        config = json.loads(json.dumps(base["config"]))
        for path in sorted(drop, key=len, reverse=True):
            target = config
            for key in path[:-1]:
                target = target.get(key) if isinstance(target, dict) else None
            if isinstance(target, dict):
                target.pop(path[-1], None)
        attempt(base, "config_missing", config=dump(config))

    run()
    finish("config_missing")


def test_config_raw_bytes(base):
    @fuzz(80)
    @given(data=st.binary(max_size=300) | st.sampled_from([b"", b"\xff\xfe{}", b"[]", b"null", b"{" * 5000, b'{"library": "paraencoder"}', b"NaN"]))
    def run(data):
        assert attempt(base, "config_bytes", config=data) != "loaded"

    run()
    finish("config_bytes")


def test_wrong_llm_is_named(base, tiny_qwen_dir):
    """An adapter for one LLM loaded with another: AdapterMismatchError naming both."""
    other = resolve_llm(str(tiny_qwen_dir))
    directory = base["root"] / "clean"
    with pytest.raises(adapter_module.AdapterMismatchError) as info:
        SpeechAdapter.from_pretrained(directory, llm=other)
    message = str(info.value)
    assert base["llm"].identity["name"] in message and other.identity["name"] in message, message


@pytest.mark.parametrize("stack,hidden_dim", [
    pytest.param(65536, 65536),
    pytest.param(4096, 4096),
    (2, 65536),  # 12.6 M parameters: under the guard's limit, refused by the shape check today
])
def test_absurd_projector_is_refused_before_allocating(base, stack, hidden_dim):
    """Each size is within the config's 1-65536 range, but together they describe a projector of up
    to 2.7e11 parameters (1 TB) next to a 27 kB weights file: refuse before building it."""
    config = set_path(set_path(base["config"], ("projector", "stack"), stack), ("projector", "hidden_dim"), hidden_dim)
    before = len(VIOLATIONS["absurd_projector"])
    outcome = attempt(base, "absurd_projector", config=dump(config))
    assert outcome == "UnsafeFileError", (outcome, VIOLATIONS["absurd_projector"][before:])
