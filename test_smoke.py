"""The project's tests: CPU only, no downloads, a tiny dataset written in CIFAR-10's real on-disk format.

    python -m pytest            # everything
    python -m pytest -k resume  # one topic
"""
import os

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # albumentations would ask PyPI on import

import argparse
import contextlib
import ctypes
import dataclasses
import json
import pickle
import platform
import queue
import re
import shutil
import socket
import warnings

import numpy as np
import pytest
import torch

import augment
import benchmark
import engine
import files
import resnet
import runfiles
import train

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
# A class-specific colour makes a task that ResNet18 learns in a few CPU steps, to show that training learns.
CLASS_COLOURS = np.array([[230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48],
                          [145, 30, 180], [70, 240, 240], [240, 50, 230], [128, 128, 0], [0, 0, 128]])


# ----------------------------------------------------------------------------- fixtures

def write_cifar_batch(path, images, labels):
    """Write images (N, 32, 32, 3) uint8 in CIFAR-10's python format: a pickle of CHW rows."""
    rows = images.transpose(0, 3, 1, 2).reshape(len(images), -1)
    with open(path, "wb") as f:
        pickle.dump({"batch_label": "test", "labels": [int(x) for x in labels], "data": rows,
                     "filenames": [f"{i}.png" for i in range(len(labels))]}, f)


def coloured_images(count, seed):
    """Images whose colour gives their class away, plus noise, so that a model can learn them fast."""
    rng = np.random.default_rng(seed)
    labels = np.arange(count) % 10
    noise = rng.normal(0, 25, size=(count, 32, 32, 3))
    images = np.clip(CLASS_COLOURS[labels][:, None, None, :] + noise, 0, 255).astype(np.uint8)
    return images, labels


def write_cifar_folder(root, train_per_batch=40, test_count=40, seed=0):
    """`root`/cifar-10-batches-py with five training batches, a test batch and batches.meta."""
    folder = os.path.join(root, "cifar-10-batches-py")
    os.makedirs(folder, exist_ok=True)
    for b in range(5):
        images, labels = coloured_images(train_per_batch, seed + b)
        write_cifar_batch(os.path.join(folder, f"data_batch_{b + 1}"), images, labels)
    images, labels = coloured_images(test_count, seed + 99)
    write_cifar_batch(os.path.join(folder, "test_batch"), images, labels)
    with open(os.path.join(folder, "batches.meta"), "wb") as f:
        pickle.dump({"label_names": CLASSES, "num_cases_per_batch": train_per_batch, "num_vis": 3072}, f)
    return root


@pytest.fixture(scope="session", autouse=True)
def torchrun_logs_in_pytest_temp(tmp_path_factory):
    """torchrun's agents make a log folder per launch, in /tmp/torchelastic_* unless told (PET_LOG_DIR is
    its --log-dir): into pytest's own temporary folder, which pytest clears."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PET_LOG_DIR", str(tmp_path_factory.mktemp("torchrun-logs")))
        yield


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    return write_cifar_folder(str(tmp_path_factory.mktemp("data")))


@pytest.fixture(scope="session")
def fp16_data_dir(tmp_path_factory):
    """fp16 on a CPU runs reference kernels (0.37 s per image, forward and backward): 8 test images."""
    return write_cifar_folder(str(tmp_path_factory.mktemp("data_fp16")), test_count=8)


def tiny_args(data_dir, out_dir, *extra):
    """A run that takes a second or two on a CPU."""
    return ["--data-dir", data_dir, "--out-dir", str(out_dir), "--device", "cpu", "--epochs", "2",
            "--batch-size", "32", "--train-subset", "64", "--workers", "0", *extra]


def fp16_args(data_dir, out_dir, *extra):
    """tiny_args for fp16: 2 steps of 4 images an epoch."""
    return tiny_args(data_dir, out_dir, "--precision", "fp16", "--batch-size", "4", "--train-subset", "8", *extra)


def error_lines(err):
    """stderr without the tiny dataset's expected 'not the official CIFAR-10' warning, and the note that a
    tiny run's warm-up is under a step."""
    return [line for line in err.splitlines()
            if not line.startswith("warning: ") and "is one step or less" not in line]


def run_main(module, argv, capsys=None):
    """Call module.main(argv) and return (exit code, stderr): argparse's errors arrive as SystemExit."""
    try:
        code = module.main(argv)
    except SystemExit as exit_:
        code = exit_.code
    return code, (capsys.readouterr().err if capsys else "")


@pytest.fixture(scope="session")
def trained_run(data_dir, tmp_path_factory):
    """One tiny 2-epoch run shared by the tests that only read its outputs."""
    out = tmp_path_factory.mktemp("run")
    assert train.main(tiny_args(data_dir, out)) == 0
    return out


# ----------------------------------------------------------------------------- model

def test_model_shape_parameters_and_layer_names():
    model = resnet.resnet18(num_classes=10)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    assert sum(p.numel() for p in model.parameters()) == 11_173_962
    names = [name for name, _ in model.named_children()]
    assert names[2:6] == ["layer1", "layer2", "layer3", "layer4"]
    assert resnet.resnet18(num_classes=100)(torch.randn(1, 3, 32, 32)).shape == (1, 100)


# ----------------------------------------------------------------------------- augmentation and data

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


# ----------------------------------------------------------------------------- training end to end

def test_training_writes_log_and_checkpoints(trained_run):
    log = json.loads((trained_run / "log.json").read_text())
    assert log["format"] == runfiles.LOG_FORMAT and log["classes"] == CLASSES
    assert log["args"]["epochs"] == 2 and log["environment"]["device"] == "cpu"
    assert [r["epoch"] for r in log["epochs"]] == [1, 2]
    for record in log["epochs"]:
        assert {"epoch", "lr", "train_loss", "train_acc", "test_loss", "test_acc", "test_acc_tta",
                "seconds", "images_per_s"} <= set(record)
        assert 0 <= record["test_acc"] <= 1 and record["images_per_s"] > 0
    summary = log["summary"]
    assert summary["final_test_acc"] == log["epochs"][-1]["test_acc"]
    assert summary["best_test_acc"] == max(r["test_acc"] for r in log["epochs"])
    assert set(log["per_class_accuracy"]) == set(CLASSES)
    confusion = np.array(log["confusion_matrix"])
    assert confusion.shape == (10, 10) and confusion.sum() == 40
    assert np.trace(confusion) / 40 == pytest.approx(summary["final_test_acc"])

    for name in ("last.pt", "best.pt"):
        checkpoint = torch.load(trained_run / name, weights_only=True)
        assert checkpoint["format"] == resnet.CHECKPOINT_FORMAT
        assert {"model", "model_args", "classes", "mean", "std", "optimizer", "scheduler", "scaler", "rng",
                "epoch", "args", "history"} <= set(checkpoint)
        assert checkpoint["classes"] == CLASSES and tuple(checkpoint["mean"]) == augment.CIFAR10_MEAN
        assert not any(k.startswith(("_orig_mod.", "module.")) for k in checkpoint["model"])
        model = resnet.model_from_checkpoint(checkpoint)
        assert model(torch.zeros(1, 3, 32, 32)).shape == (1, 10)
    assert torch.load(trained_run / "last.pt", weights_only=True)["epoch"] == 2
    assert not [n for n in os.listdir(trained_run) if ".tmp-" in n]


def test_training_learns_a_learnable_task(data_dir, tmp_path, capsys):
    argv = tiny_args(data_dir, tmp_path, "--epochs", "4", "--train-subset", "200", "--batch-size", "20")
    assert train.main(argv) == 0
    out, err = capsys.readouterr()
    # Not a terminal: one line per epoch and no progress bars.
    assert [line.split()[1] for line in out.splitlines() if line.startswith("epoch")] == ["1/4", "2/4", "3/4", "4/4"]
    assert "%|" not in err and "step/s" not in err
    log = json.loads((tmp_path / "log.json").read_text())
    assert log["epochs"][-1]["test_acc"] >= 0.5, log["epochs"]  # chance is 0.1
    assert log["epochs"][-1]["train_loss"] < log["epochs"][0]["train_loss"]


@pytest.mark.parametrize("precision", ["auto", "fp16"])  # fp16: the grad scaler's state travels too
def test_resume_continues_and_matches_an_uninterrupted_run(request, tmp_path, monkeypatch, capsys, precision):
    data_dir = request.getfixturevalue("fp16_data_dir" if precision == "fp16" else "data_dir")
    args = fp16_args if precision == "fp16" else tiny_args
    argv = ["--epochs", "3", "--deterministic"]
    straight = tmp_path / "straight"
    assert train.main(args(data_dir, straight, *argv)) == 0

    # Interrupt the second run as Ctrl-C would, right after epoch 2 is saved.
    interrupted = tmp_path / "interrupted"
    save = train.Run.save

    def save_then_interrupt(self, record, confusion):
        save(self, record, confusion)
        if record["epoch"] == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(train.Run, "save", save_then_interrupt)
    code, err = run_main(train, args(data_dir, interrupted, *argv), capsys)
    assert code == 130 and "--resume" in err
    assert torch.load(interrupted / "last.pt", weights_only=True)["epoch"] == 2
    monkeypatch.undo()

    code, err = run_main(train, ["--resume", str(interrupted / "last.pt"), "--device", "cpu", "--workers", "0",
                                 "--data-dir", data_dir, "--epochs", "9", "--precision", precision], capsys)
    assert code == 0 and "ignoring --epochs 9: --resume continues the recipe" in err
    resumed_log = json.loads((interrupted / "log.json").read_text())
    straight_log = json.loads((straight / "log.json").read_text())
    assert [r["epoch"] for r in resumed_log["epochs"]] == [1, 2, 3]
    for a, b in zip(resumed_log["epochs"], straight_log["epochs"]):
        for key in ("lr", "train_loss", "train_acc", "test_loss", "test_acc"):
            assert a[key] == b[key], (key, a, b)
    resumed = torch.load(interrupted / "last.pt", weights_only=True)
    uninterrupted = torch.load(straight / "last.pt", weights_only=True)
    assert all(torch.equal(resumed["model"][k], uninterrupted["model"][k]) for k in resumed["model"])
    # fp16: scale and count of good steps since the last overflow (a fresh scaler would count from 0)
    assert resumed["scaler"] == uninterrupted["scaler"]


def test_compiled_run_saves_plain_checkpoints_and_resumes(data_dir, tmp_path, monkeypatch, capsys):
    from torch._dynamo.utils import counters
    save = train.Run.save

    def save_then_interrupt(self, record, confusion):
        save(self, record, confusion)
        raise KeyboardInterrupt

    monkeypatch.setattr(train.Run, "save", save_then_interrupt)
    torch._dynamo.reset()
    counters.clear()
    # 40 test images at batch 32: a ragged last batch of 8, which would be a third graph.
    assert run_main(train, tiny_args(data_dir, tmp_path, "--compile"), capsys)[0] == 130
    assert counters["stats"]["unique_graphs"] == 2, dict(counters["stats"])  # training and evaluation
    monkeypatch.undo()
    torch._dynamo.reset()
    counters.clear()
    assert train.main(["--resume", str(tmp_path / "last.pt"), "--device", "cpu", "--workers", "0",
                       "--data-dir", data_dir, "--compile"]) == 0
    assert counters["stats"]["unique_graphs"] == 2, dict(counters["stats"])
    checkpoint = torch.load(tmp_path / "last.pt", weights_only=True)
    assert checkpoint["epoch"] == 2 and checkpoint["args"]["compile"]
    assert list(checkpoint["model"]) == list(resnet.resnet18().state_dict())  # no '_orig_mod.' prefixes
    assert [r["epoch"] for r in json.loads((tmp_path / "log.json").read_text())["epochs"]] == [1, 2]


def test_plateau_schedule_watches_validation_not_test(data_dir, tmp_path):
    argv = tiny_args(data_dir, tmp_path, "--schedule", "plateau", "--lr", "0.01", "--batch-size", "16",
                     "--weight-decay", "0", "--label-smoothing", "0", "--val-split", "16")
    assert train.main(argv) == 0
    log = json.loads((tmp_path / "log.json").read_text())
    assert all("val_acc" in r for r in log["epochs"]) and log["summary"]["best_checkpoint_metric"] == "val_acc"
    assert log["epochs"][0]["lr"] == 0.01


# ----------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("extra, message", [
    (["--epochs", "0"], "--epochs must be at least 1"),
    (["--batch-size", "0"], "--batch-size must be at least 1"),
    (["--device", "tpu"], "unknown --device"),
    (["--resume", "/nonexistent/last.pt"], "not found"),
])
def test_bad_arguments_exit_2_with_one_line(data_dir, tmp_path, capsys, extra, message):
    code, err = run_main(train, tiny_args(data_dir, tmp_path, *extra), capsys)
    assert code == 2 and message in err and len(error_lines(err)) == 1, err


def test_cuda_asked_for_but_absent(data_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # also true on a GPU machine
    monkeypatch.setattr(devices, "nvidia_driver_version", lambda: None)
    code, err = run_main(train, tiny_args(data_dir, tmp_path, "--device", "cuda"), capsys)
    assert code == 2 and "no NVIDIA GPU" in err


@pytest.mark.parametrize("device", ["auto", "cuda"])
def test_a_gpu_that_torch_cannot_use_stops_the_run_in_one_line(data_dir, tmp_path, monkeypatch, capsys, device):
    # Colab's 550 driver beside torch's CUDA 13 build: --device auto would quietly train on the CPU.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(devices, "nvidia_driver_version", lambda: "550.54.15")
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    code, err = run_main(train, tiny_args(data_dir, tmp_path, "--device", device), capsys)
    assert code == 2 and len(error_lines(err)) == 1, err
    assert "driver 550.54.15" in err and "CUDA 13.0" in err and "580" in err and "--device cpu" in err
    assert not os.listdir(tmp_path)


def test_unwritable_out_dir(data_dir, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    code, err = run_main(train, tiny_args(data_dir, blocker / "run"), capsys)
    assert code == 2 and "cannot write to output folder" in err


def test_missing_data_without_download(tmp_path, capsys):
    code, err = run_main(train, tiny_args(str(tmp_path / "empty"), tmp_path / "run", "--no-download"), capsys)
    assert code == 2 and "CIFAR-10 not found" in err and len(error_lines(err)) == 1


def test_resume_rejects_corrupt_foreign_and_mismatched_checkpoints(data_dir, trained_run, tmp_path, capsys):
    # Random bytes fail torch.load in different ways (these seeds: UnpicklingError, IndexError,
    # UnicodeDecodeError, KeyError); a truncated checkpoint is a broken zip archive.
    damaged = []
    for seed in (0, 17, 54, 62):
        damaged.append(tmp_path / f"random-{seed}.pt")
        damaged[-1].write_bytes(np.random.default_rng(seed).bytes(1000))
    damaged.append(tmp_path / "truncated.pt")
    damaged[-1].write_bytes((trained_run / "last.pt").read_bytes()[:100_000])
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {}}, foreign)
    other_classes = tmp_path / "cifar100.pt"
    checkpoint = torch.load(trained_run / "last.pt", weights_only=True)
    checkpoint["model_args"] = {"num_classes": 100}
    torch.save(checkpoint, other_classes)
    for path, message in [*((path, "is corrupt") for path in damaged),
                          (foreign, "not a checkpoint written by train.py"),
                          (other_classes, "is for 100 classes")]:
        code, err = run_main(train, ["--resume", str(path), "--data-dir", data_dir, "--device", "cpu",
                                     "--workers", "0", "--out-dir", str(tmp_path / "out")], capsys)
        assert code == 2 and message in err and len(error_lines(err)) == 1, err


