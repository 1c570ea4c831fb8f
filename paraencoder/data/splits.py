"""Speaker-disjoint splits: a speaker's clips all land in one split, so test scores measure
generalisation to new voices, not memorised ones.
"""

from __future__ import annotations

import random
from collections import Counter, defaultdict
from typing import Iterable, Mapping, Sequence

from paraencoder.data.manifest import Utterance
from paraencoder.errors import ConfigError

__all__ = ["split_by_speaker", "ravdess_actor_split", "check_speaker_disjoint"]


def check_speaker_disjoint(splits: Mapping[str, Sequence[Utterance]]) -> None:
    """Raise :class:`ConfigError` if any speaker occurs in two splits."""
    owner: dict[str, str] = {}
    for name, utts in splits.items():
        for utt in utts:
            other = owner.setdefault(str(utt.speaker), name)
            if other != name:
                raise ConfigError(f"speaker {utt.speaker!r} is in both split {other!r} and {name!r}; splits must be speaker-disjoint")


def _group(utts: Sequence[Utterance]) -> dict[str, list[Utterance]]:
    groups: dict[str, list[Utterance]] = defaultdict(list)
    for utt in utts:
        if utt.speaker is None:
            raise ConfigError(f"utterance {utt.id!r} has no speaker; a speaker split needs every utterance's speaker")
        groups[utt.speaker].append(utt)
    return groups


def split_by_speaker(
    utts: Sequence[Utterance],
    spec: Mapping[str, float] | Mapping[str, Iterable[str]] = {"train": 0.8, "val": 0.1, "test": 0.1},
    seed: int = 0,
    *,
    stratify: str | None = None,
) -> dict[str, list[Utterance]]:
    """Split utterances by speaker, never by utterance.

    ``spec`` maps split names either to fractions (summing to 1; speakers are shuffled with
    ``seed`` and assigned greedily so that each split's share of *utterances* approaches its
    fraction) or to explicit speaker lists (every speaker must be listed exactly once).
    ``stratify="gender"`` (any string label field) deals speakers out per label value so each split
    gets a similar mix; speakers are grouped by their majority value of that label.
    Input order is kept within each split.
    """
    groups = _group(utts)
    values = list(spec.values())
    if not values:
        raise ConfigError("split_by_speaker: spec is empty")
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        fractions = {k: float(v) for k, v in spec.items()}
        if any(f < 0 for f in fractions.values()) or abs(sum(fractions.values()) - 1.0) > 1e-6:
            raise ConfigError(f"split_by_speaker: fractions must be >= 0 and sum to 1, got {fractions}")
        rng = random.Random(seed)
        speakers = sorted(groups)
        if stratify:
            strata: dict[object, list[str]] = defaultdict(list)
            for spk in speakers:
                counts = Counter(getattr(u, stratify) for u in groups[spk])
                strata[counts.most_common(1)[0][0]].append(spk)
            blocks = [strata[k] for k in sorted(strata, key=str)]
        else:
            blocks = [speakers]
        assignment: dict[str, str] = {}
        for block in blocks:
            rng.shuffle(block)
            total = sum(len(groups[s]) for s in block)
            filled = {k: 0 for k in fractions}
            for spk in block:
                # the split furthest below its target share of this block takes the next speaker
                name = max(fractions, key=lambda k: (fractions[k] * total - filled[k], fractions[k]))
                assignment[spk] = name
                filled[name] += len(groups[spk])
    else:
        assignment = {}
        for name, speakers_of in spec.items():
            if isinstance(speakers_of, (str, bytes)) or not isinstance(speakers_of, Iterable):
                raise ConfigError(f"split_by_speaker: split {name!r} must be a fraction or a list of speakers, got {speakers_of!r}")
            for spk in speakers_of:
                spk = str(spk)
                if spk in assignment:
                    raise ConfigError(f"split_by_speaker: speaker {spk!r} listed in both {assignment[spk]!r} and {name!r}")
                assignment[spk] = name
        missing = sorted(set(groups) - set(assignment))
        if missing:
            raise ConfigError(f"split_by_speaker: speakers {missing[:10]} are in no split; list every speaker (or use fractions)")
    out: dict[str, list[Utterance]] = {name: [] for name in spec}
    for utt in utts:
        out[assignment[utt.speaker]].append(utt)
    check_speaker_disjoint(out)
    return out


def ravdess_actor_split(
    utts: Sequence[Utterance], train: Iterable[int] = range(1, 17), test: Iterable[int] = range(17, 21), val: Iterable[int] = ()
) -> dict[str, list[Utterance]]:
    """The usual RAVDESS protocol: actors 1-16 train, 17-20 test (actor numbers as ints)."""
    spec: dict[str, list[str]] = {"train": [f"{a:02d}" for a in train], "test": [f"{a:02d}" for a in test]}
    val = list(val)
    if val:
        spec["val"] = [f"{a:02d}" for a in val]
    present = {u.speaker for u in utts}
    spec = {k: [s for s in v if s in present] for k, v in spec.items()}
    return split_by_speaker(utts, spec)
