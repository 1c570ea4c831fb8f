"""DualLevelHead: pooling, hand-computed losses, ignored labels, coarse-from-fine aggregation."""

from __future__ import annotations

import json
import math

import pytest
import torch

from paraencoder.errors import ConfigError
from paraencoder.objectives import DualLevelHead
from paraencoder.objectives.heads import masked_pool

torch.set_num_threads(2)

HIERARCHY = {
    "emotion": {
        "positive": ["happy", "calm", "surprised"],
        "negative": ["sad", "angry", "fearful", "disgust"],
        "neutral": ["neutral"],
    },
    "age_group": {"young": ["child", "teen"], "adult": ["adult", "senior"]},
}


def head(**kwargs) -> DualLevelHead:
    torch.manual_seed(0)
    return DualLevelHead(8, HIERARCHY, hidden_dim=16, **kwargs)


def ref_ce(logits_row: torch.Tensor, target: int) -> float:
    z = [float(x) for x in logits_row.detach()]
    m = max(z)
    return -(z[target] - m - math.log(sum(math.exp(x - m) for x in z)))


def test_label_vocab_and_output_shapes():
    h = head()
    vocab = h.label_vocab()
    json.dumps(vocab)  # JSON-ready for saving
    assert vocab["emotion"]["coarse"] == ["positive", "negative", "neutral"]
    assert vocab["emotion"]["fine"] == ["happy", "calm", "surprised", "sad", "angry", "fearful", "disgust", "neutral"]
    assert vocab["emotion"]["parent"] == [0, 0, 0, 1, 1, 1, 1, 2]
    out = h(torch.randn(3, 5, 8), torch.tensor([5, 2, 1]))
    assert out["emotion/coarse"].shape == (3, 3) and out["emotion/fine"].shape == (3, 8)
    assert out["age_group/coarse"].shape == (3, 2) and out["age_group/fine"].shape == (3, 4)


def test_masked_mean_pooling_ignores_padding():
    states = torch.arange(2 * 4 * 3, dtype=torch.float32).reshape(2, 4, 3)
    padded = states.clone()
    padded[0, 2:] = 1e6  # padding beyond length 2 must not matter
    pooled = masked_pool(padded, torch.tensor([2, 4]))
    torch.testing.assert_close(pooled[0], states[0, :2].mean(0))
    torch.testing.assert_close(pooled[1], states[1].mean(0))
    torch.testing.assert_close(masked_pool(padded, torch.tensor([2, 4]), "max")[0], states[0, 1])


def test_loss_equals_hand_computed_cross_entropy():
    h = head(coarse_weight=0.5, fine_weight=1.0)
    logits = h(torch.randn(3, 6, 8), torch.tensor([6, 4, 3]))
    labels = {"emotion": ["angry", "calm", "neutral"], "age_group": ["teen", "adult", "senior"]}
    total, parts = h.loss(logits, labels)
    ec, ef = logits["emotion/coarse"], logits["emotion/fine"]
    ac, af = logits["age_group/coarse"], logits["age_group/fine"]
    want_ef = (ref_ce(ef[0], 4) + ref_ce(ef[1], 1) + ref_ce(ef[2], 7)) / 3
    want_ec = (ref_ce(ec[0], 1) + ref_ce(ec[1], 0) + ref_ce(ec[2], 2)) / 3
    want_af = (ref_ce(af[0], 1) + ref_ce(af[1], 2) + ref_ce(af[2], 3)) / 3
    want_ac = (ref_ce(ac[0], 0) + ref_ce(ac[1], 1) + ref_ce(ac[2], 1)) / 3
    assert parts["emotion/fine"].item() == pytest.approx(want_ef, rel=1e-5)
    assert parts["emotion/coarse"].item() == pytest.approx(want_ec, rel=1e-5)
    assert parts["age_group/fine"].item() == pytest.approx(want_af, rel=1e-5)
    assert parts["age_group/coarse"].item() == pytest.approx(want_ac, rel=1e-5)
    want_total = 0.5 * (want_ec + want_ac) + 1.0 * (want_ef + want_af)
    assert total.item() == pytest.approx(want_total, rel=1e-5)


