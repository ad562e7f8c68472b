"""Data: reading image and label files, a dataset bound to its folder (each layout's in layouts.py), the
segmentation dataset, its samplers and loaders. What each dataset is lives in dataset_table.py."""

from __future__ import annotations

import abc
import functools
import os
from collections.abc import Collection, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from dataset_table import INVALID, VOID, DatasetInfo, check_partial, void_values
from faults import ignore_stop_signals, kill_loader_workers_at_exit
from helpers import DataError, stream_seed
from module_list import IGNORE_INDEX
from transforms import HUE_JITTER, normalise, pad_to, random_transform
from unimatch_views import labelled_crop, unlabelled_crops

SPLITS = ("train", "test")
# Image files read from a folder (any case): a folder dataset's images, predict.py's folders and globs.
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm")
CROPS = ("reference", "unimatch_labelled", "unimatch_unlabelled")  # training items (SegmentationDataset)


# ---------------------------------------------------------------------------------------------
# Files: a dataset bound to its folder (DatasetFiles), reading images and labels
# ---------------------------------------------------------------------------------------------


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


class DatasetFiles(abc.ABC):
    """A dataset bound to its data folder: its table entry `info`, its `root`, and where its files lie there
    (a subclass per layout, in layouts.py, whose resolve_dataset gives it for --dataset/--data_root)."""

    def __init__(self, info: DatasetInfo, root: Path):
        self.info, self.root = info, root

    def checked_root(self) -> Path:
        """The data folder; DataError saying how to get the data if it is missing."""
        if not self.root.is_dir():
            raise DataError(
                f"data root {self.root} for --dataset {self.info.name} not found: "
                f"{self.info.setup_hint}, or pass --data_root DIR pointing at the preprocessed "
                f"data (or try --dataset demo)"
            )
        return self.root

    def list_ids(self, split: str) -> list[str]:
        """Image ids of a split, sorted where the reference listed a folder."""
        _check_split(split)
        self.checked_root()
        return self._ids(split)

    def label_path(
        self, image_id: str, split: str, partial: str | None = None, partial_seed: int = 0
    ) -> Path:
        """Path of a label PNG: the full label, or the partial one of setting `partial` and `partial_seed`."""
        _check_split(split)
        check_partial(self.info, partial)
        return self._label_path(image_id, split, f"_{partial}_{partial_seed}" if partial else "")

    def has_mask(self, image_id: str) -> bool:
        """Whether an image has a label file (a folder dataset's unlabelled/ images have none)."""
        return True

    def unlabelled_ids(self) -> list[str]:
        """Ids of the images without masks (a folder dataset's unlabelled/): they join the unlabelled pool."""
        return []

    def renamed_ids(self) -> dict[str, str] | None:
        """Original file name -> id where the preprocessing numbered the files (Cityscapes), else None."""
        return None

    @abc.abstractmethod
    def image_path(self, image_id: str, split: str) -> Path:
        """Path of an image file."""

    @abc.abstractmethod
    def _ids(self, split: str) -> list[str]:
        """list_ids once the split and the root are checked."""

    @abc.abstractmethod
    def _label_path(self, image_id: str, split: str, suffix: str) -> Path:
        """label_path once checked; `suffix` is '' or the partial labels' '_{setting}_{seed}'."""


def _float_image(path: Path) -> DataError:
    """PIL would clip a float image's values to 0..255 (data in 0..1 reads as black): ask for integers."""
    return DataError(
        f"image {path} holds 32-bit floats, whose range is unknown: save it as an 8- or 16-bit "
        f"image (scaled to 0..255 or 0..65535)"
    )


def _too_large(path: Path, error: Exception) -> DataError:
    return DataError(
        f"image {path} is too large to decode safely ({error}): cut it into tiles (e.g. 2048x2048 "
        f"pixels, its mask likewise) and use the tiles"
    )


def _open(path: Path, what: str, hint: str) -> Image.Image:
    """Open and decode an image file, turning every failure into one DataError naming the file."""
    try:
        image = Image.open(path)
        image.load()
        return image
    except FileNotFoundError:
        raise DataError(
            f"{what} {path} is missing: the id list and the data folder disagree; {hint}"
        ) from None
    except Image.DecompressionBombError as error:
        raise _too_large(path, error) from None
    except (OSError, SyntaxError, ValueError) as error:
        raise DataError(
            f"cannot decode {what} {path} ({error}): the file is corrupt; replace it ({hint})"
        ) from None


