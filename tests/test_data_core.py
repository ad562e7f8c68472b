"""Dataset table, label maps, files, SegmentationDataset and loaders (dataset_table, build_data)."""

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import build_data as bd
import dataset_table as dt
import transforms as tf
from layouts import PascalFiles, resolve_dataset
from module_list import IGNORE_INDEX

RNG = np.random.default_rng(0)


def _save_pair(image_file: Path, label_file: Path, label: np.ndarray) -> None:
    """A random RGB image and its grayscale label PNG of the same size."""
    image_file.parent.mkdir(parents=True, exist_ok=True)
    label_file.parent.mkdir(parents=True, exist_ok=True)
    h, w = label.shape
    Image.fromarray(RNG.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(image_file)
    Image.fromarray(label.astype(np.uint8)).save(label_file)


def _as_palette(label: np.ndarray) -> Image.Image:
    """A 'P'-mode PNG whose indices are the label values (as the VOC SegmentationClass files)."""
    image = Image.frombytes("P", (label.shape[1], label.shape[0]), label.astype(np.uint8).tobytes())
    image.putpalette(dt.DATASETS["pascal"].palette.flatten().tolist())
    return image


def make_pascal(root: Path, ids=("a", "b", "c", "d"), size=(20, 24), num_classes=21, lists=True) -> Path:
    for i, image_id in enumerate(ids):
        label = RNG.integers(0, num_classes, size)
        label[0, :] = dt.VOID
        _save_pair(
            root / "JPEGImages" / f"{image_id}.jpg", root / "SegmentationClassAug" / f"{image_id}.png", label
        )
    if lists:
        (root / "train_aug.txt").write_text("\n".join(ids))
        (root / "val.txt").write_text("\n".join(ids[:2]) + "\n")
    return root


def make_cityscapes(root: Path, n_train=12, n_val=2, size=(16, 32)) -> Path:
    for split, n in (("train", n_train), ("val", n_val)):
        for i in range(n):
            label = RNG.integers(0, 34, size)
            _save_pair(root / "images" / split / f"{i}.png", root / "labels" / split / f"{i}.png", label)
    return root


def make_sun(root: Path, train_ids=(5051, 9, 120), test_ids=(8, 30), size=(18, 22)) -> Path:
    for split, ids in (("train", train_ids), ("test", test_ids)):
        for i in ids:
            label = RNG.integers(0, 38, size)
            _save_pair(
                root / f"SUNRGBD-{split}_images" / f"img-{i:06d}.jpg",
                root / "sunrgbd_train_test_labels" / f"img-{i:06d}.png",
                label,
            )
    (root / "test_idx.txt").write_text("\n".join(str(i) for i in test_ids))
    return root


# --- table ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, classes, crop, eval_size, scale, batch, min_classes, partial",
    [
        ("pascal", 21, (321, 321), (513, 513), (0.5, 1.5), 10, 3, True),
        ("cityscapes", 19, (512, 512), (512, 1024), (1.0, 1.0), 2, 12, True),
        ("sun", 37, (321, 321), (385, 513), (0.5, 1.5), 5, 0, False),
        ("demo", 7, (65, 65), (97, 97), (0.75, 1.25), 4, 2, True),
    ],
)
def test_table_matches_reference(name, classes, crop, eval_size, scale, batch, min_classes, partial):
    data = resolve_dataset(name)
    info = data.info
    assert (info.num_classes, info.crop_size, info.eval_size, info.scale_range) == (
        classes,
        crop,
        eval_size,
        scale,
    )
    assert (info.batch_size, info.min_classes, info.partial_labels) == (batch, min_classes, partial)
    assert (
        len(info.class_names) == classes and info.palette.shape == (256, 3) and info.palette.dtype == np.uint8
    )
    assert data.root == dt.REPO_ROOT / "dataset" / name
    assert info.sampler is (dt.Sampler.SUN if name == "sun" else dt.Sampler.BALANCED)


