"""compute_reco_loss: value and gradient against the direct formula, sampling laws, edge cases, AMP."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import stats

import module_list
from module_list import compute_reco_loss, label_onehot

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def random_batch(device="cpu", batch=2, size=9, num_classes=6, dim=8, seed=0):
    """rep, label (one-hot, class 4 absent), mask (some pixels invalid), prob (hard and easy pixels)."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.tensor([0, 1, 2, 3, 5])[torch.randint(0, 5, (batch, size, size), generator=gen)]
    label = label_onehot(labels, num_classes)
    mask = (torch.rand(batch, 1, size, size, generator=gen) < 0.8).float()
    prob = (torch.randn(batch, num_classes, size, size, generator=gen) + 3 * label).softmax(1)
    rep = torch.randn(batch, dim, size, size, generator=gen)
    return [t.to(device) for t in (rep, label, mask, prob)]


def record_draws(monkeypatch):
    """Make compute_reco_loss store its draws (anchors, queries, negatives) and class distribution."""
    seen = {}
    real = module_list._reco_draws

    def spy(valid, hard, class_probs, anchors, num_queries, num_negatives, generator=None):
        queries, negatives = real(valid, hard, class_probs, anchors, num_queries, num_negatives, generator)
        seen.update(class_probs=class_probs, anchors=anchors, queries=queries, negatives=negatives)
        return queries, negatives

    monkeypatch.setattr(module_list, "_reco_draws", spy)
    return seen


def direct_loss(rep, label, mask, prob, threshold, temp, anchors, queries, negatives):
    """Section 5.5 written out with Python loops over classes, in fp64, for given draws."""
    dim = rep.shape[1]
    feats = rep.double().permute(0, 2, 3, 1).reshape(-1, dim)
    valid = (label * mask).permute(1, 0, 2, 3).reshape(label.shape[1], -1) > 0
    soft = prob.permute(1, 0, 2, 3).reshape(label.shape[1], -1)
    present = [c for c in range(label.shape[1]) if valid[c].any()]
    if len(present) < 2:
        return feats.sum() * 0
    total = feats.new_zeros(())
    for row, c in enumerate(anchors.tolist()):
        hard = valid[c] & (soft[c] < threshold)
        if c not in present or not hard.any():
            continue
        proto = feats[valid[c]].mean(0).detach()
        losses = []
        for q, pix in enumerate(queries[row].tolist()):
            assert hard[pix], "a query must be a hard pixel of its class"
            keys = feats[negatives[row, q]].detach()
            assert all(valid[:, p].any() and not valid[c, p] for p in negatives[row, q].tolist())
            logits = (
                torch.cat(
                    [
                        F.cosine_similarity(feats[pix], proto, dim=0)[None],
                        F.cosine_similarity(feats[pix][None], keys, dim=1),
                    ]
                )
                / temp
            )
            losses.append(torch.logsumexp(logits, 0) - logits[0])
        total = total + torch.stack(losses).mean()
    return total / len(present)


@pytest.mark.parametrize("device", DEVICES)
def test_value_and_gradient_match_direct_formula(monkeypatch, device):
    seen = record_draws(monkeypatch)
    rep, label, mask, prob = random_batch(device)
    rep.requires_grad_(True)
    loss = compute_reco_loss(
        rep,
        label,
        mask,
        prob,
        0.97,
        0.5,
        num_queries=6,
        num_negatives=10,
        generator=torch.Generator(device).manual_seed(1),
    )
    loss.backward()
    ours_grad = rep.grad.clone()

    rep.grad = None
    expected = direct_loss(
        rep, label, mask, prob, 0.97, 0.5, seen["anchors"], seen["queries"].cpu(), seen["negatives"].cpu()
    )
    expected.backward()
    assert loss.dtype == torch.float32 and loss.shape == ()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    torch.testing.assert_close(ours_grad, rep.grad, rtol=1e-4, atol=1e-6)


def test_class_distribution_is_softmax_of_prototype_cosines(monkeypatch):
    seen = record_draws(monkeypatch)
    rep, label, mask, prob = random_batch()
    compute_reco_loss(rep, label, mask, prob, 0.97, 0.5, 4, 4)
    valid = (label * mask).sum((0, 2, 3)) > 0
    feats = rep.permute(0, 2, 3, 1).reshape(-1, rep.shape[1]).double()
    weights = (label * mask).permute(1, 0, 2, 3).reshape(label.shape[1], -1).double()
    protos = weights @ feats / weights.sum(1, keepdim=True).clamp(min=1)
    for i in torch.nonzero(valid).flatten().tolist():
        others = [j for j in torch.nonzero(valid).flatten().tolist() if j != i]
        cos = torch.stack([F.cosine_similarity(protos[i], protos[j], dim=0) for j in others])
        expected = torch.zeros(label.shape[1], dtype=torch.float64)
        expected[others] = (cos / 0.5).softmax(0)
        torch.testing.assert_close(seen["class_probs"][i].double(), expected, rtol=1e-5, atol=1e-7)