@pytest.mark.parametrize("precision", ["auto", "fp16"])  # fp16: a grad scaler must not hide a NaN loss
def test_diverging_run_stops_and_keeps_last_good_checkpoint(request, tmp_path, monkeypatch, capsys, precision):
    data_dir = request.getfixturevalue("fp16_data_dir" if precision == "fp16" else "data_dir")
    args = fp16_args if precision == "fp16" else tiny_args
    save = train.Run.save

    def save_then_raise_lr(self, record, confusion):  # epoch 1 trains well, then the lr explodes
        save(self, record, confusion)
        for group in self.runner.optimizer.param_groups:
            group["lr"] = 1e12
        self.runner.per_step_schedule = False

    monkeypatch.setattr(train.Run, "save", save_then_raise_lr)
    code, err = run_main(train, args(data_dir, tmp_path), capsys)
    assert code == 1 and "NaN or infinite at epoch 2, step" in err and len(error_lines(err)) == 1, err
    assert "still holds epoch 1" in err
    checkpoint = torch.load(tmp_path / "last.pt", weights_only=True)
    assert checkpoint["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in checkpoint["model"].values() if v.is_floating_point())
    assert [r["epoch"] for r in json.loads((tmp_path / "log.json").read_text())["epochs"]] == [1]


# ----------------------------------------------------------------------------- a new user's first hour

def test_a_second_run_does_not_replace_the_first(trained_run, data_dir, tmp_path, capsys):
    folder = tmp_path / "run"
    shutil.copytree(trained_run, folder)
    before = {name: (folder / name).read_bytes() for name in ("log.json", "last.pt", "best.pt")}
    final = json.loads(before["log.json"])["epochs"][-1]["test_acc"]
    code, err = run_main(train, tiny_args(data_dir, folder), capsys)
    assert code == 2 and len(error_lines(err)) == 1, err
    for words in ("holds another finished run", "2 of 2 epochs", f"{100 * final:.2f}%", "--out-dir", "--overwrite"):
        assert words in err, (words, err)
    assert "--resume" not in err  # a finished run has nothing left to continue
    assert {name: (folder / name).read_bytes() for name in before} == before
    assert train.main(tiny_args(data_dir, folder, "--epochs", "1", "--overwrite")) == 0
    assert [r["epoch"] for r in json.loads((folder / "log.json").read_text())["epochs"]] == [1]


def test_resume_from_another_folder_finds_the_runs_data(data_dir, tmp_path, monkeypatch, capsys):
    data = tmp_path / "my-data"
    shutil.copytree(data_dir, data)
    run = tmp_path / "run"
    monkeypatch.chdir(tmp_path)
    interrupt_after_epoch(monkeypatch, 1)
    code, err = run_main(train, tiny_args("my-data", "run"), capsys)  # relative paths, as a user types them
    assert code == 130
    command = err.split("continue with: ")[1].split()
    monkeypatch.undo()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    # The printed command, as printed, plus this machine's flags: no --data-dir, no download attempt.
    assert command[:2] == ["python", "train.py"]
    assert train.main([*command[2:], "--device", "cpu", "--workers", "0", "--no-download"]) == 0
    assert not (elsewhere / "data").exists() and not os.listdir(elsewhere)
    assert torch.load(run / "last.pt", weights_only=True)["args"]["data_dir"] == str(data)


def test_resume_into_another_folder_refuses_another_run_and_branches_the_run(data_dir, trained_run, tmp_path,
                                                                             monkeypatch, capsys):
    first = tmp_path / "first"
    interrupt_after_epoch(monkeypatch, 1)
    assert run_main(train, tiny_args(data_dir, first), capsys)[0] == 130
    monkeypatch.undo()
    machine = ["--device", "cpu", "--workers", "0"]
    resume = ["--resume", str(first / "last.pt"), *machine]
    other = tmp_path / "other"
    shutil.copytree(trained_run, other)
    code, err = run_main(train, [*resume, "--out-dir", str(other)], capsys)
    assert code == 2 and "holds another finished run" in err, err
    # Stopped before its first epoch was saved: the branch holds the run as saved, and resumes from there.
    monkeypatch.setattr(train.Run, "epoch", lambda *_: (_ for _ in ()).throw(KeyboardInterrupt))
    code, err = run_main(train, [*resume, "--out-dir", str(other), "--overwrite"], capsys)
    monkeypatch.undo()
    assert code == 130 and f"continue with: python train.py --resume {other / 'last.pt'}" in err, err
    saved = json.loads((first / "log.json").read_text())["epochs"]
    assert json.loads((other / "log.json").read_text())["epochs"] == saved  # not the replaced run's
    for name in ("last.pt", "best.pt"):
        assert torch.load(other / name, weights_only=True)["history"] == saved
    branch = tmp_path / "branch"
    code, err = run_main(train, [*resume, "--out-dir", str(branch)], capsys)
    assert code == 0, err
    log = json.loads((branch / "log.json").read_text())
    best = torch.load(branch / "best.pt", weights_only=True)  # there, whether or not epoch 2 improved
    assert best["epoch"] == log["summary"]["best_checkpoint_epoch"] and [r["epoch"] for r in log["epochs"]] == [1, 2]
    # A finished run branched: nothing to train, and the new folder holds the whole run.
    code, out = run_main(train, ["--resume", str(trained_run / "last.pt"), *machine, "--out-dir", str(tmp_path / "copy")],
                         capsys)
    assert code == 0 and sorted(os.listdir(tmp_path / "copy")) == [".train.lock", "best.pt", "last.pt", "log.json"]
    copied, original = (json.loads((folder / "log.json").read_text()) for folder in (tmp_path / "copy", trained_run))
    assert copied["epochs"] == original["epochs"] and copied["confusion_matrix"] == original["confusion_matrix"]


def test_resume_repairs_files_that_a_kill_between_writes_left_behind(data_dir, tmp_path, monkeypatch, capsys):
    # Killed after last.pt of the last epoch was written, before best.pt and log.json: the checkpoint is
    # complete, and the resume (with nothing left to train) brings the other two up to date.
    class Killed(Exception):
        pass

    def killed(*_):
        raise Killed

    monkeypatch.setattr(files, "atomic_link", killed)
    with pytest.raises(Killed):
        train.main(tiny_args(data_dir, tmp_path, "--epochs", "1"))
    monkeypatch.undo()
    assert (tmp_path / "last.pt").exists() and not (tmp_path / "best.pt").exists() and not (tmp_path / "log.json").exists()
    code, err = run_main(train, ["--resume", str(tmp_path / "last.pt"), "--device", "cpu", "--workers", "0"], capsys)
    assert code == 0, err
    assert torch.load(tmp_path / "best.pt", weights_only=True)["epoch"] == 1
    log = json.loads((tmp_path / "log.json").read_text())
    assert [r["epoch"] for r in log["epochs"]] == [1] and log["summary"]["epochs_done"] == 1
    assert sum(map(sum, log["confusion_matrix"])) == log["data"]["test_images"] and "per_class_accuracy" in log
    # Killed after last.pt (and best.pt, if epoch 2 improved) of the last epoch, before log.json: the log on disk is an epoch behind.
    write_json = files.write_json

    def killed_at_epoch_2(path, log):
        if len(log["epochs"]) == 2:
            raise Killed
        write_json(path, log)

    monkeypatch.setattr(files, "write_json", killed_at_epoch_2)
    with pytest.raises(Killed):
        train.main(tiny_args(data_dir, tmp_path / "two", "--epochs", "2"))
    monkeypatch.undo()
    assert len(json.loads((tmp_path / "two" / "log.json").read_text())["epochs"]) == 1
    code = run_main(train, ["--resume", str(tmp_path / "two" / "last.pt"), "--device", "cpu", "--workers", "0"])[0]
    out = capsys.readouterr().out
    assert code == 0 and "nothing to do" in out and "resuming at epoch 3/2" not in out, out
    log = json.loads((tmp_path / "two" / "log.json").read_text())
    assert [r["epoch"] for r in log["epochs"]] == [1, 2] and "confusion_matrix" in log


def test_log_says_what_the_accuracies_were_measured_on(trained_run, tmp_path, capsys):
    log = json.loads((trained_run / "log.json").read_text())
    assert log["data"] == {"official": False, "test_images": 40, "test_subset": False}  # the tiny dataset
    assert plot_curves.main([str(trained_run / "log.json"), "--out", str(tmp_path / "c.png")]) == 0
    assert "held-out images, not the official test set" in capsys.readouterr().out


def test_too_few_training_images_for_the_processes_is_one_line(data_dir):
    data = augment.load_dataset("cifar10", data_dir, download=False)
    args = train.build_parser().parse_args(["--train-subset", "4"])
    with pytest.raises(train.UsageError, match="4 training images cannot be shared among 8 processes"):
        train.split_data(data, args, engine.World(size=8, local_size=8, launched=True))
    assert len(train.split_data(data, args, engine.World(size=4, local_size=4, launched=True))[0][0]) == 4


def test_subsets_and_dropped_images_are_said(data_dir, tmp_path, capsys):
    argv = tiny_args(data_dir, tmp_path, "--train-subset", "500", "--batch-size", "64", "--epochs", "1",
                     "--test-subset", "20")
    assert train.main(argv) == 0
    out, err = capsys.readouterr()
    assert "--train-subset 500 asked for, but the dataset has 200 training images" in err
    assert "each epoch trains on 3 batches of 64: 8 of the 200 training images" in err
    assert "200 training images, 20 test images" in out
    assert "s in all (training " in out  # the epoch's whole time and the training time, each named
    log = json.loads((tmp_path / "log.json").read_text())
    assert log["data"]["test_images"] == 20 and log["data"]["test_subset"]
    assert np.array(log["confusion_matrix"]).sum(axis=1).tolist() == [2] * 10  # class-balanced


def test_balanced_subset_is_fixed_and_even():
    labels = np.repeat(np.arange(10), [50, 50, 50, 50, 50, 50, 50, 50, 50, 3])  # one rare class
    chosen = augment.balanced_subset(labels, 100)
    assert np.array_equal(chosen, augment.balanced_subset(labels, 100)) and len(set(chosen)) == 100
    counts = np.bincount(labels[chosen], minlength=10)
    assert counts[9] == 3 and counts[:9].max() - counts[:9].min() <= 1


def test_evaluation_shows_a_progress_bar_at_a_terminal(data_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(engine, "show_progress", lambda world=None: True)
    assert train.main(tiny_args(data_dir, tmp_path, "--epochs", "1")) == 0
    assert "epoch 1 test" in capsys.readouterr().err


def test_plot_of_one_epoch_has_markers_and_whole_epochs(trained_run, tmp_path):
    log = json.loads((trained_run / "log.json").read_text())
    log["epochs"] = log["epochs"][:1]
    figure = plot_curves.curves_figure([log], ["one"], [plot_curves.summary(log)])
    for axis in figure.axes:
        assert axis.get_xlim() == (0.5, 1.5) and list(axis.get_xticks()) == [1]
        assert all(line.get_marker() not in (None, "None", "") for line in axis.get_lines())


def test_plot_warns_about_nan(trained_run, tmp_path, capsys):
    log = json.loads((trained_run / "log.json").read_text())
    log["epochs"][-1].update(test_acc=float("nan"), train_loss=float("nan"))
    path = tmp_path / "nan.json"
    path.write_text(json.dumps(log))
    assert plot_curves.main([str(path)]) == 0
    err = capsys.readouterr().err
    assert "NaN" in err and "epoch(s) 2" in err


def test_a_closed_pipe_ends_quietly_with_every_file_written(trained_run, tmp_path):
    log = tmp_path / "log.json"
    shutil.copy(trained_run / "log.json", log)
    image = save_test_images(tmp_path)[0]
    commands = [["plot_curves.py", str(log)],
                ["gradcam.py", "--image", image, "--checkpoint", str(trained_run / "best.pt")]]
    for command in commands:
        process = subprocess.Popen([sys.executable, *command], cwd=HERE, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True)
        process.stdout.close()  # `| head -0`: the reader is gone before anything is printed
        err = process.stderr.read()
        assert process.wait() == 0 and "Traceback" not in err and "BrokenPipe" not in err, err
    assert (tmp_path / "log_curves.png").exists() and (tmp_path / "log_confusion.png").exists()
    assert os.path.exists(os.path.splitext(image)[0] + "_gradcam.png")


def test_first_hour_messages(data_dir, tmp_path, capsys):
    a_file = tmp_path / "afile"
    a_file.write_text("")
    code, err = run_main(train, tiny_args(data_dir, a_file), capsys)
    assert code == 2 and "--out-dir" in err and "is a file" in err, err
    damaged = tmp_path / "damaged"
    shutil.copytree(data_dir, damaged)
    batch = damaged / "cifar-10-batches-py" / "data_batch_1"
    batch.write_bytes(batch.read_bytes()[:500])  # truncated
    out = tmp_path / "never"
    code, err = run_main(train, tiny_args(str(damaged), out), capsys)
    assert code == 2 and "data_batch_1 is damaged or truncated" in err and len(error_lines(err)) == 1, err
    assert not out.exists()  # no folder, no .train.lock: nothing is created before the inputs are checked
    code, err = run_main(train, tiny_args(data_dir, out, "--val-split", "64"), capsys)
    assert code == 2 and "--val-split 64 leaves no training images" in err and not out.exists(), err
    code, err = run_main(train, ["--epochs", "abc"], capsys)
    assert code == 2 and err.strip().splitlines() == [
        "train.py: error: argument --epochs: invalid int value: 'abc' (see train.py --help)"], err
    code, err = run_main(train, ["--no-such-flag"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "--help" in err, err
    help_text = train.build_parser().format_help()
    for words in ("examples:", "python train.py --resume last.pt", "--overwrite", "--no-download keep"):
        assert words in help_text, words


# ----------------------------------------------------------------------------- GPUs and Macs, decided on a CPU
# Every device-dependent choice is a function of plain facts: these tests feed it the facts of machines
# that the test machine is not (a T4, an H100, a Mac, a Docker container with 64 MB of /dev/shm).

import devices  # noqa: E402


@pytest.mark.parametrize("capability, expected", [
    ((6, 0), "fp16"), ((7, 0), "fp16"), ((7, 5), "fp16"),   # P100, V100, T4 / RTX 20xx: no bf16 kernels
    ((8, 0), "bf16"), ((8, 6), "bf16"), ((9, 0), "bf16"),   # A100, RTX 30xx, H100
])
def test_auto_precision_follows_the_gpus_compute_capability(capability, expected):
    assert devices.choose_precision("auto", devices.Facts("cuda", capability)) == expected
    assert devices.choose_precision("fp32", devices.Facts("cuda", capability)) == "fp32"
    slow_bf16 = devices.precision_warning("bf16", devices.Facts("cuda", capability))
    assert (slow_bf16 is not None) == (expected == "fp16")


@pytest.mark.parametrize("driver, torch_cuda, said", [
    ("550.54.15", "13.0", ["driver 550.54.15", "built for CUDA 13.0", "driver 580 or newer", "whl/cu126"]),
    ("560.35.03", None, ["driver 560.35.03", "CPU-only build", "whl/cu126"]),
    ("580.65.06", "13.0", ["driver 580.65.06", "cannot use it", "CUDA_VISIBLE_DEVICES"]),  # new enough: hidden
    ("", "12.8", ["driver of unknown version", "CUDA 12.8"]),
])
def test_a_gpu_that_torch_cannot_use_is_said_not_skipped(driver, torch_cuda, said):
    for name in ("auto", "cuda"):
        with pytest.raises(devices.DeviceError) as raised:
            devices.choose_device(name, False, False, nvidia_driver=driver, torch_cuda=torch_cuda)
        assert all(part in str(raised.value) for part in said), str(raised.value)
    assert devices.choose_device("cpu", False, False, driver, torch_cuda) == "cpu"  # the CPU on purpose
    assert devices.choose_device("auto", True, False, driver, torch_cuda) == "cuda"
    assert devices.choose_device("auto", False, False, None, torch_cuda) == "cpu"  # no NVIDIA GPU here


def test_the_nvidia_driver_version_is_read_where_linux_shows_it(tmp_path, monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    proc = tmp_path / "version"
    for text, version in [
            ("NVRM version: NVIDIA UNIX x86_64 Kernel Module  550.54.15  Tue Mar  5 22:23:56 UTC 2024\n", "550.54.15"),
            ("NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  580.65.06  Release Build  (dvs-builder@U)\n",
             "580.65.06"),
            ("something else\n", "")]:
        proc.write_text(text)
        assert devices.nvidia_driver_version(str(proc), nvidia_smi="absent-nvidia-smi") == version
    missing = str(tmp_path / "missing")
    assert devices.nvidia_driver_version(missing, nvidia_smi="absent-nvidia-smi") is None
    smi = tmp_path / "nvidia-smi"  # WSL: nvidia-smi, but no /proc/driver/nvidia
    smi.write_text("#!/bin/sh\necho 552.22\n")
    smi.chmod(0o755)
    assert devices.nvidia_driver_version(missing, nvidia_smi=str(smi)) == "552.22"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # every GPU hidden on purpose: the CPU is what was asked
    proc.write_text("NVRM version: NVIDIA UNIX x86_64 Kernel Module  550.54.15  Tue Mar  5 2024\n")
    assert devices.nvidia_driver_version(str(proc)) is None


def test_default_workers_leave_a_core_to_the_training_process(monkeypatch):
    for cores, processes, workers in [(2, 1, 1), (1, 1, 1), (16, 1, 15), (64, 1, 16), (16, 8, 1), (96, 8, 11)]:
        monkeypatch.setattr(os, "sched_getaffinity", lambda _pid, cores=cores: set(range(cores)), raising=False)
        assert engine.default_workers(processes) == workers, (cores, processes)


def test_sync_bn_with_compile_warns_in_one_line(monkeypatch, capsys):
    monkeypatch.setattr(engine, "resolve_device", lambda *a: (torch.device("cuda", 0), "bf16"))
    args = argparse.Namespace(device="cuda", precision="auto", compile=True, sync_bn=True)
    train.resolve_device(args, engine.World(launched=True, size=2, local_size=2))
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "--sync-bn with --compile" in err
    train.resolve_device(argparse.Namespace(**dict(vars(args), compile=False)), engine.World(launched=True, size=2))
    assert capsys.readouterr().err == ""


def test_auto_precision_on_cpus_and_macs():
    assert devices.choose_precision("auto", devices.Facts("cpu", cpu_bf16=True)) == "bf16"
    assert devices.choose_precision("auto", devices.Facts("cpu", cpu_bf16=False)) == "fp32"
    assert devices.choose_precision("auto", devices.Facts("mps", platform="darwin")) == "fp32"
    assert "slow" in devices.precision_warning("fp16", devices.Facts("cpu"))


def test_cpu_bf16_needs_the_instructions_not_just_avx512(monkeypatch):
    # oneDNN's own check says yes on any AVX-512 CPU (Skylake to Ice Lake servers), which emulates bf16.
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True, raising=False)
    for avx512_bf16, amx, expected in [(False, False, False), (True, False, True), (False, True, True)]:
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
        assert devices.cpu_supports_bf16("x86_64") is expected
    assert devices.cpu_supports_bf16("aarch64")  # ARM: oneDNN's answer


def test_a_t4_gets_fp16_although_torch_calls_bf16_supported(monkeypatch, capsys):
    # torch.cuda.is_bf16_supported() is True on a T4 (it counts emulation); the capability decides.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    probed = []
    monkeypatch.setattr(devices, "check_computes", probed.append)  # no GPU here to run its first computation
    args = train.build_parser().parse_args(["--device", "cuda"])
    assert train.resolve_device(args) == (torch.device("cuda"), "fp16") and probed == [torch.device("cuda")]
    train.resolve_device(train.build_parser().parse_args(["--device", "cuda", "--precision", "bf16"]))
    assert "slow fallback kernels" in capsys.readouterr().err


class OneGpu:
    """torch.cuda's RNG calls on a machine with one GPU, recording what is set."""

    def __init__(self, index=0):
        self.index, self.set = index, []

    def current_device(self):
        return self.index

    def get_rng_state(self, device="cuda"):
        return torch.full((16,), 7, dtype=torch.uint8)

    def set_rng_state(self, state, device="cuda"):
        self.set.append(state)


def test_resume_on_fewer_gpus_than_saved(monkeypatch):
    gpu = OneGpu()
    saved = devices.rng_state("cuda", gpu)
    assert isinstance(saved["cuda"], torch.Tensor)  # one state, not one per GPU of the machine
    devices.restore_rng_state(saved, "cuda", gpu)
    assert torch.equal(gpu.set[-1], saved["cuda"])
    # A checkpoint of the older format, written on 2 GPUs, resumed with CUDA_VISIBLE_DEVICES=1: one GPU.
    two_gpus = {"torch": torch.get_rng_state(), "cuda": [torch.zeros(16, dtype=torch.uint8),
                                                         torch.ones(16, dtype=torch.uint8)]}
    devices.restore_rng_state(two_gpus, "cuda", gpu)
    assert torch.equal(gpu.set[-1], two_gpus["cuda"][0])
    far_gpu = OneGpu(index=3)  # a GPU index the saving machine did not have: nothing to restore, no IndexError
    devices.restore_rng_state(two_gpus, "cuda", far_gpu)
    assert far_gpu.set == []
    devices.restore_rng_state(saved, "cpu", gpu)  # a CUDA run resumed on a CPU
    assert len(gpu.set) == 2


def tensors_in(tree):
    if isinstance(tree, torch.Tensor):
        yield tree
    elif isinstance(tree, dict):
        for value in tree.values():
            yield from tensors_in(value)
    elif isinstance(tree, (list, tuple)):
        for value in tree:
            yield from tensors_in(value)


def test_checkpoint_of_a_gpu_run_holds_cpu_tensors(monkeypatch):
    # FakeTensorMode makes tensors that are on "cuda" as far as every torch call can tell, without a GPU.
    from torch._subclasses.fake_tensor import FakeTensorMode
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device="cuda": torch.zeros(16, dtype=torch.uint8))
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: [torch.zeros(16, dtype=torch.uint8)] * 2)
    args = train.build_parser().parse_args([])
    data = augment.ImageData(None, None, None, None, CLASSES, augment.CIFAR10_MEAN, augment.CIFAR10_STD, True)
    with torch.device("meta"):  # no initial values: torch 2.9's fake uniform_ would draw them on a real GPU
        model = resnet.resnet18()
    with FakeTensorMode(allow_non_fake_inputs=True), torch.device("cuda"):
        model = model.to_empty(device="cuda")
        runner = engine.StepRunner(model, args, "bf16", torch.device("cuda"), augment.CIFAR10_MEAN,
                                  augment.CIFAR10_STD, steps_per_epoch=10)
        for parameter in model.parameters():  # what SGD's first step creates
            runner.optimizer.state[parameter]["momentum_buffer"] = torch.zeros_like(parameter)
        assert next(model.parameters()).device.type == "cuda"
        checkpoint = runfiles.build_checkpoint(runner, args, data, 1, [], None)
    tensors = list(tensors_in(checkpoint))
    assert len(tensors) > 2 * len(list(model.parameters())) and {t.device.type for t in tensors} == {"cpu"}


def interrupt_after_epoch(monkeypatch, epoch):
    save = train.Run.save

    def save_then_interrupt(self, record, confusion):
        save(self, record, confusion)
        if record["epoch"] == epoch:
            raise KeyboardInterrupt

    monkeypatch.setattr(train.Run, "save", save_then_interrupt)


def test_precision_is_the_machines_on_resume(fp16_data_dir, tmp_path, monkeypatch, capsys):
    # An A100's bf16 run goes on in fp16 on a T4, then in fp32 on a CPU: precision is not the recipe.
    resume = ["--resume", str(tmp_path / "last.pt"), "--device", "cpu", "--workers", "0", "--data-dir",
              fp16_data_dir]
    interrupt_after_epoch(monkeypatch, 1)
    code, err = run_main(train, fp16_args(fp16_data_dir, tmp_path, "--epochs", "3", "--precision", "bf16"), capsys)
    assert code == 130, err
    assert torch.load(tmp_path / "last.pt", weights_only=True)["scaler"] == {}  # bf16 needs no scaler
    interrupt_after_epoch(monkeypatch, 2)
    code, err = run_main(train, [*resume, "--precision", "fp16"], capsys)
    assert code == 130 and "ignoring" not in err, err
    assert torch.load(tmp_path / "last.pt", weights_only=True)["scaler"]["scale"] > 0  # a fresh scaler ran
    monkeypatch.undo()
    code, err = run_main(train, [*resume, "--precision", "fp32"], capsys)
    assert code == 0 and "ignoring" not in err, err
    log = json.loads((tmp_path / "log.json").read_text())
    assert [r["epoch"] for r in log["epochs"]] == [1, 2, 3] and log["environment"]["precision"] == "fp32"


def test_fp16_overflowing_steps_are_skipped_not_fatal(fp16_data_dir, tmp_path, monkeypatch, capsys):
    # A loss scale of 2**40 makes every early fp16 gradient overflow: the scaler skips those steps and
    # halves the scale. That is no divergence, and the schedule goes on without warning.
    scaler = torch.amp.GradScaler
    monkeypatch.setattr(torch.amp, "GradScaler", lambda device, enabled: scaler(device, 2.0**40, enabled=enabled))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        code, err = run_main(train, fp16_args(fp16_data_dir, tmp_path), capsys)
    assert code == 0, err
    assert not [w for w in caught if "lr_scheduler.step()" in str(w.message)], [str(w.message) for w in caught]
    checkpoint = torch.load(tmp_path / "last.pt", weights_only=True)
    assert checkpoint["scaler"]["scale"] == 2.0**40 / 2**4  # 2 epochs x 2 steps, each skipped
    assert checkpoint["scheduler"]["last_epoch"] == 4  # the schedule counted the skipped steps


def test_gpu_clocks_and_copies_by_device():
    # A GPU queues work: its clock is read after a synchronize. MPS needs its own.
    assert devices.synchronizer("cuda") is torch.cuda.synchronize
    assert devices.synchronizer("mps") is torch.mps.synchronize
    devices.synchronizer("cpu")()
    # Non-blocking copies only from pinned memory, and only CUDA gets pinned batches.
    assert [devices.pin_memory(kind) for kind in ("cuda", "mps", "cpu")] == [True, False, False]
    assert devices.copy_non_blocking(True) and not devices.copy_non_blocking(False)
    images, labels = coloured_images(64, 0)
    args = train.build_parser().parse_args(["--batch-size", "32"])
    loader, _ = engine.make_train_loader(images, labels, args, augment.CIFAR10_MEAN, torch.device("mps"), 0)
    assert not loader.pin_memory


def test_peak_memory_units_by_platform():
    assert devices.peak_resident_mib(2048, "linux") == 2  # KiB on Linux
    assert devices.peak_resident_mib(2 * 2**20, "darwin") == 2  # bytes on macOS


def test_gradcam_accepts_mps_and_says_when_absent(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(devices, "mps_available", lambda: False)
    code, err = run_main(gradcam, ["--image", save_test_images(tmp_path)[0], "--device", "mps"], capsys)
    assert code == 2 and "this machine has no MPS" in err and len(err.strip().splitlines()) == 1, err


def process_settings():
    return {name: read() for name, (read, _) in devices.SETTINGS.items()}


def test_backend_settings_by_device():
    cuda = devices.backend_settings("cuda", deterministic=False)
    assert cuda["cudnn_benchmark"] and cuda["matmul_tf32"] and cuda["cudnn_tf32"]
    assert not cuda["deterministic_algorithms"]
    exact = devices.backend_settings("cuda", deterministic=True)
    assert not exact["cudnn_benchmark"] and exact["cublas_workspace_config"] == ":4096:8"
    assert "cudnn_benchmark" not in devices.backend_settings("cpu", deterministic=False)


def test_training_leaves_process_settings_as_found(data_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", True)  # as a notebook might have set it
    before = process_settings()
    with devices.applied(devices.backend_settings("cuda", deterministic=True)):
        assert process_settings() != before
    assert process_settings() == before
    assert train.main(tiny_args(data_dir, tmp_path, "--deterministic", "--epochs", "1")) == 0
    assert process_settings() == before


def test_a_programs_own_precision_settings_survive_a_run():
    # A notebook that chose TF32 with the newer API (torch refuses to read the legacy flags after that)
    # and deterministic algorithms in warn-only mode gets both back as they were. Set and put back by
    # plain assignment: fp32_precision is a property computed by torch, which monkeypatch's undo (pytest
    # 9.2 deletes what it set) cannot take away.
    matmul = torch.backends.cuda.matmul
    before = matmul.fp32_precision
    matmul.fp32_precision = "tf32"
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        with devices.applied(devices.backend_settings("cuda", deterministic=True)):
            assert torch.are_deterministic_algorithms_enabled()
        assert matmul.fp32_precision == "tf32"
        assert torch.is_deterministic_algorithms_warn_only_enabled()
    finally:
        torch.use_deterministic_algorithms(False)
        matmul.fp32_precision = before


def test_a_notebooks_float32_matmul_precision_survives_a_gpu_run():
    # Writing the legacy allow_tf32 flag makes torch.get_float32_matmul_precision() raise ("mix of the
    # legacy and new APIs") until the precision is set again.
    torch.set_float32_matmul_precision("medium")
    try:
        with devices.applied(devices.backend_settings("cuda", deterministic=False)):
            pass
        assert torch.get_float32_matmul_precision() == "medium"
    finally:
        torch.set_float32_matmul_precision("highest")


def test_compile_and_fused_sgd_by_gpu():
    assert "7.0" in devices.compile_problem(devices.Facts("cuda", (6, 1)))  # P100, GTX 10xx: no Triton
    assert devices.compile_problem(devices.Facts("cuda", (7, 5))) is None
    assert devices.compile_problem(devices.Facts("cpu")) is None
    assert devices.fused_optimizer("cuda") and not devices.fused_optimizer("cpu")


def test_asking_the_start_method_does_not_fix_it():
    code = ("import multiprocessing, devices; devices.worker_start_method(); "
            "assert multiprocessing.get_start_method(allow_none=True) is None")
    assert subprocess.run([sys.executable, "-c", code], cwd=HERE).returncode == 0


def test_model_inputs_have_one_layout_whatever_the_source():
    # Test images are permuted views; a padded last batch is a fresh tensor: the model sees one layout.
    images = augment.to_tensor(coloured_images(10, 0)[0])
    for channels_last in (True, False):
        args = train.build_parser().parse_args([] if channels_last else ["--no-channels-last"])
        runner = engine.StepRunner(resnet.resnet18(), args, "fp32", torch.device("cpu"), augment.CIFAR10_MEAN,
                                  augment.CIFAR10_STD, steps_per_epoch=1)
        assert runner.inputs(images[:8]).stride() == runner.inputs(engine.padded(images[8:], 8)).stride()


@pytest.mark.parametrize("free_mb, workers, expected", [
    (8000, 16, 4),    # a normal machine
    (64, 16, 1),      # Docker's default --shm-size: 16 workers with 1 batch each fit in half of it
    (64, 4, 4),
    (None, 16, 4),    # no /dev/shm to count (macOS, Windows)
])
def test_prefetch_fits_shared_memory(free_mb, workers, expected):
    batch_bytes = 512 * (3072 + 8)  # a uint8 batch of 512 and its int64 labels
    free = None if free_mb is None else free_mb * 10**6
    assert devices.fit_prefetch(free, workers, batch_bytes) == expected


def test_a_machine_without_dev_shm_gets_a_loader(monkeypatch):
    # macOS and Windows have no /dev/shm: free_shared_memory() says None, and the loader is made anyway.
    monkeypatch.setattr(devices, "free_shared_memory", lambda path="/dev/shm": None)
    images, labels = coloured_images(64, 0)
    args = train.build_parser().parse_args(["--batch-size", "32"])
    loader, _ = engine.make_train_loader(images, labels, args, augment.CIFAR10_MEAN, torch.device("cpu"), 0,
                                         world=engine.World(size=2, local_size=2))
    assert len(loader) == 2


def test_too_little_shared_memory_is_one_line(data_dir, tmp_path, monkeypatch, capsys):
    with pytest.raises(devices.DeviceError):
        devices.fit_prefetch(200 * 10**6, 4, 10**6, dataset_bytes=150 * 10**6)  # spawn: the dataset counts
    images, labels = coloured_images(64, 0)
    args = train.build_parser().parse_args(["--batch-size", "32"])
    monkeypatch.setattr(devices, "free_shared_memory", lambda path="/dev/shm": 2 * 2 * 32 * 3080)  # 2 uint8 batches in half
    engine.make_train_loader(images, labels, args, augment.CIFAR10_MEAN, torch.device("cpu"), 1)  # uint8 fits
    with pytest.raises(devices.DeviceError):  # float32 batches, 4x the bytes, do not
        engine.make_train_loader(images, labels, args, augment.CIFAR10_MEAN, torch.device("cpu"), 1,
                                normalize_std=augment.CIFAR10_STD)
    monkeypatch.setattr(devices, "free_shared_memory", lambda path="/dev/shm": 100_000)
    capsys.readouterr()
    code, err = run_main(train, tiny_args(data_dir, tmp_path, "--workers", "1"), capsys)
    assert code == 2 and "--shm-size" in err and "--workers" in err and len(error_lines(err)) == 1, err


def test_spawned_workers_share_the_dataset_and_draw_the_same_batches():
    # macOS starts workers by spawn, Linux from Python 3.14 by forkserver: each worker unpickles the
    # dataset, which must then be a handle to shared memory rather than a copy.
    assert devices.dataset_in_shared_memory("spawn") and devices.dataset_in_shared_memory("forkserver")
    assert not devices.dataset_in_shared_memory("fork")
    images, labels = coloured_images(96, 0)
    args = train.build_parser().parse_args(["--batch-size", "32"])
    batches = {}
    for workers, method in ((0, None), (2, "spawn")):
        loader, sampler = engine.make_train_loader(images, labels, args, augment.CIFAR10_MEAN, torch.device("cpu"),
                                                  workers, start_method=method)
        sampler.set_epoch(1)
        batches[method] = [(x, y) for x, y in loader]
        if method == "spawn":
            assert loader.dataset.images.is_shared() and loader.dataset.labels.is_shared()
    assert len(batches["spawn"]) == 3
    for (x0, y0), (x1, y1) in zip(batches[None], batches["spawn"]):
        assert torch.equal(x0, x1) and torch.equal(y0, y1)


# ----------------------------------------------------------------------------- Grad-CAM

import gradcam  # noqa: E402  (after the training tests' imports, to keep each section readable)
import matplotlib  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: E402


def random_model_and_inputs(seed=0, batch=8):
    torch.manual_seed(seed)
    model = resnet.resnet18(num_classes=10).eval()
    return model, torch.randn(batch, 3, 32, 32)


def reference_maps(method, model, layer, images, targets):
    from pytorch_grad_cam import GradCAM, GradCAMPlusPlus
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
    library = {"gradcam": GradCAM, "gradcam++": GradCAMPlusPlus}[method]
    module = dict(model.named_modules())[layer]
    with library(model=model, target_layers=[module]) as cam:
        return cam(input_tensor=images, targets=[ClassifierOutputTarget(int(t)) for t in targets])


@pytest.mark.parametrize("method", gradcam.METHODS)
@pytest.mark.parametrize("layer", ["layer3", "layer4", "layer4.1.conv2"])
def test_gradcam_equals_pytorch_grad_cam(method, layer):
    model, images = random_model_and_inputs()
    predicted = model(images).argmax(1)
    for targets in (None, torch.tensor([3, 3, 7, 0, 1, 2, 9, 5])):  # the predicted class, then chosen ones
        maps, _, used = gradcam.GradCAM(model, [layer], method)(images, targets)
        assert torch.equal(used, predicted if targets is None else targets)
        reference = reference_maps(method, model, layer, images, used)
        # A map that ReLU zeroes everywhere would match trivially: most must be real maps.
        assert reference.shape == (8, 32, 32) and (reference.max(axis=(1, 2)) > 0.5).sum() >= 4
        np.testing.assert_allclose(maps[:, 0].numpy(), reference, atol=1e-5)


def test_gradcam_leaves_model_as_found():
    model, images = random_model_and_inputs()
    model.train()
    model.bn1.eval()  # a model fine-tuned with a frozen BatchNorm layer
    model.layer1.requires_grad_(False)
    maps, logits, _ = gradcam.GradCAM(model, ["layer2", "layer4"])(images)
    assert maps.shape == (8, 2, 32, 32) and logits.shape == (8, 10)
    assert 0 <= maps.min() and maps.max() <= 1
    assert model.training and model.layer4.training and not model.bn1.training
    assert not any(p.requires_grad for p in model.layer1.parameters())
    assert all(p.requires_grad for p in model.layer4.parameters())
    assert all(p.grad is None for p in model.parameters())
    assert all(not m._forward_hooks and not m._backward_hooks for m in model.modules())  # hooks removed


def test_gradcam_hooks_removed_after_an_error():
    model, _ = random_model_and_inputs()
    with pytest.raises(gradcam.UsageError, match="does not output"):
        gradcam.GradCAM(model, ["linear"])(torch.randn(1, 3, 32, 32))
    assert all(not m._forward_hooks for m in model.modules())
    with pytest.raises(gradcam.UsageError, match="valid layers: conv1, bn1, layer1"):
        gradcam.GradCAM(model, ["layer5"])


def save_test_images(folder):
    """A non-square RGB PNG, a grayscale JPEG, an RGBA PNG and a palette GIF."""
    from PIL import Image
    images, _ = coloured_images(4, 7)
    paths = {"wide.png": Image.fromarray(images[0]).resize((80, 48)),
             "gray.jpg": Image.fromarray(images[1]).convert("L"),
             "rgba.png": Image.fromarray(images[2]).convert("RGBA"),
             "palette.gif": Image.fromarray(images[3]).convert("P")}
    for name, image in paths.items():
        image.save(folder / name)
    return [str(folder / name) for name in paths]


def test_gradcam_reads_photos_upright_and_colour_keys_as_transparent(tmp_path):
    from PIL import Image
    left_red = np.zeros((10, 20, 3), np.uint8)
    left_red[:, :10, 0] = 255
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: the camera was turned; viewers rotate 90 degrees clockwise
    Image.fromarray(left_red).save(tmp_path / "phone.png", exif=exif)
    upright = gradcam.load_image(str(tmp_path / "phone.png"))
    assert upright.shape == (20, 10, 3) and upright[:10, :, 0].min() == 255 and upright[10:, :, 0].max() == 0
    keyed = Image.fromarray(left_red)
    keyed.save(tmp_path / "keyed.png", transparency=(0, 0, 0))  # an RGB PNG whose black is transparent
    pixels = gradcam.load_image(str(tmp_path / "keyed.png"))
    assert (pixels[:, 10:] == 255).all() and (pixels[:, :10] == (255, 0, 0)).all()  # white, not black


def test_gradcam_refuses_a_decompression_bomb_in_one_line(tmp_path, monkeypatch):
    from PIL import Image
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 4,096 pixels: over twice the limit, as a bomb is
    with pytest.raises(gradcam.UsageError, match="too large to read safely"):
        gradcam.load_image(str(tmp_path / "big.png"))


def test_gradcam_cli_writes_picture_top5_and_maps(trained_run, tmp_path, capsys):
    from PIL import Image
    paths = save_test_images(tmp_path)
    npy = tmp_path / "maps.npy"
    code = gradcam.main(["--image", *paths, "--layer", "layer3", "layer4", "--checkpoint",
                         str(trained_run / "best.pt"), "--save-npy", str(npy), "--device", "cpu"])
    out = capsys.readouterr().out
    assert code == 0
    picture = tmp_path / "wide_gradcam.png"  # beside the first image
    with Image.open(picture) as image:
        assert image.format == "PNG" and image.width >= 800 and image.height >= 8 * 200
    assert all(out.count(f"{p}: 1. ") == 1 and "5. " in out for p in paths)
    maps = np.load(npy)
    assert maps.shape == (4, 2, 32, 32) and maps.dtype == np.float32
    assert maps.min() >= 0 and maps.max() <= 1

    # The file's maps equal the library call on the same preprocessed images.
    model, checkpoint = gradcam.load_model(str(trained_run / "best.pt"), torch.device("cpu"))
    small = np.stack([gradcam.resize(gradcam.load_image(p), (32, 32)) for p in paths])
    expected, _, _ = gradcam.GradCAM(model, ["layer3", "layer4"])(
        gradcam.model_input(small, checkpoint, torch.device("cpu")))
    np.testing.assert_allclose(maps, expected.numpy(), atol=1e-6)


def test_large_originals_are_drawn_smaller_and_say_so():
    shown, note = gradcam.display_copy(np.zeros((3000, 4000, 3), dtype=np.uint8))
    assert shown.shape == (768, 1024, 3) and note == "4000x3000, drawn at 1024x768"
    small = np.zeros((48, 80, 3), dtype=np.uint8)
    assert gradcam.display_copy(small)[0] is small and gradcam.display_copy(small)[1] == "80x48"


def test_gradcam_cli_explicit_class_and_gradcam_plus_plus(trained_run, tmp_path, capsys):
    paths = save_test_images(tmp_path)
    out = tmp_path / "cat.png"
    assert gradcam.main(["--image", paths[0], "--class", "cat", "--method", "gradcam++", "--checkpoint",
                         str(trained_run / "best.pt"), "--out", str(out)]) == 0
    assert out.stat().st_size > 10_000
    assert gradcam.main(["--image", paths[0], "--class", "3", "--checkpoint", str(trained_run / "best.pt"),
                         "--out", str(out)]) == 0


@pytest.mark.parametrize("kind", ["--misclassified", "--correct"])
def test_gradcam_test_set_grid(trained_run, data_dir, tmp_path, capsys, kind):
    out = tmp_path / "grid.png"
    npy = tmp_path / "grid.npy"
    argv = [kind, "6", "--checkpoint", str(trained_run / "best.pt"), "--data-dir", data_dir, "--out", str(out),
            "--save-npy", str(npy), "--seed", "1"]
    open_figures = len(plt.get_fignums())  # other tests' figures are not this one's business
    backend = matplotlib.get_backend()
    matplotlib.use("pdf")  # a notebook's backend, say
    try:
        assert gradcam.main(argv) == 0
        first = np.load(npy)
        assert out.stat().st_size > 10_000 and 1 <= len(first) <= 6
        assert gradcam.main(argv) == 0
        assert matplotlib.get_backend() == "pdf"  # left as the caller had it
    finally:
        matplotlib.use(backend)
    assert np.array_equal(np.load(npy), first)  # the seeded choice repeats
    assert len(plt.get_fignums()) == open_figures  # none kept: main() from a notebook does not pile up figures


@pytest.mark.parametrize("count", [1, 4, 16])
def test_gradcam_grid_title_fits_the_figure(count):
    args = argparse.Namespace(method="gradcam++", layer=["layer4.1.conv2"], seed=123456)
    images, maps = np.zeros((count, 32, 32, 3), np.uint8), np.zeros((count, 32, 32))
    figure = gradcam.grid_figure(images, maps, [0] * count, [1] * count, [f"class {i}" for i in range(10)], args,
                                 "misclassified", official=False)
    renderer = FigureCanvasAgg(figure).get_renderer()
    title = figure._suptitle.get_window_extent(renderer)
    assert 0 <= title.x0 and title.x1 <= figure.bbox.width and title.y1 <= figure.bbox.height


def test_gradcam_bad_input(trained_run, tmp_path, capsys):
    checkpoint = str(trained_run / "best.pt")
    image = save_test_images(tmp_path)[0]
    not_image = tmp_path / "notes.png"
    not_image.write_text("not an image")
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"\x00" * 100)
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(1)}, foreign)
    cases = [
        (["--image", str(tmp_path / "missing.png"), "--checkpoint", checkpoint], "not found"),
        (["--image", str(not_image), "--checkpoint", checkpoint], "not an image"),
        (["--image", image, "--checkpoint", str(tmp_path / "none.pt")], "python train.py"),
        (["--image", image, "--checkpoint", str(corrupt)], "corrupt"),
        (["--image", image, "--checkpoint", str(foreign)], "not a checkpoint written by train.py"),
        (["--image", image, "--checkpoint", checkpoint, "--class", "unicorn"], "unknown class 'unicorn'"),
        (["--image", image, "--checkpoint", checkpoint, "--class", "10"], "unknown class '10'"),
        (["--image", image, "--checkpoint", checkpoint, "--layer", "layer9"], "valid layers:"),
        (["--misclassified", "4", "--checkpoint", checkpoint, "--data-dir", str(tmp_path / "nodata")],
         "cannot read the test set"),
        (["--checkpoint", checkpoint], "give one of --image"),
        (["--misclassified", "0", "--checkpoint", checkpoint], "--misclassified takes a count of at least 1"),
        (["--image", image, "--correct", "3", "--checkpoint", checkpoint], "(not several)"),
        (["--misclassified", "4", "--checkpoint", checkpoint, "--class", "cat"], "--class works with --image only"),
        (["--correct", "4", "--checkpoint", checkpoint, "--layer", "layer3", "layer4"], "give one --layer"),
        (["--image", image, "--checkpoint", checkpoint, "--out", str(tmp_path / "x.doc")], "--out"),
        (["--image", image, "--checkpoint", checkpoint, "--out", str(tmp_path / "x")], "extension"),
        (["--image", image, "--misclassified"], "expected one argument (see"),
    ]
    for argv, message in cases:
        code, err = run_main(gradcam, argv, capsys)
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, (argv, err)
    assert not list(tmp_path.glob("*_gradcam.png")) and not list(tmp_path.glob("*.tmp-*"))


def test_gradcam_grid_reads_only_the_test_batch_and_says_not_official(trained_run, data_dir, tmp_path, capsys):
    copy = tmp_path / "data"
    shutil.copytree(data_dir, copy)
    (copy / "cifar-10-batches-py" / "data_batch_1").write_bytes(b"damaged")  # not needed for a grid
    out = tmp_path / "grid.jpg"  # the format the extension names
    assert gradcam.main(["--misclassified", "4", "--checkpoint", str(trained_run / "best.pt"),
                         "--data-dir", str(copy), "--out", str(out)]) == 0
    assert out.read_bytes()[:3] == b"\xff\xd8\xff"  # JPEG, not PNG bytes in a .jpg
    printed = capsys.readouterr().out
    assert "held-out images (not the official test set)" in printed and "not the official" in printed
    (copy / "cifar-10-batches-py" / "test_batch").unlink()
    code, err = run_main(gradcam, ["--misclassified", "4", "--checkpoint", str(trained_run / "best.pt"),
                                   "--data-dir", str(copy)], capsys)
    assert code == 2 and "test_batch" in err and "allow the download" not in err, err


@pytest.mark.parametrize("mode", ["I;16", "I", "F"])
def test_gradcam_reads_16_bit_and_float_images_at_their_range(tmp_path, mode):
    from PIL import Image
    ramp = np.linspace(0, 1, 64 * 64).reshape(64, 64)  # black to white
    values = {"I;16": (ramp * 65535).astype(np.uint16), "I": (ramp * 65535).astype(np.int32),
              "F": ramp.astype(np.float32)}[mode]
    path = tmp_path / f"grey.{'png' if mode == 'I;16' else 'tiff'}"
    Image.fromarray(values).save(path)  # uint16 -> I;16, int32 -> I, float32 -> F
    with Image.open(path) as check:
        assert check.mode.startswith(mode[0])  # Pillow reads it back in a wide mode
    pixels = gradcam.load_image(str(path))
    assert pixels.dtype == np.uint8 and pixels.shape == (64, 64, 3)
    assert pixels.min() == 0 and pixels.max() == 255 and abs(pixels.mean() - 127.5) < 2  # not all white
    too_bright = tmp_path / "bright.tiff"
    Image.fromarray((ramp * 4).astype(np.float32)).save(too_bright)
    with pytest.raises(gradcam.UsageError, match="outside"):
        gradcam.load_image(str(too_bright))


# ----------------------------------------------------------------------------- learning curves

import plot_curves  # noqa: E402


def assert_png(path, min_width=800, min_height=300):
    from PIL import Image
    with Image.open(path) as image:
        assert image.format == "PNG" and image.width >= min_width and image.height >= min_height


def test_plot_curves_reads_what_train_writes(trained_run, tmp_path, capsys):
    assert plot_curves.LOG_FORMAT == runfiles.LOG_FORMAT  # the two scripts agree on the schema
    log_path = tmp_path / "log.json"
    shutil.copy(trained_run / "log.json", log_path)
    assert plot_curves.main([str(log_path)]) == 0
    out = capsys.readouterr().out
    assert_png(tmp_path / "log_curves.png")
    assert_png(tmp_path / "log_confusion.png")
    log = json.loads(log_path.read_text())
    final, best = log["summary"]["final_test_acc"], log["summary"]["best_test_acc"]
    row = out.splitlines()[1].split()
    assert row[1] == "2/2" and row[2] == f"{100 * final:.2f}%" and row[4] == f"{100 * best:.2f}%"
    assert row[5] == str(log["summary"]["best_test_acc_epoch"])


def test_plot_curves_partial_and_several_logs(trained_run, tmp_path, capsys):
    log = json.loads((trained_run / "log.json").read_text())
    partial = dict(log, epochs=log["epochs"][:1], summary=None)  # as the log looks during the run
    for key in ("per_class_accuracy", "confusion_matrix"):
        partial.pop(key)
    (tmp_path / "partial.json").write_text(json.dumps(partial))
    assert plot_curves.main([str(tmp_path / "partial.json")]) == 0
    assert_png(tmp_path / "partial_curves.png")
    assert not (tmp_path / "partial_confusion.png").exists()
    assert "1/2" in capsys.readouterr().out

    out = tmp_path / "compare.png"
    assert plot_curves.main([str(trained_run / "log.json"), str(tmp_path / "partial.json"), "--labels", "full",
                             "half", "--out", str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].startswith("full ") and lines[2].startswith("half ")
    assert_png(out)


def test_plot_curves_writes_the_format_named_and_says_what_was_measured(trained_run, tmp_path, capsys):
    assert plot_curves.main([str(trained_run / "log.json"), "--out", str(tmp_path / "curves.pdf")]) == 0
    for name in ("curves.pdf", "curves_confusion.pdf"):  # PDF bytes, not PNG bytes in a .pdf
        assert (tmp_path / name).read_bytes()[:4] == b"%PDF", name
    log = json.loads((trained_run / "log.json").read_text())  # the tiny dataset: held-out images, not test
    summaries = [plot_curves.summary(log)] * 2
    title = plot_curves.curves_figure([log, log], ["a", "b"], summaries)._suptitle.get_text()
    assert "held-out" in title and "test" not in title, title
    # A class with no evaluated image (a --test-subset of 5 on 10 classes) has no accuracy: not 0%.
    per_class = dict(log["per_class_accuracy"], cat=None)
    figure = plot_curves.confusion_figure(dict(log, per_class_accuracy=per_class), "a")
    labels = [text.get_text() for text in figure.axes[1].texts]
    assert labels[log["classes"].index("cat")] == " no images"


def test_plot_curves_bad_input(trained_run, tmp_path, capsys):
    (tmp_path / "text.json").write_text("not json {")
    (tmp_path / "other.json").write_text(json.dumps({"loss": [1, 2]}))
    log = json.loads((trained_run / "log.json").read_text())
    (tmp_path / "empty.json").write_text(json.dumps(dict(log, epochs=[])))
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    cases = [([str(tmp_path / "missing.json")], "not found"),
             ([str(tmp_path / "text.json")], "is not JSON"),
             ([str(tmp_path / "other.json")], "not a training log"),
             ([str(tmp_path / "empty.json")], "no finished epoch"),
             ([str(trained_run / "log.json"), "--out", str(blocker / "x.png")], "cannot write"),
             ([str(trained_run / "log.json"), "--labels", "a", "b"], "one name per log"),
             ([str(trained_run / "log.json"), "--out", str(tmp_path / "x.doc")], "name a picture format")]
    open_figures = len(plt.get_fignums())
    for argv, message in cases:
        code, err = run_main(plot_curves, argv, capsys)
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, (argv, err)
    assert not list(tmp_path.glob("*.png")) and not list(tmp_path.glob("*.tmp-*"))
    assert len(plt.get_fignums()) == open_figures  # none kept, also after a failed write


def test_plot_curves_does_not_import_torch():
    import subprocess
    import sys
    code = "import sys, plot_curves; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=os.path.dirname(__file__)).returncode == 0


# ----------------------------------------------------------------------------- faults

import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def env_with_switches(pause_in_write=None, wait_in_epoch=None):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if pause_in_write:
        env["TRAIN_TEST_PAUSE_IN_WRITE"] = pause_in_write  # test-only: say so and wait inside a write of that file
    if wait_in_epoch:
        env["TRAIN_TEST_WAIT_FOR_SIGNAL"] = str(wait_in_epoch)  # test-only: after the epoch's first step, wait
    return env


def start_training(argv, pause_in_write=None, wait_in_epoch=None):
    return subprocess.Popen([sys.executable, "train.py", *argv], cwd=HERE, text=True,
                            env=env_with_switches(pause_in_write, wait_in_epoch),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def wait_for(condition, process, timeout=120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        assert process.poll() is None, f"training ended early: {process.communicate()}"
        time.sleep(0.01)
    process.kill()
    raise AssertionError("timed out waiting for the training process")


def assert_files_consistent(out):
    """Every file is a complete version; the checkpoint and the log (if any) describe complete epochs."""
    epoch = 0
    if (out / "last.pt").exists():
        checkpoint = torch.load(out / "last.pt", weights_only=True)
        epoch = checkpoint["epoch"]
        assert [r["epoch"] for r in checkpoint["history"]] == list(range(1, epoch + 1))
        assert torch.load(out / "best.pt", weights_only=True)["epoch"] <= epoch
    if (out / "log.json").exists():
        logged = [r["epoch"] for r in json.loads((out / "log.json").read_text())["epochs"]]
        assert logged == list(range(1, len(logged) + 1)) and epoch - 1 <= len(logged) <= epoch
    return epoch


def test_killed_at_any_moment_loses_nothing_and_resumes(data_dir, tmp_path):
    out = tmp_path / "run"
    fresh = tiny_args(data_dir, out, "--epochs", "3")
    resume = ["--resume", str(out / "last.pt"), "--device", "cpu", "--workers", "0", "--data-dir", data_dir]
    # Where each interruption lands: inside a checkpoint write, inside a log write, between steps,
    # by SIGTERM and by Ctrl-C (SIGINT), and inside the last epoch's checkpoint write.
    plan = [("last.pt", signal.SIGKILL), ("log.json", signal.SIGKILL), ("step", signal.SIGKILL),
            ("step", signal.SIGTERM), ("step", signal.SIGINT), ("last.pt", signal.SIGKILL)]
    for where, how in plan:
        epoch_before = assert_files_consistent(out) if out.exists() else 0
        if epoch_before == 3:
            break
        process = start_training(resume if epoch_before else fresh, pause_in_write=None if where == "step" else where,
                                 wait_in_epoch=epoch_before + 1 if where == "step" else None)
        # The process says when it is between two steps, or half-way through a write of that file, and waits there.
        said = "test: between steps" if where == "step" else f"test: inside a write of {where}"
        wait_for(lambda: process.stderr.readline().startswith(said), process)
        process.send_signal(how)
        stdout, stderr = process.communicate(timeout=120)
        if how != signal.SIGKILL:
            assert process.returncode == 130 and "continue with: python train.py --resume" in stderr, stderr
            assert not [n for n in os.listdir(out) if ".tmp-" in n]  # a graceful stop writes nothing partial
        assert_files_consistent(out)
    # Whatever the kills left, resuming finishes the run, and the log agrees with the checkpoint.
    while assert_files_consistent(out) < 3:
        assert train.main(resume if (out / "last.pt").exists() else fresh) == 0
    log = json.loads((out / "log.json").read_text())
    assert [r["epoch"] for r in log["epochs"]] == [1, 2, 3] and "confusion_matrix" in log
    assert torch.load(out / "last.pt", weights_only=True)["epoch"] == 3


def test_linking_a_file_to_itself_leaves_no_temp_link(tmp_path):
    # rename() between two links of one file does nothing: the temp link would stay behind. A resume
    # re-links best.pt to last.pt, which it often is already.
    (tmp_path / "last.pt").write_bytes(b"epoch 3")
    for _ in range(2):
        files.atomic_link(tmp_path / "last.pt", tmp_path / "best.pt")
    assert sorted(os.listdir(tmp_path)) == ["best.pt", "last.pt"]
    assert os.path.samefile(tmp_path / "last.pt", tmp_path / "best.pt")


def test_an_unexpected_error_lets_the_write_in_progress_finish(data_dir, tmp_path, monkeypatch):
    # Say the GPU runs out of memory in epoch 2's evaluation while epoch 1's files are being written:
    # the error must not release the folder's lock before those files are complete.
    failed = threading.Event()
    evaluate = engine.evaluate

    def out_of_memory_in_epoch_2(runner, *args, **kwargs):
        if runner.scheduler.last_epoch > 2:
            failed.set()
            raise RuntimeError("CUDA out of memory (simulated)")
        return evaluate(runner, *args, **kwargs)

    monkeypatch.setattr(engine, "evaluate", out_of_memory_in_epoch_2)
    waited = []  # whether each write waited for the failure (not for the timeout)
    monkeypatch.setattr(files, "pause_for_tests", lambda path: waited.append(failed.wait(timeout=60)))
    with pytest.raises(RuntimeError, match="simulated"):
        train.main(tiny_args(data_dir, tmp_path))
    assert waited and all(waited), waited
    assert not [n for n in os.listdir(tmp_path) if ".tmp-" in n]
    assert torch.load(tmp_path / "last.pt", weights_only=True)["epoch"] == 1
    assert [r["epoch"] for r in json.loads((tmp_path / "log.json").read_text())["epochs"]] == [1]


def test_a_stop_after_the_last_step_finishes_the_run(data_dir, tmp_path, monkeypatch, capsys):
    # Ctrl-C during the last epoch's evaluation: no step is left to stop after, so the run finishes,
    # saves, says so, and exits 0; the message printed at the signal said this would happen.
    evaluate = engine.evaluate

    def interrupted_evaluation(runner, *args, **kwargs):
        if runner.scheduler.last_epoch == runner.scheduler.total_steps:  # after the last step
            os.kill(os.getpid(), signal.SIGINT)
        return evaluate(runner, *args, **kwargs)

    monkeypatch.setattr(engine, "evaluate", interrupted_evaluation)
    assert train.main(tiny_args(data_dir, tmp_path)) == 0
    out, err = capsys.readouterr()
    assert "once the last step is done, the run finishes" in err
    assert "SIGINT came after the last training step: the run is complete" in out
    assert torch.load(tmp_path / "last.pt", weights_only=True)["epoch"] == 2


def test_full_disk_stops_cleanly_and_keeps_previous_files(data_dir, tmp_path, monkeypatch, capsys):
    writes = []

    def disk_full_on_second_epoch(path):
        writes.append(1)
        if len(writes) > 2:  # epoch 1 wrote last.pt and log.json; the next write finds the disk full
            raise OSError(28, "No space left on device")

    monkeypatch.setattr(files, "pause_for_tests", disk_full_on_second_epoch)
    code, err = run_main(train, tiny_args(data_dir, tmp_path), capsys)
    assert code == 1 and "the disk is full" in err and len(error_lines(err)) == 1, err
    assert torch.load(tmp_path / "last.pt", weights_only=True)["epoch"] == 1
    assert torch.load(tmp_path / "best.pt", weights_only=True)["epoch"] == 1
    assert [r["epoch"] for r in json.loads((tmp_path / "log.json").read_text())["epochs"]] == [1]
    assert not [n for n in os.listdir(tmp_path) if ".tmp-" in n]


def test_checkpoint_is_written_while_the_next_epoch_trains(data_dir, tmp_path, monkeypatch):
    # Every file write waits (inside the write) until epoch 2 has started training: a write on the
    # training path would wait in vain. The kill and full-disk tests above show the guarantees hold.
    second_epoch_started = threading.Event()
    train_one_epoch = engine.train_one_epoch

    def note_the_start(runner, loader, epoch, *args, **kwargs):
        if epoch == 2:
            second_epoch_started.set()
        return train_one_epoch(runner, loader, epoch, *args, **kwargs)

    overlapped = []
    monkeypatch.setattr(engine, "train_one_epoch", note_the_start)
    monkeypatch.setattr(files, "pause_for_tests",
                        lambda path: overlapped.append(second_epoch_started.wait(timeout=30)))
    assert train.main(tiny_args(data_dir, tmp_path)) == 0
    assert overlapped and all(overlapped), overlapped
    assert torch.load(tmp_path / "last.pt", weights_only=True)["epoch"] == 2


class CodeOnLoad:
    """A pickle that runs a command when loaded, as a malicious checkpoint would."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_hostile_checkpoint_is_refused_and_never_runs(data_dir, trained_run, tmp_path, capsys):
    marker = tmp_path / "pwned"
    hostile = tmp_path / "hostile.pt"
    torch.save({"format": resnet.CHECKPOINT_FORMAT, "model": CodeOnLoad(marker)}, hostile)
    code, err = run_main(train, ["--resume", str(hostile), "--data-dir", data_dir, "--device", "cpu",
                                 "--out-dir", str(tmp_path / "out")], capsys)
    assert code == 2 and "refused" in err and len(error_lines(err)) == 1, err
    image = save_test_images(tmp_path)[0]
    code, err = run_main(gradcam, ["--image", image, "--checkpoint", str(hostile)], capsys)
    assert code == 2 and "refused" in err, err
    assert not marker.exists()
    # The payload is real: an unsafe load would have run it.
    torch.load(hostile, weights_only=False)
    assert marker.exists()


def test_second_run_on_the_same_folder_refuses(data_dir, tmp_path, capsys):
    holder = subprocess.Popen(
        [sys.executable, "-c", f"import files, time; lock = files.RunLock({str(tmp_path)!r}, '.train.lock', 'busy'); lock.__enter__(); "
                               f"print('locked', flush=True); time.sleep(60)"],
        cwd=HERE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        code, err = run_main(train, tiny_args(data_dir, tmp_path), capsys)
        assert code == 2 and "another train.py is running" in err
        assert not (tmp_path / "log.json").exists()
    finally:
        holder.kill()
        holder.wait()
    assert train.main(tiny_args(data_dir, tmp_path, "--epochs", "1")) == 0  # the lock died with its holder


# ----------------------------------------------------------------------------- benchmark

class MallInfo2(ctypes.Structure):
    """glibc's struct mallinfo2; hblkhd: bytes in blocks served by mmap rather than the heap."""
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


def mmapped_bytes_of_a_64mib_tensor(libc):
    libc.mallinfo2.restype = MallInfo2
    before = libc.mallinfo2().hblkhd
    tensor = torch.empty(2**24)  # 64 MiB: glibc's default serves it with mmap
    held = libc.mallinfo2().hblkhd - before
    del tensor
    return held


def test_heap_reuse_holds_inside_the_run_only():
    libc = engine.glibc()
    with engine.freed_memory_kept_in_heap(True) as applied:
        assert applied == (libc is not None) == (platform.libc_ver()[0] == "glibc")
        inside = mmapped_bytes_of_a_64mib_tensor(libc) if applied else None
    if applied:
        assert inside == 0
        assert mmapped_bytes_of_a_64mib_tensor(libc) >= 2**26  # glibc's defaults are back
    with engine.freed_memory_kept_in_heap(False) as applied:
        assert not applied


def test_benchmark_bad_input(tmp_path, capsys):
    for argv, message in [(["--seed", "-1"], "--seed must not be negative"),
                          (["--steps", "0"], "--steps must be at least 1"),
                          (["--workers", "-2"], "--workers must not be negative")]:
        code, err = run_main(benchmark, [*argv, "--device", "cpu", "--out-dir", str(tmp_path)], capsys)
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, (argv, err)
    assert not os.listdir(tmp_path)


FAILING_BENCHMARK = """
import sys, benchmark, engine
def failing_epoch(runner, loader, *args, **kwargs):
    next(iter(loader))  # the loader's workers are running
    raise RuntimeError("CUDA out of memory (raised by the test)")
engine.train_one_epoch = failing_epoch
sys.exit(benchmark.main(sys.argv[1:]))
"""


def test_benchmark_exits_when_a_row_fails_while_workers_run(tmp_path):
    # The traceback keeps the loader alive and its workers ignore SIGTERM: multiprocessing's exit handler
    # waited for them forever. The timeout only bounds a failure; a passing run ends in seconds.
    argv = ["--device", "cpu", "--batch-size", "8", "--steps", "1", "--workers", "1", "--out-dir", str(tmp_path)]
    done = subprocess.run([sys.executable, "-c", FAILING_BENCHMARK, *argv], cwd=HERE, capture_output=True,
                          text=True, timeout=240)
    assert done.returncode != 0 and "CUDA out of memory (raised by the test)" in done.stderr


def test_benchmark_prints_table_and_writes_json(tmp_path, capsys):
    argv = ["--device", "cpu", "--batch-size", "8", "--steps", "2", "--workers", "1", "--deterministic",
            "--out-dir", str(tmp_path)]
    before = process_settings()
    assert benchmark.main(argv) == 0
    assert process_settings() == before
    out = capsys.readouterr().out
    result = json.loads((tmp_path / "benchmark.json").read_text())
    for key in ("pipeline_images_per_s", "pipeline_normalized_in_workers_images_per_s",
                "augmentation_per_core_images_per_s", "coarse_dropout_per_core_images_per_s",
                "cutout_speedup_per_core", "cores_to_feed_40k_images_per_s", "step_images_per_s",
                "full_loop_images_per_s", "efficiency", "seed_settings_images_per_s", "speedup_over_seed_settings",
                "peak_memory_mb"):
        assert result[key] > 0, key
    assert result["efficiency"] == pytest.approx(
        result["full_loop_images_per_s"] / min(result["pipeline_images_per_s"], result["step_images_per_s"]))
    assert result["cores_to_feed_40k_images_per_s"] == pytest.approx(40_000 / result["augmentation_per_core_images_per_s"])
    for label in ("input pipeline alone", "normalized to float32 in the workers", "augmentation alone, one core",
                  "CoarseDropout", "speedup of the cheap cutout", "cores to feed 40,000", "model step alone",
                  "full training loop", "efficiency", "seed's settings", "speedup", "peak"):
        assert label in out
    assert f"{result['speedup_over_seed_settings']:.2f}x" in out
    # On glibc the step is also measured without freed memory kept in the heap; elsewhere that row is absent.
    assert result["cpu_heap_reuse"] == (platform.libc_ver()[0] == "glibc")
    if result["cpu_heap_reuse"]:
        assert result["step_default_malloc_images_per_s"] > 0
        assert f"{result['step_default_malloc_images_per_s']:,.0f} img/s" in out


# ----------------------------------------------------------------------------- several processes (torchrun)

def torchrun(argv, *launcher, script="train.py", wait_in_epoch=None):
    """train.py (or `script`) under a real torchrun; two processes on this machine unless `launcher` says
    otherwise. One thread each: two processes on two cores."""
    launcher = launcher or ("--standalone", "--nproc_per_node", "2")
    env = dict(env_with_switches(wait_in_epoch=wait_in_epoch), OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", *launcher, script, *argv], cwd=HERE,
                            env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def ranks_waiting(processes, count, timeout=120):
    """Wait until `count` ranks of these torchrun launches say they are between steps. Each launcher's
    stderr is read in a thread of its own: the launchers' lines arrive in any order. Returns the ranks'
    process ids, and a function that gives a launcher's whole stderr once it has ended."""
    arrived, read = queue.Queue(), {process: [] for process in processes}

    def reader(process):
        for line in process.stderr:
            read[process].append(line)
            arrived.put(line)
        arrived.put(None)  # this launcher ended

    threads = {process: threading.Thread(target=reader, args=(process,), daemon=True) for process in processes}
    for thread in threads.values():
        thread.start()
    pids = []
    while len(pids) < count:
        try:
            line = arrived.get(timeout=timeout)
        except queue.Empty:
            for process in processes:  # not left running beside the next tests
                process.kill()
            raise AssertionError(f"no rank said it waits between steps: {''.join(sum(read.values(), []))}") from None
        assert line is not None, f"torchrun ended early: {''.join(sum(read.values(), []))}"
        pids += [int(pid) for pid in re.findall(r"test: between steps, waiting for a signal \(pid (\d+)\)", line)]

    def stderr_of(process):
        process.wait(timeout=timeout)
        threads[process].join(timeout=timeout)
        return "".join(read[process])
    return pids, stderr_of


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_nodes(argv_of_each, wait_in_epoch=None):
    """Two "machines" on this one: two torchrun agents of one process each, meeting by c10d rendezvous on
    localhost, each with its own command line (its own data, checkpoint or precision)."""
    endpoint = f"127.0.0.1:{free_port()}"
    return [torchrun(argv, "--nnodes", "2", "--nproc_per_node", "1", "--node-rank", str(rank), "--rdzv-backend", "c10d",
                     "--rdzv-endpoint", endpoint, "--rdzv-id", "two-nodes", wait_in_epoch=wait_in_epoch)
            for rank, argv in enumerate(argv_of_each)]


def said_by(script, output):
    """The lines that `script` itself said in a launch's output, without their "(rank N)": torchrun's
    failure report repeats them after "traceback : ", and names the script in "train.py FAILED"."""
    said = (re.match(rf"{re.escape(script)}(?: \(rank \d+\))?: (.*)$", line) for line in output.splitlines())
    return [match.group(1) for match in said if match]


def stderr_when_ended(processes, timeout=120):
    """The processes' stderr, together, once all have ended (killed if one has not after `timeout` s)."""
    try:
        return "".join(process.communicate(timeout=timeout)[1] for process in processes)
    finally:
        for process in processes:
            process.kill()


def reference_evaluation(checkpoint_path, data_dir, batch_size, precision):
    """A single process's evaluation of a saved checkpoint on the test batch, one thread (as each rank had),
    in the run's precision (auto: bf16 or fp32, by the CPU)."""
    checkpoint = torch.load(checkpoint_path, weights_only=True)
    args = argparse.Namespace(**checkpoint["args"])
    model = engine.build_model(10, args, torch.device("cpu"))
    model.load_state_dict(checkpoint["model"])
    runner = engine.StepRunner(model, args, precision, torch.device("cpu"), checkpoint["mean"], checkpoint["std"], 1)
    data = augment.load_dataset("cifar10", data_dir, download=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return engine.evaluate(runner, augment.to_tensor(data.test_images), torch.from_numpy(data.test_labels),
                               10, batch_size)
    finally:
        torch.set_num_threads(threads)


def test_torchrun_two_processes_make_one_run(data_dir, tmp_path):
    argv = tiny_args(data_dir, tmp_path, "--epochs", "4", "--train-subset", "200", "--batch-size", "20")
    process = torchrun(argv)
    out, err = process.communicate(timeout=300)
    assert process.returncode == 0, err
    # Rank 0 alone prints and writes: one start line, one line per epoch, one log, one checkpoint.
    assert len([line for line in out.splitlines() if line.startswith("training from")]) == 1, out
    assert [line.split()[1] for line in out.splitlines() if line.startswith("epoch")] == ["1/4", "2/4", "3/4", "4/4"]
    assert sorted(n for n in os.listdir(tmp_path)) == [".train.lock", "best.pt", "last.pt", "log.json"]
    log = json.loads((tmp_path / "log.json").read_text())
    env = log["environment"]
    assert (env["world_size"], env["nodes"], env["backend"], env["per_rank_batch"]) == (2, 1, "gloo", 10)
    last = log["epochs"][-1]
    assert last["test_acc"] >= 0.5, log["epochs"]  # chance is 0.1: the learnable task was learned
    assert last["train_loss"] < log["epochs"][0]["train_loss"]
    # The sharded evaluation's counts equal one process's evaluation of the saved checkpoint, exactly.
    reference = reference_evaluation(tmp_path / "last.pt", data_dir, batch_size=10, precision=env["precision"])
    assert (last["test_acc"], last["test_acc_tta"]) == (reference["acc"], reference["acc_tta"])
    assert log["confusion_matrix"] == reference["confusion"]


def test_torchrun_a_failed_write_on_rank_0_stops_every_rank(data_dir, tmp_path):
    # last.pt cannot be replaced (a folder stands there): rank 0's write of epoch 1 fails while epoch 2
    # trains. The other rank must stop too, at the same point, instead of waiting for rank 0 in a step.
    (tmp_path / "last.pt").mkdir()
    process = torchrun(tiny_args(data_dir, tmp_path, "--epochs", "3", "--train-subset", "128", "--overwrite"))
    _, err = process.communicate(timeout=120)
    assert "train.py: error: could not save epoch 1" in err, err
    # torchrun's report, of the ranks that had ended when it looked: rank 0 failed (1); rank 1 stopped with
    # it (2), unless torchrun ended it first (-15).
    expected = {"0": ("1",), "1": ("2", "-15")}
    codes = re.findall(r"rank\s*: (\d) \(local_rank: \d\)\s*exitcode\s*: (-?\d+)", err)
    assert process.returncode != 0 and codes and all(code in expected[rank] for rank, code in codes), err
    assert 'train.py", line' not in err, err  # no rank died in a collective with a traceback


def test_torchrun_nodes_with_different_data_stop_in_one_line(data_dir, tmp_path):
    # Two "machines", each with its own --data-dir: one holds fewer training images. Their ranks would
    # take different numbers of steps and wait for each other forever.
    smaller = write_cifar_folder(str(tmp_path / "smaller"), train_per_batch=16)
    nodes = two_nodes([tiny_args(folder, tmp_path / "run", "--train-subset", "0", "--epochs", "1")
                       for folder in (data_dir, smaller)])
    errors = stderr_when_ended(nodes)
    assert all(node.returncode != 0 for node in nodes)
    said = said_by("train.py", errors)  # once a machine: on a cluster each machine's log has its own
    assert len(said) == 2 and all(text.startswith("error: the processes of this run read different data or "
                                                  "checkpoints") for text in said), errors
    # torchrun's failure report shows the line too, not "To enable traceback see ...": it reads each
    # failed process's error file.
    # (At least one report: an agent whose rendezvous host has already gone may end without one.)
    assert re.search(r"traceback : train.py( \(rank 1\))?: error: the processes of this run read different", errors), errors
    assert not (tmp_path / "run").exists()  # stopped before anything was created


def test_torchrun_nodes_given_different_settings_stop_in_one_line(data_dir, tmp_path):
    # Each machine has its own command line. Another --lr would step each rank's optimizer differently on
    # the same averaged gradients (the copies of the model drift apart, rank 0 saves its own); another
    # --seed would shuffle other shares of the images (some seen twice an epoch, some never).
    nodes = two_nodes([tiny_args(data_dir, tmp_path / "run", "--lr", lr, "--seed", seed)
                       for lr, seed in (("0.1", "0"), ("0.2", "1"))])
    errors = stderr_when_ended(nodes)
    assert all(node.returncode != 0 for node in nodes)
    assert said_by("train.py", errors) == ["error: the processes of this run have different settings (--lr, --seed): "
                                           "give every machine the same command line"] * 2, errors
    assert not (tmp_path / "run").exists()


def test_the_settings_that_every_process_must_share_name_their_flags(trained_run):
    # The same names in the same order on every rank (they are compared position by position), whatever
    # the checkpoint holds; the machine's own flags are left out, but for the two that change what DDP does.
    checkpoint = torch.load(trained_run / "last.pt", weights_only=True)
    fresh = train.agreed_settings(train.parse_args([]), None)
    resumed_args, _ = train.args_for_resume(train.parse_args(["--resume", str(trained_run / "last.pt")]), {"resume"})
    resumed = train.agreed_settings(resumed_args, checkpoint)
    assert list(resumed) == list(fresh)
    assert (resumed["--lr"], resumed["--epochs"], resumed["the checkpoint's history"]) == (
        checkpoint["args"]["lr"], checkpoint["args"]["epochs"], checkpoint["history"])  # the run's own, compared
    assert all(json.dumps(value) for value in [*fresh.values(), *resumed.values()])  # each becomes a crc32
    assert {"--lr", "--seed", "--batch-size", "--epochs", "--no-nesterov", "--sync-bn", "--no-channels-last",
            "the checkpoint's history"} <= set(fresh)
    assert not {"--device", "--precision", "--workers", "--data-dir", "--out-dir", "--resume", "--help"} & set(fresh)


@pytest.mark.parametrize("failure", ["checkpoint", "arguments", "a flag argparse refuses"])
def test_a_failure_on_one_node_before_training_stops_every_node(failure, data_dir, trained_run, tmp_path):
    # Two "machines", each with its own copy of the checkpoint or its own command line; the second's fails
    # before any training. The first must stop too, in one line, not wait for it nor end in a traceback (it
    # did when the checks came before the processes connected), and the second must say why, even where
    # the error is of a kind said once when every rank meets it (a usage error). Which machine gets rank 0
    # is the rendezvous's choice: the lines are compared without their "(rank N)".
    if failure == "checkpoint":
        missing = tmp_path / "missing" / "last.pt"
        argvs = [["--resume", str(copy), "--device", "cpu", "--workers", "0", "--out-dir", str(tmp_path / "run")]
                 for copy in (trained_run / "last.pt", missing)]
        why = f"error: checkpoint {missing} not found"
    elif failure == "arguments":
        argvs = [tiny_args(data_dir, tmp_path / "run", "--batch-size", str(batch)) for batch in (32, 33)]
        why = ("error: --batch-size 33 is the global batch and does not divide among 2 processes; give a multiple "
               "of 2 (32 or 34)")
    else:  # argparse's own error: it left silently (exit 2) while the other machine waited to connect
        argvs = [tiny_args(data_dir, tmp_path / "run", "--batch-size", batch) for batch in ("32", "3x")]
        why = "error: argument --batch-size: invalid int value: '3x' (see train.py --help)"
    nodes = two_nodes(argvs)
    errors = stderr_when_ended(nodes)
    assert all(node.returncode != 0 for node in nodes)
    assert sorted(said_by("train.py", errors)) == sorted(
        [why, "error: another process of this run failed (its message says why)"]), errors
    assert not (tmp_path / "run").exists()  # stopped before anything was created


def test_nodes_with_different_precisions_stop_in_one_line(data_dir, tmp_path):
    # --precision auto decides per machine: an A100 (bf16) beside a T4 (fp16) would average loss-scaled
    # gradients with unscaled ones. Two "machines" given different precisions stand in for them.
    nodes = two_nodes([tiny_args(data_dir, tmp_path / "run", "--precision", precision) for precision in ("bf16", "fp32")])
    errors = stderr_when_ended(nodes)
    assert all(node.returncode != 0 for node in nodes)
    assert said_by("train.py", errors) == ["error: the processes of this run chose different devices or precisions "
                                           "(bf16 on some, fp32 on others): give every machine the same kind of "
                                           "device, or --device and --precision explicitly"] * 2, errors
    assert not (tmp_path / "run").exists()


def test_two_nodes_stop_on_sigterm_and_resume_across_world_sizes(data_dir, tmp_path, monkeypatch, capsys):
    # 1 process -> 2 "nodes" (two torchrun agents, c10d rendezvous on localhost) -> 1 process. 4 steps an
    # epoch: under torchrun the ranks' stop vote is read one step after it is cast.
    argv = tiny_args(data_dir, tmp_path, "--epochs", "3", "--train-subset", "128")
    interrupt_after_epoch(monkeypatch, 1)
    assert train.main(argv) == 130
    resume = ["--resume", str(tmp_path / "last.pt"), "--device", "cpu", "--workers", "0"]
    nodes = two_nodes([resume, resume], wait_in_epoch=3)
    _, stderr_of = ranks_waiting(nodes, 2)
    for node in nodes:  # a cluster's preemption: every launcher gets SIGTERM
        node.send_signal(signal.SIGTERM)
    errors = "".join(stderr_of(node) for node in nodes)
    assert all(node.returncode != 0 for node in nodes)
    said = said_by("train.py", errors)  # once a machine
    assert len(said) == 2 and all(text.startswith("stopped at epoch 3, after step 2 of 4; epochs 1-2 are saved; "
                                                  "continue with: torchrun --nnodes 2 --nproc_per_node 1")
                                  for text in said), errors
    assert not [n for n in os.listdir(tmp_path) if ".tmp-" in n]  # nothing partial
    saved = torch.load(tmp_path / "last.pt", weights_only=True)
    assert saved["epoch"] == 2 and saved["args"]["batch_size"] == 32
    assert json.loads((tmp_path / "log.json").read_text())["environment"]["nodes"] == 2
    monkeypatch.undo()
    assert train.main(resume) == 0
    log = json.loads((tmp_path / "log.json").read_text())
    assert [r["epoch"] for r in log["epochs"]] == [1, 2, 3] and log["environment"]["world_size"] == 1
    # The schedule went on where it was, whatever the number of processes: the lr of a one-process run.
    assert [r["lr"] for r in log["epochs"]] == pytest.approx(one_cycle_lrs(epochs=3, steps=4, peak=0.2 * 32 / 500))


def test_log_records_the_peak_lr_and_an_old_checkpoint_keeps_its_own(data_dir, tmp_path, monkeypatch):
    argv = tiny_args(data_dir, tmp_path, "--epochs", "3")
    interrupt_after_epoch(monkeypatch, 1)
    assert train.main(argv) == 130
    monkeypatch.undo()
    log = json.loads((tmp_path / "log.json").read_text())
    assert log["args"]["lr"] == pytest.approx(0.2 * 32 / 500)  # a number, not "default"
    # A checkpoint from before: "lr": null, meaning that day's default (0.1 per 128 images), peak 0.025 here.
    checkpoint = torch.load(tmp_path / "last.pt", weights_only=True)
    checkpoint["args"]["lr"] = None
    old_lrs = one_cycle_lrs(epochs=3, steps=2, peak=0.025)
    for group in checkpoint["optimizer"]["param_groups"]:
        group["max_lr"], group["initial_lr"], group["min_lr"] = 0.025, 0.025 / 25, 0.025 / 25 / 1e4
        group["lr"] = old_lrs[1]
    checkpoint["scheduler"]["max_lrs"] = [0.025]
    checkpoint["scheduler"]["base_lrs"] = [0.025 / 25]
    torch.save(checkpoint, tmp_path / "last.pt")
    assert train.main(["--resume", str(tmp_path / "last.pt"), "--device", "cpu", "--workers", "0"]) == 0
    log = json.loads((tmp_path / "log.json").read_text())
    assert log["args"]["lr"] == 0.025
    assert [r["lr"] for r in log["epochs"]][1:] == pytest.approx(old_lrs[1:])  # its schedule goes on


def one_cycle_lrs(epochs, steps, peak):
    """The lr at the start of each epoch under the default one-cycle schedule, from PyTorch itself."""
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=peak)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=peak, total_steps=epochs * steps,
                                                   pct_start=0.2, anneal_strategy="cos", cycle_momentum=False)
    lrs = []
    for _ in range(epochs):
        lrs.append(optimizer.param_groups[0]["lr"])
        for _ in range(steps):
            optimizer.step()
            schedule.step()
    return lrs


def test_torchrun_sigterm_then_sigkill_of_one_rank_then_resume(data_dir, tmp_path):
    argv = tiny_args(data_dir, tmp_path, "--epochs", "3", "--train-subset", "128")
    # SIGTERM to each process (as Ctrl-C or a cluster does): both stop at the same step and exit 130.
    process = torchrun(argv, wait_in_epoch=2)
    pids, stderr_of = ranks_waiting([process], 2)
    for pid in pids:
        os.kill(pid, signal.SIGTERM)
    err = stderr_of(process)
    assert err.count("exitcode  : 130") == 2, err  # torchrun's report of both ranks
    assert "train.py: stopped at epoch 2, after step 2 of 4; epoch 1 is saved; continue with: torchrun " \
           "--standalone --nproc_per_node 2 train.py --resume" in err
    assert not [n for n in os.listdir(tmp_path) if ".tmp-" in n]
    assert assert_files_consistent(tmp_path) == 1
    # SIGKILL of one rank: torchrun ends the other; every file is still a complete version.
    process = torchrun(["--resume", str(tmp_path / "last.pt"), "--device", "cpu", "--workers", "0"], wait_in_epoch=3)
    pids, stderr_of = ranks_waiting([process], 2)
    os.kill(pids[0], signal.SIGKILL)
    err = stderr_of(process)
    assert process.returncode != 0 and "SIGKILL" in err, err
    assert assert_files_consistent(tmp_path) in (1, 2)  # epoch 2's files may have been in the writing
    assert train.main(["--resume", str(tmp_path / "last.pt"), "--device", "cpu", "--workers", "0"]) == 0
    assert assert_files_consistent(tmp_path) == 3


def test_an_unexpected_error_with_workers_ends_the_process(data_dir, tmp_path):
    # The workers ignore SIGTERM (a stop is the main process's decision); an error that reaches the top
    # must still end them, or Python's exit would wait for them forever.
    script = (f"import engine, train\n"
              f"def fail(*args, **kwargs): raise RuntimeError('CUDA out of memory (simulated)')\n"
              f"engine.evaluate = fail\n"
              f"train.main({tiny_args(data_dir, tmp_path, '--workers', '1')!r})\n")
    process = subprocess.run([sys.executable, "-c", script], cwd=HERE, capture_output=True, text=True, timeout=120)
    assert process.returncode == 1 and "CUDA out of memory (simulated)" in process.stderr


def test_ranks_draw_different_augmentations_for_the_same_positions():
    images = np.tile(coloured_images(1, 0)[0], (64, 1, 1, 1))  # one image, many times
    shares = []
    for rank in (0, 1):
        dataset = augment.AugmentedImages(images, np.zeros(64, dtype=np.int64),
                                          augment.train_transform(augment.CIFAR10_MEAN))
        sampler = augment.SeededBatchSampler(64, 32, seed=0, rank=rank, world_size=2)
        shares.append([dataset.__getitems__(batch) for batch in sampler])
    for first, second in zip(*shares):
        assert len(first) == len(second) == 16
        assert sum(torch.equal(a[0], b[0]) for a, b in zip(first, second)) <= 2  # a crop may coincide
    # Together the ranks' shares are the global batch of a single process, in order.
    whole = [indices for _, indices in augment.SeededBatchSampler(64, 32, seed=0)]
    halves = [[indices for _, indices in augment.SeededBatchSampler(64, 32, seed=0, rank=r, world_size=2)]
              for r in (0, 1)]
    assert [a + b for a, b in zip(*halves)] == whole


def test_each_machine_downloads_once(tmp_path, monkeypatch):
    # The first process of a machine downloads; the others read what it wrote, never download themselves.
    downloads = []

    def download(spec, root):
        downloads.append(root)
        raise augment.DatasetError("no network in this test")

    monkeypatch.setattr(augment, "_download", download)
    args = train.parse_args(["--data-dir", str(tmp_path), "--device", "cpu"])
    for rank in range(4):  # two machines of two processes each
        with pytest.raises(augment.DatasetError):
            train.load_data(args, engine.World(rank=rank, local_rank=rank % 2, size=4, local_size=2))
    assert downloads == [str(tmp_path)] * 2  # by ranks 0 and 2, the first of each machine


def test_global_batch_must_divide_among_processes(data_dir, tmp_path, capsys):
    args = train.parse_args(tiny_args(data_dir, tmp_path, "--batch-size", "32"))
    with pytest.raises(train.UsageError, match=r"--batch-size 32 is the global batch and does not divide among 3 "
                                               r"processes; give a multiple of 3 \(30 or 33\)$"):
        train.check_args(args, engine.World(size=3, local_size=3))
    train.check_args(args, engine.World(size=2, local_size=2))
    # A resumed run keeps its batch (airbench's 500, saved on one GPU, resumed on 8): the advice is the processes.
    resumed = argparse.Namespace(**dict(vars(args), batch_size=500, resume="run/last.pt"))
    with pytest.raises(train.UsageError, match=r"^run/last.pt was saved with a global batch of 500, which does not "
                                               r"divide among 8 processes; resume it on 1, 2, 4, 5 or 10 processes$"):
        train.check_args(resumed, engine.World(size=8, local_size=8))
    code, err = run_main(train, tiny_args(data_dir, tmp_path, "--sync-bn"), capsys)
    assert code == 2 and "--sync-bn needs CUDA GPUs" in err and len(error_lines(err)) == 1, err


def test_benchmark_under_torchrun_adds_the_all_reduce_and_scaling(tmp_path):
    process = torchrun(["--device", "cpu", "--batch-size", "8", "--steps", "1", "--workers", "0",
                        "--out-dir", str(tmp_path)], script="benchmark.py")
    out, err = process.communicate(timeout=300)
    assert process.returncode == 0, err
    result = json.loads((tmp_path / "benchmark.json").read_text())
    assert (result["world_size"], result["per_rank_batch"], result["backend"]) == (2, 4, "gloo")
    for key in ("ddp_step_images_per_s", "all_reduce_ms", "step_ms", "scaling_efficiency"):
        assert result[key] > 0, key
    assert result["gradient_mb"] == pytest.approx(11_173_962 * 4 / 2**20)
    assert out.count("benchmark on") == 1  # rank 0 alone prints
    for label in ("DistributedDataParallel, all 2 processes", "gradient all-reduce alone", "scaling efficiency"):
        assert label in out


def test_a_recipe_in_one_word_and_flags_beside_it(trained_run):
    seed = vars(train.parse_args(["--recipe", "seed", "--lr", "0.02"]))
    expected = dict(engine.RECIPES["seed"], lr=0.02, precision="fp32", channels_last=False, recipe="seed")
    assert {key: seed[key] for key in expected} == expected
    assert (seed["schedule"], seed["val_split"], seed["batch_size"], seed["cutout"]) == ("plateau", 5000, 64, 0)
    airbench = train.parse_args(["--recipe", "airbench"])  # train_resnet18_94.py's hyperparameters
    assert (airbench.batch_size, airbench.lr, airbench.momentum, airbench.nesterov, airbench.weight_decay,
            airbench.label_smoothing, airbench.schedule, airbench.warmup, airbench.pad_crop, airbench.flip,
            airbench.cutout) == (500, 0.2, 0.9, True, 5e-4, 0.0, "linear", 0.2, 4, True, 12)
    default = vars(train.parse_args([]))
    # The default: airbench's settings with a batch that divides among 8 GPUs and PyTorch's cosine shape.
    assert default == dict(vars(airbench), recipe="default", batch_size=512, lr=None, schedule="onecycle")
    assert engine.derived_lr(argparse.Namespace(lr=None, batch_size=512)) == pytest.approx(0.2 * 512 / 500)
    assert json.loads((trained_run / "log.json").read_text())["args"]["recipe"] == "default"


def schedule_lrs(argv, steps):
    """The lr of each step under train.py's parsed command line."""
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    scheduler = engine.make_scheduler(optimizer, train.parse_args(argv), steps_per_epoch=steps // 10)
    lrs = []
    for _ in range(steps):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return np.array(lrs)


def test_linear_schedule_is_airbenchs_triangle():
    argv = ["--epochs", "10", "--batch-size", "500", "--lr", "0.2", "--warmup", "0.2"]
    linear = schedule_lrs(argv + ["--schedule", "linear"], steps=800)
    # airbench's ResNet-18 baseline: np.interp over the steps, from 0.2x the peak at step 0 up to the peak at
    # 20% of the steps, then down to 0. OneCycleLR peaks one step earlier: within 1/160 of the peak.
    triangle = 0.2 * np.interp(np.arange(800), [0, 160, 800], [0.2, 1, 0])
    assert np.abs(linear - triangle).max() <= 0.2 / 160 + 1e-9
    assert linear[0] == pytest.approx(0.04) and linear.max() == pytest.approx(0.2) and linear[-1] < 1e-5
    cosine = schedule_lrs(argv + ["--schedule", "onecycle"], steps=800)
    assert cosine[0] == pytest.approx(0.2 / 25) and cosine.max() == pytest.approx(0.2)
    assert np.abs(cosine - triangle).max() > 0.01  # a different shape, not a renamed one


def test_a_warmup_of_one_step_or_less_starts_at_the_peak(capsys):
    # 5 steps at --warmup 0.2 is a warm-up of exactly one step: OneCycleLR divided by zero there.
    for shape in ("onecycle", "linear"):
        for epochs in ("5", "2"):  # one step, and less than one
            args = train.parse_args(["--epochs", epochs, "--lr", "0.2", "--warmup", "0.2", "--schedule", shape])
            optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
            engine.make_scheduler(optimizer, args, steps_per_epoch=1)
            assert optimizer.param_groups[0]["lr"] == pytest.approx(0.2, rel=0.01), (shape, epochs)
            assert "is one step or less: the run starts at the peak lr" in capsys.readouterr().err
    args = train.parse_args(["--epochs", "1", "--warmup", "0.2"])
    engine.make_scheduler(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0), args, steps_per_epoch=1)
    assert "the run's one step is its schedule's last, at nearly 0" in capsys.readouterr().err
    args = train.parse_args(["--epochs", "5", "--warmup", "0.2"])
    engine.make_scheduler(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0), args, steps_per_epoch=2)
    assert capsys.readouterr().err == ""  # two steps of warm-up: climbs as asked, nothing to say


class AnotherRankDiverged(engine.World):
    """One process's view of a run in which another rank's loss became NaN at step 1."""

    def minimum(self, tensor):
        return torch.minimum(tensor, torch.tensor(1))


def test_a_nan_on_another_rank_stops_this_one(data_dir, tmp_path):
    world, cpu = AnotherRankDiverged(), torch.device("cpu")
    args = train.parse_args(tiny_args(data_dir, tmp_path))
    images, labels = coloured_images(64, seed=0)
    loader, _ = engine.make_train_loader(images, labels, args, augment.CIFAR10_MEAN, cpu, 0, world=world)
    runner = engine.StepRunner(engine.build_model(10, args, cpu), args, "bf16", cpu, augment.CIFAR10_MEAN,
                               augment.CIFAR10_STD, len(loader), world)
    with engine.StopFlag(world) as stop, pytest.raises(engine.Diverged, match="epoch 1, step 1 of 2"):
        engine.train_one_epoch(runner, loader, 1, 1, stop, bar_enabled=False)


def test_the_lock_dies_with_its_process_not_with_its_workers(tmp_path):
    # A DataLoader worker is a fork of the training process: killed, the process must not leave the lock
    # to a worker that lives on for a few seconds (an flock would be shared with it, keeping a resume out).
    script = (f"import files, os, signal, sys, time\n"
              f"lock = files.RunLock({str(tmp_path)!r}, '.train.lock', 'busy').__enter__()\n"
              f"if os.fork() == 0:\n"
              f"    print('worker', os.getpid(), flush=True); time.sleep(60); os._exit(0)\n"
              f"time.sleep(60)\n")
    holder = subprocess.Popen([sys.executable, "-c", script], cwd=HERE, stdout=subprocess.PIPE, text=True)
    worker = int(holder.stdout.readline().split()[1])
    try:
        with pytest.raises(files.FolderInUse):
            files.RunLock(str(tmp_path), ".train.lock", "busy").__enter__()
        holder.kill()
        holder.wait()
        os.kill(worker, 0)  # the worker is still alive
        lock = files.RunLock(str(tmp_path), ".train.lock", "busy").__enter__()
        lock.__exit__(None, None, None)
    finally:
        holder.kill()
        with contextlib.suppress(ProcessLookupError):
            os.kill(worker, signal.SIGKILL)


def test_gpus_this_build_has_no_kernels_for_and_too_few_gpus(monkeypatch):
    cuda_13 = ["sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120"]
    assert "a PyTorch build for it" in devices.build_problem((7, 0), cuda_13)  # a V100
    assert devices.build_problem((7, 5), cuda_13) is None and devices.build_problem((12, 1), cuda_13) is None
    assert devices.build_problem((6, 0), []) is None  # a CPU-only build lists nothing: nothing to say
    assert "from compute capability 9.0 on" in devices.build_problem((8, 0), ["sm_90a", "sm_100f", "compute_90"])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(devices.DeviceError, match="LOCAL_RANK 2, but this machine shows 2 GPU"):
        devices.pick_device("cuda", 2)


def test_a_device_that_cannot_compute_is_one_line():
    devices.check_computes(torch.device("cpu"))
    # A tensor on the meta device has no values: its .item() fails as a broken GPU's first kernel would.
    with pytest.raises(devices.DeviceError, match=r"^meta cannot compute \(Tensor.item\(\) cannot be called on meta "
                                                  r"tensors\); check the GPU \(nvidia-smi\), or use --device cpu$"):
        devices.check_computes(torch.device("meta"))


def test_cuda_failing_at_start_up_is_one_line(monkeypatch):
    # CUDA's lazy start-up runs at the first query of the GPU's facts; a driver problem raises there.
    def broken_driver(device):
        raise RuntimeError("\n")  # no message at all: the error's kind names it

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(devices, "read_facts", broken_driver)
    with pytest.raises(devices.DeviceError, match=r"^--device cuda: the device cannot be used \(RuntimeError\); check"):
        engine.resolve_device("cuda", "auto", False)


def test_resume_keeps_this_machines_optimizer_implementation(data_dir, tmp_path):
    # Optimizer.load_state_dict takes every group setting from the checkpoint: a CPU run resumed on a
    # GPU would lose fused SGD (and the fp16 scaler's sync-free step) without care.
    args = train.parse_args(tiny_args(data_dir, tmp_path))
    runner = engine.StepRunner(engine.build_model(10, args, torch.device("cpu")), args, "bf16", torch.device("cpu"),
                               augment.CIFAR10_MEAN, augment.CIFAR10_STD, 2)
    data = augment.load_dataset("cifar10", data_dir, download=False)
    checkpoint = runfiles.build_checkpoint(runner, args, data, 1, [], None)
    checkpoint["optimizer"]["param_groups"][0].update(fused=True, foreach=False)  # as a GPU run saves it
    before = {k: runner.optimizer.param_groups[0][k] for k in ("fused", "foreach")}
    runfiles.restore_checkpoint(runner, checkpoint)
    assert {k: runner.optimizer.param_groups[0][k] for k in ("fused", "foreach")} == before


def test_resume_puts_momentum_buffers_in_the_parameters_layout(data_dir, tmp_path):
    # A --no-channels-last run resumed with channels_last (the default): loading keeps the saved NCHW
    # buffers, and CUDA's fused SGD refuses a step whose buffers' strides differ from the parameters'.
    def runner(*flags):
        args = train.parse_args(tiny_args(data_dir, tmp_path, *flags))
        return engine.StepRunner(engine.build_model(10, args, torch.device("cpu")), args, "fp32",
                                 torch.device("cpu"), augment.CIFAR10_MEAN, augment.CIFAR10_STD, 2), args
    (saved, args), (resumed, _) = runner("--no-channels-last"), runner()
    images, labels = coloured_images(8, 0)
    saved(augment.to_tensor(images), torch.from_numpy(labels))  # one step: momentum buffers exist
    data = augment.load_dataset("cifar10", data_dir, download=False)
    runfiles.save_checkpoint(runfiles.build_checkpoint(saved, args, data, 1, [], None), tmp_path / "nchw.pt")
    runfiles.restore_checkpoint(resumed, torch.load(tmp_path / "nchw.pt", weights_only=True))
    parameters = list(resumed.model.parameters())
    assert any(p.dim() == 4 and not p.is_contiguous() for p in parameters)  # channels_last conv weights
    for parameter, before in zip(parameters, saved.model.parameters()):
        buffer = resumed.optimizer.state[parameter]["momentum_buffer"]
        assert buffer.stride() == parameter.stride()
        assert torch.equal(buffer, saved.optimizer.state[before]["momentum_buffer"])  # the same values


def test_a_seed_recipe_run_resumes_in_its_own_precision_and_layout(trained_run, tmp_path):
    checkpoint = torch.load(trained_run / "last.pt", weights_only=True)
    checkpoint["args"]["recipe"] = "seed"
    path = tmp_path / "seed.pt"
    torch.save(checkpoint, path)
    resumed, _ = train.args_for_resume(train.parse_args(["--resume", str(path)]), {"resume"})
    assert (resumed.precision, resumed.channels_last) == ("fp32", False)
    given = train.parse_args(["--resume", str(path), "--precision", "bf16"])
    assert train.args_for_resume(given, {"resume", "precision"})[0].precision == "bf16"  # given: kept


def test_torchruns_variables_describe_the_processes():
    assert engine.world_from_environment({}) == engine.World()  # no torchrun: one process, nothing started
    world = engine.world_from_environment({"RANK": "11", "LOCAL_RANK": "3", "WORLD_SIZE": "16",
                                           "LOCAL_WORLD_SIZE": "8"})
    assert (world.rank, world.local_rank, world.size, world.nodes, world.main, world.launched) == \
        (11, 3, 16, 2, False, True)
    assert world.per_rank(512) == 32
    assert world.resume_command("/r/last.pt").startswith("torchrun --nnodes 2 --nproc_per_node 8 --rdzv-backend c10d")
    assert engine.World().resume_command("/r/last.pt") == "python train.py --resume /r/last.pt"


def test_gpus_connect_their_own_nccl_group_only_after_the_checks(monkeypatch):
    # The processes connect over gloo first (engine.processes); the GPUs' NCCL group comes after the checks,
    # bound to this rank's GPU. No GPU here: torch's new_group is replaced by a recorder.
    made, compared = [], []
    monkeypatch.setattr(torch.distributed, "new_group", lambda **options: made.append(options) or "nccl group")
    monkeypatch.setattr(engine.World, "spread", lambda self, *values: compared.append(values) or (values, values))
    launched = engine.World(rank=1, local_rank=1, size=2, local_size=2, launched=True, backend="gloo")
    gpu = engine.on_device(launched, torch.device("cuda", 1), "bf16")
    assert (gpu.backend, gpu.data) == ("nccl", "nccl group")
    assert made == [{"backend": "nccl", "device_id": torch.device("cuda", 1)}]
    assert compared == [(1, devices.PRECISIONS.index("bf16"))]  # device type and precision agreed on first
    assert engine.on_device(launched, torch.device("cpu"), "fp32") is launched  # CPU processes: all on gloo
    assert engine.on_device(engine.World(), torch.device("cuda", 0), "bf16") == engine.World()  # one process
    with pytest.raises(devices.DeviceError, match="not on mps"):
        engine.on_device(launched, torch.device("mps"), "fp32")
    bf16, fp16 = devices.PRECISIONS.index("bf16"), devices.PRECISIONS.index("fp16")
    monkeypatch.setattr(engine.World, "spread", lambda self, *values: ([1, bf16], [1, fp16]))  # a T4 beside an A100
    with pytest.raises(engine.DevicesDiffer, match=r"different devices or precisions \(bf16 on some, fp16 on others\)"):
        engine.on_device(launched, torch.device("cuda", 1), "fp16")
    assert len(made) == 1


def test_the_model_is_wrapped_with_the_worlds_data_group():
    # The default group is gloo (checks, stop votes); gradients and --sync-bn's statistics go through the
    # world's data group (NCCL's on GPUs). A one-process gloo group stands in for it here.
    store = torch.distributed.HashStore()
    torch.distributed.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        group = torch.distributed.new_group(backend="gloo")
        world = engine.World(launched=True, backend="gloo", data=group)
        assert world.wrap(resnet.resnet18(10), torch.device("cpu")).process_group is group
        synced = torch.nn.SyncBatchNorm.convert_sync_batchnorm(resnet.resnet18(10))
        with pytest.raises(ValueError, match="only work with GPU modules"):  # torch's refusal on a CPU, after...
            world.wrap(synced, torch.device("cpu"))
        norms = [m for m in synced.modules() if isinstance(m, torch.nn.SyncBatchNorm)]
        assert norms and all(m.process_group is group for m in norms)  # ...each layer got the data group
    finally:
        torch.distributed.destroy_process_group()


def test_collectives_of_device_tensors_go_through_the_data_group(monkeypatch):
    # On GPUs the data group is NCCL's and the default group gloo, which would also take CUDA tensors, slowly,
    # through the host: so a collective that forgot its group would not fail there. It fails here.
    torch.distributed.init_process_group("gloo", store=torch.distributed.HashStore(), rank=0, world_size=1)
    try:
        group = torch.distributed.new_group(backend="gloo")
        world = engine.World(launched=True, backend="gloo", data=group)
        used = []
        for name in ("all_reduce", "broadcast"):
            collective = getattr(torch.distributed, name)
            monkeypatch.setattr(torch.distributed, name, lambda *tensors, collective=collective, **options:
                                used.append(options.get("group")) or collective(*tensors, **options))
        world.add_up(torch.ones(2), torch.tensor(3))
        world.minimum(torch.ones(1))
        world.share_buffers(torch.nn.BatchNorm2d(2))
        benchmark.measure_all_reduce(torch.device("cpu"), 1, world)
        assert len(used) == 2 + 3 + 3 and all(g is group for g in used)  # the device's tensors
        used.clear()
        world.any(True), world.same_everywhere(1, 2), world.vote(False).result()
        assert len(used) == 4 and all(g is None for g in used)  # decisions: CPU values, on the default gloo group
    finally:
        torch.distributed.destroy_process_group()


def test_an_error_is_said_once_a_machine_and_left_for_torchruns_report(tmp_path, monkeypatch, capsys):
    error_file = tmp_path / "error.json"
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(error_file))
    second_of_machine_2 = engine.World(rank=3, local_rank=1, size=4, local_size=2, launched=True)
    first_of_machine_2 = engine.World(rank=2, local_rank=0, size=4, local_size=2, launched=True)
    shared = train.UsageError("--batch-size 6 is the global batch and does not divide among 4 processes")
    engine.report_error(second_of_machine_2, "train.py", shared, f"error: {shared}", train.SAID_ONCE_A_MACHINE)
    assert capsys.readouterr().err == ""  # the machine's first process says it
    record = json.loads(error_file.read_text())["message"]  # where torchrun's failure report reads it
    assert record["message"] == record["extraInfo"]["py_callstack"] == f"train.py (rank 3): error: {shared}"
    engine.report_error(first_of_machine_2, "train.py", shared, f"error: {shared}", train.SAID_ONCE_A_MACHINE)
    assert capsys.readouterr().err == f"train.py (rank 2): error: {shared}\n"
    own = devices.DeviceError("--device cuda asked for, but PyTorch sees no CUDA GPU")  # this machine's alone
    engine.report_error(second_of_machine_2, "train.py", own, f"error: {own}", train.SAID_ONCE_A_MACHINE)
    assert capsys.readouterr().err == f"train.py (rank 3): error: {own}\n"


def test_torchruns_root_cause_is_the_process_that_says_why(tmp_path, monkeypatch):
    # Rank 1 fails alone (at 100.95 s); rank 0 stops with it (at 101.02 s) and unwinds faster. torchrun's
    # report names the earliest error file its "Root Cause" (whole seconds; a tie goes to the failure it
    # noticed first), which must be rank 1's line, not rank 0's "another process failed", however late
    # rank 1 gets to say it. torch's own classes read the files; a recorder stands in for the count.
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure
    monkeypatch.setattr(engine.World, "count", lambda self, flag: 1)  # one rank failed
    clock = iter([1_800_000_100.95, 1_800_000_101.02])  # rank 1 meets its error, then rank 0 learns of it
    monkeypatch.setattr(engine.time, "time", lambda: next(clock))
    errors = {}

    def fail():
        raise devices.DeviceError("--device cuda asked for, but PyTorch sees no CUDA GPU")
    for rank, here in ((1, True), (0, False)):
        with pytest.raises(Exception) as raised:
            engine.World(rank=rank, local_rank=rank, size=2, local_size=2, launched=True).together(fail, here=here)
        errors[rank] = raised.value
    assert isinstance(errors[0], engine.ElsewhereFailed)
    clock = iter([1_800_000_101.1, 1_800_000_103.5])  # rank 0 says its line at once, rank 1 seconds later
    monkeypatch.setattr(engine.time, "time", lambda: next(clock))
    failures = {}
    for rank in (0, 1):  # torchrun notices rank 0 first
        monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(tmp_path / f"error-{rank}.json"))
        world = engine.World(rank=rank, local_rank=rank, size=2, local_size=2, launched=True)
        engine.report_error(world, "train.py", errors[rank], f"error: {errors[rank]}", train.SAID_ONCE_A_MACHINE)
        failures[rank] = ProcessFailure(local_rank=rank, pid=100 + rank, exitcode=2,
                                        error_file=str(tmp_path / f"error-{rank}.json"))
    rank, first = ChildFailedError("train.py", failures).get_first_failure()
    assert (rank, first.message["message"]) == (1, "train.py (rank 1): error: --device cuda asked for, but PyTorch "
                                                    "sees no CUDA GPU")


def test_the_cpus_name_counts_in_words(monkeypatch):
    monkeypatch.setattr(os, "cpu_count", lambda: 1)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)  # one process of two under torchrun, on a 1-core VM
    assert devices.device_name(torch.device("cpu")).endswith("(1 core, 1 thread)")
