"""Free-text replies → labels: which emotion, age group, gender or sentiment a reply names.

The frozen LLM answers in sentences ("The speaker sounds quite upset."), so classification suites
need a parser. This one is a keyword/synonym table with three rules that matter in practice:

* **negation**: a keyword preceded (within its clause, up to 5 words back) by ``not``, ``n't``,
  ``no``, ``never``, ``without``, ``nor`` or ``neither`` does not count ("not happy, rather sad" → sad);
* **salience**: among the remaining matches the first one wins (replies name their answer early);
* **ambiguity**: two different labels joined only by ``or``/``and``/``/`` ("a child or an adult",
  the LLM echoing the question) give ``None``, which suites count as *unparsable*, never as right.

Label sets map raw labels onto the classes of a protocol, e.g. the 4-class cross-corpus set
(angry/happy/sad/neutral, with calm → neutral and excited → happy).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Mapping

from paraencoder.errors import ConfigError

__all__ = [
    "EMOTIONS",
    "EMOTION_PATTERNS",
    "AGE_PATTERNS",
    "GENDER_PATTERNS",
    "SENTIMENT_OF_EMOTION",
    "LabelSet",
    "LABEL_SETS",
    "extract_label",
    "extract_emotion",
    "extract_age_group",
    "extract_gender",
    "extract_sentiment",
    "map_label",
    "get_label_set",
]

EMOTIONS = ("neutral", "calm", "happy", "sad", "angry", "fearful", "disgust", "surprised")
"""The 8 RAVDESS classes, the canonical output of :func:`extract_emotion`."""

# Regex fragments (matched at a word start, case-insensitive). Order inside a list does not matter:
# the earliest match in the text wins.
EMOTION_PATTERNS: dict[str, tuple[str, ...]] = {
    "neutral": (
        r"neutral", r"indifferent", r"unemotional", r"matter[- ]of[- ]fact", r"emotionless", r"impassive",
        r"no (?:particular|strong|clear|specific) (?:emotion|feeling)", r"even(?:-toned)? (?:tone|voice)",
    ),
    "calm": (r"calm(?:ly|ness)?\b", r"relaxed", r"peaceful", r"serene", r"composed", r"tranquil", r"at ease", r"soothing", r"gentle\b"),
    "happy": (
        r"happ(?:y|ier|iness|ily)", r"cheerful", r"joy(?:ful|ous)?\b", r"glad\b", r"delighted", r"excited", r"excitement",
        r"pleased", r"elated", r"thrilled", r"upbeat", r"enthusiastic", r"amused", r"cheery", r"jolly",
        r"overjoyed", r"ecstatic", r"in a good mood",
    ),
    "sad": (
        r"sad(?:ly|ness|der)?\b", r"unhappy", r"sorrow(?:ful)?", r"depressed", r"melanchol", r"gloomy", r"miserable",
        r"heartbroken", r"tearful", r"crying", r"grie(?:f|ving)", r"downcast", r"feeling down", r"upset", r"disappointed",
        r"dejected", r"despair", r"mournful",
    ),
    "angry": (
        r"angr(?:y|ily|ier)", r"anger\b", r"mad\b", r"furious", r"irritated", r"annoyed", r"frustrat", r"irate",
        r"enraged", r"hostile", r"outraged", r"rage\b", r"livid", r"agitated", r"aggressive", r"resentful",
    ),
    "fearful": (
        r"fear(?:ful)?\b", r"afraid", r"scared", r"frighten", r"terrified", r"anxious", r"anxiety", r"nervous",
        r"worried", r"panic", r"alarmed", r"uneasy", r"apprehensive",
    ),
    "disgust": (r"disgust", r"revolted", r"repulsed", r"repelled", r"grossed out", r"gross\b", r"repugnan", r"sickened", r"contempt"),
    "surprised": (r"surpris", r"astonish", r"amazed", r"shocked", r"startled", r"stunned", r"taken aback", r"astounded"),
}

AGE_PATTERNS: dict[str, tuple[str, ...]] = {
    "child": (
        r"child(?:ren)?\b", r"kids?\b", r"boy\b", r"girl\b", r"toddler", r"little one", r"young child", r"minor\b",
        r"youngster", r"teen(?:ager)?s?\b", r"adolescent", r"juvenile", r"young (?:boy|girl|person|speaker)",
    ),
    "adult": (
        r"adults?\b", r"grown[- ]?ups?\b", r"grownup", r"\bman\b", r"woman\b", r"men\b", r"women\b", r"lady\b", r"gentleman",
        r"elderly", r"older (?:person|man|woman|speaker)", r"middle[- ]aged", r"mature\b", r"senior\b",
    ),
}

GENDER_PATTERNS: dict[str, tuple[str, ...]] = {
    "male": (r"male\b", r"\bman\b", r"men\b", r"boy\b", r"gentleman", r"masculine", r"guy\b"),
    "female": (r"female\b", r"woman\b", r"women\b", r"girl\b", r"lady\b", r"feminine"),
}
# Pronouns are weak evidence: only used when no explicit word matched.
_GENDER_PRONOUNS: dict[str, tuple[str, ...]] = {"male": (r"he\b", r"him\b", r"his\b"), "female": (r"she\b", r"her\b", r"hers\b")}

SENTIMENT_OF_EMOTION: dict[str, str] = {
    "neutral": "neutral",
    "calm": "neutral",
    "happy": "positive",
    "surprised": "positive",
    "excited": "positive",
    "sad": "negative",
    "angry": "negative",
    "fearful": "negative",
    "disgust": "negative",
    "frustrated": "negative",
    "bored": "neutral",
    "contempt": "negative",
}
"""Coarse polarity of each emotion (used to compare replies that react to an emotion without naming it)."""

# Reactions rather than names: "I'm sorry to hear that" reacts to a negative state.
_SENTIMENT_PATTERNS: dict[str, tuple[str, ...]] = {
    "negative": (
        r"sorry", r"that'?s (?:tough|hard|awful|terrible)", r"difficult", r"hard time", r"calm down", r"take a deep breath",
        r"it'?s okay to feel", r"i understand (?:how|that|you)", r"here for you", r"unfortunately", r"terrible", r"awful",
        r"don'?t worry", r"must be hard", r"frustrating", r"stressful",
    ),
    "positive": (
        r"great\b", r"wonderful", r"congratulat", r"awesome", r"fantastic", r"good news", r"glad to hear", r"exciting",
        r"that'?s amazing", r"love\b", r"nice\b", r"excellent", r"brilliant", r"yay\b",
    ),
}

_NEGATORS = re.compile(r"\b(?:not|no|never|without|nor|neither|hardly|isn't|aren't|wasn't|doesn't|don't|didn't|cannot|can't)\b|n't\b")
_NOT_NEGATING = re.compile(r"\bno (?:doubt|question)\b|\bnot only\b")
_CLAUSE_BREAK = re.compile(r"[.;:!?,]|\b(?:but|rather|instead|though|although|however)\b")
# Alternatives ("child or adult") echo a question: ambiguous. A conjunction ("angry and upset")
# describes one state with its most salient word first, so "and" does not make a reply ambiguous.
_JOINER = re.compile(r"^\W*(?:or|and/or|/|nor)\W*(?:an?\s+|the\s+)?\W*$")


def _compile(table: Mapping[str, tuple[str, ...]]) -> list[tuple[str, re.Pattern]]:
    return [(label, re.compile(r"(?<![\w-])(?:" + "|".join(p.removeprefix(r"\b") for p in pats) + ")", re.IGNORECASE)) for label, pats in table.items()]


_COMPILED: dict[int, list[tuple[str, re.Pattern]]] = {}


def _patterns(table: Mapping[str, tuple[str, ...]]) -> list[tuple[str, re.Pattern]]:
    key = id(table)
    if key not in _COMPILED:
        _COMPILED[key] = _compile(table)
    return _COMPILED[key]


def _negated(text: str, start: int) -> bool:
    """True when a negator occurs in the same clause within 5 words before ``start``."""
    before = text[:start].lower()
    clause = _CLAUSE_BREAK.split(before)[-1]
    words = " ".join(clause.split()[-5:])
    return bool(_NEGATORS.search(_NOT_NEGATING.sub(" ", words)))


def _matches(text: str, table: Mapping[str, tuple[str, ...]]) -> list[tuple[int, int, str]]:
    found = []
    for label, pattern in _patterns(table):
        for m in pattern.finditer(text):
            if not _negated(text, m.start()):
                found.append((m.start(), m.end(), label))
    # Longest match first at equal starts, so "young child" beats nothing and "man" inside "woman" never fires.
    found.sort(key=lambda t: (t[0], -(t[1] - t[0])))
    return found


def extract_label(text: str | None, table: Mapping[str, tuple[str, ...]]) -> str | None:
    """The first non-negated label of ``table`` named in ``text``; ``None`` if none or ambiguous.

    Ambiguous = the first two distinct labels are joined only by "or"/"/" (an echo of the
    question, "child or adult"), and nothing before them decides. With "and" the first wins.
    """
    if not text:
        return None
    found = _matches(text, table)
    if not found:
        return None
    first = found[0]
    for start, _end, label in found[1:]:
        if label == first[2]:
            continue
        if _JOINER.match(text[first[1] : start]):
            return None
        break
    return first[2]


def extract_emotion(text: str | None) -> str | None:
    """One of :data:`EMOTIONS` named in a free-text reply, or ``None``.

    >>> extract_emotion("The speaker sounds sad and tired.")
    'sad'
    >>> extract_emotion("They are not happy at all; they seem angry.")
    'angry'
    """
    return extract_label(text, EMOTION_PATTERNS)


def extract_age_group(text: str | None) -> str | None:
    """``"child"`` or ``"adult"`` named in a reply (teenagers count as children), else ``None``."""
    return extract_label(text, AGE_PATTERNS)


def extract_gender(text: str | None) -> str | None:
    """``"male"`` or ``"female"`` named in a reply; pronouns (he/she) only when no explicit word is found."""
    return extract_label(text, GENDER_PATTERNS) or extract_label(text, _GENDER_PRONOUNS)


def extract_sentiment(text: str | None) -> str | None:
    """Coarse polarity of a reply: from a named emotion if any, else from reaction phrases, else ``"neutral"``.

    ``None`` only for an empty reply.
    """
    if not text or not text.strip():
        return None
    emotion = extract_emotion(text)
    if emotion is not None:
        return SENTIMENT_OF_EMOTION[emotion]
    return extract_label(text, _SENTIMENT_PATTERNS) or "neutral"


@dataclass(frozen=True)
class LabelSet:
    """The classes of an evaluation protocol and how raw labels map onto them (unmapped → excluded)."""

    name: str
    classes: tuple[str, ...]
    mapping: dict[str, str] = field(default_factory=dict)

    def map(self, label: str | None) -> str | None:
        if label is None:
            return None
        label = label.strip().lower()
        if label in self.classes:
            return label
        return self.mapping.get(label)


LABEL_SETS: dict[str, LabelSet] = {
    "emotion8": LabelSet("emotion8", EMOTIONS, {"anger": "angry", "fear": "fearful", "surprise": "surprised", "disgusted": "disgust", "joy": "happy", "sadness": "sad"}),
    # The usual IEMOCAP-style cross-corpus protocol; fear/disgust/surprise have no class and are excluded.
    "emotion4": LabelSet(
        "emotion4",
        ("angry", "happy", "sad", "neutral"),
        {"calm": "neutral", "excited": "happy", "joy": "happy", "anger": "angry", "frustrated": "angry", "sadness": "sad", "bored": "neutral"},
    ),
    "sentiment": LabelSet("sentiment", ("positive", "negative", "neutral"), dict(SENTIMENT_OF_EMOTION)),
    "age": LabelSet("age", ("child", "adult"), {"teen": "child", "teenager": "child", "kid": "child", "elderly": "adult", "senior": "adult"}),
    "gender": LabelSet("gender", ("male", "female"), {"m": "male", "man": "male", "f": "female", "woman": "female"}),
}
"""Named label sets: ``emotion8`` (RAVDESS), ``emotion4`` (cross-corpus), ``sentiment``, ``age``, ``gender``."""


def get_label_set(label_set: str | LabelSet) -> LabelSet:
    if isinstance(label_set, LabelSet):
        return label_set
    if label_set not in LABEL_SETS:
        raise ConfigError(f"unknown label set {label_set!r}; available: {sorted(LABEL_SETS)}")
    return LABEL_SETS[label_set]


def map_label(label: str | None, label_set: str | LabelSet) -> str | None:
    """Map a raw label into ``label_set``'s classes; ``None`` when it has no class there.

    >>> map_label("calm", "emotion4"), map_label("fearful", "emotion4")
    ('neutral', None)
    """
    return get_label_set(label_set).map(label)


_YES = re.compile(r"^\W*(?:yes|yeah|yep|correct|indeed|absolutely|certainly|definitely)\b", re.IGNORECASE)
_NO = re.compile(r"^\W*(?:no|nope|not really|not at all)\b", re.IGNORECASE)

EXTRACTORS = {"emotion": extract_emotion, "age_group": extract_age_group, "gender": extract_gender}
"""Label field → the parser that reads that attribute from a free-text reply."""


def extract_yes_no(text: str | None) -> str | None:
    """``"yes"`` / ``"no"`` when a reply opens with one (``"Yes, the speaker sounds sad."``), else ``None``."""
    if not text:
        return None
    if _YES.search(text):
        return "yes"
    if _NO.search(text):
        return "no"
    return None


def _implied_yes_no(attribute: str, reply: str | None, candidate: str | None) -> str | None:
    """A yes/no answer given as a statement: "The speaker is not sad." (no), "The speaker is angry." (yes).

    The class the reply names (negated mentions do not count) decides: the candidate means yes,
    another class means no; a reply naming none but negating the candidate means no.
    """
    if not reply or not candidate:
        return None
    named = EXTRACTORS[attribute](reply)
    if named is not None:
        return "yes" if named == candidate else "no"
    table = {"emotion": EMOTION_PATTERNS, "age_group": AGE_PATTERNS, "gender": GENDER_PATTERNS}[attribute]
    text = reply.lower()
    for label, pattern in _patterns(table):
        if label == candidate and any(_negated(text, m.start()) for m in pattern.finditer(text)):
            return "no"
    return None


def score_answer(attribute: str, form: str, reply: str | None, label: str, candidate: str | None = None) -> tuple[str | None, bool]:
    """``(parsed answer, correct)`` for a reply to a question-bank question about ``attribute``.

    Naming formats (word, sentence, open, choice) parse the class the reply names; ``yesno`` parses
    yes/no and is correct when it agrees with ``candidate == label``. An unparsed reply is never correct.
    """
    if form == "yesno":
        answer = extract_yes_no(reply) or _implied_yes_no(attribute, reply, candidate)
        return answer, answer is not None and (answer == "yes") == (candidate == label)
    lset = {"emotion": "emotion8", "age_group": "age", "gender": "gender"}[attribute]
    raw = EXTRACTORS[attribute](reply)
    pred = map_label(raw, lset) if raw is not None else None
    return pred, pred is not None and pred == map_label(label, lset)