def test_hand_made_two_classes_exact():
    # Class 0: pixel a (hard) and b (easy); class 1: pixel c only (easy); pixel d is class 1 but masked out.
    # Every query is a, every negative is c, so the loss is deterministic: loss_a / 2 (two present classes).
    a, b, c, d = (
        torch.tensor([1.0, 0.0]),
        torch.tensor([0.0, 1.0]),
        torch.tensor([-1.0, 0.5]),
        torch.tensor([3.0, 3.0]),
    )
    rep = torch.stack([a, b, c, d], dim=1).view(1, 2, 2, 2).requires_grad_(True)
    label = label_onehot(torch.tensor([[[0, 0], [1, 1]]]), 3)
    mask = torch.tensor([[[[1.0, 1.0], [1.0, 0.0]]]])
    prob = torch.full((1, 3, 2, 2), 0.99)
    prob[0, 0, 0, 0] = 0.5  # a is hard
    temp, n = 0.5, 7
    loss = compute_reco_loss(rep, label, mask, prob, 0.97, temp, num_queries=5, num_negatives=n)
    cos_pos = F.cosine_similarity(a, (a + b) / 2, dim=0)
    cos_neg = F.cosine_similarity(a, c, dim=0)
    expected = (
        -torch.log(torch.exp(cos_pos / temp) / (torch.exp(cos_pos / temp) + n * torch.exp(cos_neg / temp)))
        / 2
    )
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    loss.backward()
    grad = rep.grad[0].permute(1, 2, 0).reshape(4, 2)
    assert grad[0].abs().sum() > 0 and grad[1:].abs().sum() == 0  # only the query pixel a gets a gradient


def test_gradients_reach_queries_only(monkeypatch):
    seen = record_draws(monkeypatch)
    rep, label, mask, prob = random_batch()
    rep.requires_grad_(True)
    prob.requires_grad_(True)
    compute_reco_loss(rep, label, mask, prob, 0.97, 0.5, 5, 8).backward()
    pixel_grad = rep.grad.permute(0, 2, 3, 1).reshape(-1, rep.shape[1]).abs().sum(1)
    is_query = torch.zeros_like(pixel_grad, dtype=torch.bool)
    is_query[seen["queries"].flatten()] = True
    assert (pixel_grad[~is_query] == 0).all() and (pixel_grad[is_query] > 0).all()
    assert prob.grad is None


@pytest.mark.parametrize("case", ["one_class", "no_hard", "nothing_valid"])
def test_zero_cases_are_zero_and_backward_safe(case):
    rep, label, mask, prob = random_batch()
    if case == "one_class":
        label = label_onehot(torch.zeros(label.shape[0], *label.shape[2:], dtype=torch.long), label.shape[1])
    elif case == "no_hard":
        prob = torch.zeros_like(prob)
    else:
        mask = torch.zeros_like(mask)
    rep.requires_grad_(True)
    loss = compute_reco_loss(rep, label, mask, prob, 0.97 if case != "no_hard" else 0.0, 0.5, 4, 4)
    loss.backward()
    assert loss.item() == 0.0 and torch.isfinite(rep.grad).all() and (rep.grad == 0).all()


def test_divisor_counts_classes_without_hard_pixels(monkeypatch):
    # Only class 0 has hard pixels: its term is divided by all 5 present classes, not by 1.
    seen = record_draws(monkeypatch)
    rep, label, mask, prob = random_batch()
    prob = prob.clone()
    prob[:, 1:] = 1.0  # only class 0 can have hard pixels
    loss = compute_reco_loss(rep, label, mask, prob, 0.97, 0.5, 4, 6)
    expected = direct_loss(
        rep, label, mask, prob, 0.97, 0.5, seen["anchors"], seen["queries"], seen["negatives"]
    )
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    present = int(((label * mask).sum((0, 2, 3)) > 0).sum())
    assert present == 5  # expected divides by 5 although only class 0 contributes


def test_shape_mismatch_is_a_clear_error():
    rep, label, mask, prob = random_batch()
    with pytest.raises(ValueError, match="prob has shape"):
        compute_reco_loss(rep, label, mask, prob[:, :, :-1], 0.97, 0.5, 4, 4)


