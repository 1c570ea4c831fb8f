"""Response objectives: each checked against an independent float64 reference written here."""

from __future__ import annotations

import math
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from paraencoder.errors import ConfigError
from paraencoder.objectives import (
    GeneralizedJSD,
    ObjectiveMix,
    ResponseCE,
    ResponseKL,
    chunked_token_loss,
    generalized_jsd,
    response_ce_from_logits,
    topk_approximation_error,
    topk_teacher_logits,
)

torch.set_num_threads(2)


# -- independent references (explicit sums in float64, no library softmax) -------------------------
def ref_log_softmax(z: torch.Tensor) -> torch.Tensor:
    z = z.double()
    m = z.max(dim=-1, keepdim=True).values
    return z - m - torch.log(torch.exp(z - m).sum(dim=-1, keepdim=True))


def ref_kl(log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """sum_v a_v (log a_v - log b_v) per row."""
    a = torch.exp(log_a)
    return (a * (log_a - log_b)).sum(dim=-1)


def ref_jsd(student: torch.Tensor, teacher: torch.Tensor, beta: float, t: float) -> torch.Tensor:
    """Per-row generalized JSD, written from the definition."""
    log_q = ref_log_softmax(student.double() / t)
    log_p = ref_log_softmax(teacher.double() / t)
    if beta == 0:
        return ref_kl(log_p, log_q)
    if beta == 1:
        return ref_kl(log_q, log_p)
    m = beta * torch.exp(log_p) + (1 - beta) * torch.exp(log_q)
    log_m = torch.log(m)
    return beta * ref_kl(log_p, log_m) + (1 - beta) * ref_kl(log_q, log_m)


def make(n=10, h=6, v=13, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g, dtype=torch.float64) * scale
    weight = torch.randn(v, h, generator=g, dtype=torch.float64)
    teacher = torch.randn(n, h, generator=g, dtype=torch.float64) * scale
    return hidden, weight, teacher


# -- chunked helper -----------------------------------------------------------------------------------
def test_chunked_helper_matches_unchunked_and_slices_per_token_tensors():
    hidden, weight, _ = make(n=11)
    extra = torch.arange(11, dtype=torch.float64)

    def fn(logits, e):
        return logits.logsumexp(-1) * e

    full = fn(hidden @ weight.T, extra)
    for chunk in (1, 4, 11, 50):
        out = chunked_token_loss(fn, hidden, weight, None, extra, chunk_size=chunk)
        assert out.shape == (11,)
        torch.testing.assert_close(out, full)


def test_chunked_helper_rejects_bad_shapes():
    hidden, weight, _ = make()
    with pytest.raises(ConfigError, match="chunk_size"):
        chunked_token_loss(lambda z: z.sum(-1), hidden, weight, None, chunk_size=0)
    with pytest.raises(ConfigError, match=r"weight \[V, H\]"):
        chunked_token_loss(lambda z: z.sum(-1), hidden, weight[:, :3], None)
    with pytest.raises(ConfigError, match="must align"):
        chunked_token_loss(lambda z, e: z.sum(-1), hidden, weight, None, torch.zeros(3))


# -- cross-entropy ------------------------------------------------------------------------------------
def test_ce_hand_computed_two_tokens_vocab_three():
    # Logits written so that the log-softmax is easy by hand.
    # row 0: logits (0, 0, 0)           -> log p = -ln 3 for every class; target 2 -> loss ln 3 = 1.098612
    # row 1: logits (ln 1, ln 2, ln 5)  -> p = (1/8, 2/8, 5/8); target 1 -> loss ln 4 = 1.386294
    logits = torch.tensor([[0.0, 0.0, 0.0], [0.0, math.log(2.0), math.log(5.0)]], dtype=torch.float64)
    # hidden = logits, weight = identity gives exactly these logits.
    weight = torch.eye(3, dtype=torch.float64)
    targets = torch.tensor([2, 1])
    loss = ResponseCE()(logits, weight, targets)
    assert loss.item() == pytest.approx((1.0986122886681098 + 1.3862943611198906) / 2, abs=1e-12)
    summed = ResponseCE(reduction="sum")(logits, weight, targets)
    assert summed.item() == pytest.approx(1.0986122886681098 + 1.3862943611198906, abs=1e-12)
    # token_weight (0, 1) keeps only row 1: weighted mean = ln 4.
    weighted = ResponseCE()(logits, weight, targets, token_weight=torch.tensor([0.0, 1.0]))
    assert weighted.item() == pytest.approx(1.3862943611198906, abs=1e-12)


@pytest.mark.parametrize("chunk", [1, 3, 64])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_ce_equals_torch_cross_entropy_with_masking(chunk, smoothing):
    hidden, weight, _ = make(n=17, v=29, seed=1)
    bias = torch.randn(29, dtype=torch.float64)
    targets = torch.randint(0, 29, (17,), generator=torch.Generator().manual_seed(2))
    targets[[0, 5, 6]] = -100
    h1 = hidden.clone().requires_grad_(True)
    got = ResponseCE(chunk_size=chunk, label_smoothing=smoothing)(h1, weight, targets, bias=bias)
    got.backward()
    h2 = hidden.clone().requires_grad_(True)
    want = F.cross_entropy(h2 @ weight.T + bias, targets, ignore_index=-100, label_smoothing=smoothing)
    want.backward()
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(h1.grad, h2.grad, rtol=1e-10, atol=1e-10)
    assert h1.grad[[0, 5, 6]].abs().max() == 0  # masked positions get no gradient


def test_ce_all_masked_is_zero_not_nan_and_bad_ids_are_named():
    hidden, weight, _ = make(n=4)
    h = hidden.clone().requires_grad_(True)
    loss = ResponseCE()(h, weight, torch.full((4,), -100))
    loss.backward()
    assert loss.item() == 0.0 and torch.isfinite(h.grad).all()
    with pytest.raises(ConfigError, match="outside"):
        ResponseCE()(hidden, weight, torch.tensor([0, 1, 99, 2]))


def test_response_ce_from_logits_shifts_and_masks():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 5, 7, generator=g)
    labels = torch.tensor([[-100, -100, 3, 4, 1], [-100, 2, 6, -100, -100]])
    # Explicit: position t predicts labels[t + 1].
    terms = []
    for b in range(2):
        for t in range(4):
            y = int(labels[b, t + 1])
            if y != -100:
                terms.append(-ref_log_softmax(logits[b, t])[y])
    want = torch.stack(terms).mean()
    got = response_ce_from_logits(logits, labels)
    assert got.item() == pytest.approx(want.item(), abs=1e-6)
    # And it agrees with the chunked module on the gathered positions.
    hidden, targets = logits[:, :-1][labels[:, 1:] != -100], labels[:, 1:][labels[:, 1:] != -100]
    assert ResponseCE(chunk_size=2)(hidden, torch.eye(7), targets).item() == pytest.approx(want.item(), abs=1e-6)


