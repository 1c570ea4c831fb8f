"""Untrusted adapter directories: refused before allocating, in bounded memory and time, with short errors.

Each case writes an adapter directory (hypothesis generates the values), loads it, and asserts:
a :class:`ParaencoderError` (or a clean load), an error message under 1000 characters that names
the file, peak RSS growth under 200 MB and under 5 s for that case, and no real (non-meta) module
built for a directory whose weights do not match its config. Stored system prompts stay on their
adapter. Counts go to PARAENCODER_RELIABILITY_REPORT when set.
"""

from __future__ import annotations

import json
import os
import resource
import struct
import time
from collections import defaultdict
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import paraencoder.model.adapter as adapter_module
from paraencoder.model.resolve import resolve_encoder, resolve_llm
from paraencoder.model.adapter import CONFIG_NAME, WEIGHTS_NAME, SpeechAdapter
from paraencoder.errors import ParaencoderError
from paraencoder.model.llm import SPEECH

pytestmark = pytest.mark.timeout(600)

RSS_LIMIT_MB = 200.0
SECONDS_LIMIT = 5.0
MESSAGE_LIMIT = 1000
STATS: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
WORST = {"rss_mb": 0.0, "seconds": 0.0, "message_chars": 0}


def fuzz(n: int):
    return settings(max_examples=n, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


def maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


@pytest.fixture(scope="module")
def base(tmp_path_factory, tiny_whisper_dir, tiny_llm_dir):
    llm = resolve_llm(str(tiny_llm_dir))
    root = tmp_path_factory.mktemp("limits")
    adapter = SpeechAdapter.build(str(tiny_whisper_dir), llm, stack=2, hidden_dim=32)
    adapter.save_pretrained(root / "clean")
    config = json.loads((root / "clean" / CONFIG_NAME).read_text())
    raw = (root / "clean" / WEIGHTS_NAME).read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return {"root": root, "llm": llm, "raw": raw, "header": json.loads(raw[8 : 8 + n]), "config": config}


@pytest.fixture(scope="module", autouse=True)
def report():
    yield
    summary = {"categories": {k: dict(v) for k, v in sorted(STATS.items())}, "total_cases": sum(v["cases"] for v in STATS.values()),
               "worst_case": {k: round(v, 2) for k, v in WORST.items()}}
    print("\nadapter limit cases:")
    for name, counts in summary["categories"].items():
        print(f"  {name:<22} {counts['cases']:>4} cases  ({', '.join(f'{k}={v}' for k, v in sorted(counts.items()) if k != 'cases')})")
    print(f"  total {summary['total_cases']}; worst case: {summary['worst_case']}")
    target = os.environ.get("PARAENCODER_RELIABILITY_REPORT")
    if target and summary["total_cases"]:
        from paraencoder.io import atomic_write_json

        existing = json.loads(Path(target).read_text()) if Path(target).is_file() else {}
        existing["adapter_limits"] = summary
        atomic_write_json(target, existing)


@pytest.fixture()
def real_builds(monkeypatch):
    """Counts projectors built with real (non-meta) parameters."""
    built = []
    real = adapter_module.Projector

    def spy(*args, **kwargs):
        module = real(*args, **kwargs)
        if not next(module.parameters()).is_meta:
            built.append(sum(p.numel() for p in module.parameters()))
        return module

    monkeypatch.setattr(adapter_module, "Projector", spy)
    return built


def set_path(config: dict, path: tuple, value) -> dict:
    config = json.loads(json.dumps(config))
    target = config
    for key in path[:-1]:
        target = target.setdefault(key, {})
    target[path[-1]] = value
    return config


def header_bytes(header: dict) -> bytes:
    body = json.dumps(header).encode()
    return struct.pack("<Q", len(body)) + body


def attempt(base, category: str, *, config: dict | bytes | None = None, weights: bytes | None = None, sparse_size: int | None = None,
            expect_refused: bool = True) -> str:
    """Write, load, check the contract for one case; returns the outcome's type name."""
    directory = base["root"] / "case"
    directory.mkdir(exist_ok=True)
    cfg = base["config"] if config is None else config
    (directory / CONFIG_NAME).write_bytes(cfg if isinstance(cfg, bytes) else json.dumps(cfg).encode())
    (directory / WEIGHTS_NAME).write_bytes(base["raw"] if weights is None else weights)
    if sparse_size:
        os.truncate(directory / WEIGHTS_NAME, sparse_size)  # a hole: no blocks on disk
    STATS[category]["cases"] += 1
    rss, start = maxrss_mb(), time.perf_counter()
    try:
        SpeechAdapter.from_pretrained(directory, llm=base["llm"])
        outcome, message = "loaded", ""
    except ParaencoderError as exc:
        outcome, message = type(exc).__name__, str(exc)
    seconds, growth = time.perf_counter() - start, maxrss_mb() - rss
    WORST["rss_mb"] = max(WORST["rss_mb"], growth)
    WORST["seconds"] = max(WORST["seconds"], seconds)
    WORST["message_chars"] = max(WORST["message_chars"], len(message))
    STATS[category][outcome] += 1
    assert growth < RSS_LIMIT_MB, (category, growth, message[:200])
    assert seconds < SECONDS_LIMIT, (category, seconds, message[:200])
    assert len(message) < MESSAGE_LIMIT, (category, len(message), message[:300])
    if outcome in ("UnsafeFileError", "ConfigError"):
        assert str(directory) in message, message
    if expect_refused:
        assert outcome != "loaded", category
    return outcome


def test_clean_adapter_loads(base):
    assert attempt(base, "clean", expect_refused=False) == "loaded"


def test_layer_ranges_are_bounded(base, real_builds):
    """encoder.train_layers / projector layers with huge ranges and indices: short errors, nothing built."""
    huge = st.integers(-(10**18), 10**18)
    spec = st.one_of(
        st.builds(lambda a, b: f"{a}-{b}", st.integers(0, 10**15), st.integers(0, 10**15)),
        st.builds(lambda parts: ",".join(parts), st.lists(st.sampled_from(["0", "1", "99", "0-99999999999", "-5", "x", ""]), min_size=1, max_size=50)),
        st.lists(huge, min_size=1, max_size=50), huge, st.just("0-" + "9" * 4000), st.just(list(range(100_000))),
    )

    @fuzz(150)
    @given(path=st.sampled_from([("encoder", "train_layers"), ("projector", "layer"), ("projector", "mix_layers")]), value=spec)
    def run(path, value):
        if path == ("projector", "layer") and isinstance(value, list):
            value = value[0]
        config = set_path(base["config"], path, value)
        if path == ("projector", "mix_layers"):
            config = set_path(config, ("projector", "layer"), "mix")
        before = len(real_builds)
        outcome = attempt(base, "layer_ranges", config=config, expect_refused=False)
        if outcome != "loaded":
            assert len(real_builds) == before, (path, str(value)[:80])

    run()


def test_sizes_and_prompt_lengths_are_bounded(base, real_builds):
    fields = [("projector", "stack"), ("projector", "hidden_dim"), ("projector", "in_dim"), ("projector", "out_dim"),
              ("projector", "summary_tokens"), ("encoder", "hidden_size"), ("encoder", "num_layers"),
              ("llm", "hidden_size"), ("llm", "vocab_size")]
    values = st.one_of(st.integers(-(2**70), 2**70), st.sampled_from([0, 1, 64, 65, 4096, 65536, 65537, 2**31, 2**63]),
                       st.floats(allow_nan=True), st.booleans(), st.none(), st.text(max_size=5))

    @fuzz(150)
    @given(changes=st.lists(st.tuples(st.sampled_from(fields), values), min_size=1, max_size=3))
    def run(changes):
        config = base["config"]
        for path, value in changes:
            config = set_path(config, path, value)
        before = len(real_builds)
        if attempt(base, "sizes", config=config, expect_refused=False) != "loaded":
            assert len(real_builds) == before

    run()


@pytest.mark.parametrize("stack,hidden_dim", [(128, 65536), (64, 65536), (2048, 8192)])
def test_sparse_weights_file_is_refused_before_allocating(base, real_builds, stack, hidden_dim):
    """A config for a 0.3-1e9 parameter projector next to a weights file whose header matches it exactly,
    the file being a hole (apparent size up to 1.1 GB, 0 bytes on disk): refused, nothing built."""
    config = set_path(set_path(base["config"], ("projector", "stack"), stack), ("projector", "hidden_dim"), hidden_dim)
    config.pop("weights_sha256", None)
    with torch.device("meta"):
        meta = SpeechAdapter(resolve_encoder(config["encoder"]["spec"]), 64, stack=stack, hidden_dim=hidden_dim)
    header, offset = {}, 0
    for name, tensor in sorted(meta.trainable_state_dict().items()):
        nbytes = tensor.numel() * 2
        header[name] = {"dtype": "F16", "shape": list(tensor.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    head = header_bytes(header)
    assert offset > 500 * 1024**2
    assert attempt(base, "sparse_weights", config=config, weights=head, sparse_size=len(head) + offset) == "UnsafeFileError"
    assert real_builds == []


def test_header_is_checked_against_the_config_before_building(base, real_builds):
    """A config describing a bigger projector than the header: refused before the projector is built."""
    @fuzz(40)
    @given(hidden=st.integers(33, 4096), pad=st.integers(0, 3))
    def run(hidden, pad):
        config = set_path(base["config"], ("projector", "hidden_dim"), hidden)
        config.pop("weights_sha256", None)
        weights = base["raw"] + b"\0" * (hidden * 2048 * pad)  # room for the size bound; tail bytes belong to no tensor
        before = len(real_builds)
        assert attempt(base, "header_vs_config", config=config, weights=weights) == "UnsafeFileError"
        assert len(real_builds) == before

    run()


def test_padded_weights_file_is_refused(base):
    """Bytes after the last tensor (or a gap): the file is larger than its tensors, refuse it."""
    config = dict(base["config"])
    config.pop("weights_sha256", None)
    for extra in (1, 8, 1 << 20):
        assert attempt(base, "padded_weights", config=config, weights=base["raw"] + b"\0" * extra) == "UnsafeFileError"


def test_nan_weights_are_refused(base):
    raw = bytearray(base["raw"])
    (n,) = struct.unpack("<Q", raw[:8])
    name = sorted(k for k in base["header"] if k != "__metadata__")[0]
    start = 8 + n + base["header"][name]["data_offsets"][0]
    raw[start : start + 4] = struct.pack("<f", float("nan"))
    config = dict(base["config"])
    config.pop("weights_sha256", None)
    assert attempt(base, "nan_weights", config=config, weights=bytes(raw)) == "UnsafeFileError"
    with pytest.raises(ParaencoderError, match="NaN/infinite"):
        SpeechAdapter.from_pretrained(base["root"] / "case", llm=base["llm"])


def test_wrong_kinds_of_files(base, tmp_path):
    """Directory, FIFO, missing file, adapter path that is a file: errors that say what the path is."""
    case = base["root"] / "case"
    attempt(base, "file_kinds", expect_refused=False)
    for target, kind in ((WEIGHTS_NAME, "directory"), (CONFIG_NAME, "directory"), (WEIGHTS_NAME, "FIFO"), (CONFIG_NAME, "FIFO")):
        path = case / target
        path.unlink()
        os.mkdir(path) if kind == "directory" else os.mkfifo(path)
        with pytest.raises(ParaencoderError, match=f"{path}.* is a {kind}"):
            SpeechAdapter.from_pretrained(case, llm=base["llm"])
        STATS["file_kinds"]["cases"] += 1
        STATS["file_kinds"]["refused"] += 1
        os.rmdir(path) if kind == "directory" else path.unlink()
        path.write_bytes(base["raw"] if target == WEIGHTS_NAME else json.dumps(base["config"]).encode())
    with pytest.raises(ParaencoderError, match="is a file, not an adapter directory"):
        SpeechAdapter.from_pretrained(case / WEIGHTS_NAME, llm=base["llm"])


def test_config_structure(base):
    """Deep nesting, huge integers, wrong section types, empty llm block: library errors, never Python's."""
    deep = b'{"library": "paraencoder", "training": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    cases = [
        deep,
        json.dumps(set_path(base["config"], ("training",), {"a": [[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[1]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]})).encode(),
        json.dumps(base["config"]).replace('"stack": 2', '"stack": ' + "9" * 5000).encode(),
        json.dumps(set_path(base["config"], ("llm",), {})).encode(),
        json.dumps(set_path(base["config"], ("llm",), {"name": "tiny-llama"})).encode(),
        json.dumps(set_path(base["config"], ("prompts",), ["system"])).encode(),
        json.dumps(set_path(base["config"], ("prompts", "system"), 5)).encode(),
        json.dumps(set_path(base["config"], ("prompts", "system"), "x" * 200_000)).encode(),
        json.dumps(set_path(base["config"], ("weights_sha256",), ["a"])).encode(),
        json.dumps(set_path(base["config"], ("encoder", "spec"), "x" * 10_000)).encode(),
    ]
    for data in cases:
        assert attempt(base, "config_structure", config=data) in ("UnsafeFileError", "ConfigError")


def test_unknown_sections_are_accepted(base):
    """A newer version's extra sections and keys load (bounded by size and depth only)."""
    config = set_path(base["config"], ("summary_v2",), {"tokens": 4, "nested": {"a": [1, 2, {"b": None}]}})
    config = set_path(config, ("projector", "future_key"), "value")
    assert attempt(base, "unknown_sections", config=config, expect_refused=False) == "loaded"


def test_stored_system_prompt_with_speech_is_refused(base):
    config = set_path(base["config"], ("prompts", "system"), f"Listen: {SPEECH}")
    case = base["root"] / "case"
    assert attempt(base, "system_prompt", config=config) == "UnsafeFileError"
    with pytest.raises(ParaencoderError, match=r"adapter_config.json: prompts.system: .*speech placeholder"):
        SpeechAdapter.from_pretrained(case, llm=base["llm"])
    config = set_path(base["config"], ("prompts", "system"), "caf\ud800")
    assert attempt(base, "system_prompt", config=config) == "UnsafeFileError"


def test_system_prompt_stays_on_its_adapter(base, tmp_path):
    """Loading an adapter with a stored system prompt must not change the shared LLM or later adapters."""
    llm = base["llm"]
    assert llm.system_prompt is None
    with_prompt = set_path(base["config"], ("prompts", "system"), "Always answer in French.")
    with_prompt.pop("weights_sha256")
    for name, config in (("a", with_prompt), ("b", base["config"])):
        (tmp_path / name).mkdir()
        (tmp_path / name / CONFIG_NAME).write_text(json.dumps(config))
        (tmp_path / name / WEIGHTS_NAME).write_bytes(base["raw"])
    first = SpeechAdapter.from_pretrained(tmp_path / "a", llm=llm)
    second = SpeechAdapter.from_pretrained(tmp_path / "b", llm=llm)
    assert llm.system_prompt is None
    assert first.llm.system_prompt == "Always answer in French." and second.llm.system_prompt is None
    assert first.llm.model is llm.model and first.llm.tokenizer is llm.tokenizer  # a view, not a copy of the weights
    french = first.llm.tokenizer.decode(first.llm.encode([SPEECH], num_speech_tokens=[1]).input_ids[0])
    plain = second.llm.tokenizer.decode(second.llm.encode([SPEECH], num_speech_tokens=[1]).input_ids[0])
    assert "French" in french and "French" not in plain
    # generate() passes the adapter's prompt even when called through the shared LLM object.
    seen = []
    real_encode = type(llm).encode
    try:
        type(llm).encode = lambda self, *a, **k: seen.append(k.get("system")) or real_encode(self, *a, **k)
        first.generate(torch.zeros(8000), sample_rate=16000, max_new_tokens=1)
        second.generate(torch.zeros(8000), sample_rate=16000, max_new_tokens=1)
    finally:
        type(llm).encode = real_encode
    assert seen == ["Always answer in French.", None]


def test_training_keeps_its_system_prompt_off_the_shared_llm(tiny_llm_dir, tiny_whisper_dir):
    """AlignmentModule's prompt goes on its own LLM view; the data module's teacher gets it through the trainer."""
    from types import SimpleNamespace

    from paraencoder.errors import ConfigError
    from paraencoder.train.data import AlignmentData
    from paraencoder.train.module import AlignmentModule

    module = AlignmentModule(llm=str(tiny_llm_dir), encoder=str(tiny_whisper_dir), stack=2, projector_dim=32, system_prompt="Be kind.")
    shared = resolve_llm(str(tiny_llm_dir))
    assert shared.system_prompt is None
    assert module.llm.system_prompt == "Be kind." and module.adapter.llm.system_prompt == "Be kind."
    assert module.llm.model is shared.model
    data = AlignmentData(train_manifest="unused.jsonl", llm=str(tiny_llm_dir))
    assert data.system_prompt() is None
    data.trainer = SimpleNamespace(lightning_module=module)
    assert data.system_prompt() == "Be kind."
    other = AlignmentData(train_manifest="unused.jsonl", llm=str(tiny_llm_dir), system_prompt="Be rude.")
    other.trainer = SimpleNamespace(lightning_module=module)
    with pytest.raises(ConfigError, match="data.system_prompt='Be rude.' but model.system_prompt='Be kind.'"):
        other.system_prompt()


def test_loading_a_backbone_never_moves_the_global_rng(monkeypatch):
    """Same seed, same bytes, whatever is cached: a loader that converts (and so initialises a model
    randomly) leaves the seeded generator exactly where a cache hit leaves it."""
    from paraencoder.backbones import memoize as _memo

    def converting_loader():
        torch.nn.Linear(256, 256)  # what building a model before loading converted weights does
        return object()

    torch.manual_seed(0)
    _memo(("test-rng", object()), converting_loader)
    after_conversion = torch.rand(4)
    torch.manual_seed(0)
    assert torch.equal(after_conversion, torch.rand(4))