def test_fp32_under_autocast():
    rep, label, mask, prob = random_batch()
    plain = compute_reco_loss(
        rep, label, mask, prob, 0.97, 0.5, 8, 16, generator=torch.Generator().manual_seed(3)
    )
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = compute_reco_loss(
            rep, label, mask, prob.bfloat16(), 0.97, 0.5, 8, 16, generator=torch.Generator().manual_seed(3)
        )
    assert mixed.dtype == torch.float32
    assert mixed.item() == pytest.approx(plain.item(), rel=1e-6)


def test_same_generator_same_loss_and_no_numpy_rng():
    rep, label, mask, prob = random_batch()
    np_state = np.random.get_state()[1].copy()
    first = compute_reco_loss(
        rep, label, mask, prob, 0.97, 0.5, 8, 16, generator=torch.Generator().manual_seed(5)
    )
    second = compute_reco_loss(
        rep, label, mask, prob, 0.97, 0.5, 8, 16, generator=torch.Generator().manual_seed(5)
    )
    assert first.item() == second.item()
    assert (np.random.get_state()[1] == np_state).all()


# ------------------------------------------------------------------------------------------------------------
# Sampling distributions of _reco_draws (fixed seeds: deterministic, so no flakiness)
# ------------------------------------------------------------------------------------------------------------


def draw_setup():
    """4 classes, 40 pixels: class c owns pixels with p % 5 == c (class 3 also has class 2's pixel 39)."""
    pixels = torch.arange(40)
    valid = torch.stack([pixels % 5 == c for c in range(4)])
    valid[3, 37] = True  # pixel 37 (p % 5 == 2) is valid for classes 2 and 3
    hard = valid & (pixels % 3 == 0)
    class_probs = torch.tensor(
        [[0.0, 0.5, 0.3, 0.2], [0.6, 0.0, 0.1, 0.3], [0.25, 0.25, 0.0, 0.5], [0.1, 0.1, 0.8, 0.0]]
    )
    return valid, hard, class_probs


def test_queries_uniform_over_hard_pixels():
    valid, hard, class_probs = draw_setup()
    queries, _ = module_list._reco_draws(
        valid, hard, class_probs, torch.tensor([0, 2]), 30000, 1, generator=torch.Generator().manual_seed(0)
    )
    for row, c in enumerate([0, 2]):
        counts = torch.bincount(queries[row], minlength=40)
        assert counts[~hard[c]].sum() == 0
        assert stats.chisquare(counts[hard[c]].numpy()).pvalue > 1e-3


def test_negative_classes_follow_class_distribution_and_keys_uniform_within_class():
    valid, hard, class_probs = draw_setup()
    num_q, num_n = 400, 300
    _, negatives = module_list._reco_draws(
        valid,
        hard,
        class_probs,
        torch.tensor([0, 3]),
        num_q,
        num_n,
        generator=torch.Generator().manual_seed(1),
    )
    for row, i in enumerate([0, 3]):
        negs = negatives[row]  # [Q,N]
        per_pixel = torch.bincount(negs.flatten(), minlength=40)
        # A negative pixel belongs to class j (and is uniform among j's pixels) with probability p_j / n_j.
        prob_pixel = (class_probs[i, :, None] * valid / valid.sum(1, keepdim=True)).sum(0)
        assert per_pixel[prob_pixel == 0].sum() == 0  # never its own class only, never an invalid pixel
        expected = prob_pixel[prob_pixel > 0] * negs.numel()
        assert stats.chisquare(per_pixel[prob_pixel > 0].numpy(), expected.numpy()).pvalue > 1e-3
        # Per query, the count of class-1 negatives (pixels only class 1 owns) is Binomial(N, p_1).
        p1 = class_probs[i, 1].item()
        per_query = valid[1][negs].sum(1).double()
        assert per_query.mean().item() == pytest.approx(num_n * p1, rel=0.02)
        assert per_query.var().item() == pytest.approx(num_n * p1 * (1 - p1), rel=0.2)


def test_uniform_below_has_no_modulo_bias():
    n = torch.full((60000,), 6)
    counts = torch.bincount(module_list._uniform_below(n, torch.Generator().manual_seed(0)), minlength=6)
    assert stats.chisquare(counts.numpy()).pvalue > 1e-3
    assert module_list._uniform_below(torch.tensor([0, 1]), None).tolist() == [0, 0]


# ------------------------------------------------------------------------------------------------------------
# _SampledDot: the private fused op and the public tiled fallback
# ------------------------------------------------------------------------------------------------------------


def sampled_dot_inputs(rows=7, points=5, cols=13, dim=6, seed=0):
    """a [R,D], b [P,D], index [R,N] with P < N, so index values repeat within a row and across rows."""
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(rows, dim, generator=gen)
    b = torch.randn(points, dim, generator=gen)
    index = torch.randint(0, points, (rows, cols), generator=gen)
    return a, b, index