def read_image(info: DatasetInfo, path: Path) -> np.ndarray:
    """An RGB image file as uint8 [H, W, 3]; 16-bit grey is scaled to 8 bits (PIL's convert would clip it)."""
    image = _open(path, "image", info.setup_hint)
    if image.mode == "F":
        raise _float_image(path)
    if image.mode.startswith("I"):
        grey = np.clip(np.asarray(image, np.float32) / 257, 0, 255).round().astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=2)
    return np.array(image.convert("RGB"))


def read_label_values(path: Path, hint: str) -> np.ndarray:
    """The raw values of a single-channel label PNG (grayscale or palette: the stored indices), [H, W]:
    uint8, or uint16 for 16/32-bit files with values above 255 clipped to 256; errors name the file and
    `hint`."""
    image = _open(path, "label", hint)
    if image.mode == "1":  # a 1-bit PNG: black is 0, white is 1
        return np.asarray(image, np.uint8)
    if image.mode in ("LA", "RGB", "RGBA"):  # a grey mask that a tool saved with colour or alpha channels
        channels = np.asarray(image)[..., : 1 if image.mode == "LA" else 3]
        if not (channels == channels[..., :1]).all():
            raise DataError(
                f"label {path} is an {image.mode} image of colours: labels must be single-channel PNGs "
                f"(grayscale or palette) holding class indices; convert each colour to its class index"
            )
        return np.ascontiguousarray(channels[..., 0])
    if image.mode not in ("L", "P") and not image.mode.startswith("I"):
        raise DataError(
            f"label {path} is a {image.mode} image: labels must be single-channel PNGs "
            f"(grayscale or palette) holding class indices; convert it to indices"
        )
    raw = np.asarray(image)
    return raw if raw.dtype == np.uint8 else np.clip(raw, 0, 256).astype(np.uint16)


def read_label(info: DatasetInfo, path: Path) -> np.ndarray:
    """A label PNG of a dataset as uint8 [H, W] of class ids / VOID (its raw values mapped by the table)."""
    raw = read_label_values(path, info.setup_hint)
    label = info.label_table[raw]
    invalid = label == INVALID
    if invalid.any():
        values = np.unique(raw[invalid])[:8].tolist()
        void = "/".join(map(str, void_values(info)))
        fix = info.value_fix or f"is it the right dataset, preprocessed? ({info.setup_hint})"
        raise DataError(
            f"label {path} holds values {values} that are neither a class of --dataset {info.name} "
            f"(0..{info.num_classes - 1}) nor void {void}: {fix}"
        )
    return label


def present_classes(label: np.ndarray, void_values: Collection[int] = (VOID,)) -> np.ndarray:
    """Values present in label [H, W], ascending, without the void values."""
    present = np.flatnonzero(np.bincount(label.ravel()))
    return present[~np.isin(present, list(void_values))]


def file_stamp(path: Path) -> tuple[int, int, int] | None:
    """What rewriting a file changes (inode, modification time in ns, size), None for a missing file: the key
    of what is read once per process. A rewrite in place to the same size within one tick of the file
    system's clock (a few ms) would go unseen."""
    try:
        stat = path.stat()
    except FileNotFoundError:
        return None
    return stat.st_ino, stat.st_mtime_ns, stat.st_size


def image_size(path: Path) -> tuple[int, int]:
    """(W, H) of an image file, read from its header once while the file is unchanged (file_stamp)."""
    return _header_size(path, file_stamp(path))


@functools.lru_cache(maxsize=1 << 16)
def _header_size(path: Path, stamp: tuple[int, int, int] | None) -> tuple[int, int]:
    """image_size's reading of the header; `stamp` only keys the cache."""
    try:
        with Image.open(path) as image:
            if image.mode == "F":
                raise _float_image(path)
            return image.size
    except Image.DecompressionBombError as error:
        raise _too_large(path, error) from None
    except (OSError, SyntaxError, ValueError) as error:
        raise DataError(
            f"cannot read image {path} ({error}): the file is corrupt or not an image; replace or remove it"
        ) from None


# ---------------------------------------------------------------------------------------------
# Dataset and loaders
# ---------------------------------------------------------------------------------------------