def test_training_defaults():
    assert all(
        (
            dt.DATASETS[n].epochs,
            dt.DATASETS[n].iters_per_epoch,
            dt.DATASETS[n].resnet_depth,
            dt.DATASETS[n].pretrained,
        )
        == (200, 200, 101, "imagenet")
        for n in ("pascal", "cityscapes", "sun")
    )
    demo = dt.DATASETS["demo"]
    assert demo.class_names[0] == "background" and len(demo.class_names) == 7
    assert (demo.resnet_depth, demo.pretrained) == (18, "none")


def test_unknown_dataset_lists_valid_names():
    with pytest.raises(bd.DataError, match="pascal, cityscapes, sun, demo"):
        resolve_dataset("voc")


def test_palettes():
    pascal, city, sun = (dt.DATASETS[n].palette for n in ("pascal", "cityscapes", "sun"))
    assert pascal[:9].tolist() == [
        [0, 0, 0],
        [128, 0, 0],
        [0, 128, 0],
        [128, 128, 0],
        [0, 0, 128],
        [128, 0, 128],
        [0, 128, 128],
        [128, 128, 128],
        [64, 0, 0],
    ]
    assert pascal[20].tolist() == [0, 64, 128]  # tvmonitor
    assert (pascal[21:] == 255).all()
    assert (
        city[0].tolist() == [128, 64, 128] and city[18].tolist() == [119, 11, 32] and (city[19:] == 0).all()
    )
    assert sun[0].tolist() == [148, 65, 137] and sun[36].tolist() == [161, 176, 169] and (sun[37:] == 0).all()


def test_color_map_paints_ignore_with_last_row():
    palette = dt.DATASETS["pascal"].palette
    label = torch.tensor([[0, 1], [IGNORE_INDEX, 20]])
    out = dt.color_map(label, palette)
    assert out.shape == (2, 2, 3) and out.dtype == np.uint8
    assert out[1, 0].tolist() == [255, 255, 255] and out[0, 1].tolist() == [128, 0, 0]
    assert (dt.color_map(np.array([[255]]), palette) == out[1, 0]).all()


def test_denormalise_inverts_normalise():
    x = torch.rand(2, 3, 4, 5)
    assert torch.allclose(tf.denormalise(tf.normalise(x)), x, atol=1e-6)
    assert torch.allclose(tf.normalise(torch.tensor(tf.MEAN).view(3, 1, 1)), torch.zeros(3, 1, 1), atol=1e-7)


# --- labels -----------------------------------------------------------------------------------


def _write_label(path: Path, values: np.ndarray) -> Path:
    Image.fromarray(values.astype(np.uint8)).save(path)
    return path


def test_cityscapes_label_ids_to_train_ids(tmp_path):
    raw = np.arange(256).reshape(16, 16)
    out = bd.read_label(dt.DATASETS["cityscapes"], _write_label(tmp_path / "l.png", raw)).ravel()
    expected = np.full(256, dt.VOID)
    for label_id, train_id in {
        7: 0,
        8: 1,
        11: 2,
        12: 3,
        13: 4,
        17: 5,
        19: 6,
        20: 7,
        21: 8,
        22: 9,
        23: 10,
        24: 11,
        25: 12,
        26: 13,
        27: 14,
        28: 15,
        31: 16,
        32: 17,
        33: 18,
    }.items():
        expected[label_id] = train_id
    assert out.tolist() == expected.tolist()  # void ids and ids outside 0..33 (34..255) become VOID


def test_sun_labels_minus_one(tmp_path):
    raw = np.array([[0, 1, 37, 20]])
    out = bd.read_label(dt.DATASETS["sun"], _write_label(tmp_path / "l.png", raw))
    assert out.tolist() == [[dt.VOID, 0, 36, 19]]
    with pytest.raises(bd.DataError, match=r"l2.png.*\[38\]"):
        bd.read_label(dt.DATASETS["sun"], _write_label(tmp_path / "l2.png", np.array([[1, 38]])))


