"""The model, CIFAR loading and the albumentations pipeline: shapes, seeding per worker, formats."""
import dataclasses
import os
import pickle
import re
import shutil

import numpy as np
import pytest
import torch

import augment
import resnet
import train

from helpers import CLASSES, coloured_images, tiny_args, write_cifar_folder


def test_model_shape_parameters_and_layer_names():
    model = resnet.resnet18(num_classes=10)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    assert sum(p.numel() for p in model.parameters()) == 11_173_962
    names = [name for name, _ in model.named_children()]
    assert names[2:6] == ["layer1", "layer2", "layer3", "layer4"]
    assert resnet.resnet18(num_classes=100)(torch.randn(1, 3, 32, 32)).shape == (1, 100)


def test_train_transform_output_and_cutout_fill():
    image = np.full((32, 32, 3), 200, dtype=np.uint8)
    out = augment.train_transform(augment.CIFAR10_MEAN, cutout=16)(image=image)["image"]
    assert out.shape == (3, 32, 32) and out.dtype == torch.uint8
    fill = torch.tensor(augment.mean_colour(augment.CIFAR10_MEAN), dtype=torch.uint8).view(3, 1)
    hole = (out == fill.view(3, 1, 1)).all(0)
    assert hole.sum() == 16 * 16  # one 16x16 square in the mean colour, everything else untouched
    assert (out[:, ~hole] == 200).all()


def test_cutout_places_its_hole_anywhere_inside_and_leaves_the_input_alone():
    image = np.full((32, 32, 3), 200, dtype=np.uint8)
    transform = augment.train_transform(augment.CIFAR10_MEAN, cutout=12, pad_crop=0, flip=False)
    corners = set()
    for seed in range(400):
        augment.reseed(transform, seed)
        hole = (transform(image=image)["image"] != 200).any(0).nonzero()
        assert len(hole) == 12 * 12
        corners.add(tuple(hole.min(0).values.tolist()))
    assert (image == 200).all()  # no crop or flip before it: the cutout was handed the dataset's own array
    rows, columns = zip(*corners)
    assert set(rows) == set(columns) == set(range(32 - 12 + 1))  # every place where the hole fits


def test_pipeline_normalization_equals_device_normalization():
    image = coloured_images(1, 3)[0][0]
    mean, std = augment.CIFAR10_MEAN, augment.CIFAR10_STD
    in_pipeline = augment.train_transform(mean, 0, 0, False, normalize_std=std)(image=image)["image"]
    on_device = augment.normalize(augment.train_transform(mean, 0, 0, False)(image=image)["image"][None], mean, std)
    assert in_pipeline.dtype == torch.float32
    assert torch.allclose(in_pipeline, on_device[0], atol=1e-5)


def test_normalize_uses_cifar_statistics():
    mean, std = augment.CIFAR10_MEAN, augment.CIFAR10_STD
    images = torch.tensor(augment.mean_colour(mean), dtype=torch.uint8).view(1, 3, 1, 1).expand(2, 3, 4, 4)
    assert augment.normalize(images, mean, std).abs().max() < 0.01  # the mean colour maps to ~0
    white = augment.normalize(torch.full((1, 3, 1, 1), 255, dtype=torch.uint8), mean, std)
    expected = [(1 - m) / s for m, s in zip(mean, std)]
    assert torch.allclose(white.flatten(), torch.tensor(expected), atol=1e-5)


def augmented_batches(seed, workers, batches=4):
    images = np.tile(coloured_images(1, 0)[0], (32 * batches, 1, 1, 1))  # one image, many times
    dataset = augment.AugmentedImages(images, np.zeros(len(images), dtype=np.int64),
                                      augment.train_transform(augment.CIFAR10_MEAN))
    sampler = augment.SeededBatchSampler(len(dataset), 32, seed=seed)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=workers)
    return [x for x, _ in loader]


def test_same_seed_same_augmentations_whatever_the_workers():
    first, again, two_workers = augmented_batches(0, 0), augmented_batches(0, 0), augmented_batches(0, 2)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert all(torch.equal(a, b) for a, b in zip(first, two_workers))
    assert not torch.equal(first[0], augmented_batches(1, 0)[0])


