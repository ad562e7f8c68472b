"""UniMatch's and FixMatch's views (unimatch_views): the crop geometry against PIL and the authors' rules, the
strong views against torchvision and Pillow, and the distributions of every draw, CutMix boxes included."""

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image, ImageFilter
from scipy import stats

import transforms as tf
import unimatch_views as uv
from module_list import IGNORE_INDEX

N = 4000  # draws for the rate tests: the 0.8 +- 0.03 band is about 4.7 standard deviations wide
N_BOX = 2000


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _geometries(height, width, crop, n, seed):
    generator = _gen(seed)
    return [uv.draw_geometry(height, width, crop, generator) for _ in range(n)]


# --- geometry ---------------------------------------------------------------------------------


@pytest.mark.parametrize("height, width", [(30, 41), (41, 30), (35, 35)])
def test_long_side_range_and_aspect_rule(height, width):
    crop, longest, shortest = 50, max(height, width), min(height, width)
    draws = _geometries(height, width, crop, N, 1)
    long_side = np.array([max(g.height, g.width) if height != width else g.width for g in draws])
    short_side = np.array([min(g.height, g.width) if height != width else g.height for g in draws])
    low, high = longest // 2, 2 * longest
    counts = np.bincount(long_side - low, minlength=high - low + 1)
    assert long_side.min() == low and long_side.max() == high and len(counts) == high - low + 1
    assert stats.chisquare(counts).pvalue > 1e-3  # uniform over the integers, both ends included
    # the long side stays the long side, the short one is scaled and rounded to the nearest integer
    assert all((g.height >= g.width) == (height >= width) for g in draws)
    assert np.array_equal(short_side, (shortest * long_side / longest + 0.5).astype(int))


def test_crop_window_and_flip_are_uniform():
    crop = 40
    draws = _geometries(30, 37, crop, N, 2)
    for axis in ("top", "left"):
        size = "height" if axis == "top" else "width"
        offsets = np.array([getattr(g, axis) for g in draws])
        spans = np.array([max(getattr(g, size), crop) - crop for g in draws])
        assert (offsets >= 0).all() and (offsets <= spans).all()
        # uniform over 0..span: then (offset + U(0, 1)) / (span + 1) is U(0, 1)
        jittered = (offsets + np.random.default_rng(3).random(N)) / (spans + 1)
        assert stats.kstest(jittered, stats.uniform(0, 1).cdf).pvalue > 1e-3
        assert (offsets[spans == 0] == 0).all() and (offsets == spans).any()  # both ends reachable
    assert abs(np.mean([g.flip for g in draws]) - 0.5) < 0.03


def _noise(height, width, seed):
    """A uint8 noise image [H, W, 3] (the hardest case for resizing) and the same as float [3, H, W]."""
    array = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return array, torch.from_numpy(array).permute(2, 0, 1).float() / 255


def _ties(in_len, out_len):
    """Output positions whose centre falls exactly between two source pixels: PIL picks either side."""
    return [i for i in range(out_len) if (2 * i + 1) * in_len % (2 * out_len) == 0]