# -- KL ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("direction", ["forward", "reverse"])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_kl_equals_float64_reference_on_fixed_logits(direction, temperature):
    hidden, weight, teacher = make(n=9, v=11, seed=4)
    s_logits, t_logits = hidden @ weight.T, teacher @ weight.T
    log_q, log_p = ref_log_softmax(s_logits / temperature), ref_log_softmax(t_logits / temperature)
    rows = ref_kl(log_p, log_q) if direction == "forward" else ref_kl(log_q, log_p)
    want = rows.mean() * temperature**2
    for kwargs in ({"teacher_hidden": teacher}, {"teacher_logits": t_logits}, {"teacher_hidden": teacher, "teacher_weight": weight}):
        got = ResponseKL(temperature=temperature, chunk_size=4, direction=direction)(hidden, weight, **kwargs)
        assert got.item() == pytest.approx(want.item(), rel=1e-10)


def test_kl_teacher_head_can_differ_and_gets_no_gradient():
    hidden, weight, teacher = make(n=6, v=8, seed=5)
    t_weight = torch.randn(8, 6, dtype=torch.float64, requires_grad=True)
    th = teacher.clone().requires_grad_(True)
    h = hidden.clone().requires_grad_(True)
    got = ResponseKL(chunk_size=2)(h, weight, teacher_hidden=th, teacher_weight=t_weight)
    got.backward()
    want = ref_kl(ref_log_softmax(teacher @ t_weight.detach().T), ref_log_softmax(hidden @ weight.T)).mean()
    assert got.item() == pytest.approx(want.item(), rel=1e-10)
    assert th.grad is None and t_weight.grad is None and h.grad.abs().sum() > 0