def test_two_workers_draw_different_augmentations():
    # Batches 0 and 1 come from worker 0 and worker 1. Without per-batch seeding, albumentations 2.0.8
    # gives every worker a copy of one generator state, and these two batches would be identical.
    batches = augmented_batches(0, workers=2)
    assert not torch.equal(batches[0], batches[1])
    assert not torch.equal(batches[2], batches[3])
    # Within a batch, the images of one source image differ too.
    assert len({tuple(x.flatten().tolist()) for x in batches[0]}) > 20


def crop_row_and_flip(reseed_with, seeds=300):
    """Correlation between the crop's row offset and the flip decision over batches seeded 0..seeds-1."""
    transform = augment.train_transform(augment.CIFAR10_MEAN, cutout=0)
    transform.save_applied_params = True
    image = np.zeros((32, 32, 3), dtype=np.uint8)
    rows, flips = [], []
    for seed in range(seeds):
        reseed_with(transform, seed)
        applied = dict(transform(image=image)["applied_transforms"])
        rows.append(applied["RandomCrop"]["crop_coords"][1])
        flips.append("HorizontalFlip" in applied)
    return np.corrcoef(rows, flips)[0, 1]


def test_reseed_gives_each_transform_its_own_stream():
    # Compose.set_random_seed hands every transform the same seed: the flip then follows the crop.
    assert abs(crop_row_and_flip(lambda t, seed: t.set_random_seed(seed))) > 0.5
    assert abs(crop_row_and_flip(lambda t, seed: augment.reseed(t, [seed]))) < 0.2


def test_sampler_covers_data_and_changes_order_per_epoch():
    sampler = augment.SeededBatchSampler(100, 32, seed=0)
    first = [i for _, batch in sampler for i in batch]
    sampler.set_epoch(1)
    second = [i for _, batch in sampler for i in batch]
    assert len(sampler) == 3 and len(first) == 96 and len(set(first)) == 96
    assert first != second
    assert len(augment.SeededBatchSampler(10, 32, seed=0)) == 1  # never zero batches


def test_load_dataset_reads_cifar_format_exactly(tmp_path, capsys):
    root = write_cifar_folder(str(tmp_path))
    data = augment.load_dataset("cifar10", root, download=False)
    expected, labels = coloured_images(40, 0)
    assert data.train_images.shape == (200, 32, 32, 3) and data.train_images.dtype == np.uint8
    assert np.array_equal(data.train_images[:40], expected) and np.array_equal(data.train_labels[:40], labels)
    assert data.test_images.shape == (40, 32, 32, 3) and data.classes == CLASSES
    assert not data.official
    assert "not the official CIFAR-10" in capsys.readouterr().err  # a copy loads, with a warning