def test_pascal_labels_as_is_and_out_of_range_rejected(tmp_path):
    raw = np.array([[0, 20, 255, 7]])
    assert (
        bd.read_label(dt.DATASETS["pascal"], _write_label(tmp_path / "l.png", raw)).tolist() == raw.tolist()
    )
    with pytest.raises(bd.DataError, match=r"bad.png.*\[21, 254\]"):
        bd.read_label(dt.DATASETS["pascal"], _write_label(tmp_path / "bad.png", np.array([[0, 21, 254]])))
    with pytest.raises(bd.DataError, match="0..6"):
        bd.read_label(dt.DATASETS["demo"], _write_label(tmp_path / "d.png", np.array([[7]])))


def test_palette_and_grayscale_labels_decode_to_same_ids(tmp_path):
    raw = RNG.integers(0, 21, (9, 11))
    raw[2] = 255
    _as_palette(raw).save(tmp_path / "p.png")
    _write_label(tmp_path / "g.png", raw)
    assert Image.open(tmp_path / "p.png").mode == "P"
    info = dt.DATASETS["pascal"]
    assert np.array_equal(bd.read_label(info, tmp_path / "p.png"), bd.read_label(info, tmp_path / "g.png"))
    assert bd.read_label(info, tmp_path / "p.png").tolist() == raw.tolist()


def test_16bit_label(tmp_path):
    raw = np.array([[7, 33, 40, 1000]], dtype=np.uint16)
    Image.fromarray(raw).save(tmp_path / "l.png")
    assert bd.read_label(dt.DATASETS["cityscapes"], tmp_path / "l.png").tolist() == [[0, 18, 255, 255]]


def test_rgb_label_is_an_error(tmp_path):
    Image.fromarray(np.full((4, 4, 3), (200, 0, 0), np.uint8)).save(tmp_path / "rgb.png")  # colours, not grey
    with pytest.raises(bd.DataError, match="rgb.png is an RGB image of colours.*single-channel"):
        bd.read_label(dt.DATASETS["pascal"], tmp_path / "rgb.png")


# --- ids and paths ----------------------------------------------------------------------------


def test_list_ids_pascal_and_shipped_fallback(tmp_path):
    data = resolve_dataset("pascal", make_pascal(tmp_path / "voc"))
    assert data.list_ids("train") == ["a", "b", "c", "d"]
    assert data.list_ids("test") == ["a", "b"]
    (tmp_path / "bare").mkdir()
    bare = resolve_dataset("pascal", tmp_path / "bare")
    train, val = bare.list_ids("train"), bare.list_ids("test")
    assert (len(train), len(val)) == (10582, 1449) and val[961] == "2010_000426" and not set(train) & set(val)


def test_list_ids_cityscapes_numeric_order(tmp_path):
    data = resolve_dataset("cityscapes", make_cityscapes(tmp_path, n_train=12, n_val=2, size=(4, 4)))
    assert data.list_ids("train") == [str(i) for i in range(12)]
    assert data.list_ids("test") == ["0", "1"]


def test_list_ids_sun(tmp_path):
    root = make_sun(tmp_path / "sun", size=(4, 4))
    data = resolve_dataset("sun", root)
    assert data.list_ids("train") == ["9", "120", "5051"]
    assert data.list_ids("test") == ["8", "30"]
    (root / "test_idx.txt").unlink()
    shipped = data.list_ids("test")
    assert len(shipped) == len(set(shipped)) == 475 and max(map(int, shipped)) <= 5050


def test_label_paths_with_partial_labels(tmp_path):
    pascal, city, sun = (resolve_dataset(n, tmp_path) for n in ("pascal", "cityscapes", "sun"))
    assert pascal.label_path("x", "train", "p5", 2) == tmp_path / "SegmentationClassAug_p5_2" / "x.png"
    assert pascal.label_path("x", "test") == tmp_path / "SegmentationClassAug" / "x.png"
    assert city.label_path("3", "train", "p0", 1) == tmp_path / "labels" / "train_p0_1" / "3.png"
    assert city.label_path("3", "test") == tmp_path / "labels" / "val" / "3.png"
    assert sun.label_path("12", "train") == tmp_path / "sunrgbd_train_test_labels" / "img-000012.png"
    assert sun.image_path("12", "test") == tmp_path / "SUNRGBD-test_images" / "img-000012.jpg"
    with pytest.raises(bd.DataError, match="sun has no partial labels"):
        sun.label_path("12", "train", "p1")
    with pytest.raises(bd.DataError, match="--partial 'p2'"):
        pascal.label_path("x", "train", "p2")
    with pytest.raises(ValueError, match="train split only"):
        city.label_path("3", "test", "p0")