def test_topk_with_k_equal_v_is_the_full_kl():
    hidden, weight, teacher = make(n=8, v=12, seed=6)
    values, indices = topk_teacher_logits(teacher, weight, k=12, chunk_size=3)
    assert values.dtype == torch.float16 and indices.shape == (8, 12)
    assert (values[:, 0] == 0).all()  # stored relative to the row max
    full = ResponseKL(temperature=1.5)(hidden, weight, teacher_hidden=teacher)
    approx = ResponseKL(temperature=1.5, chunk_size=5)(hidden, weight, teacher_topk=(values, indices))
    # Only float16 rounding of the cached logits separates them.
    assert approx.item() == pytest.approx(full.item(), rel=2e-3)


def test_topk_matches_its_documented_formula():
    hidden, weight, teacher = make(n=5, v=20, seed=7)
    values, indices = topk_teacher_logits(teacher, weight, k=4)
    log_q = ref_log_softmax(hidden @ weight.T)
    log_pk = ref_log_softmax(values.double())
    want = (torch.exp(log_pk) * (log_pk - log_q.gather(1, indices.long()))).sum(-1).mean()
    got = ResponseKL(topk_mode="teacher")(hidden, weight, teacher_topk=(values, indices))
    assert got.item() == pytest.approx(want.item(), rel=1e-10)


def test_topk_both_mode_is_the_kl_between_renormalised_distributions():
    hidden, weight, teacher = make(n=5, v=20, seed=7)
    values, indices = topk_teacher_logits(teacher, weight, k=4)
    log_pk = ref_log_softmax(values.double() / 2.0)
    # The student's distribution restricted to the k ids, at T = 2.
    log_q2 = ref_log_softmax((hidden @ weight.T / 2.0).gather(1, indices.long()))
    want = 4.0 * (torch.exp(log_pk) * (log_pk - log_q2)).sum(-1).mean()
    got = ResponseKL(temperature=2.0, topk_mode="both")(hidden, weight, teacher_topk=(values, indices))
    assert got.item() == pytest.approx(want.item(), rel=1e-10)
    # Zero when the student equals the teacher, unlike "teacher" mode (which keeps -log(top-k mass)).
    same = ResponseKL()(teacher, weight, teacher_topk=(values.double(), indices))
    assert abs(same.item()) < 1e-3
    assert ResponseKL(topk_mode="teacher")(teacher, weight, teacher_topk=(values.double(), indices)).item() > 0.01


def test_topk_error_shrinks_as_k_grows():
    hidden, weight, teacher = make(n=24, h=16, v=300, seed=8, scale=0.6)
    reports = [topk_approximation_error(hidden, weight, teacher, k) for k in (5, 50, 150, 300)]
    assert set(reports[0]) == {"k", "full_kl", "topk_kl", "abs_error", "rel_error", "teacher_mass", "grad_cosine"}
    errors = [r["abs_error"] for r in reports]
    masses = [r["teacher_mass"] for r in reports]
    assert errors[0] > errors[1] > errors[2] > errors[3]
    assert 0 < masses[0] < masses[1] < masses[2] < masses[3] == pytest.approx(1.0, abs=1e-6)
    assert errors[3] < 1e-3 * reports[3]["full_kl"]
    assert reports[0]["grad_cosine"] < reports[3]["grad_cosine"] and reports[3]["grad_cosine"] > 0.999