def test_cifar100_format_trains(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    images, _ = coloured_images(40, 5)
    for name in ("train", "test"):
        with open(folder / name, "wb") as f:  # CIFAR-100 keeps its labels under 'fine_labels'
            pickle.dump({"data": images.transpose(0, 3, 1, 2).reshape(40, -1),
                         "fine_labels": list(range(40)), "coarse_labels": [0] * 40}, f)
    with open(folder / "meta", "wb") as f:
        pickle.dump({"fine_label_names": [f"class{i}" for i in range(100)]}, f)
    assert train.main(tiny_args(str(tmp_path), tmp_path / "run", "--dataset", "cifar100", "--epochs", "1")) == 0
    checkpoint = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert checkpoint["model_args"] == {"num_classes": 100} and checkpoint["dataset"] == "cifar100"
    assert tuple(checkpoint["mean"]) == augment.CIFAR100_MEAN


def test_load_dataset_refuses_what_is_not_cifars_layout(data_dir, tmp_path):
    # HWC images (torchvision's CIFAR10.data pickled as is) or floats in [0, 1] would reshape into
    # scrambled pictures without a word; labels that are no list, or an empty batch, used to crash.
    images, labels = coloured_images(4, 0)
    rows = images.transpose(0, 3, 1, 2).reshape(4, -1)
    cases = [({"data": images, "labels": labels.tolist()}, "uint8 of shape (4, 32, 32, 3)"),
             ({"data": rows / 255.0, "labels": labels.tolist()}, "float64"),
             ({"data": rows.tolist(), "labels": labels.tolist()}, "'data' is list"),
             ({"data": rows, "labels": 3}, "labels are not a list"),
             ({"data": rows[:0], "labels": []}, "holds 0 images and 0 labels")]
    for entry, message in cases:
        copy = tmp_path / "copy"
        shutil.rmtree(copy, ignore_errors=True)
        shutil.copytree(data_dir, copy)
        with open(copy / "cifar-10-batches-py" / "test_batch", "wb") as f:
            pickle.dump(entry, f)
        with pytest.raises(augment.DatasetError, match=re.escape(message)) as error:
            augment.load_dataset("cifar10", str(copy), download=False)
        assert "test_batch is not a CIFAR batch" in str(error.value) or "holds 0" in str(error.value)
    with open(copy / "cifar-10-batches-py" / "test_batch", "wb") as f:  # CIFAR's layout, unflattened: fine
        pickle.dump({"data": rows.reshape(4, 3, 32, 32), "labels": labels.tolist()}, f)
    assert np.array_equal(augment.load_dataset("cifar10", str(copy), download=False).test_images, images)


def test_dataset_files_and_checksums_match_torchvision():
    from torchvision.datasets import CIFAR10, CIFAR100
    for spec, reference in ((augment.CIFAR10, CIFAR10), (augment.CIFAR100, CIFAR100)):
        assert (spec.url, spec.archive, spec.archive_md5, spec.folder) == (
            reference.url, reference.filename, reference.tgz_md5, reference.base_folder)
        assert [list(f) for f in spec.train_files + spec.test_files] == reference.train_list + reference.test_list
        assert spec.meta_file == (reference.meta["filename"], reference.meta["md5"])
        assert spec.class_names_key == reference.meta["key"]


def test_missing_dataset_without_download_says_where(tmp_path):
    with pytest.raises(augment.DatasetError, match="cifar-10-python.tar.gz"):
        augment.load_dataset("cifar10", str(tmp_path), download=False)


def without_proxies(monkeypatch):
    """A proxy from the environment would be asked instead of the unreachable address, and might wait."""
    for proxy in ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"):
        monkeypatch.delenv(proxy, raising=False)


def test_an_archive_put_in_place_by_hand_is_extracted_without_downloading(data_dir, tmp_path, monkeypatch):
    import tarfile
    without_proxies(monkeypatch)
    archive = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(os.path.join(data_dir, "cifar-10-batches-py"), arcname="cifar-10-batches-py")
    official = dataclasses.replace(augment.CIFAR10, archive_md5=augment._md5(str(archive)),
                                   url="http://127.0.0.1:9/cifar-10-python.tar.gz")  # never reached
    monkeypatch.setitem(augment.DATASETS, "cifar10", official)
    data = augment.load_dataset("cifar10", str(tmp_path), download=False)
    assert len(data.test_labels) == 40 and (tmp_path / "cifar-10-batches-py" / "test_batch").exists()
    damaged = tmp_path / "damaged"  # an interrupted download, say
    damaged.mkdir()
    (damaged / "cifar-10-python.tar.gz").write_bytes(archive.read_bytes()[:1000])
    with pytest.raises(augment.DatasetError, match="is not the official CIFAR-10 archive"):
        augment.load_dataset("cifar10", str(damaged), download=False)
    with pytest.raises(augment.DatasetError, match="could not download"):  # downloads again, over it
        augment.load_dataset("cifar10", str(damaged), download=True)


def test_failed_download_says_what_to_do(tmp_path, monkeypatch):
    # Nothing listens on port 9 of the loopback: the download fails at once, as it does offline.
    without_proxies(monkeypatch)
    unreachable = dataclasses.replace(augment.CIFAR10, url="http://127.0.0.1:9/cifar-10-python.tar.gz")
    monkeypatch.setitem(augment.DATASETS, "cifar10", unreachable)
    with pytest.raises(augment.DatasetError) as error:
        augment.load_dataset("cifar10", str(tmp_path), download=True)
    message = str(error.value)
    assert "could not download" in message and unreachable.url in message and str(tmp_path) in message
    assert "\n" not in message
    assert tmp_path.exists()  # a folder that was there stays
    new_folder = tmp_path / "data"
    with pytest.raises(augment.DatasetError):
        augment.load_dataset("cifar10", str(new_folder), download=True)
    assert not new_folder.exists()  # one the download created goes again: no empty data/ left behind