# --- dataset ----------------------------------------------------------------------------------


def test_train_items_are_cropped_and_reproducible(tmp_path):
    ds = bd.SegmentationDataset(
        resolve_dataset("pascal", make_pascal(tmp_path)),
        ["a", "b"],
        "train",
        crop_size=(33, 35),
        scale_range=(0.5, 1.5),
        augmentation=True,
    )
    image, label = ds[(1, 7)]
    assert image.shape == (3, 33, 35) and image.dtype == torch.float32
    assert label.shape == (33, 35) and label.dtype == torch.long
    assert set(label.unique().tolist()) <= set(range(21)) | {IGNORE_INDEX}
    again, other = ds[(1, 7)], ds[(1, 8)]
    assert torch.equal(again[0], image) and torch.equal(again[1], label)
    assert not torch.equal(other[0], image)


def test_test_items_pad_to_eval_size_at_origin(tmp_path):
    info = dataclasses.replace(dt.DATASETS["pascal"], eval_size=(25, 30))
    root = make_pascal(tmp_path, size=(20, 24))
    ds = bd.SegmentationDataset(PascalFiles(info, root), ["a"], "test")
    image, label = ds[0]
    raw_image, raw_label = ds.load(0)
    assert image.shape == (3, 25, 30) and label.shape == (25, 30)
    assert torch.equal(label[:20, :24], raw_label)
    assert (label[20:] == IGNORE_INDEX).all() and (label[:, 24:] == IGNORE_INDEX).all()
    image = tf.denormalise(image)
    assert torch.allclose(image[:, :20, :24], raw_image, atol=1e-6)
    assert torch.allclose(image[:, 20, :24], raw_image[:, 18], atol=1e-6)  # reflect, edge not repeated
    assert torch.equal(ds[0][0], ds[0][0])


def test_cityscapes_and_sun_items(tmp_path):
    info = dt.DATASETS["cityscapes"]
    city = bd.SegmentationDataset(
        resolve_dataset("cityscapes", make_cityscapes(tmp_path / "c", 2, 1)),
        ["0"],
        "test",
        crop_size=(16, 32),
    )
    _, label = city[0]
    raw = np.asarray(Image.open(tmp_path / "c" / "labels" / "val" / "0.png"))
    expected = torch.from_numpy(info.label_table[raw]).long()
    assert torch.equal(label, torch.where(expected == dt.VOID, IGNORE_INDEX, expected))
    sun = bd.SegmentationDataset(
        resolve_dataset("sun", make_sun(tmp_path / "s")), ["9"], "train", crop_size=(10, 10)
    )
    image, label = sun[(0, 1)]
    assert image.shape == (3, 10, 10) and set(label.unique().tolist()) <= set(range(37)) | {IGNORE_INDEX}


def test_partial_labels_are_read(tmp_path):
    root = make_pascal(tmp_path)
    data = resolve_dataset("pascal", root)
    partial = np.full((20, 24), dt.VOID)
    partial[5, 6] = 3
    (root / "SegmentationClassAug_p0_1").mkdir()
    _write_label(root / "SegmentationClassAug_p0_1" / "a.png", partial)
    ds = bd.SegmentationDataset(data, ["a"], "train", partial="p0", partial_seed=1)
    assert ds.load(0)[1].eq(3).sum() == 1 and ds.load(0)[1].ne(IGNORE_INDEX).sum() == 1
    with pytest.raises(bd.DataError, match="SegmentationClassAug_p5_0.*not found"):
        bd.SegmentationDataset(data, ["a"], "train", partial="p5")
    with pytest.raises(bd.DataError, match="sun has no partial labels"):
        bd.SegmentationDataset(resolve_dataset("sun", make_sun(tmp_path / "s")), ["9"], partial="p1")


