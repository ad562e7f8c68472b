"""The batched joint transform (transforms.random_transform / batch_transform): geometry, exact labels,
colour ops against torchvision, and the distributions of the random draws."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from PIL import Image
from scipy import stats

import transforms as tf
from module_list import IGNORE_INDEX

N = 2000  # draws for the rate tests: the 0.5 +- 0.04 band is about 3.6 standard deviations wide


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _rows_cols(b, h, w):
    """Labels that encode their source position: [B, H, W] long = row * w + col."""
    return (torch.arange(h)[:, None] * w + torch.arange(w)[None]).expand(b, h, w).clone()


def test_batch_transform_shapes_and_pads():
    images, labels = tf.normalise(torch.rand(8, 3, 20, 24)), torch.randint(0, 21, (8, 20, 24))
    conf = torch.rand(8, 20, 24) + 0.01
    out_images, out_labels, out_conf = tf.batch_transform(
        images, labels, conf, (33, 35), (1.0, 1.0), False, _gen()
    )
    assert (
        out_images.shape == (8, 3, 33, 35)
        and out_labels.shape == (8, 33, 35)
        and out_conf.shape == (8, 33, 35)
    )
    assert out_labels.dtype == torch.long and out_conf.dtype == torch.float32
    # scale 1 and a crop larger than the image: the crop sits at (0, 0) and the pad is bottom/right
    assert torch.equal(out_labels[:, :20, :24], labels) and torch.equal(out_conf[:, :20, :24], conf)
    assert (out_labels[:, 20:] == IGNORE_INDEX).all() and (out_labels[:, :, 24:] == IGNORE_INDEX).all()
    assert (out_conf[:, 20:] == 0).all() and (out_conf[:, :, 24:] == 0).all()
    raw = tf.denormalise(images)
    out = tf.denormalise(out_images)
    assert torch.allclose(out[:, :, :20, :24], raw, atol=1e-5)
    assert torch.allclose(
        out[:, :, 20:23, :24], raw[:, :, [18, 17, 16]], atol=1e-5
    )  # reflect, edge not repeated
    assert torch.allclose(out[:, :, :20, 24:27], raw[:, :, :, [22, 21, 20]], atol=1e-5)


def test_pads_under_full_augmentation():
    labels, conf = torch.randint(0, 5, (8, 20, 24)), torch.rand(8, 20, 24) + 0.01
    _, out_labels, out_conf = tf.batch_transform(
        torch.randn(8, 3, 20, 24), labels, conf, (33, 35), (1.0, 1.0), True, _gen(1)
    )
    pad = out_labels == IGNORE_INDEX
    assert (pad.sum(dim=(1, 2)) == 33 * 35 - 20 * 24).all()  # flips move the pad, its size stays
    assert torch.equal(out_conf == 0, pad)


def test_pad_larger_than_image_reflects_repeatedly():
    images = torch.arange(5.0).view(1, 1, 1, 5).expand(1, 3, 2, 5) / 4
    out, _, _ = tf.random_transform(
        images, torch.zeros(1, 2, 5, dtype=torch.long), None, (2, 14), (1.0, 1.0), False, _gen()
    )
    assert (out[0, 0, 0] * 4).round().tolist() == [0, 1, 2, 3, 4, 3, 2, 1, 0, 1, 2, 3, 4, 3]


def test_identity_at_scale_one_without_augmentation():
    images, labels = torch.rand(3, 3, 17, 19), torch.randint(-1, 21, (3, 17, 19))
    out_images, out_labels, _ = tf.random_transform(images, labels, None, (17, 19), (1.0, 1.0), False, _gen())
    assert torch.equal(out_images, images) and torch.equal(out_labels, labels)


def _find_window(big, small):
    """Offsets (y, x) where small [h, w] equals a window of big [H, W]."""
    h, w = small.shape
    return [
        (y, x)
        for y in range(big.shape[0] - h + 1)
        for x in range(big.shape[1] - w + 1)
        if torch.equal(big[y : y + h, x : x + w], small)
    ]


@pytest.mark.parametrize("scale", [1.5, 0.75])
def test_rescale_matches_interpolate_and_labels_use_nearest(scale):
    h, w = 24, 28
    images, labels = torch.rand(4, 3, h, w), _rows_cols(4, h, w)
    crop = (15, 17)
    out_images, out_labels, _ = tf.random_transform(
        images, labels, None, crop, (scale, scale), False, _gen(3)
    )
    size = (int(h * scale), int(w * scale))
    ref_labels = F.interpolate(labels[:, None].double(), size=size, mode="nearest-exact")[:, 0].long()
    # antialiased as PIL's BILINEAR resize when shrinking; the same as plain bilinear when enlarging
    ref_images = F.interpolate(images, size=size, mode="bilinear", antialias=True, align_corners=False)
    for k in range(4):
        windows = _find_window(ref_labels[k], out_labels[k])
        assert len(windows) == 1  # labels are an exact window of the nearest-rescaled label
        y, x = windows[0]
        assert torch.allclose(out_images[k], ref_images[k, :, y : y + crop[0], x : x + crop[1]], atol=1e-5)


def _rescale(images, labels, scale, crop, compact=None):
    """_resample at per-sample scales (a list), crop at offset 0."""
    return tf._resample(images, labels, None, crop, torch.tensor(scale, dtype=torch.float64), None, compact)


@pytest.mark.parametrize("compact", [True, False])  # host-read (CPU) and sync-free (GPU) forms
def test_shrink_is_antialiased_per_sample(compact):
    h, w = 40, 46
    scales = [0.5, 0.62, 0.8, 0.97, 1.0, 1.2, 1.5]
    images, labels = torch.rand(len(scales), 3, h, w, generator=_gen(20)), _rows_cols(len(scales), h, w)
    crop = (19, 22)  # inside every rescaled image: no padding
    out, out_labels, _ = _rescale(images, labels, scales, crop, compact)
    for k, s in enumerate(scales):
        size = (int(h * s), int(w * s))
        aa = F.interpolate(images[k : k + 1], size=size, mode="bilinear", antialias=True, align_corners=False)
        assert torch.allclose(out[k], aa[0, :, : crop[0], : crop[1]], atol=1e-5)
        plain = F.interpolate(images[k : k + 1], size=size, mode="bilinear", align_corners=False)
        if s >= 1:  # enlarging: plain bilinear
            assert torch.allclose(out[k], plain[0, :, : crop[0], : crop[1]], atol=1e-5)
        elif s < 0.9:
            assert (out[k] - plain[0, :, : crop[0], : crop[1]]).abs().max() > 0.05
        near = F.interpolate(labels[k : k + 1, None].double(), size=size, mode="nearest-exact")[0, 0].long()
        assert torch.equal(out_labels[k], near[: crop[0], : crop[1]])  # labels stay nearest, values exact
    assert torch.equal(out[4], images[4, :, : crop[0], : crop[1]])  # scale 1: an exact copy


def test_compact_and_dense_forms_agree():
    images, labels = torch.rand(6, 3, 30, 35, generator=_gen(21)), torch.randint(0, 21, (6, 30, 35))
    conf = torch.rand(6, 30, 35, generator=_gen(22))
    params = tf.sample_params(6, (0.5, 1.5), _gen(23))
    for crop in [(21, 23), (50, 41)]:  # inside and padded
        a = tf._resample(images, labels, conf, crop, params.scale, params.offset_u, compact=True)
        b = tf._resample(images, labels, conf, crop, params.scale, params.offset_u, compact=False)
        assert torch.allclose(a[0], b[0], atol=1e-6) and torch.equal(a[1], b[1]) and torch.equal(a[2], b[2])
        single = [
            tf._resample(
                images[k : k + 1],
                labels[k : k + 1],
                conf[k : k + 1],
                crop,
                params.scale[k : k + 1],
                params.offset_u[k : k + 1],
            )
            for k in range(6)
        ]  # as the loader's workers (B = 1)
        assert torch.allclose(torch.cat([o[0] for o in single]), a[0], atol=1e-6)
        assert torch.equal(torch.cat([o[1] for o in single]), a[1])


@pytest.mark.parametrize("scale", [0.5, 0.63, 0.8, 1.4])
def test_matches_pil_bilinear_resize(scale):
    h, w = 61, 83
    array = np.random.default_rng(24).integers(0, 256, (h, w, 3), dtype=np.uint8)  # noise: the hardest case
    size = (int(h * scale), int(w * scale))
    pil = torch.from_numpy(np.array(Image.fromarray(array).resize(size[::-1], Image.BILINEAR))).permute(
        2, 0, 1
    )
    images = torch.from_numpy(array).permute(2, 0, 1)[None].float() / 255
    out, _, _ = _rescale(images, torch.zeros(1, h, w, dtype=torch.long), [scale], size)
    error = (out[0] * 255 - pil.float()).abs()
    # PIL rounds to 8 bits after each pass (measured: mean 0.27-0.30, max 0.86-0.99 grey levels)
    assert error.mean() < 0.4 and error.max() < 1.5
    if scale < 1:  # without antialiasing: mean 12-27, max 74-106 grey levels
        plain = F.interpolate(images, size=size, mode="bilinear", align_corners=False)
        assert (plain[0] * 255 - pil.float()).abs().mean() > 5


@pytest.mark.parametrize("compact", [True, False])
def test_shrink_then_pad_reflects(compact):
    images = torch.rand(2, 3, 20, 24, generator=_gen(25))
    labels = torch.randint(0, 21, (2, 20, 24))
    out, out_labels, _ = _rescale(
        images, labels, [0.5, 0.5], (16, 17), compact
    )  # 10x12 rescaled, padded to 16x17
    ref = F.interpolate(images, size=(10, 12), mode="bilinear", antialias=True, align_corners=False)
    assert torch.allclose(out[:, :, :10, :12], ref, atol=1e-5)
    assert torch.allclose(
        out[:, :, 10:16, :12], ref[:, :, [8, 7, 6, 5, 4, 3]], atol=1e-5
    )  # edge not repeated
    assert torch.allclose(out[:, :, :10, 12:17], ref[:, :, :, [10, 9, 8, 7, 6]], atol=1e-5)
    assert (out_labels[:, 10:] == IGNORE_INDEX).all() and (out_labels[:, :, 12:] == IGNORE_INDEX).all()
    near = F.interpolate(labels[:, None].double(), size=(10, 12), mode="nearest-exact")[:, 0].long()
    assert torch.equal(out_labels[:, :10, :12], near)


def test_cpu_result_does_not_depend_on_threads_or_layout():
    # the loader's workers run one thread, the main process several; decoded images are channels-last views
    array = torch.rand(16, 20, 24, 3, generator=_gen(26))
    labels = torch.randint(0, 21, (16, 20, 24))
    params = tf.sample_params(16, (0.5, 1.5), _gen(27))
    threads, outs = torch.get_num_threads(), []
    try:
        for n, images in [
            (1, array.permute(0, 3, 1, 2)),
            (2, array.permute(0, 3, 1, 2)),
            (2, array.permute(0, 3, 1, 2).contiguous()),
        ]:
            torch.set_num_threads(n)
            outs.append(
                torch.cat(
                    [
                        tf._resample(
                            images[k : k + 1],
                            labels[k : k + 1],
                            None,
                            (11, 13),
                            params.scale[k : k + 1],
                            params.offset_u[k : k + 1],
                        )[0]
                        for k in range(16)
                    ]
                )
            )  # one sample at a time, as in the workers
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])


def test_label_and_conf_values_survive_exactly():
    labels = torch.randint(0, 21, (16, 30, 30))
    labels[:, :3] = IGNORE_INDEX
    conf = torch.randint(1, 256, (16, 30, 30)) / 255.0
    _, out_labels, out_conf = tf.batch_transform(
        torch.randn(16, 3, 30, 30), labels, conf, (33, 33), (0.5, 1.5), True, _gen(4)
    )
    assert set(out_labels.unique().tolist()) <= set(labels.unique().tolist())
    assert set(out_conf.unique().tolist()) <= set(conf.unique().tolist()) | {0.0}


def test_same_seed_same_result_other_seed_differs():
    images, labels = torch.rand(4, 3, 30, 30), torch.randint(0, 5, (4, 30, 30))
    a = tf.batch_transform(images, labels, None, (21, 21), (0.5, 1.5), True, _gen(9))
    b = tf.batch_transform(images, labels, None, (21, 21), (0.5, 1.5), True, _gen(9))
    c = tf.batch_transform(images, labels, None, (21, 21), (0.5, 1.5), True, _gen(10))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and not torch.equal(a[0], c[0])
    assert a[2] is None


# --- distributions ----------------------------------------------------------------------------


def test_flip_rate_end_to_end():
    labels = _rows_cols(N, 4, 4)
    _, out, _ = tf.random_transform(torch.rand(N, 3, 4, 4), labels, None, (4, 4), (1.0, 1.0), True, _gen(5))
    flipped = out[:, 0, 0] == 3
    assert torch.equal(out[flipped], labels[flipped].flip(-1)) and torch.equal(
        out[~flipped], labels[~flipped]
    )
    assert abs(flipped.float().mean().item() - 0.5) < 0.04


def test_rescale_sizes_end_to_end():
    # no pad inside the rescaled image, so the number of labelled rows is int(20 * s)
    _, out, _ = tf.random_transform(
        torch.rand(N, 3, 20, 1),
        torch.zeros(N, 20, 1, dtype=torch.long),
        None,
        (40, 1),
        (0.5, 1.5),
        False,
        _gen(6),
    )
    rows = (out[:, :, 0] != IGNORE_INDEX).sum(dim=1).double()
    assert rows.min() == 10 and rows.max() in (29, 30)
    assert abs(rows.mean().item() - 19.5) < 0.4  # E[int(20 s)] for s ~ U(0.5, 1.5)


def test_crop_offset_is_uniform():
    labels = _rows_cols(N, 12, 1)
    _, out, _ = tf.random_transform(torch.rand(N, 3, 12, 1), labels, None, (9, 1), (1.0, 1.0), False, _gen(7))
    counts = torch.bincount(out[:, 0, 0], minlength=4)
    assert counts.numel() == 4 and stats.chisquare(counts.numpy()).pvalue > 1e-3


def test_parameter_distributions():
    p = tf.sample_params(N, (0.5, 1.5), _gen(8))
    assert abs(p.jitter.double().mean().item() - 0.8) < 0.04
    assert abs(p.blur.double().mean().item() - 0.5) < 0.04 and abs(p.flip.double().mean().item() - 0.5) < 0.04
    assert stats.kstest(p.scale.numpy(), stats.uniform(0.5, 1.0).cdf).pvalue > 1e-3
    assert stats.kstest(p.sigma.numpy(), stats.uniform(0.15, 1.0).cdf).pvalue > 1e-3
    for k, (lo, width) in enumerate([(0.75, 0.5)] * 3 + [(-0.25, 0.5)]):
        assert stats.kstest(p.factors[:, k].numpy(), stats.uniform(lo, width).cdf).pvalue > 1e-3
    assert torch.equal(p.order.sort(dim=1).values, torch.arange(4).expand(N, 4))  # each row a permutation
    first = torch.bincount(p.order[:, 0], minlength=4)
    assert stats.chisquare(first.numpy()).pvalue > 1e-3  # every op equally likely to run first
    assert (p.offset_u >= 0).all() and (p.offset_u < 1).all()


# --- colour ops against torchvision -----------------------------------------------------------


def _one_op(images, op, factor):
    """Run colour_jitter with only op `op` active (the other factors neutral) in slot 0."""
    b = images.shape[0]
    factors = torch.tensor([1.0, 1.0, 1.0, 0.0]).repeat(b, 1)
    factors[:, op] = factor
    order = torch.tensor([op] + [k for k in range(4) if k != op]).repeat(b, 1)
    return tf.colour_jitter(images, torch.ones(b, dtype=torch.bool), factors, order)


@pytest.mark.parametrize(
    "op, factor, reference",
    [
        (0, 1.2, TF.adjust_brightness),
        (0, 0.8, TF.adjust_brightness),
        (1, 1.25, TF.adjust_contrast),
        (1, 0.75, TF.adjust_contrast),
        (2, 1.2, TF.adjust_saturation),
        (2, 0.76, TF.adjust_saturation),
        (3, 0.2, TF.adjust_hue),
        (3, -0.25, TF.adjust_hue),
    ],
)
def test_colour_ops_match_torchvision(op, factor, reference):
    images = torch.rand(2, 3, 9, 10, generator=_gen(11))
    assert torch.allclose(_one_op(images, op, factor), reference(images, factor), atol=2e-5)


def test_jitter_order_and_apply_mask():
    images = torch.rand(3, 3, 8, 8, generator=_gen(12))
    factors = torch.tensor([[1.25, 0.75, 1.2, 0.1]]).repeat(3, 1)
    order = torch.tensor([[0, 1, 2, 3], [3, 2, 1, 0], [1, 3, 0, 2]])
    out = tf.colour_jitter(images, torch.tensor([True, True, False]), factors, order)
    ops = [
        lambda x: TF.adjust_brightness(x, 1.25),
        lambda x: TF.adjust_contrast(x, 0.75),
        lambda x: TF.adjust_saturation(x, 1.2),
        lambda x: TF.adjust_hue(x, 0.1),
    ]
    for k in range(2):
        expected = images[k]
        for op in order[k].tolist():
            expected = ops[op](expected)
        assert torch.allclose(out[k], expected, atol=2e-5)
    assert torch.equal(out[2], images[2])  # not applied: exactly unchanged


def test_blur_matches_torchvision_inside_and_skips_exactly():
    images = torch.rand(2, 3, 20, 20, generator=_gen(13))
    out = tf.gaussian_blur(images, torch.tensor([True, False]), torch.tensor([0.9, 0.9]))
    expected = TF.gaussian_blur(images[0], kernel_size=9, sigma=0.9)
    assert torch.allclose(out[0, :, 4:-4, 4:-4], expected[:, 4:-4, 4:-4], atol=1e-5)
    assert torch.equal(out[1], images[1])
    flat = tf.gaussian_blur(torch.full((1, 3, 6, 6), 0.3), torch.tensor([True]), torch.tensor([1.15]))
    assert torch.allclose(
        flat, torch.full_like(flat, 0.3)
    )  # edges: replicate padding keeps a flat image flat


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_cuda_without_host_syncs():
    device = torch.device("cuda")
    images = torch.randn(10, 3, 64, 64, device=device)
    labels = torch.randint(0, 21, (10, 64, 64), device=device)
    conf = torch.rand(10, 64, 64, device=device)
    generator = torch.Generator(device=device).manual_seed(0)
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = tf.batch_transform(images, labels, conf, (33, 33), (0.5, 1.5), True, generator)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert all(t.device.type == "cuda" for t in out) and out[0].shape == (10, 3, 33, 33)


def _red(n):
    return torch.tensor([1.0, 0.0, 0.0]).view(1, 3, 1, 1).expand(n, 3, 9, 9).clone()


def test_hue_jitter_scales_the_hue_draw_and_keeps_every_other_draw():
    wide, none = (tf.sample_params(N, (0.5, 1.5), _gen(9), hue=hue) for hue in (0.25, 0.0))
    assert torch.equal(none.factors[:, 3], torch.zeros(N)) and wide.factors[:, 3].abs().max() > 0.24
    narrow = tf.sample_params(N, (0.5, 1.5), _gen(9), hue=0.1)
    assert torch.allclose(narrow.factors[:, 3], wide.factors[:, 3] * 0.4)
    for field in ("scale", "offset_u", "jitter", "order", "blur", "sigma", "flip"):
        assert torch.equal(getattr(none, field), getattr(wide, field)), field
    assert torch.equal(none.factors[:, :3], wide.factors[:, :3])


def test_without_hue_jitter_red_stays_red():
    """Brightness, contrast and saturation keep a pure red's green and blue equal; a hue rotation does not."""
    labels = torch.zeros(64, 9, 9, dtype=torch.long)
    for hue, stays in ((0.0, True), (0.25, False)):
        out, _, _ = tf.random_transform(_red(64), labels, None, (9, 9), (1.0, 1.0), True, _gen(10), hue)
        same = (out[:, 1] == out[:, 2]).all() & (out[:, 0] > out[:, 1]).all()
        assert bool(same) == stays, hue
