"""Data: the dataset table, label maps, joint transforms, datasets, loaders, label-budget splits,
partial labels and the synthetic demo dataset."""

from module_list import IGNORE_INDEX

# Void value of label files on disk; it becomes IGNORE_INDEX in tensors.
VOID = 255


class DataError(Exception):
    """A problem with the user's data or data flags; the message names the file or flag and the fix."""


# ---------------------------------------------------------------------------------------------
# Splits, partial labels and the demo dataset (below this line)
# ---------------------------------------------------------------------------------------------

import os  # noqa: E402  (imports of this section; kept here so the two owners of this file do not collide)
import random  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402
from collections.abc import Callable, Collection, Mapping, Sequence  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

# Partial-label settings in the order the reference draws them: the first pass over all files
# draws p25, p5, p1 per file; a second pass draws p0 (one pixel per class).
PARTIAL_FRACTIONS = {"p25": 0.25, "p5": 0.05, "p1": 0.01}
PARTIAL_SEEDS = (0, 1, 2)


def read_png(path: Path) -> np.ndarray:
    """Raw values of a single-channel label PNG as uint8 [H, W] (no class remapping)."""
    try:
        with Image.open(path) as img:
            array = np.array(img)
    except OSError as err:
        raise DataError(f"cannot read label file {path}: {err}; re-create it with the dataset's "
                        f"preprocessing script") from err
    if array.ndim != 2 or array.dtype != np.uint8:
        raise DataError(f"label file {path} is not a single-channel 8-bit PNG (shape {array.shape}, "
                        f"dtype {array.dtype}); labels must hold one class id per pixel")
    return array


def write_png(path: Path, array: np.ndarray) -> None:
    """Save uint8 [H, W] as a grayscale PNG."""
    Image.fromarray(np.ascontiguousarray(array, dtype=np.uint8), mode="L").save(path)


def _valid_classes(label: np.ndarray, void_values: Collection[int]) -> np.ndarray:
    """Class values present in label [H, W], ascending, without the void values."""
    present = np.flatnonzero(np.bincount(label.ravel(), minlength=256))
    return present[~np.isin(present, list(void_values))]


def _square_half_width(region: np.ndarray, y: int, x: int, target: int) -> int:
    """Smallest r = 2k such that the square [y-r, y+r] x [x-r, x+r] (clipped) holds >= target region pixels.

    k steps of dilating a one-pixel mask with a 5x5 ones kernel give exactly that square, so this is
    the reference's "dilate until enough pixels" loop, computed at once on an integral image.
    """
    h, w = region.shape
    integral = np.zeros((h + 1, w + 1), np.int64)
    np.cumsum(np.cumsum(region, axis=0), axis=1, out=integral[1:, 1:])
    k_max = (max(y, h - 1 - y, x, w - 1 - x) + 1) // 2  # this square covers the whole image
    r = 2 * np.arange(k_max + 1)
    y0, y1 = np.maximum(y - r, 0), np.minimum(y + r + 1, h)
    x0, x1 = np.maximum(x - r, 0), np.minimum(x + r + 1, w)
    counts = integral[y1, x1] - integral[y0, x1] - integral[y1, x0] + integral[y0, x0]
    return int(r[np.argmax(counts >= target)])


def partial_label(label: np.ndarray, rng: np.random.RandomState, fraction: float,
                  void_values: Collection[int] = (VOID,), fill: int = VOID) -> np.ndarray:
    """Partial label uint8 [H, W] from a full label [H, W]: per valid class, a square around one random
    pixel of the class, grown 2 px per side until it covers int(fraction * class size) class pixels,
    clipped to the class (fraction 0: the single pixel). Other pixels are `fill`."""
    h, w = label.shape
    out = np.full((h, w), fill, np.uint8)
    for c in _valid_classes(label, void_values):
        region = label == c
        pixels = np.flatnonzero(region)  # row-major, as np.nonzero lists them
        # The reference's exact draw: legacy choice without replacement (a full permutation).
        y, x = divmod(int(pixels[rng.choice(pixels.size, 1, replace=False)[0]]), w)
        r = _square_half_width(region, y, x, int(fraction * pixels.size))
        window = np.s_[max(y - r, 0):y + r + 1, max(x - r, 0):x + r + 1]
        out[window][region[window]] = c
    return out


def _replace_dir(new: Path, dest: Path) -> None:
    """Move the finished folder `new` to `dest`, replacing an old `dest` without a half-written moment."""
    if dest.exists():
        old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
        dest.rename(old)
        new.rename(dest)
        shutil.rmtree(old)
    else:
        new.rename(dest)


