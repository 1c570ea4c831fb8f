"""Speaker splits, length bucketing (padding, DDP, resumption), label balancing, streaming shards."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
import torch

from conftest import shared_data_or_skip
from paraencoder.data.manifest import Utterance, load_manifest
from paraencoder.data.sampling import LabelBalancedSampler, LengthBucketSampler, ShardedManifestIterable, padding_waste
from paraencoder.data.splits import check_speaker_disjoint, ravdess_actor_split, split_by_speaker
from paraencoder.errors import ConfigError


def _utts(n_speakers=20, per=10, seed=0):
    rng = np.random.default_rng(seed)
    return [
        Utterance(f"s{s}-{i}", "x.wav", speaker=f"s{s:02d}", gender="male" if s % 2 else "female", emotion=["happy", "sad"][i % 2], duration=float(rng.uniform(1, 8)))
        for s in range(n_speakers)
        for i in range(per + (s % 3))
    ]


def test_split_by_fraction_is_speaker_disjoint_and_seeded():
    utts = _utts()
    a = split_by_speaker(utts, {"train": 0.8, "val": 0.1, "test": 0.1}, seed=3)
    assert sum(len(v) for v in a.values()) == len(utts)
    check_speaker_disjoint(a)
    shares = {k: len(v) / len(utts) for k, v in a.items()}
    assert shares["train"] == pytest.approx(0.8, abs=0.06) and shares["test"] == pytest.approx(0.1, abs=0.06)
    b = split_by_speaker(utts, {"train": 0.8, "val": 0.1, "test": 0.1}, seed=3)
    assert {k: [u.id for u in v] for k, v in a.items()} == {k: [u.id for u in v] for k, v in b.items()}
    c = split_by_speaker(utts, {"train": 0.8, "val": 0.1, "test": 0.1}, seed=4)
    assert {u.speaker for u in c["test"]} != {u.speaker for u in a["test"]}


def test_split_stratified_by_gender():
    utts = _utts()
    out = split_by_speaker(utts, {"train": 0.5, "test": 0.5}, seed=0, stratify="gender")
    for part in out.values():
        genders = Counter(u.speaker for u in part if u.gender == "male"), Counter(u.speaker for u in part if u.gender == "female")
        assert len(genders[0]) == len(genders[1]) == 5


def test_split_explicit_and_errors():
    utts = _utts(4, 2)
    out = split_by_speaker(utts, {"train": ["s00", "s01", "s02"], "test": ["s03"]})
    assert {u.speaker for u in out["test"]} == {"s03"}
    with pytest.raises(ConfigError, match="in no split"):
        split_by_speaker(utts, {"train": ["s00"], "test": ["s03"]})
    with pytest.raises(ConfigError, match="both"):
        split_by_speaker(utts, {"train": ["s00", "s01", "s02", "s03"], "test": ["s03"]})
    with pytest.raises(ConfigError, match="sum to 1"):
        split_by_speaker(utts, {"train": 0.7, "test": 0.1})
    with pytest.raises(ConfigError, match="no speaker"):
        split_by_speaker([Utterance("a", "x")], {"all": 1.0})
    with pytest.raises(ConfigError, match="both split"):
        check_speaker_disjoint({"a": [Utterance("1", "x", speaker="p")], "b": [Utterance("2", "x", speaker="p")]})


def test_ravdess_actor_split():
    utts = [Utterance(f"{a}-{i}", "x", speaker=f"{a:02d}") for a in range(1, 21) for i in range(3)]
    out = ravdess_actor_split(utts)
    assert {u.speaker for u in out["test"]} == {"17", "18", "19", "20"} and len(out["train"]) == 48


def test_bucketing_bounds_padding_and_covers_everything():
    durations = list(np.random.default_rng(0).uniform(0.5, 12.0, 500))
    s = LengthBucketSampler(durations, batch_size=8, max_padding_ratio=0.1, seed=1)
    batches = list(s)
    assert sorted(i for b in batches for i in b) == list(range(500))
    assert all(max(durations[i] for i in b) <= 1.1 * min(durations[i] for i in b) + 1e-9 for b in batches)
    g = torch.Generator().manual_seed(0)
    random_batches = [p.tolist() for p in torch.randperm(500, generator=g).split(8)]
    assert padding_waste(batches, durations) < 0.05 < 0.5 < padding_waste(random_batches, durations)
    assert padding_waste([[0]], durations) == 0.0


def test_bucketing_max_seconds_and_epochs():
    durations = list(np.random.default_rng(1).uniform(1, 10, 300))
    s = LengthBucketSampler(durations, max_seconds=40.0, seed=0)
    e0 = list(s)
    assert all(max(durations[i] for i in b) * len(b) <= 40.0 or len(b) == 1 for b in e0)
    e1 = list(s)  # a finished pass advances the epoch
    assert e0 != e1 and sorted(map(tuple, e0)) != [] and s.epoch == 2
    s.set_epoch(0)
    assert list(s) == e0
    assert LengthBucketSampler(durations, max_tokens=2000, tokens_per_second=50.0, seed=0).batches() == e0
    with pytest.raises(ConfigError):
        LengthBucketSampler(durations)
    with pytest.raises(ConfigError, match="positive"):
        LengthBucketSampler([1.0, 0.0], batch_size=2)


def test_bucketing_ddp_ranks_partition_equally():
    durations = list(np.random.default_rng(2).uniform(1, 10, 101))
    ranks = [LengthBucketSampler(durations, batch_size=4, seed=5, num_replicas=3, rank=r) for r in range(3)]
    lists = [r.batches() for r in ranks]
    assert len({len(x) for x in lists}) == 1 and len(ranks[0]) == len(lists[0])
    seen = [i for x in lists for b in x for i in b]
    assert set(seen) == set(range(101))
    dropped = [LengthBucketSampler(durations, batch_size=4, seed=5, num_replicas=3, rank=r, drop_last=True).batches() for r in range(3)]
    flat = [i for x in dropped for b in x for i in b]
    assert len(flat) == len(set(flat))  # no repeats with drop_last
    with pytest.raises(ConfigError, match="rank"):
        LengthBucketSampler(durations, batch_size=4, num_replicas=2, rank=2)


def test_bucketing_resumes_mid_epoch():
    durations = list(np.random.default_rng(3).uniform(1, 10, 200))
    ref = LengthBucketSampler(durations, batch_size=6, seed=9)
    ref.set_epoch(2)
    full = list(ref)
    s = LengthBucketSampler(durations, batch_size=6, seed=9)
    s.set_epoch(2)
    it = iter(s)
    head = [next(it) for _ in range(7)]
    state = s.state_dict()
    assert state["batches_yielded"] == 7 and state["epoch"] == 2
    fresh = LengthBucketSampler(durations, batch_size=6, seed=9)
    fresh.load_state_dict(json.loads(json.dumps(state)))
    assert head + list(fresh) == full
    assert fresh.epoch == 3
    with pytest.raises(ConfigError, match="seed"):
        LengthBucketSampler(durations, batch_size=6, seed=1).load_state_dict(state)


def test_label_balanced_sampler():
    labels = ["neutral"] * 900 + ["angry"] * 90 + ["sad"] * 10
    s = LabelBalancedSampler(labels, num_samples=30000, seed=0)
    counts = Counter(labels[i] for i in s)
    assert all(abs(c / 30000 - 1 / 3) < 0.02 for c in counts.values())
    s.set_epoch(0)
    assert list(s)[:50] == list(LabelBalancedSampler(labels, num_samples=30000, seed=0))[:50]
    state = s.state_dict()
    other = LabelBalancedSampler(labels, num_samples=30000, seed=0)
    other.load_state_dict(state)
    assert list(other)[:20] == list(s)[:20]


def test_sharded_manifest_stream(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text("".join(json.dumps({"id": f"u{i}", "audio": "x.wav"}) + "\n" for i in range(103)))
    world = [ShardedManifestIterable(path, rank=r, world_size=2) for r in range(2)]
    got = [[u.id for u in ds] for ds in world]
    assert got[0] == [f"u{i}" for i in range(0, 103, 2)] and got[1] == [f"u{i}" for i in range(1, 103, 2)]
    # two DataLoader workers per rank: 4 shards in all, each item exactly once
    ids = []
    for r in range(2):
        ds = ShardedManifestIterable(path, rank=r, world_size=2, transform=lambda u: u.id)
        loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2)
        ids.extend(loader)
    assert sorted(ids) == sorted(f"u{i}" for i in range(103))


@pytest.mark.integration
def test_shared_bucketing_waste():
    durations = [u.duration for u in load_manifest(shared_data_or_skip("ravdess") / "metadata.jsonl")]
    bucketed = LengthBucketSampler(durations, batch_size=16, seed=0).batches()
    plain = [p.tolist() for p in torch.randperm(len(durations), generator=torch.Generator().manual_seed(0)).split(16)]
    # RAVDESS clips are all 3-5 s, so random batching wastes only ~19 %; buckets cap it at the 20 % ratio and halve it
    assert padding_waste(bucketed, durations) < min(0.2, padding_waste(plain, durations) / 2)
