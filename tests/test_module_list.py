"""module_list: losses, mixing, label_onehot, EMA, PolyLR, ConfMatrix (ReCo has its own file)."""

from __future__ import annotations

import math
from itertools import combinations

import numpy as np
import pytest
import torch
import torch.distributed as dist
from scipy import stats

import module_list as ml
from module_list import IGNORE_INDEX


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------------------------------------------------
# Losses
# ------------------------------------------------------------------------------------------------------------


def test_supervised_loss_ignores_and_means_over_valid_pixels():
    pred = torch.randn(2, 4, 3, 5, generator=seeded(0))
    target = torch.randint(0, 4, (2, 3, 5), generator=seeded(1))
    target[0, 0] = IGNORE_INDEX
    logp = pred.log_softmax(1)
    keep = target >= 0
    expected = -logp.gather(1, target.clamp(min=0)[:, None])[:, 0][keep].mean()
    assert ml.compute_supervised_loss(pred, target).item() == pytest.approx(expected.item(), rel=1e-6)
    per_pixel = ml.compute_supervised_loss(pred, target, reduction=False)
    assert per_pixel.shape == (2, 3, 5) and (per_pixel[~keep] == 0).all()


def test_supervised_loss_low_precision_pred_and_all_ignored():
    pred = torch.randn(1, 3, 4, 4, generator=seeded(0))
    target = torch.randint(0, 3, (1, 4, 4), generator=seeded(1))
    half = ml.compute_supervised_loss(pred.bfloat16(), target)
    assert half.dtype == torch.float32
    assert half.item() == pytest.approx(
        ml.compute_supervised_loss(pred.bfloat16().float(), target).item(), rel=1e-6
    )
    pred.requires_grad_(True)
    empty = ml.compute_supervised_loss(pred, torch.full_like(target, IGNORE_INDEX))
    empty.backward()
    assert empty.item() == 0.0 and (pred.grad == 0).all()


def unsup_reference(pred, target, conf, threshold):
    """Section 5.4 with numpy loops."""
    pred, target, conf = pred.double().numpy(), target.numpy(), conf.numpy()
    values = []
    for b in range(pred.shape[0]):
        n_valid = (target[b] >= 0).sum()
        weight = (conf[b] >= threshold).sum() / n_valid if n_valid else 0.0
        for y in range(pred.shape[2]):
            for x in range(pred.shape[3]):
                t = target[b, y, x]
                if t < 0:
                    continue
                logits = pred[b, :, y, x]
                ce = np.log(np.exp(logits - logits.max()).sum()) + logits.max() - logits[t]
                if ce > 0:
                    values.append(weight * ce)
    return float(np.mean(values)) if values else 0.0


def test_unsupervised_loss_matches_formula():
    pred = torch.randn(3, 4, 5, 6, generator=seeded(0))
    target = torch.randint(0, 4, (3, 5, 6), generator=seeded(1))
    conf = torch.rand(3, 5, 6, generator=seeded(2))
    target[0, :2] = IGNORE_INDEX
    target[2] = IGNORE_INDEX  # an image without valid pixels: weight 0, no NaN
    conf[2] = 1.0
    pred[1, :, 0, 0] = torch.tensor([100.0, 0.0, 0.0, 0.0])  # CE exactly 0 there: dropped from the mean
    target[1, 0, 0] = 0
    ours = ml.compute_unsupervised_loss(pred, target, conf, 0.5)
    assert ours.item() == pytest.approx(unsup_reference(pred, target, conf, 0.5), rel=1e-5)


def test_unsupervised_loss_empty_selection_is_zero_with_gradient():
    pred = torch.randn(2, 3, 4, 4, generator=seeded(0), requires_grad=True)
    loss = ml.compute_unsupervised_loss(pred, torch.full((2, 4, 4), IGNORE_INDEX), torch.ones(2, 4, 4), 0.97)
    loss.backward()
    assert loss.item() == 0.0 and torch.isfinite(pred.grad).all() and (pred.grad == 0).all()


def test_label_onehot():
    labels = torch.tensor([[[0, 2], [IGNORE_INDEX, 1]]])
    onehot = ml.label_onehot(labels, 3)
    assert onehot.shape == (1, 3, 2, 2) and onehot.dtype == torch.float32
    assert onehot.argmax(1).tolist() == [[[0, 2], [0, 1]]]  # ignored -> class 0 row
    assert (onehot.sum(1) == 1).all()