def test_kl_argument_errors():
    hidden, weight, teacher = make()
    with pytest.raises(ConfigError, match="exactly one"):
        ResponseKL()(hidden, weight)
    with pytest.raises(ConfigError, match="direction"):
        ResponseKL(direction="sideways")
    topk = topk_teacher_logits(teacher, weight, 3)
    with pytest.raises(ConfigError, match="forward"):
        ResponseKL(direction="reverse")(hidden, weight, teacher_topk=topk)


# -- generalized JSD ---------------------------------------------------------------------------------
BETAS = [0.0, 0.1, 0.5, 0.9, 1.0]
TEMPS = [1.0, 1.2, 2.0]


@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("temperature", TEMPS)
def test_jsd_equals_float64_reference(beta, temperature):
    g = torch.Generator().manual_seed(9)
    student, teacher = torch.randn(3, 4, 17, generator=g) * 3, torch.randn(3, 4, 17, generator=g) * 3
    want = ref_jsd(student, teacher, beta, temperature)
    got = generalized_jsd(student, teacher, beta=beta, temperature=temperature, reduction="none")
    assert got.shape == (3, 4)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    assert generalized_jsd(student, teacher, beta, temperature).item() == pytest.approx(want.mean().item(), rel=1e-5)
    assert generalized_jsd(student, teacher, beta, temperature, reduction="sum").item() == pytest.approx(want.sum().item(), rel=1e-5)
    # float64 input stays float64 and is then exact.
    exact = generalized_jsd(student.double(), teacher.double(), beta, temperature, reduction="none")
    torch.testing.assert_close(exact, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("beta", BETAS)
def test_jsd_is_zero_when_student_equals_teacher(beta):
    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(10)) * 4
    assert generalized_jsd(logits, logits.clone(), beta=beta, temperature=1.2).abs().item() < 1e-6


def test_jsd_symmetric_at_half_and_bounded_by_ln2():
    g = torch.Generator().manual_seed(11)
    a, b = torch.randn(20, 30, generator=g) * 8, torch.randn(20, 30, generator=g) * 8
    ab = generalized_jsd(a, b, beta=0.5, reduction="none")
    torch.testing.assert_close(ab, generalized_jsd(b, a, beta=0.5, reduction="none"), rtol=1e-5, atol=1e-6)
    assert ab.max().item() <= math.log(2) + 1e-6
    # Disjoint one-hot-like distributions reach the bound.
    sharp_a = torch.tensor([[100.0, -100.0]])
    sharp_b = torch.tensor([[-100.0, 100.0]])
    assert generalized_jsd(sharp_a, sharp_b, beta=0.5).item() == pytest.approx(math.log(2), abs=1e-6)
    # Not symmetric away from 1/2: swapping the roles equals using 1 - beta.
    torch.testing.assert_close(
        generalized_jsd(a, b, beta=0.1, reduction="none"), generalized_jsd(b, a, beta=0.9, reduction="none"), rtol=1e-5, atol=1e-6
    )


@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("temperature", TEMPS)
def test_jsd_module_equals_full_logit_reference_values_and_grads(beta, temperature):
    n = 7
    hidden, weight, teacher = make(n=n, h=5, v=19, seed=12, scale=2.0)
    hidden, weight, teacher = hidden.float(), weight.float(), teacher.float()
    h_ref = hidden.clone().requires_grad_(True)
    want = generalized_jsd(h_ref @ weight.T, teacher @ weight.T, beta=beta, temperature=temperature)
    want.backward()
    for chunk in (1, 3, n):
        h = hidden.clone().requires_grad_(True)
        got = GeneralizedJSD(beta=beta, temperature=temperature, chunk_size=chunk)(h, weight, teacher_hidden=teacher)
        got.backward()
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(h.grad, h_ref.grad, rtol=1e-5, atol=1e-5)
    # Given as full teacher logits, too.
    h = hidden.clone().requires_grad_(True)
    got = GeneralizedJSD(beta=beta, temperature=temperature, chunk_size=2)(h, weight, teacher_logits=teacher @ weight.T)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_jsd_gradient_only_through_student():
    hidden, weight, teacher = make(n=4, v=9, seed=13)
    th = teacher.clone().requires_grad_(True)
    h = hidden.clone().requires_grad_(True)
    GeneralizedJSD(beta=0.3)(h, weight, teacher_hidden=th).backward()
    assert th.grad is None and h.grad.abs().sum() > 0
    with pytest.raises(ConfigError, match="beta"):
        GeneralizedJSD(beta=1.5)


