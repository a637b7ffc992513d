"""Data for `python -m fused_resnet train`: a deterministic synthetic set, or an ImageFolder.

Synthetic: class k has a fixed random prototype image (drawn from `seed`); sample i is its
class's prototype plus Gaussian noise drawn from (seed, i), so the set is the same on every
run and every rank, learnable, and needs no download. ImageFolder: the standard augmentations
(CIFAR-size nets: the image resized and center-cropped to 32x32 as for validation, then a
4-pixel padded random crop + horizontal flip, as in the paper's CIFAR experiments; ImageNet
nets: RandomResizedCrop(224) + flip; validation: resize 256, center crop 224), then
per-channel normalization; each training item's random draws come from (seed, epoch, index)
(`SeededDraws`), whatever the number of loader workers. Validation images take the training
folder's class indices.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Optional

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, RandomSampler, Sampler

if TYPE_CHECKING:
    from fused_resnet.train.loop import TrainConfig

CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class SyntheticImages(Dataset):
    """`size` images of `classes` classes, (3, image_size, image_size), deterministic."""

    def __init__(self, size: int, image_size: int, classes: int = 10, seed: int = 0,
                 noise: float = 1.0, offset: int = 0):
        if size < 1 or image_size < 1 or classes < 2:
            raise ValueError(f"size and image_size must be >= 1 and classes >= 2, got {size}, "
                             f"{image_size}, {classes}")
        g = torch.Generator().manual_seed(seed)
        self.prototypes = torch.randn(classes, 3, image_size, image_size, generator=g)
        self.size, self.classes, self.seed = size, classes, seed
        self.noise, self.offset = noise, offset

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        i = self.offset + index
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + i + 1)
        label = int(torch.randint(0, self.classes, (1,), generator=g))
        image = self.prototypes[label] + self.noise * torch.randn(
            self.prototypes.shape[1:], generator=g)
        return image, label


class StridedSplit(Sampler):
    """Rank `rank`'s share of `size` items for validation under DDP: every `world`-th index
    from `rank`, unshuffled and unpadded (DistributedSampler pads the shares to one length
    with repeated items, which the all-reduced counts would score twice). Together the ranks
    cover each item exactly once; shares differ in length by at most one."""

    def __init__(self, size: int, rank: int, world: int):
        if world < 1 or not 0 <= rank < world:
            raise ValueError(f"rank must be in [0, world) with world >= 1, got rank {rank}, "
                             f"world {world}")
        self.size, self.rank, self.world = size, rank, world

    def __iter__(self):
        return iter(range(self.rank, self.size, self.world))

    def __len__(self) -> int:
        return len(range(self.rank, self.size, self.world))


class SeededDraws(Dataset):
    """`dataset` (a training ImageFolder) whose item i takes its random draws (the
    augmentations': torch's CPU generator) from a seed of (seed, epoch, i) alone, in the
    training process and in any loader worker alike: a run's batches do not depend on
    --workers (nor on the core count that picks its default), and a resume gets them back.
    `make_loader` sets `epoch` before it makes each epoch's loader (workers copy the dataset
    as they start). Other attributes are the dataset's (classes, class_to_idx, ...)."""

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset, self.seed, self.epoch = dataset, seed, 0

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        # fork_rng: the caller's generator state is left as it was (~10 us an item, beside
        # an image's decoding)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(((self.seed * 1_000_003 + self.epoch) * 1_000_000_007 + index)
                              % 2**63)
            return self.dataset[index]

    def __getattr__(self, name: str):
        dataset = self.__dict__.get("dataset")  # (absent while unpickling in a worker)
        if dataset is None:
            raise AttributeError(name)
        return getattr(dataset, name)


def _class_folders(root: str) -> list[str]:
    """The class subfolders of an ImageFolder root, sorted (ImageFolder's class order)."""
    return sorted(entry.name for entry in os.scandir(root) if entry.is_dir())


def _folder_with_classes(classes: list[str], class_to_idx: dict[str, int]):
    """An ImageFolder class labelled by another folder's classes: `classes` (index -> name,
    as `.classes` always is) and `class_to_idx` (the names this folder has, with their
    index in `classes`) instead of its own sorted order."""
    from torchvision import datasets

    class ClassMappedFolder(datasets.ImageFolder):
        def find_classes(self, directory: str) -> tuple[list[str], dict[str, int]]:
            return list(classes), dict(class_to_idx)

    return ClassMappedFolder