def requires_fused_op():
    """Skip if this torch has no private op (only the fallback is used); else the probe must accept it."""
    if not hasattr(torch.ops.aten, module_list._FUSED_SAMPLED_DOT_OP):
        pytest.skip("this torch has no fused sampled-dot op")
    assert module_list._fused_sampled_dot_works()


# 7 rows x 13 columns x D = 6: one tile; tiles of 2 whole rows (the last partial); tiles of 5 columns.
@pytest.mark.parametrize(
    "tile, num_tiles",
    [(1 << 24, 1), (2 * 13 * 6, 4), (5 * 6, 7 * 3)],
    ids=["one_tile", "row_tiles", "column_tiles"],
)
def test_fallback_matches_fused_values_and_gradients(monkeypatch, tile, num_tiles):
    requires_fused_op()
    monkeypatch.setattr(module_list, "_GATHER_TILE_ELEMENTS", tile)
    a, b, index = sampled_dot_inputs()
    weight = torch.randn(index.shape, generator=torch.Generator().manual_seed(1))
    gathered = []
    real_bmm = torch.bmm

    def bmm_spy(keys, queries):
        gathered.append(keys.numel())
        return real_bmm(keys, queries)

    monkeypatch.setattr(torch, "bmm", bmm_spy)
    results = {}
    for fused in (True, False):
        monkeypatch.setattr(module_list, "_fused_sampled_dot_works", lambda fused=fused: fused)
        leaf = a.clone().requires_grad_(True)
        out = module_list._SampledDot.apply(leaf, b, index)
        (grad,) = torch.autograd.grad((out * weight).sum(), leaf)
        results[fused] = out.detach(), grad

    # The fallback gathers every key once, in the expected tiles, never more than the bound at a time.
    assert (
        len(gathered) == num_tiles and max(gathered) <= tile and sum(gathered) == index.numel() * a.shape[1]
    )
    torch.testing.assert_close(results[False][0], results[True][0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(results[False][0], (a[:, None, :] * b[index]).sum(2), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(results[False][1], results[True][1], rtol=1e-5, atol=1e-6)


def test_reco_loss_same_with_fallback_forced(monkeypatch):
    requires_fused_op()
    rep, label, mask, prob = random_batch()

    def loss_and_grad():
        leaf = rep.clone().requires_grad_(True)
        loss = compute_reco_loss(
            leaf, label, mask, prob, 0.97, 0.5, 6, 10, generator=torch.Generator().manual_seed(2)
        )
        return loss.detach(), torch.autograd.grad(loss, leaf)[0]

    default = loss_and_grad()
    monkeypatch.setattr(module_list, "_fused_sampled_dot_works", lambda: False)
    monkeypatch.setattr(module_list, "_GATHER_TILE_ELEMENTS", 3 * rep.shape[1])  # 4 column tiles per query
    fallback = loss_and_grad()
    assert default[0].item() > 0
    torch.testing.assert_close(fallback[0], default[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fallback[1], default[1], rtol=1e-5, atol=1e-7)


def wrong_fused(a, b, index):
    """The definition with the first two columns swapped: right values in the wrong places."""
    return (a[:, None, :] * b[index]).sum(2)[:, [1, 0, *range(2, index.shape[1])]]


def raising_fused(a, b, index):
    """A kernel this build does not have."""
    raise NotImplementedError("no kernel")


@pytest.mark.parametrize("case", ["missing", "raises", "wrong"])
def test_probe_rejects_missing_raising_or_wrong_op(monkeypatch, case):
    if case == "missing":
        monkeypatch.setattr(module_list, "_FUSED_SAMPLED_DOT_OP", "no_such_sampled_dot_op")
    else:
        monkeypatch.setattr(
            module_list, "_sampled_dot_fused", raising_fused if case == "raises" else wrong_fused
        )
    assert module_list._fused_sampled_dot_works.__wrapped__() is False  # the uncached probe


# ------------------------------------------------------------------------------------------------------------
# Accelerator: no host sync inside the loss
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_no_host_sync():
    rep, label, mask, prob = random_batch("cuda", batch=2, size=17, num_classes=21, dim=32)
    rep.requires_grad_(True)
    compute_reco_loss(rep, label, mask, prob, 0.97, 0.5, 16, 32)  # warm-up (lazy CUDA init may sync)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss = compute_reco_loss(rep, label, mask, prob, 0.97, 0.5, 16, 32)
        loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert math.isfinite(loss.item())