@pytest.mark.parametrize("size", [(29, 40), (95, 130), (61, 83)])
def test_resize_matches_pil(size):
    height, width = 61, 83
    array, image = _noise(height, width, 3)
    positions = np.arange(height * width, dtype=np.int32).reshape(height, width)
    label = torch.from_numpy(positions).long()
    crop = min(size)
    geometry = uv.Geometry(size[0], size[1], (size[0] - crop) // 2, size[1] - crop, False)
    out, out_label, padding = uv.apply_geometry(image, label, crop, geometry)
    window = (slice(geometry.top, geometry.top + crop), slice(geometry.left, geometry.left + crop))
    pil = np.array(Image.fromarray(array).resize(size[::-1], Image.BILINEAR))[window]
    error = (out.permute(1, 2, 0).numpy() * 255 - pil).__abs__()
    assert error.mean() < 0.4 and error.max() < 1.5  # PIL rounds to 8 bits after each pass
    # labels: PIL's NEAREST, which samples pixel centres; at an exact tie it may land on either side
    pil_label = np.array(Image.fromarray(positions, mode="I").resize(size[::-1], Image.NEAREST))[window]
    rows = [r for r in range(crop) if r + geometry.top not in _ties(height, size[0])]
    cols = [c for c in range(crop) if c + geometry.left not in _ties(width, size[1])]
    assert np.array_equal(out_label.numpy()[np.ix_(rows, cols)], pil_label[np.ix_(rows, cols)])
    assert not padding.any()


def test_padding_is_black_ignored_and_only_where_the_image_is_not():
    image = torch.rand(3, 20, 30, generator=_gen(4)) * 0.9 + 0.1  # every pixel > 0
    label = torch.randint(0, 5, (20, 30), generator=_gen(5))
    label[:3] = IGNORE_INDEX  # void in the ground truth is not padding
    geometry = uv.Geometry(20, 30, 0, 0, False)
    out, out_label, padding = uv.apply_geometry(image, label, 41, geometry)
    expected = torch.ones(41, 41, dtype=torch.bool)
    expected[:20, :30] = False
    assert torch.equal(padding, expected)
    assert torch.equal(out[:, :20, :30], image) and (out[:, padding] == 0).all()
    assert torch.equal(out_label[:20, :30], label) and (out_label[padding] == IGNORE_INDEX).all()
    # the labelled pair: the image normalised (black padding before), the label as above
    normalised, labelled = uv.labelled_crop(image, label, 41, _gen(6))
    assert normalised.shape == (3, 41, 41) and normalised.dtype == torch.float32
    assert labelled.dtype == torch.long
    pad = (tf.denormalise(normalised).abs() < 1e-6).all(dim=0)
    assert torch.equal(pad & (labelled != IGNORE_INDEX), torch.zeros_like(pad))


def test_unlabelled_crops_mark_padding_and_flip_it_with_the_image():
    image = torch.rand(3, 31, 12, generator=_gen(7)) * 0.9 + 0.1  # at most 24 wide: padded columns
    label = torch.zeros(31, 12, dtype=torch.long)
    generator, flips = _gen(8), []
    for _ in range(60):
        crops = uv.unlabelled_crops(image, label, 37, generator)
        assert [c.shape for c in crops] == [(3, 37, 37), (37, 37), (37, 37), (3, 37, 37), (37, 37)]
        assert crops[1].dtype == torch.bool and crops[4].dtype == torch.bool
        assert torch.equal(crops[2] == IGNORE_INDEX, crops[1])  # the label is void exactly on the padding
        for weak, padding in (crops[:2], crops[3:]):
            assert torch.equal((weak == 0).all(dim=0), padding)  # bilinear of positive pixels stays > 0
            assert padding[:, 0].all() != padding[:, -1].all()  # padded on the right, or flipped to the left
            flips.append(bool(padding[:, 0].all()))
            assert 0 <= weak.min() and weak.max() <= 1
    assert 0.3 < np.mean(flips) < 0.7


def test_hflip_moves_image_and_label_together():
    # an image and a label that both increase from left to right
    height, width = 26, 34
    image = (torch.arange(width) / (width - 1)).expand(3, height, width).contiguous()
    label = torch.arange(width).expand(height, width).contiguous()
    generator, flipped = _gen(9), []
    for _ in range(300):
        out, out_label = uv.labelled_crop(image, label, 20, generator)
        image_falls = (tf.denormalise(out)[0, 0, -1] < tf.denormalise(out)[0, 0, 0]).item()
        label_falls = out_label[0, -1] < out_label[0, 0]
        assert image_falls == label_falls
        flipped.append(label_falls)
    assert abs(np.mean(flipped) - 0.5) < 0.1
    flip = uv.Geometry(height, width, 3, 5, True)
    out, out_label, _ = uv.apply_geometry(image, label, 20, flip)
    assert torch.equal(out_label, label[3:23, 5:25].flip(-1))
    assert torch.equal(out, image[:, 3:23, 5:25].flip(-1))


def test_geometry_is_a_function_of_the_generator():
    image = torch.rand(3, 25, 33, generator=_gen(10))
    label = torch.randint(0, 4, (25, 33), generator=_gen(11))
    a, b, c = (uv.labelled_crop(image, label, 21, _gen(s)) for s in (12, 12, 13))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and not torch.equal(a[0], c[0])
    a, b, c = (uv.unlabelled_crops(image, label, 21, _gen(s)) for s in (14, 14, 15))
    assert all(torch.equal(x, y) for x, y in zip(a, b)) and not torch.equal(a[0], c[0])
    assert not torch.equal(a[0], a[3])  # the mix crop is a draw of its own


# --- strong views ------------------------------------------------------------------------------


def test_strong_parameter_distributions():
    p = uv.sample_strong_params(N, _gen(16))
    for gate, rate in [(p.jitter, 0.8), (p.gray, 0.2), (p.blur, 0.5)]:
        assert abs(gate.double().mean().item() - rate) < 0.03
    for k, (low, width) in enumerate([(0.5, 1.0)] * 3 + [(-0.25, 0.5)]):
        assert stats.kstest(p.factors[:, k].numpy(), stats.uniform(low, width).cdf).pvalue > 1e-3
    assert stats.kstest(p.sigma.numpy(), stats.uniform(0.1, 1.9).cdf).pvalue > 1e-3
    assert torch.equal(p.order.sort(dim=1).values, torch.arange(4).expand(N, 4))  # each row a permutation
    codes = (p.order * torch.tensor([64, 16, 4, 1])).sum(dim=1)
    counts = np.unique(codes.numpy(), return_counts=True)[1]
    assert len(counts) == 24 and stats.chisquare(counts).pvalue > 1e-3  # every order equally likely
    gates = torch.stack([p.jitter, p.gray, p.blur], dim=1).double()
    assert (torch.corrcoef(gates.T) - torch.eye(3)).abs().max() < 0.06  # drawn independently


def _torchvision_view(image, params, k):
    """Sample k of a strong view by torchvision's ops, one at a time (the blur separately)."""
    ops = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue]
    if params.jitter[k]:
        for op in params.order[k].tolist():
            image = ops[op](image, params.factors[k, op].item())
    if params.gray[k]:
        image = TF.rgb_to_grayscale(image, num_output_channels=3)
    return image


