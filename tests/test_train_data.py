"""The data `train` reads: validation images labelled with the training folder's class
indices, CIFAR nets' training crops at the scale validation sees, and DDP validation splits
that score every image once."""

import os

import numpy as np
import pytest
import torch
from PIL import Image

from fused_resnet.train import TrainConfig, train
from fused_resnet.train.data import StridedSplit, image_folder, make_datasets, make_loader

pytest.importorskip("torchvision")


def _write_images(folder, shades, size=8):
    """One subfolder per class name in `shades` (name -> grey level), 2 images each."""
    for name, shade in shades.items():
        os.makedirs(folder / name)
        for i in range(2):
            Image.fromarray(np.full((size, size, 3), shade + i, np.uint8)).save(
                folder / name / f"{i}.png")


def test_validation_takes_the_training_folders_class_indices(tmp_path):
    _write_images(tmp_path / "train", {"a": 10, "b": 120, "c": 230})
    _write_images(tmp_path / "val", {"a": 10, "c": 230})  # no "b": fine
    train_set, val_set, classes = make_datasets(str(tmp_path), 32, True, 0, 0)
    assert classes == 3 and train_set.class_to_idx == {"a": 0, "b": 1, "c": 2}
    assert val_set.class_to_idx == {"a": 0, "c": 2}
    assert val_set.classes == ["a", "b", "c"]  # .classes[label] names every label
    labels = [label for _, label in val_set.samples]
    names = [os.path.basename(os.path.dirname(path)) for path, _ in val_set.samples]
    assert labels == [train_set.class_to_idx[name] for name in names] == [0, 0, 2, 2]


def test_a_validation_class_the_training_folder_lacks_is_named(tmp_path):
    _write_images(tmp_path / "train", {"a": 10, "b": 120})
    _write_images(tmp_path / "val", {"a": 10, "zebra": 230})
    expected = (f"the validation folder '{tmp_path / 'val'}' has class 'zebra', which the "
                f"training folder '{tmp_path / 'train'}' lacks")
    with pytest.raises(ValueError, match=expected):
        make_datasets(str(tmp_path), 32, True, 0, 0)
    out = tmp_path / "run"
    with pytest.raises(ValueError, match="has class 'zebra'"):
        train(TrainConfig(arch="cifar_resnet20", data=str(tmp_path), out=str(out),
                          backend="reference", device="cpu", workers=0, progress=False))
    assert not out.exists()  # refused before anything was written


@pytest.mark.parametrize("layout, message", [
    ((), "Couldn't find any class folder"),
    (("a",), "Found no valid file"),
])
def test_an_empty_validation_folder_is_named(tmp_path, layout, message):
    _write_images(tmp_path / "train", {"a": 10, "b": 120})
    os.makedirs(tmp_path / "val")
    for name in layout:
        os.makedirs(tmp_path / "val" / name)
    with pytest.raises(ValueError, match=f"--data '{tmp_path / 'val'}' is not an ImageFolder: "
                                         f"{message}"):
        make_datasets(str(tmp_path), 32, True, 0, 0)


def _black_columns(image):
    """Columns of the middle row that are black in every channel (below the mean)."""
    return int((image[:, image.shape[1] // 2] < 0).all(0).sum())


def test_cifar_training_crops_see_the_whole_image_at_32(tmp_path):
    """A 64x64 image, left half black: validation shows it resized to 32x32 (16 black
    columns); a training crop of the same scale, padded by 4 and maybe flipped, shows 12 to
    20 (a 32x32 window of the full-size image would show anything from 0 to 32)."""
    os.makedirs(tmp_path / "x")
    pixels = np.full((64, 64, 3), 255, np.uint8)
    pixels[:, :32] = 0
    Image.fromarray(pixels).save(tmp_path / "x" / "0.png")
    val = image_folder(str(tmp_path), False, True)[0][0]
    assert val.shape == (3, 32, 32) and _black_columns(val) == 16
    train_set = image_folder(str(tmp_path), True, True)
    torch.manual_seed(0)
    crops = [train_set[0][0] for _ in range(24)]
    assert all(c.shape == (3, 32, 32) for c in crops)
    assert all(12 <= _black_columns(c) <= 20 for c in crops), [_black_columns(c) for c in crops]


def test_cifar_training_crops_of_32x32_images_are_the_papers(tmp_path):
    """On 32x32 images (CIFAR's) the resize and center crop change nothing: the same draws
    give the padded random crop + flip of the paper exactly."""
    from torchvision import transforms

    from fused_resnet.train.data import CIFAR_MEAN, CIFAR_STD

    os.makedirs(tmp_path / "x")
    pixels = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "x" / "0.png")
    paper = transforms.Compose([transforms.RandomCrop(32, padding=4),
                                transforms.RandomHorizontalFlip(), transforms.ToTensor(),
                                transforms.Normalize(CIFAR_MEAN, CIFAR_STD)])
    train_set = image_folder(str(tmp_path), True, True)
    for seed in range(6):
        torch.manual_seed(seed)
        ours = train_set[0][0]
        torch.manual_seed(seed)
        assert torch.equal(ours, paper(Image.open(tmp_path / "x" / "0.png").convert("RGB")))


@pytest.mark.parametrize("size, world", [(17, 2), (9, 4), (3, 4), (8, 2)])
def test_strided_split_covers_every_item_once(size, world):
    shares = [list(StridedSplit(size, rank, world)) for rank in range(world)]
    assert sorted(i for share in shares for i in share) == list(range(size))
    assert [len(StridedSplit(size, rank, world)) for rank in range(world)] == \
        [len(share) for share in shares]


def test_ddp_validation_loaders_score_each_image_once():
    """17 validation images on 2 ranks: 9 and 8 (DistributedSampler would give 9 and 9, the
    first image twice)."""
    _, val_set, _ = make_datasets("synthetic", 4, True, 68, 0)
    assert len(val_set) == 17
    seen = []
    for rank in range(2):
        loader = make_loader(val_set, 4, train=False, seed=0, workers=0, rank=rank, world=2)
        seen.append([y for _, ys in loader for y in ys.tolist()])
    assert [len(s) for s in seen] == [9, 8]
    assert sorted(seen[0] + seen[1]) == sorted(val_set[i][1] for i in range(17))


@pytest.mark.parametrize("rank, world", [(2, 2), (-1, 2), (0, 0)])
def test_strided_split_names_a_bad_rank(rank, world):
    with pytest.raises(ValueError, match=f"got rank {rank}, world {world}"):
        StridedSplit(4, rank, world)


def test_training_draws_do_not_depend_on_loader_workers(tmp_path):
    """Augmented batches of an epoch are the same with 0 and 2 loader processes (each item's
    draws seeded by (seed, epoch, index): `SeededDraws`), differ between epochs, and leave
    the caller's generator as it was."""
    os.makedirs(tmp_path / "x")
    rng = np.random.default_rng(0)
    for i in range(8):
        Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(
            tmp_path / "x" / f"{i}.png")
    train_set, _, _ = make_datasets(str(tmp_path), 32, True, 0, seed=3)

    def epoch_batches(workers, epoch):
        loader = make_loader(train_set, 4, train=True, seed=3, workers=workers, epoch=epoch)
        return torch.cat([x for x, _ in loader])

    torch.manual_seed(0)
    state = torch.get_rng_state()
    in_process = epoch_batches(0, epoch=1)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(epoch_batches(2, epoch=1), in_process)
    assert not torch.equal(epoch_batches(0, epoch=2), in_process)