class SegmentationDataset(torch.utils.data.Dataset):
    """Images and labels of one split. Item -> (image float [3, h, w] normalised, label long [h, w]).

    split='train': random rescale/crop (+ augmentation) to crop_size (default info.crop_size); an item index
    may be an (index, seed) pair, which makes its augmentation a pure function of the seed.
    split='test': padded to crop_size (default info.eval_size) at offset (0, 0), no randomness.
    crops (split='train'): 'reference' as above; 'unimatch_labelled' and 'unimatch_unlabelled' are FixMatch's
    and UniMatch's items on a square crop_size (unimatch_views.labelled_crop, unlabelled_crops: the latter
    -> weak crop in [0, 1], its padding, label, and the mix batch's weak crop and padding).
    """

    def __init__(
        self,
        data: DatasetFiles,
        ids: Sequence[str],
        split: str = "train",
        partial: str | None = None,
        partial_seed: int = 0,
        crop_size: tuple[int, int] | None = None,
        scale_range: tuple[float, float] = (1.0, 1.0),
        augmentation: bool = False,
        crops: str = "reference",
        hue_jitter: float = HUE_JITTER,
    ):
        _check_split(split)
        info = data.info
        check_partial(info, partial)
        if crops not in CROPS:
            raise ValueError(f"crops must be one of {CROPS}, got {crops!r}")
        self.crops = crops
        data.checked_root()
        self.data, self.info, self.ids, self.split = data, info, list(ids), split
        self.partial, self.partial_seed = partial, partial_seed
        self.crop_size = tuple(crop_size or (info.crop_size if split == "train" else info.eval_size))
        self.scale_range, self.augmentation, self.hue_jitter = tuple(scale_range), augmentation, hue_jitter
        if partial is not None and self.ids:
            folder = data.label_path(self.ids[0], split, partial, partial_seed).parent
            if not folder.is_dir():
                raise DataError(
                    f"partial-label folder {folder} (--partial {partial}, seed {partial_seed}) not found: "
                    f"{info.setup_hint}"
                )

    def __len__(self) -> int:
        return len(self.ids)

    def load(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The untransformed pair: image float [3, H, W] in [0, 1], label long [H, W] with IGNORE_INDEX."""
        image_id = self.ids[index]
        image = read_image(self.info, self.data.image_path(image_id, self.split))
        if not self.data.has_mask(image_id):  # every pixel ignore: such a label only feeds the monitors
            label = np.full(image.shape[:2], VOID, np.uint8)
        else:
            path = self.data.label_path(image_id, self.split, self.partial, self.partial_seed)
            label = read_label(self.info, path)
            if image.shape[:2] != label.shape:
                raise DataError(
                    f"label {path} is {label.shape[1]}x{label.shape[0]} but its image is "
                    f"{image.shape[1]}x{image.shape[0]} (WxH): re-run the preprocessing "
                    f"({self.info.setup_hint})"
                )
        label = torch.from_numpy(label).long()
        label[label == VOID] = IGNORE_INDEX
        return torch.from_numpy(image).permute(2, 0, 1).float().div_(255), label

    def __getitem__(self, item: int | tuple[int, int]) -> tuple[torch.Tensor, ...]:
        index, seed = item if isinstance(item, tuple) else (item, None)
        image, label = self.load(index)
        if self.split == "test":
            image, label = pad_to(image[None], label[None], self.crop_size)
            return normalise(image[0]), label[0]
        generator = None if seed is None else torch.Generator().manual_seed(seed)
        if self.crops == "unimatch_labelled":
            return labelled_crop(image, label, self.crop_size[0], generator)
        if self.crops == "unimatch_unlabelled":
            return unlabelled_crops(image, label, self.crop_size[0], generator)
        image, label, _ = random_transform(
            image[None],
            label[None],
            None,
            self.crop_size,
            self.scale_range,
            self.augmentation,
            generator,
            self.hue_jitter,
        )
        return normalise(image[0]), label[0]


class EpochBatchSampler(torch.utils.data.Sampler):
    """iters_per_epoch batches of (index, sample_seed) pairs; a pure function of (seed, epoch, rank), so it
    does not depend on the number of workers.

    epoch_length None: indices drawn with replacement, each rank its own. Else UniMatch's epoch: the items
    stretched (repeated, then cut) to epoch_length, shuffled by (seed, epoch), rank r taking every
    world_size-th from r on; more batches than that holds continue with the next shuffles.
    """

    def __init__(
        self,
        num_items: int,
        batch_size: int,
        iters_per_epoch: int,
        seed: int = 0,
        rank: int = 0,
        epoch_length: int | None = None,
        world_size: int = 1,
    ):
        if num_items < 1:
            raise DataError("the training set is empty: check the id list / split")
        self.num_items, self.batch_size, self.iters = num_items, batch_size, iters_per_epoch
        self.seed, self.rank, self.epoch, self.start = seed, rank, 0, 0
        self.epoch_length, self.world_size = epoch_length, world_size

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Draw epoch `epoch`'s batches, skipping its first `start` (already trained on before a stop)."""
        self.epoch, self.start = epoch, start

    def _shuffled(self) -> torch.Tensor:
        """[iters, batch] indices of this rank: shuffles of the stretched items, shared by every rank."""
        shared = torch.Generator().manual_seed(stream_seed("epoch order", self.seed, self.epoch))
        needed = self.iters * self.batch_size * self.world_size
        order = torch.cat(
            [
                torch.randperm(self.epoch_length, generator=shared)
                for _ in range(-(-needed // self.epoch_length))
            ]
        )
        mine = order[self.rank :: self.world_size][: self.iters * self.batch_size]
        return (mine % self.num_items).view(self.iters, self.batch_size)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        generator = torch.Generator().manual_seed(stream_seed("batches", self.seed, self.epoch, self.rank))
        if self.epoch_length is None:
            index = torch.randint(self.num_items, (self.iters, self.batch_size), generator=generator)
        else:
            index = self._shuffled()
        seeds = torch.randint(2**62, (self.iters, self.batch_size), generator=generator)
        for row_index, row_seed in zip(index[self.start :].tolist(), seeds[self.start :].tolist()):
            yield list(zip(row_index, row_seed))

    def __len__(self) -> int:
        return self.iters - self.start


def loader_workers(requested: int | None, device: torch.device, world_size: int = 1) -> int:
    """Loader worker processes: --num_workers, else up to 8 per process on CUDA and none on a CPU, whose step
    needs the cores. 8 feed a 10 + 10 semi step at 321^2 (bench/dataloader.py: 4 workers 107, 8 workers 210
    crops/s on a 16-core H100 machine; a loader needs 100 at a 0.10 s step)."""
    if requested is not None:
        return requested
    return max(1, min(8, (os.cpu_count() or 1) // world_size)) if device.type == "cuda" else 0


def _worker_options(num_workers: int, pin_memory: bool) -> dict:
    """DataLoader options shared by the loaders: workers kept across epochs that leave stop signals to the
    training process (faults.ignore_stop_signals), which therefore kills any still alive at its exit."""
    if num_workers:
        kill_loader_workers_at_exit()
    return dict(
        num_workers=num_workers,
        pin_memory=pin_memory,
        persistent_workers=num_workers > 0,
        worker_init_fn=ignore_stop_signals,
    )


class TrainLoader:
    """A DataLoader over an EpochBatchSampler: len() batches per epoch; call set_epoch(e) before epoch e."""

    def __init__(
        self,
        dataset: SegmentationDataset,
        sampler: EpochBatchSampler,
        num_workers: int,
        seed: int,
        pin_memory: bool,
    ):
        self.dataset, self.sampler = dataset, sampler
        self.loader = torch.utils.data.DataLoader(
            dataset,
            batch_sampler=sampler,
            **_worker_options(num_workers, pin_memory),
            # seeds the workers' torch, numpy and random streams: distinct per worker, reproducible per run
            generator=torch.Generator().manual_seed(stream_seed("loader workers", seed, sampler.rank)),
        )

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.sampler.set_epoch(epoch, start)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return iter(self.loader)

    def __len__(self) -> int:
        return len(self.sampler)


def build_train_loader(
    dataset: SegmentationDataset,
    batch_size: int,
    iters_per_epoch: int,
    num_workers: int = 0,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    pin_memory: bool = False,
    epoch_length: int | None = None,
) -> TrainLoader:
    """Exactly iters_per_epoch batches per epoch: sampled with replacement, each rank its own (epoch_length
    None), or UniMatch's shuffled epoch of epoch_length items shared out between the ranks
    (EpochBatchSampler)."""
    sampler = EpochBatchSampler(
        len(dataset), batch_size, iters_per_epoch, seed, rank, epoch_length, world_size
    )
    return TrainLoader(dataset, sampler, num_workers, seed, pin_memory)


def build_test_loader(
    dataset: SegmentationDataset,
    batch_size: int = 4,
    num_workers: int = 0,
    rank: int = 0,
    world_size: int = 1,
    pin_memory: bool = False,
) -> torch.utils.data.DataLoader:
    """In order; with world_size > 1 rank r takes the r-th contiguous shard (disjoint shards, no padding)."""
    n = len(dataset)
    shard = range(n * rank // world_size, n * (rank + 1) // world_size)
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, sampler=shard, **_worker_options(num_workers, pin_memory)
    )