def test_strong_view_composes_the_ops_in_order():
    images = torch.rand(12, 3, 15, 17, generator=_gen(17))
    params = uv.sample_strong_params(12, _gen(18))
    params.blur[:] = False
    params.jitter[:4], params.gray[:2], params.gray[4:6] = True, True, False
    out = uv.strong_view(images, params)
    for k in range(12):
        assert torch.allclose(out[k], _torchvision_view(images[k], params, k), atol=3e-5)
    gray = params.gray.nonzero()[:, 0]
    assert torch.equal(out[gray, 0], out[gray, 1]) and torch.equal(out[gray, 1], out[gray, 2])


@pytest.mark.parametrize("sigma", [0.1, 0.3, 0.7, 1.4, 2.0])
def test_blur_matches_pillow(sigma):
    array, image = _noise(40, 44, 19)
    array[:, :3] = 255  # a bright border: Pillow replicates the edge at each of its passes
    image = torch.from_numpy(array).permute(2, 0, 1).float() / 255
    params = uv.StrongParams(
        jitter=torch.tensor([False, False]),
        factors=torch.ones(2, 4),
        order=torch.arange(4).expand(2, 4),
        gray=torch.tensor([False, False]),
        blur=torch.tensor([True, False]),
        sigma=torch.tensor([sigma, sigma]),
    )
    out = uv.strong_view(torch.stack([image, image]), params)
    pil = np.array(Image.fromarray(array).filter(ImageFilter.GaussianBlur(radius=sigma)))
    error = (out[0].permute(1, 2, 0).numpy() * 255 - pil).__abs__()
    assert error.mean() < 1.1 and error.max() < 3.5  # Pillow rounds to 8 bits after each of its 6 passes
    assert torch.equal(out[1], image)  # not blurred: exactly unchanged
    box = uv.pillow_box(torch.tensor([sigma]))
    assert abs((box * torch.arange(-2.0, 3.0) ** 2).sum().item() * 3 - sigma**2) < 1e-6  # variance sigma^2


def test_unlabelled_views_shapes_and_independence():
    weak = torch.rand(6, 3, 33, 33, generator=_gen(20))
    padding = torch.zeros(6, 33, 33, dtype=torch.bool)
    padding[:, 30:] = True
    out = uv.unlabelled_views(weak, padding, _gen(21))
    assert [o.shape for o in out] == [(6, 3, 33, 33)] * 3 + [(6, 33, 33)] * 3
    assert [o.dtype for o in out] == [torch.float32] * 3 + [torch.long, torch.float32, torch.float32]
    assert torch.equal(out[0], tf.normalise(weak))
    assert torch.equal(out[3], padding.long() * 255) and uv.PADDING == 255
    assert not torch.equal(out[1], out[2]) and not torch.equal(out[4], out[5])
    again = uv.unlabelled_views(weak, padding, _gen(21))
    assert all(torch.equal(a, b) for a, b in zip(out, again))


# --- CutMix boxes ------------------------------------------------------------------------------