# ------------------------------------------------------------------------------------------------------------
# Mixing
# ------------------------------------------------------------------------------------------------------------


def box_of(mask):
    """(height, width, top, left) of the zero region of a [H,W] mask, checking that it is one rectangle."""
    rows = torch.nonzero((mask == 0).any(1)).flatten()
    cols = torch.nonzero((mask == 0).any(0)).flatten()
    h, w = len(rows), len(cols)
    assert (mask[rows[0] : rows[0] + h, cols[0] : cols[0] + w] == 0).all() and (mask == 0).sum() == h * w
    return h, w, rows[0].item(), cols[0].item()


def test_cutout_mask_box_sizes_as_reference():
    height, width = 7, 11
    widths, tops = [], []
    for seed in range(400):
        mask = ml.generate_cutout_mask((height, width), generator=seeded(seed))
        assert mask.shape == (height, width) and set(mask.unique().tolist()) <= {0.0, 1.0}
        h, w, top, left = box_of(mask)
        assert width // 2 + 1 <= w <= width - 1  # randint(W/2 + 1, W), upper bound excluded
        assert h == round(height * width / 2 / w)  # Python's round is half-to-even, like numpy's
        assert 0 <= top <= height - h and 0 <= left <= width - w
        widths.append(w)
        tops.append((top, h))
    counts = np.bincount(widths, minlength=width)[width // 2 + 1 : width]
    assert stats.chisquare(counts).pvalue > 1e-3  # widths uniform over [W//2+1, W-1]
    # Top corner uniform over the valid positions, for the most common box height.
    h_mode = max(set(h for _, h in tops), key=[h for _, h in tops].count)
    top_counts = np.bincount([t for t, h in tops if h == h_mode], minlength=height - h_mode + 1)
    assert stats.chisquare(top_counts).pvalue > 1e-3


def test_class_mask_keeps_half_of_the_values_including_ignore():
    label = torch.tensor([[IGNORE_INDEX, 0, 3], [5, 5, 3]])
    seen = {}
    for seed in range(600):
        mask = ml.generate_class_mask(label, generator=seeded(seed))
        kept = sorted(set(label[mask == 1].tolist()))
        assert len(kept) == 2  # floor(4 / 2) of {-1, 0, 3, 5}
        assert ((mask == 1) == torch.isin(label, torch.tensor(kept))).all()
        seen[tuple(kept)] = seen.get(tuple(kept), 0) + 1
    assert set(seen) == set(combinations([-1, 0, 3, 5], 2))
    assert stats.chisquare(list(seen.values())).pvalue > 1e-3  # every pair equally likely
    assert (ml.generate_class_mask(torch.full((3, 3), 2)) == 0).all()  # one value: nothing kept


def mixing_batch():
    data = torch.randn(3, 3, 8, 10, generator=seeded(0))
    target = torch.randint(0, 4, (3, 8, 10), generator=seeded(1))
    target[1, 0] = IGNORE_INDEX
    conf = torch.rand(3, 8, 10, generator=seeded(2))
    return data, target, conf


def test_unsup_data_cutout():
    data, target, conf = mixing_batch()
    out_data, out_target, out_conf = ml.generate_unsup_data(data, target, conf, "cutout", generator=seeded(3))
    assert out_target.dtype == torch.long
    for i in range(3):
        cut = out_conf[i] == 0
        h, w, _, _ = box_of((~cut).float())
        assert h == round(8 * 10 / 2 / w)
        assert (out_data[i][:, cut] == 0).all() and (out_target[i][cut] == IGNORE_INDEX).all()
        assert torch.equal(out_data[i][:, ~cut], data[i][:, ~cut]) and torch.equal(
            out_target[i][~cut], target[i][~cut]
        )
        assert torch.equal(out_conf[i][~cut], conf[i][~cut])


@pytest.mark.parametrize("mode", ["cutmix", "classmix"])
def test_unsup_data_mixes_with_next_image(mode):
    data, target, conf = mixing_batch()
    conf = conf + 1  # no zero confidence, so the kept region can be read from where conf changed
    out_data, out_target, out_conf = ml.generate_unsup_data(data, target, conf, mode, generator=seeded(4))
    for i in range(3):
        j = (i + 1) % 3
        keep = out_conf[i] == conf[i]
        assert torch.equal(out_conf[i][~keep], conf[j][~keep])
        for out, src in ((out_data[i], data), (out_target[i], target)):
            assert torch.equal(out[..., keep], src[i][..., keep]) and torch.equal(
                out[..., ~keep], src[j][..., ~keep]
            )
        if mode == "cutmix":
            box_of(keep.float())
        else:  # the kept pixels are exactly those of floor(n/2) of image i's values
            values = target[i].unique()
            kept = target[i][keep].unique()
            assert len(kept) == len(values) // 2 and torch.equal(keep, torch.isin(target[i], kept))


def test_unsup_data_unknown_mode_and_generator():
    data, target, conf = mixing_batch()
    with pytest.raises(ValueError, match="cutout, cutmix, classmix"):
        ml.generate_unsup_data(data, target, conf, "mixup")
    first = ml.generate_unsup_data(data, target, conf, "classmix", generator=seeded(7))
    second = ml.generate_unsup_data(data, target, conf, "classmix", generator=seeded(7))
    assert all(torch.equal(a, b) for a, b in zip(first, second))


# ------------------------------------------------------------------------------------------------------------
# EMA, PolyLR
# ------------------------------------------------------------------------------------------------------------


def conv_bn_pair():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4))