def test_none_unknown_and_missing_labels_are_ignored():
    h = head()
    logits = h(torch.randn(4, 3, 8), torch.tensor([3, 3, 2, 1]))
    ef, ec = logits["emotion/fine"], logits["emotion/coarse"]
    # None and an unknown string are skipped; a coarse-only label trains only the coarse classifier.
    total, parts = h.loss(logits, {"emotion": [None, "sad", "bored", "positive"]})
    assert parts["emotion/fine"].item() == pytest.approx(ref_ce(ef[1], 3), rel=1e-5)
    assert parts["emotion/coarse"].item() == pytest.approx((ref_ce(ec[1], 1) + ref_ce(ec[3], 0)) / 2, rel=1e-5)
    assert "age_group/fine" not in parts  # attribute missing from the batch contributes nothing
    assert total.item() == pytest.approx(0.5 * parts["emotion/coarse"].item() + parts["emotion/fine"].item(), rel=1e-6)
    # Nothing usable at all: exactly 0, finite, and backward still works.
    total, parts = h.loss(logits, {"emotion": [None, None, "bored", None], "age_group": [None] * 4})
    assert total.item() == 0.0 and all(p.item() == 0.0 for p in parts.values())
    total.backward()
    with pytest.raises(ConfigError, match="unknown attributes"):
        h.loss(logits, {"accent": ["x"] * 4})
    with pytest.raises(ConfigError, match="entries"):
        h.loss(logits, {"emotion": ["sad"]})


def test_gradient_reaches_the_states():
    h = head(consistency_weight=0.3)
    states = torch.randn(2, 5, 8, requires_grad=True)
    logits = h(states, torch.tensor([5, 3]))
    total, _ = h.loss(logits, {"emotion": ["happy", None]})
    total.backward()
    assert states.grad[0].abs().sum() > 0 and states.grad[1, :3].abs().sum() > 0
    assert states.grad[1, 3:].abs().sum() == 0  # padding frames get no gradient


def test_coarse_from_fine_sums_groups_and_consistency_is_the_kl():
    h = head(consistency_weight=2.0, coarse_weight=0.0, fine_weight=0.0)
    fine = torch.tensor([[1.0, 0.0, -1.0, 2.0, 0.5, 0.0, -2.0, 0.3]])
    p = torch.softmax(fine.double(), -1)[0]
    groups = [p[0:3].sum(), p[3:7].sum(), p[7]]
    got = h.coarse_from_fine(fine, "emotion").exp()[0]
    torch.testing.assert_close(got.double(), torch.stack(groups), rtol=1e-6, atol=1e-7)
    assert got.sum().item() == pytest.approx(1.0, abs=1e-6)
    # Consistency = KL(coarse || aggregated fine), weighted by consistency_weight.
    coarse = torch.tensor([[0.2, -0.4, 1.0]])
    logits = {"emotion/coarse": coarse, "emotion/fine": fine, "age_group/coarse": torch.zeros(1, 2), "age_group/fine": torch.zeros(1, 4)}
    total, parts = h.loss(logits, {})
    pc = torch.softmax(coarse.double(), -1)[0]
    agg = torch.stack(groups)
    want = float((pc * (pc / agg).log()).sum())
    assert parts["emotion/consistency"].item() == pytest.approx(want, rel=1e-5)
    # age_group: uniform coarse vs uniform fine summed into two equal groups -> KL 0.
    assert parts["age_group/consistency"].item() == pytest.approx(0.0, abs=1e-7)
    assert total.item() == pytest.approx(2.0 * want, rel=1e-5)


def test_bad_hierarchies_are_rejected():
    with pytest.raises(ConfigError, match="more than one"):
        DualLevelHead(4, {"emotion": {"a": ["x"], "b": ["x"]}})
    with pytest.raises(ConfigError, match="no fine classes"):
        DualLevelHead(4, {"emotion": {"a": []}})
    with pytest.raises(ConfigError, match="pooling"):
        DualLevelHead(4, HIERARCHY, pooling="attention")
    with pytest.raises(ConfigError, match="empty"):
        DualLevelHead(4, {})