def _reference_box(size, rng):
    """The rule as written: (w, h, x, y) of a box, or None; redrawn until it fits."""
    if rng.random() >= 0.5:
        return None
    area = rng.uniform(0.02, 0.4) * size * size
    while True:
        ratio = rng.uniform(0.3, 1 / 0.3)
        w, h = int(np.sqrt(area / ratio)), int(np.sqrt(area * ratio))
        x, y = rng.integers(0, size), rng.integers(0, size)
        if x + w <= size and y + h <= size:
            return w, h, x, y


def _box_stats(boxes):
    """(has box, w, h, x, y) of each [S, S] box; a rectangle of ones is the only shape allowed."""
    rows, cols = boxes.any(dim=2), boxes.any(dim=1)
    has = rows.any(dim=1)
    h, w = rows.sum(dim=1), cols.sum(dim=1)
    y, x = rows.float().argmax(dim=1), cols.float().argmax(dim=1)
    assert torch.equal(boxes.sum(dim=(1, 2)), (w * h).float())
    return has.numpy(), w[has].numpy(), h[has].numpy(), x[has].numpy(), y[has].numpy()


@pytest.mark.parametrize("size", [8, 32, 61])  # 8: a box one row too tall shows
def test_boxes_follow_the_rejection_distribution(size):
    boxes = uv.cutmix_boxes(N_BOX, size, _gen(22))
    assert boxes.shape == (N_BOX, size, size) and boxes.dtype == torch.float32
    assert set(boxes.unique().tolist()) <= {0.0, 1.0}
    has, *ours = _box_stats(boxes)
    rng = np.random.default_rng(23)
    drawn = [_reference_box(size, rng) for _ in range(N_BOX)]
    theirs = np.array([d for d in drawn if d is not None]).T
    assert abs(has.mean() - 0.5) < 0.04 and abs(np.mean([d is not None for d in drawn]) - 0.5) < 0.04
    for name, a, b in zip("whxy", ours, theirs):
        assert stats.ks_2samp(a, b).pvalue > 1e-3, name
    assert stats.ks_2samp(ours[0] * ours[1], theirs[0] * theirs[1]).pvalue > 1e-3  # area
    assert ((ours[2] + ours[0]) <= size).all() and ((ours[3] + ours[1]) <= size).all()


def test_boxes_fit_when_no_candidate_does(monkeypatch):
    monkeypatch.setattr(uv, "_BOX_TRIES", 1)  # most single candidates miss: the fallback must still fit
    boxes = uv.cutmix_boxes(2000, 20, _gen(24))
    has, w, h, x, y = _box_stats(boxes)
    assert has.mean() > 0.4 and ((x + w) <= 20).all() and ((y + h) <= 20).all()


def test_boxes_are_a_function_of_the_generator():
    a, b, c = (uv.cutmix_boxes(16, 40, _gen(s)) for s in (25, 25, 26))
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_device_views_on_cuda_without_host_syncs():
    device = torch.device("cuda")
    weak = torch.rand(8, 3, 65, 65, device=device)
    padding = torch.rand(8, 65, 65, device=device) < 0.1
    generator = torch.Generator(device=device).manual_seed(0)
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = uv.unlabelled_views(weak, padding, generator)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert all(o.device.type == "cuda" for o in out) and out[1].shape == (8, 3, 65, 65)
    cpu = uv.unlabelled_views(weak.cpu(), padding.cpu(), _gen(0))
    assert all(o.shape == c.shape and o.dtype == c.dtype for o, c in zip(out, cpu))


def test_strong_views_follow_hue_jitter():
    """At hue 0 a pure red stays red or turns grey (grayscale), with green and blue equal; at 0.25 not."""
    red = torch.tensor([1.0, 0.0, 0.0]).view(1, 3, 1, 1).expand(64, 3, 9, 9).clone()
    wide, none = (uv.sample_strong_params(64, _gen(19), hue=hue) for hue in (0.25, 0.0))
    assert torch.equal(none.factors[:, 3], torch.zeros(64))
    assert torch.equal(none.factors[:, :3], wide.factors[:, :3])
    padding = torch.zeros(64, 9, 9, dtype=torch.bool)
    for hue, stays in ((0.0, True), (0.25, False)):
        for out in uv.unlabelled_views(red, padding, _gen(20), hue)[1:3]:
            out = tf.denormalise(out)
            red_or_grey = ((out[:, 1] - out[:, 2]).abs() < 1e-5).all() & (out[:, 0] >= out[:, 1] - 1e-5).all()
            assert bool(red_or_grey) == stays