# -- memory: never a [N, V] tensor -------------------------------------------------------------------
class LiveTensorBytes(TorchDispatchMode):
    """Bytes of live storages created by ops inside the mode (freed when the storage dies), their peak,
    and the largest new storage. Storages of ``inputs`` (and views of them) are not counted."""

    def __init__(self, *inputs: torch.Tensor):
        super().__init__()
        self.live = self.peak = self.largest = 0
        self._seen: set[int] = {id(t.untyped_storage()) for t in inputs}
        self._keep = [t.untyped_storage() for t in inputs]  # ids stay valid while the mode lives

    def _free(self, key: int, nbytes: int) -> None:
        self._seen.discard(key)
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                if id(storage) not in self._seen:
                    self._seen.add(id(storage))
                    self.largest = max(self.largest, storage.nbytes())
                    self.live += storage.nbytes()
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(storage, self._free, id(storage), storage.nbytes())
        return out


def test_chunked_jsd_memory_far_below_full_logits_at_128k_vocab(monkeypatch):
    # The checkpointed regime (what N x V above chunked.SMALL_LOGITS gets), at a size a test can afford.
    monkeypatch.setattr("paraencoder.objectives.chunked.SMALL_LOGITS", 0)
    n, h, v, chunk = 32, 64, 128256, 4
    g = torch.Generator().manual_seed(14)
    hidden = torch.randn(n, h, generator=g, requires_grad=True)
    weight = torch.randn(v, h, generator=g) * 0.05
    teacher = torch.randn(n, h, generator=g)
    with LiveTensorBytes(hidden, weight, teacher) as chunked:
        GeneralizedJSD(chunk_size=chunk)(hidden, weight, teacher_hidden=teacher).backward()
    with LiveTensorBytes(hidden, weight, teacher) as full:
        generalized_jsd(hidden @ weight.T, teacher @ weight.T).backward()
    chunk_matrix, logit_matrix = chunk * v * 4, n * v * 4
    assert chunked.largest <= chunk_matrix  # no [N, V] tensor is ever created
    assert full.largest >= logit_matrix
    # Peak is a fixed number of [chunk, V] float32 matrices (measured: 10), independent of N...
    assert chunked.peak <= 11 * chunk_matrix
    # ...so here, with N / chunk = 8, it is far below the full-logit version (measured: 11 [N, V] matrices).
    assert full.peak >= 8 * logit_matrix
    assert chunked.peak < full.peak / 6


@pytest.mark.parametrize("which", ["ce", "kl", "topk"])
def test_ce_and_kl_never_create_full_logits(which, monkeypatch):
    monkeypatch.setattr("paraencoder.objectives.chunked.SMALL_LOGITS", 0)  # the checkpointed regime
    n, h, v, chunk = 64, 8, 4000, 8
    g = torch.Generator().manual_seed(15)
    hidden = torch.randn(n, h, generator=g, requires_grad=True)
    weight, teacher = torch.randn(v, h, generator=g), torch.randn(n, h, generator=g)
    targets = torch.randint(0, v, (n,), generator=g)
    topk = topk_teacher_logits(teacher, weight, 32, chunk_size=chunk)
    with LiveTensorBytes(hidden, weight, teacher) as mode:
        if which == "ce":
            loss = ResponseCE(chunk_size=chunk)(hidden, weight, targets)
        elif which == "kl":
            loss = ResponseKL(chunk_size=chunk)(hidden, weight, teacher_hidden=teacher)
        else:
            loss = ResponseKL(chunk_size=chunk)(hidden, weight, teacher_topk=topk)
        loss.backward()
    assert mode.largest <= chunk * v * 4
    assert mode.peak <= 8 * chunk * v * 4  # measured: CE 3, KL 7, top-k KL 3 chunk matrices
    assert mode.peak < n * v * 4