def test_bad_data_errors(tmp_path):
    nowhere = resolve_dataset("pascal", tmp_path / "nowhere")
    with pytest.raises(bd.DataError, match="nowhere.*not found.*pascal_preprocess.*--dataset demo"):
        bd.SegmentationDataset(nowhere, ["a"])
    with pytest.raises(bd.DataError, match="nowhere"):
        nowhere.list_ids("train")
    nolists = dataclasses.replace(dt.DATASETS["demo"], name="no-such-dataset")
    (tmp_path / "empty").mkdir()
    with pytest.raises(bd.DataError, match="train_aug.txt not found"):
        PascalFiles(nolists, tmp_path / "empty").list_ids("train")
    data = resolve_dataset("pascal", make_pascal(tmp_path / "voc", ids=("a", "b", "c", "d")))
    root = data.root
    ds = bd.SegmentationDataset(data, ["a", "b", "c", "d", "zz"], "train", crop_size=(9, 9))
    with pytest.raises(bd.DataError, match=r"JPEGImages/zz.jpg is missing"):
        ds[4]
    (root / "JPEGImages" / "b.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    with pytest.raises(bd.DataError, match=r"cannot decode image .*b.jpg"):
        ds[1]
    _write_label(root / "SegmentationClassAug" / "c.png", np.zeros((5, 5)))
    with pytest.raises(bd.DataError, match=r"c.png is 5x5 but its image is 24x20"):
        ds[2]
    _write_label(root / "SegmentationClassAug" / "d.png", np.full((20, 24), 40))
    with pytest.raises(bd.DataError, match=r"d.png holds values \[40\]"):
        ds[3]
    with pytest.raises(ValueError, match="split"):
        bd.SegmentationDataset(data, ["a"], "val")


# --- loaders ----------------------------------------------------------------------------------


def _batches(loader, epoch):
    loader.set_epoch(epoch)
    return [(x.clone(), y.clone()) for x, y in loader]


def test_train_loader_sampling(tmp_path):
    root = make_pascal(tmp_path, ids=tuple("abcdef"))
    ds = bd.SegmentationDataset(
        resolve_dataset("pascal", root),
        list("abcdef"),
        crop_size=(11, 13),
        scale_range=(0.5, 1.5),
        augmentation=True,
    )
    loader = bd.build_train_loader(ds, batch_size=3, iters_per_epoch=4, seed=5)
    epoch0 = _batches(loader, 0)
    assert len(loader) == 4 and len(epoch0) == 4 and all(x.shape == (3, 3, 11, 13) for x, _ in epoch0)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(epoch0, _batches(loader, 0)))
    assert not torch.equal(epoch0[0][0], _batches(loader, 1)[0][0])
    rank1 = bd.build_train_loader(ds, 3, 4, seed=5, rank=1, world_size=2)
    assert not torch.equal(epoch0[0][0], _batches(rank1, 0)[0][0])
    # the draw does not depend on the number of workers
    workers = bd.build_train_loader(ds, 3, 4, num_workers=1, seed=5)
    assert all(
        torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(epoch0, _batches(workers, 0))
    )


def test_unimatch_items_are_square_crops_of_the_seeded_geometry(tmp_path):
    root = make_pascal(tmp_path, ids=tuple("abc"))
    data = resolve_dataset("pascal", root)
    labelled = bd.SegmentationDataset(data, list("abc"), crop_size=(17, 17), crops="unimatch_labelled")
    image, label = labelled[(0, 7)]
    assert image.shape == (3, 17, 17) and label.shape == (17, 17)
    assert all(torch.equal(a, b) for a, b in zip(labelled[(0, 7)], (image, label)))
    unlabelled = bd.SegmentationDataset(data, list("abc"), crop_size=(17, 17), crops="unimatch_unlabelled")
    weak, padding, label, mix, mix_padding = unlabelled[(1, 7)]
    assert weak.shape == mix.shape == (3, 17, 17) and padding.dtype == mix_padding.dtype == torch.bool
    assert 0 <= weak.min() and weak.max() <= 1 and (label[padding] == -1).all()
    with pytest.raises(ValueError, match="crops must be one of"):
        bd.SegmentationDataset(data, list("abc"), crops="unimatch")