def test_ema_decay_schedule_and_buffers():
    student = conv_bn_pair()
    ema = ml.EMA(student, alpha=0.5)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
        student[1].running_mean.fill_(3.0)
    ema.update(student)  # step 0: decay 0, a copy
    for mine, theirs in zip(ema.model.parameters(), student.parameters()):
        assert torch.equal(mine, theirs)
    assert (ema.model[1].running_mean == 0).all()  # buffers not averaged by default
    before = [p.clone() for p in ema.model.parameters()]
    with torch.no_grad():
        for p in student.parameters():
            p.add_(2.0)
    ema.update(student)  # step 1: decay min(1 - 1/2, 0.5) = 0.5
    for old, mine, theirs in zip(before, ema.model.parameters(), student.parameters()):
        torch.testing.assert_close(mine, 0.5 * old + 0.5 * theirs)
    assert ema.step == 2
    ema.step = 10
    before = [p.clone() for p in ema.model.parameters()]
    ema.update(student)  # decay capped at alpha
    for old, mine, theirs in zip(before, ema.model.parameters(), student.parameters()):
        torch.testing.assert_close(mine, 0.5 * old + 0.5 * theirs)


def test_ema_average_buffers_and_state_dict():
    student = conv_bn_pair()
    ema = ml.EMA(student, alpha=0.9, average_buffers=True)
    ema.step = 5
    student[1].running_mean.fill_(1.0)
    student[1].num_batches_tracked.fill_(7)
    ema.update(student)  # decay min(1 - 1/6, 0.9)
    decay = 1 - 1 / 6
    torch.testing.assert_close(ema.model[1].running_mean, torch.full((4,), 1 - decay))
    assert ema.model[1].num_batches_tracked.item() == 7
    other = ml.EMA(conv_bn_pair(), alpha=0.9)
    other.load_state_dict(ema.state_dict())
    assert other.step == 6 and torch.equal(other.model[1].running_mean, ema.model[1].running_mean)


@pytest.mark.parametrize("fused", ["_foreach_copy_", "_foreach_lerp_"])
def test_tensor_list_ops_give_the_same_result_without_the_fused_private_op(fused, monkeypatch):
    torch.manual_seed(0)
    shapes = [(3, 4), (5,), (), (2, 1, 3)]
    targets, sources = [torch.randn(s) for s in shapes], [torch.randn(s) for s in shapes]
    with_fused = [t.clone() for t in targets]
    ml.copy_tensors_(with_fused, sources) if fused == "_foreach_copy_" else ml.lerp_tensors_(
        with_fused, sources, 0.3
    )
    monkeypatch.delattr(torch, fused)  # a torch without the private op: the public loop
    public = [t.clone() for t in targets]
    ml.copy_tensors_(public, sources) if fused == "_foreach_copy_" else ml.lerp_tensors_(public, sources, 0.3)
    for a, b, target, source in zip(with_fused, public, targets, sources):
        expected = source if fused == "_foreach_copy_" else target + 0.3 * (source - target)
        torch.testing.assert_close(a, expected)
        torch.testing.assert_close(b, expected)