def image_folder(root: str, train: bool, cifar: bool,
                 class_to_idx: Optional[dict[str, int]] = None, classes_from: str = ""):
    """torchvision ImageFolder at `root` with the standard augmentations (module docstring).
    With `class_to_idx` (the training folder `classes_from`'s), each class keeps that index
    and `.classes` is that folder's list; class folders may be missing, but one the mapping
    lacks is a ValueError naming both folders and the class."""
    from torchvision import datasets, transforms

    if not os.path.isdir(root):
        raise ValueError(f"--data must be 'synthetic' or an ImageFolder directory; {root!r} is "
                         "not a directory")
    mean, std = (CIFAR_MEAN, CIFAR_STD) if cifar else (IMAGENET_MEAN, IMAGENET_STD)
    if cifar:  # both at the scale of the whole image at 32x32 (no-ops on 32x32 images)
        plain = [transforms.Resize(32), transforms.CenterCrop(32)]
        aug = plain + [transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip()]
    else:
        aug = [transforms.RandomResizedCrop(224), transforms.RandomHorizontalFlip()]
        plain = [transforms.Resize(256), transforms.CenterCrop(224)]
    tail = [transforms.ToTensor(), transforms.Normalize(mean, std)]
    transform = transforms.Compose((aug if train else plain) + tail)
    folder = datasets.ImageFolder
    if class_to_idx is not None:
        names = _class_folders(root)
        unknown = [name for name in names if name not in class_to_idx]
        if unknown:
            raise ValueError(f"--data: the validation folder {root!r} has class {unknown[0]!r}, "
                             f"which the training folder {classes_from!r} lacks; the model "
                             "learns the training folder's classes only (add the class to "
                             "it, or remove the folder from validation)")
        if names:  # none: ImageFolder's own "no class folder" error, below
            by_index = sorted(class_to_idx, key=class_to_idx.get)
            folder = _folder_with_classes(by_index, {n: class_to_idx[n] for n in names})
    try:
        return folder(root, transform)
    except FileNotFoundError as exc:  # no class folders, or no images in them
        reason = str(exc).rstrip(".")
        raise ValueError(f"--data {root!r} is not an ImageFolder: {reason}; it needs one "
                         "subfolder of images per class (or train/ and val/ folders of "
                         "those)") from None


def data_workers(cfg: TrainConfig, image_size: int, world: int) -> int:
    """Loader processes per rank: cfg.workers where set; else none for synthetic images of
    at most 64x64 (a batch is drawn in about a millisecond in this process), and otherwise
    (decoded and augmented images, or large synthetic ones: 40M Gaussian draws a batch of 256
    at 224x224, 100 ms or more on one core) up to 8, a share of this machine's cores."""
    if cfg.workers is not None:
        return cfg.workers
    if cfg.data == "synthetic" and image_size <= 64:
        return 0
    return max(1, min(8, (os.cpu_count() or 1) // max(world, 1)))


def make_datasets(data: str, image_size: int, cifar: bool, synthetic_size: int,
                  seed: int, classes: int = 10):
    """(train set, validation set, number of classes). For an ImageFolder root, its `train`
    and `val` subfolders when present, else the root for both."""
    if data == "synthetic":
        train = SyntheticImages(synthetic_size, image_size, classes, seed)
        val = SyntheticImages(max(1, synthetic_size // 4), image_size, classes, seed,
                              offset=synthetic_size)
        return train, val, classes
    train_root = os.path.join(data, "train")
    val_root = os.path.join(data, "val")
    if not os.path.isdir(train_root):
        train_root = val_root = data
    train = image_folder(train_root, True, cifar)
    val = image_folder(val_root, False, cifar, train.class_to_idx, train_root)
    return SeededDraws(train, seed), val, len(train.classes)


def make_loader(dataset, batch_size: int, *, train: bool, seed: int, workers: int,
                rank: int = 0, world: int = 1, epoch: int = 0,
                pin_memory: bool = False) -> DataLoader:
    """A loader whose order depends only on (seed, epoch): the same after a resume. Training
    loaders shuffle (each rank its share under DDP) and drop the last partial batch;
    validation loaders under DDP read each rank's `StridedSplit`, every image once;
    `pin_memory` (for a CUDA run) lets the batches' copies to the GPU be asynchronous."""
    if isinstance(dataset, SeededDraws):
        dataset.epoch = epoch  # its items' draws: this epoch's
    sampler: Optional[Sampler] = None
    if world > 1 and train:
        sampler = DistributedSampler(dataset, world, rank, shuffle=True, seed=seed,
                                     drop_last=True)
        sampler.set_epoch(epoch)
    elif world > 1:
        sampler = StridedSplit(len(dataset), rank, world)
    elif train:
        sampler = RandomSampler(dataset, generator=torch.Generator().manual_seed(
            seed * 1_000_003 + epoch))
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=train,
                      num_workers=workers, persistent_workers=False, pin_memory=pin_memory,
                      generator=torch.Generator().manual_seed(seed + epoch))