def write_partial_labels(label_files: Sequence[Path], dest: Path, folder_format: str,
                         seeds: Sequence[int] = PARTIAL_SEEDS, void_values: Collection[int] = (VOID,),
                         fill: int = VOID, progress: bool = False) -> None:
    """Write the p25/p5/p1/p0 partial labels of `label_files` (in the given order, which fixes the
    random stream) into dest/folder_format.format(partial=..., seed=...)/<file name>, per seed."""
    from tqdm import tqdm

    dest.mkdir(parents=True, exist_ok=True)
    settings = [*PARTIAL_FRACTIONS.items(), ("p0", 0.0)]
    for seed in seeds:
        tmp = Path(tempfile.mkdtemp(prefix=f".partial-{seed}-", dir=dest))
        try:
            for name, _ in settings:
                (tmp / name).mkdir()
            rng = np.random.RandomState(seed)  # the same stream as np.random.seed(seed)
            passes = [settings[:3], settings[3:]]
            bar = tqdm(total=2 * len(label_files), desc=f"partial labels, seed {seed}", disable=not progress)
            for pass_settings in passes:
                for path in label_files:
                    label = read_png(path)
                    for name, fraction in pass_settings:
                        write_png(tmp / name / path.name, partial_label(label, rng, fraction, void_values, fill))
                    bar.update()
            bar.close()
            for name, _ in settings:
                _replace_dir(tmp / name, dest / folder_format.format(partial=name, seed=seed))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


# --- the synthetic demo dataset (Pascal layout, 5 classes) ---

# Per object class: base colour (RGB) and second texture colour.
_DEMO_COLOURS = {
    1: ((220, 60, 50), (120, 20, 20)),     # stripes: red / dark red
    2: ((40, 90, 210), (230, 230, 240)),   # checker: blue / white
    3: ((40, 150, 60), (240, 220, 40)),    # dots: green with yellow dots
    4: ((150, 70, 190), (190, 120, 230)),  # blob: smooth shaded purple
}


def _dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    """Binary dilation of mask [H, W] with a (2r+1) x (2r+1) square (zero outside the image)."""
    out = mask.copy()
    for axis in (0, 1):
        grown = out.copy()
        for shift in range(1, radius + 1):
            ahead = [slice(None)] * 2
            behind = [slice(None)] * 2
            ahead[axis], behind[axis] = slice(shift, None), slice(None, -shift)
            grown[tuple(ahead)] |= out[tuple(behind)]
            grown[tuple(behind)] |= out[tuple(ahead)]
        out = grown
    return out