def test_poly_lr_staircase_and_resume():
    def make():
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2.5e-3)
        return opt, ml.PolyLR(opt, max_iters=200, power=0.9, min_lr=1e-6)

    opt, sched = make()
    lrs = []
    for _ in range(205):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    expected = [max(2.5e-3 * max(1 - t / 200, 0) ** 0.9, 1e-6) for t in range(205)]
    assert lrs == pytest.approx(expected, rel=1e-12)
    assert lrs[199] == pytest.approx(2.5e-3 * (1 / 200) ** 0.9) and lrs[200:] == [1e-6] * 5

    opt, sched = make()
    for _ in range(50):
        opt.step()
        sched.step()
    state = sched.state_dict()
    opt2, sched2 = make()
    sched2.load_state_dict(state)
    opt2.step()
    sched2.step()
    assert opt2.param_groups[0]["lr"] == pytest.approx(expected[51], rel=1e-12)


# ------------------------------------------------------------------------------------------------------------
# ConfMatrix
# ------------------------------------------------------------------------------------------------------------


def test_confmatrix_matches_torchmetrics_and_reference_formula():
    from torchmetrics.classification import MulticlassJaccardIndex

    num_classes = 5
    pred = torch.randint(0, num_classes, (2, 30, 30), generator=seeded(0))
    target = torch.randint(0, num_classes, (2, 30, 30), generator=seeded(1))
    target[0, :3] = IGNORE_INDEX
    target[1, :2] = 255  # out of range: ignored too
    conf = ml.ConfMatrix(num_classes)
    conf.update(pred[:1], target[:1])
    conf.update(pred[1:], target[1:])
    keep = (target >= 0) & (target < num_classes)
    macro = MulticlassJaccardIndex(num_classes, average="macro")(pred[keep], target[keep])
    per_class = MulticlassJaccardIndex(num_classes, average="none")(pred[keep], target[keep])
    miou, acc = conf.get_metrics()
    assert miou == pytest.approx(macro.item(), rel=1e-6)
    assert conf.iou_per_class() == pytest.approx(per_class.tolist(), rel=1e-6)
    assert acc == pytest.approx((pred[keep] == target[keep]).float().mean().item(), rel=1e-6)
    mat = conf.mat.double()  # the reference formula, all classes present
    assert miou == pytest.approx((mat.diag() / (mat.sum(0) + mat.sum(1) - mat.diag())).mean().item())
    assert conf.mat.dtype == torch.int64 and conf.mat[2, 3] == ((target[keep] == 2) & (pred[keep] == 3)).sum()


def test_confmatrix_absent_classes_excluded():
    conf = ml.ConfMatrix(4)
    conf.update(torch.tensor([0, 1, 1, 0]), torch.tensor([0, 1, 0, 0]))
    iou = conf.iou_per_class()
    assert iou[:2] == pytest.approx([2 / 3, 1 / 2]) and math.isnan(iou[2]) and math.isnan(iou[3])
    miou, acc = conf.get_metrics()
    assert miou == pytest.approx((2 / 3 + 1 / 2) / 2) and acc == pytest.approx(3 / 4)
    assert ml.ConfMatrix(3).get_metrics() == (0.0, 0.0)


def test_confmatrix_reduce_sums_over_ranks(tmp_path):
    conf = ml.ConfMatrix(2)
    conf.update(torch.tensor([1, 1]), torch.tensor([0, 1]))
    conf.reduce_from_all_processes()  # not initialised: no-op
    assert conf.mat.tolist() == [[0, 1], [0, 1]]
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        conf.reduce_from_all_processes()
        assert conf.mat.tolist() == [[0, 1], [0, 1]]
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_mixing_and_metric_stay_on_device_without_sync():
    data, target, conf = (t.cuda() for t in mixing_batch())
    matrix = ml.ConfMatrix(4, device="cuda")
    gen = torch.Generator("cuda").manual_seed(0)
    ml.generate_unsup_data(data, target, conf, "classmix", generator=gen)  # warm-up
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        outs = [ml.generate_unsup_data(data, target, conf, mode, generator=gen) for mode in ml.MIX_MODES]
        matrix.update(target, target)
        onehot = ml.label_onehot(target, 4)
        loss = ml.compute_unsupervised_loss(torch.randn(3, 4, 8, 10, device="cuda"), target, conf, 0.5)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert all(t.is_cuda for out in outs for t in out) and onehot.is_cuda and loss.is_cuda