def test_sampler_draws_with_replacement_and_covers_items():
    sampler = bd.EpochBatchSampler(num_items=5, batch_size=4, iters_per_epoch=500, seed=0)
    indices = np.array([[i for i, _ in batch] for batch in sampler])
    seeds = [s for batch in sampler for _, s in batch]
    assert indices.shape == (500, 4)
    counts = np.bincount(indices.ravel(), minlength=5)
    assert counts.min() > 300 and counts.max() < 500  # uniform: 400 expected each
    assert any(len(set(row)) < 4 for row in indices.tolist())  # with replacement
    assert len(set(seeds)) == len(seeds)


def test_unimatchs_epoch_stretches_the_items_and_shares_one_shuffle_between_ranks():
    def indices(sampler, epoch=0, start=0):
        sampler.set_epoch(epoch, start)
        return [i for batch in sampler for i, _ in batch]

    # 3 labelled images stretched to 10 unlabelled: each appears 3 or 4 times in an epoch, in a shuffled order
    one = indices(bd.EpochBatchSampler(3, 2, 5, seed=1, epoch_length=10))
    assert sorted(np.bincount(one, minlength=3).tolist()) == [3, 3, 4] and one != sorted(one)
    assert one != indices(bd.EpochBatchSampler(3, 2, 5, seed=1, epoch_length=10), epoch=1)
    # an unlabelled pass over 10 images on 2 ranks: disjoint halves of one shuffle, 2 batches of 2 each
    ranks = [
        indices(bd.EpochBatchSampler(10, 2, 2, seed=1, rank=r, world_size=2, epoch_length=10)) for r in (0, 1)
    ]
    assert len(set(ranks[0] + ranks[1])) == 8 and not set(ranks[0]) & set(ranks[1])
    # more batches than an epoch holds: the next shuffles follow; a resumed epoch skips exactly what it drew
    long = bd.EpochBatchSampler(4, 2, 5, seed=2, epoch_length=4)
    drawn = indices(long)
    assert sorted(drawn[:4]) == sorted(drawn[4:8]) == [0, 1, 2, 3]
    assert indices(long, start=3) == drawn[6:]


def test_test_loader_in_order_and_sharded(tmp_path):
    ids = [f"i{k}" for k in range(7)]
    info = dataclasses.replace(dt.DATASETS["pascal"], eval_size=(20, 24))
    ds = bd.SegmentationDataset(PascalFiles(info, make_pascal(tmp_path, ids=tuple(ids))), ids, "test")
    batches = list(bd.build_test_loader(ds))
    assert [len(y) for _, y in batches] == [4, 3]
    assert torch.equal(batches[0][1][1], ds[1][1])
    shards = [list(bd.build_test_loader(ds, 4, rank=r, world_size=3).sampler) for r in range(3)]
    flat = [i for shard in shards for i in shard]
    assert sorted(flat) == list(range(7)) and all(shards)


def test_loader_workers_rule(monkeypatch):
    monkeypatch.setattr(bd.os, "cpu_count", lambda: 16)
    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    assert [bd.loader_workers(None, cuda, n) for n in (1, 4, 32)] == [8, 4, 1]
    assert bd.loader_workers(None, cpu) == 0 and bd.loader_workers(3, cpu) == 3
    assert bd.loader_workers(0, cuda) == 0


class _WorkerRandom(torch.utils.data.Dataset):
    """Returns draws of the worker's own torch and numpy streams (not of the per-sample seed)."""

    def __len__(self):
        return 4

    def __getitem__(self, item):
        return torch.tensor([torch.rand(()).item(), float(np.random.rand())])


def test_worker_streams_distinct_and_reproducible():
    def draws():
        loader = bd.build_train_loader(
            _WorkerRandom(), batch_size=1, iters_per_epoch=2, num_workers=2, seed=3
        )
        return torch.cat(list(loader))  # one batch from each worker

    first, again = draws(), draws()
    assert torch.equal(first, again)
    assert (first[0] != first[1]).all()  # torch and numpy streams differ between workers