def _demo_sample(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """One synthetic image uint8 [size, size, 3] and its label uint8 [size, size] (0..4, VOID borders)."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    # Background: a smooth gradient between two dull colours plus pixel noise.
    angle = rng.uniform(0, 2 * np.pi)
    ramp = (np.cos(angle) * (xx - 0.5) + np.sin(angle) * (yy - 0.5) + 0.75) / 1.5
    c0, c1 = rng.uniform(70, 170, size=(2, 3))
    image = c0 + (c1 - c0) * ramp[..., None]
    label = np.zeros((size, size), np.uint8)
    instances = np.zeros((size, size), np.int32)
    for index, cls in enumerate(rng.integers(1, 5, size=rng.integers(2, 5)), start=1):
        cy, cx = rng.uniform(0.15, 0.85, size=2)
        radius = rng.uniform(0.12, 0.28)
        theta = np.arctan2(yy - cy, xx - cx)
        dist = np.hypot(yy - cy, xx - cx)
        shape = rng.integers(3)
        if shape == 0:  # ellipse
            ry, rx = radius * rng.uniform(0.6, 1.0, size=2)
            region = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
        elif shape == 1:  # rotated rectangle
            rot = rng.uniform(0, np.pi)
            u = np.cos(rot) * (xx - cx) + np.sin(rot) * (yy - cy)
            v = -np.sin(rot) * (xx - cx) + np.cos(rot) * (yy - cy)
            region = (np.abs(u) <= radius) & (np.abs(v) <= radius * rng.uniform(0.4, 0.9))
        else:  # wobbly blob
            phase = rng.uniform(0, 2 * np.pi, size=2)
            edge = radius * (1 + 0.25 * np.sin(3 * theta + phase[0]) + 0.12 * np.sin(5 * theta + phase[1]))
            region = dist <= edge
        base, second = (np.array(c, np.float32) + rng.uniform(-20, 20, size=3) for c in _DEMO_COLOURS[cls])
        px, py = xx * size, yy * size
        if cls == 1:  # stripes at a random angle, period 6-10 px
            rot, period = rng.uniform(0, np.pi), rng.uniform(6, 10)
            pattern = np.sin(2 * np.pi * (np.cos(rot) * px + np.sin(rot) * py) / period) > 0
        elif cls == 2:  # checkerboard, cells of 4-6 px
            cell = rng.integers(4, 7)
            pattern = ((px // cell + py // cell) % 2).astype(bool)
        elif cls == 3:  # dots on a lattice
            step = rng.uniform(6, 9)
            pattern = np.hypot(px % step - step / 2, py % step - step / 2) < step / 4
        else:  # smooth radial shading
            pattern = None
        if pattern is None:
            shade = np.clip(1 - dist / (2 * radius), 0, 1)[..., None]
            texture = base + (second - base) * shade
        else:
            texture = np.where(pattern[..., None], second, base)
        image = np.where(region[..., None], texture, image)
        label[region] = cls
        instances[region] = index
    # VOC-like void band: 2 px outside every visible object (objects also border each other).
    void = np.zeros((size, size), bool)
    for index in np.unique(instances[instances > 0]):
        obj = instances == index
        void |= _dilate(obj, 2) & ~obj
    label[void] = VOID
    image = image + rng.normal(0, 8, size=image.shape)
    return np.clip(image, 0, 255).round().astype(np.uint8), label


_DEMO_MARKER = "DEMO_DATASET"  # file that marks a folder as a generated demo dataset


def make_demo_dataset(root: str | os.PathLike, seed: int = 0, num_train: int = 240, num_val: int = 48,
                      size: int = 96, partial_seeds: Sequence[int] = PARTIAL_SEEDS) -> Path:
    """Generate the synthetic demo dataset in the Pascal layout under `root` (deterministic in `seed`):
    JPEGImages/{id}.jpg, SegmentationClassAug/{id}.png, train_aug.txt, val.txt and the partial labels
    SegmentationClassAug_{p0,p1,p5,p25}_{s}. Written aside and renamed into place; returns root."""
    root = Path(root)
    if root.exists() and any(root.iterdir()) and not (root / _DEMO_MARKER).exists():
        raise DataError(f"{root} exists and is not a demo dataset made by this project; pass another "
                        f"root folder or delete this one")
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}-", dir=root.parent))
    try:
        (tmp / "JPEGImages").mkdir()
        (tmp / "SegmentationClassAug").mkdir()
        ids = {"train_aug": [f"train_{i:05d}" for i in range(num_train)],
               "val": [f"val_{i:05d}" for i in range(num_val)]}
        for split_code, (split, split_ids) in enumerate(ids.items()):
            for i, sample_id in enumerate(split_ids):
                image, label = _demo_sample(np.random.default_rng([seed, split_code, i]), size)
                Image.fromarray(image).save(tmp / "JPEGImages" / f"{sample_id}.jpg", quality=95)
                write_png(tmp / "SegmentationClassAug" / f"{sample_id}.png", label)
            (tmp / f"{split}.txt").write_text("\n".join(split_ids) + "\n")
        label_files = sorted((tmp / "SegmentationClassAug").glob("*.png"))
        write_partial_labels(label_files, tmp, "SegmentationClassAug_{partial}_{seed}", partial_seeds)
        (tmp / _DEMO_MARKER).write_text(f"seed={seed} num_train={num_train} num_val={num_val} size={size}\n")
        _replace_dir(tmp, root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root



# --- label-budget splits (full-label mode) ---

ClassSets = Mapping[str, Collection[int]] | Callable[[str], Collection[int]]


def _budget_error(num_labels: int, got: int, why: str) -> DataError:
    return DataError(f"cannot pick {num_labels} labelled images: {why} (picked {got}); pass a smaller "
                     f"--num_labels, or --num_labels 0 to use every training image")


def select_labelled(ids: Sequence[str], class_sets: ClassSets, num_labels: int, seed: int, num_classes: int,
                    min_classes: int) -> tuple[list[str], list[str]]:
    """The reference's class-balanced greedy split (Pascal, Cityscapes): returns (labelled ids in selection
    order, the other ids in list order). `class_sets` maps an id to its classes (void excluded); it is
    called lazily and may be called again for the same id."""
    classes_of = class_sets if callable(class_sets) else class_sets.__getitem__
    if not 0 <= num_labels <= len(ids):
        raise _budget_error(num_labels, 0, f"the training list has {len(ids)} images")
    work = list(ids)
    random.Random(seed).shuffle(work)  # the only random draw, as random.seed(seed); random.shuffle(...)
    counter = [0] * num_classes
    least_seen = set(range(num_classes))
    labelled: list[str] = []
    rejected: list[str] = []
    failed: set[str] = set()  # ids rejected since the last accept
    while len(labelled) < num_labels:
        if not work:
            work, rejected = rejected, []
        candidate = work.pop()
        classes = set(classes_of(candidate))
        if len(classes) >= min_classes and (not labelled or classes & least_seen):
            labelled.append(candidate)
            for c in classes:
                counter[c] += 1
            failed.clear()
        else:
            rejected.append(candidate)
            failed.add(candidate)
            # Acceptance depends only on the counters, so once every remaining id failed since the last
            # accept, no id can ever pass: the reference would loop forever here.
            if len(failed) == len(work) + len(rejected):
                raise _budget_error(num_labels, len(labelled),
                                    f"no remaining image has >= {min_classes} classes including one of the "
                                    f"least-seen classes {sorted(least_seen)}")
        fewest = min(counter)
        least_seen = {c for c in range(num_classes) if counter[c] == fewest}
    chosen = set(labelled)
    return labelled, [i for i in ids if i not in chosen]


def select_labelled_sun(ids: Sequence[str], class_sets: ClassSets, num_labels: int, seed: int,
                        num_classes: int) -> tuple[list[str], list[str]]:
    """The reference's SUN split: take images from the per-class lists of the least-seen class (no minimum
    class count). Returns (labelled ids in selection order, the other ids in list order)."""
    classes_of = class_sets if callable(class_sets) else class_sets.__getitem__
    if not 0 <= num_labels <= len(ids):
        raise _budget_error(num_labels, 0, f"the training list has {len(ids)} images")
    shuffled = list(ids)
    random.Random(seed).shuffle(shuffled)
    class_list: list[list[str]] = [[] for _ in range(num_classes)]
    for i in shuffled:
        for c in classes_of(i):
            class_list[c].append(i)
    counter = np.zeros(num_classes, np.int64)
    active = np.ones(num_classes, bool)
    fill = list(range(num_classes))
    labelled: list[str] = []
    chosen: set[str] = set()
    while len(labelled) < num_labels:
        if not fill:
            raise _budget_error(num_labels, len(labelled), "every image containing a class was taken")
        if class_list[fill[0]]:
            candidate = class_list[fill[0]].pop()
            if candidate not in chosen:
                labelled.append(candidate)
                chosen.add(candidate)
                counter[list(classes_of(candidate))] += 1
                fill = np.flatnonzero(active & (counter == counter[active].min())).tolist()
        else:  # this class has no images left: it stops counting
            active[fill[0]] = False
            fill = fill[1:]
    return labelled, [i for i in ids if i not in chosen]


def get_split(info: "DatasetInfo", root: str | os.PathLike, num_labels: int, seed: int
              ) -> tuple[list[str], list[str]]:
    """(labelled ids, unlabelled ids) of the training set for a label budget; 0 -> (all ids, all ids)."""
    ids = list_ids(info, root, "train")
    if num_labels == 0:
        return list(ids), list(ids)
    cache: dict[str, frozenset[int]] = {}

    def classes_of(i: str) -> frozenset[int]:
        if i not in cache:
            path = label_path(info, root, i, "train")
            classes = _valid_classes(read_label(info, path), (VOID,))
            if classes.size and classes[-1] >= info.num_classes:
                raise DataError(f"label file {path} holds class {classes[-1]}, but {info.name} has "
                                f"{info.num_classes} classes (0..{info.num_classes - 1}, {VOID} = void)")
            cache[i] = frozenset(classes.tolist())
        return cache[i]

    if info.min_classes == 0:
        return select_labelled_sun(ids, classes_of, num_labels, seed, info.num_classes)
    return select_labelled(ids, classes_of, num_labels, seed, info.num_classes, info.min_classes)


def write_split_dir(path: str | os.PathLike, labelled: Sequence[str], unlabelled: Sequence[str]) -> None:
    """Write path/labelled.txt and path/unlabelled.txt, one id per line."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    for name, split_ids in (("labelled.txt", labelled), ("unlabelled.txt", unlabelled)):
        tmp = path / f".{name}.tmp{os.getpid()}"
        tmp.write_text("".join(f"{i}\n" for i in split_ids))
        os.replace(tmp, path / name)


def read_split_dir(path: str | os.PathLike) -> tuple[list[str], list[str]]:
    """(labelled, unlabelled) ids from a folder written by write_split_dir or dataset/make_splits.py."""
    path = Path(path)
    lists = []
    for name in ("labelled.txt", "unlabelled.txt"):
        file = path / name
        if not file.is_file():
            raise FileNotFoundError(f"split file {file} does not exist: --split_dir must be a folder written "
                                    f"by dataset/make_splits.py (labelled.txt and unlabelled.txt)")
        lists.append([line.strip() for line in file.read_text().splitlines() if line.strip()])
    if not lists[0]:
        raise DataError(f"split file {path / 'labelled.txt'} lists no ids; re-create it with "
                        f"dataset/make_splits.py")
    return lists[0], lists[1]