# -- ObjectiveMix -------------------------------------------------------------------------------------
def test_objective_mix_sums_weighted_parts_and_skips_zero_weights():
    hidden, weight, teacher = make(n=12, v=15, seed=16)
    targets = torch.randint(0, 15, (12,), generator=torch.Generator().manual_seed(17))
    targets[:2] = -100
    mix = ObjectiveMix(ce_weight=0.7, kl_weight=0.2, jsd_weight=0.1, temperature=1.3, beta=0.4, chunk_size=5)
    total, parts = mix(hidden, weight, targets, teacher_hidden=teacher)
    keep = targets != -100
    ce = ResponseCE()(hidden, weight, targets)
    kl = ResponseKL(temperature=1.3)(hidden[keep], weight, teacher_hidden=teacher[keep])
    jsd = GeneralizedJSD(beta=0.4, temperature=1.3)(hidden[keep], weight, teacher_hidden=teacher[keep])
    assert set(parts) == {"ce", "kl", "jsd"}
    assert parts["kl"].item() == pytest.approx(kl.item(), rel=1e-10)  # ignored targets are not distilled
    assert total.item() == pytest.approx((0.7 * ce + 0.2 * kl + 0.1 * jsd).item(), rel=1e-10)

    # KL from a top-k cache (used only when no exact teacher is given).
    topk = topk_teacher_logits(teacher, weight, 6)
    _, parts = ObjectiveMix(ce_weight=0.0, kl_weight=1.0)(hidden, weight, targets, teacher_topk=topk)
    want_topk = ResponseKL()(hidden[keep], weight, teacher_topk=(topk[0][keep], topk[1][keep]))
    assert parts["kl"].item() == pytest.approx(want_topk.item(), rel=1e-10)
    _, parts = ObjectiveMix(ce_weight=0.0, kl_weight=1.0)(hidden, weight, targets, teacher_topk=topk, teacher_hidden=teacher)
    kl_t1 = ResponseKL()(hidden[keep], weight, teacher_hidden=teacher[keep])
    assert parts["kl"].item() == pytest.approx(kl_t1.item(), rel=1e-10)

    ce_only = ObjectiveMix(chunk_size=5)
    total, parts = ce_only(hidden, weight, targets)  # no teacher needed, KL/JSD never run
    assert set(parts) == {"ce"} and total.item() == pytest.approx(ce.item(), rel=1e-12)
    with pytest.raises(ConfigError, match="teacher"):
        ObjectiveMix(kl_weight=1.0)(hidden, weight, targets)
    with pytest.raises(ConfigError, match="aux_loss"):
        ObjectiveMix(aux_weight=1.0)(hidden, weight, targets)
    aux = torch.tensor(2.0)
    total, parts = ObjectiveMix(ce_weight=0.0, aux_weight=0.5)(hidden, weight, targets, aux_loss=aux)
    assert total.item() == 1.0 and set(parts) == {"aux"}
    with pytest.raises(ConfigError, match=">= 0"):
        ObjectiveMix(ce_weight=-1.0)


def test_small_logits_are_kept_instead_of_recomputed_same_numbers(monkeypatch):
    """Below SMALL_LOGITS the chunk is not checkpointed: the same loss and gradients as the checkpointed path."""
    from paraencoder.objectives import chunked
    from paraencoder.objectives.ce import ResponseCE

    torch.manual_seed(0)
    hidden = torch.randn(37, 16, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(101, 16, dtype=torch.float64)
    targets = torch.randint(0, 101, (37,))
    results = []
    for small in (0, chunked.SMALL_LOGITS):
        monkeypatch.setattr(chunked, "SMALL_LOGITS", small)
        loss = ResponseCE(chunk_size=16)(hidden, weight, targets)
        (grad,) = torch.autograd.grad(loss, hidden)
        results.append((loss.detach(), grad))
    reference = torch.nn.functional.cross_entropy(hidden.detach() @ weight.T, targets)
    for loss, grad in results:
        torch.testing.assert_close(loss, reference)
    torch.testing.assert_close(results[0][1], results[1][1])
