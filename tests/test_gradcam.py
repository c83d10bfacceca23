"""Grad-CAM and Grad-CAM++ against the grad-cam package, and gradcam.py's pictures and bad input."""
import argparse
import os
import shutil

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from PIL import Image

import augment
import gradcam
import resnet

from helpers import CLASSES, HERE, run_main, save_test_images


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


def test_a_row_shows_the_prediction_beside_another_class_and_the_title_stays_above_the_rows():
    args = argparse.Namespace(method="gradcam", layer=["layer4"], image=[f"{i}.png" for i in range(24)])
    images, maps = np.zeros((24, 32, 32, 3), np.uint8), np.zeros((24, 1, 32, 32), np.float32)
    probabilities = torch.full((24, 10), 0.01).index_fill_(1, torch.tensor([9]), 0.91)  # a truck, every one
    figure = gradcam.image_figure(args, list(images), images, maps, [3] * 24, probabilities, CLASSES)
    labels = [text.get_text() for axis in figure.axes for text in axis.texts]
    assert len(labels) == 24 and all(label.endswith("cat (1.0%)\npredicted: truck (91.0%)") for label in labels)
    renderer = FigureCanvasAgg(figure).get_renderer()
    title = figure._suptitle.get_window_extent(renderer)
    assert all(title.y0 >= axis.get_tightbbox(renderer).y1 for axis in figure.axes)


def test_the_readmes_notebook_snippet_runs(trained_run, tmp_path, monkeypatch):
    readme = open(os.path.join(HERE, "README.md")).read()
    snippet = readme.split("**From a notebook**")[1].split("```")[1]
    monkeypatch.chdir(tmp_path)  # a notebook in a copy of the repository's folder: best.pt and examples/
    shutil.copy(trained_run / "best.pt", tmp_path / "best.pt")
    shutil.copytree(os.path.join(HERE, "examples"), tmp_path / "examples")
    names = {}
    exec(snippet, names)
    assert names["images"].shape == (1, 3, 32, 32) and names["maps"].shape == (1, 1, 32, 32)


def test_gradcam_targets_are_class_indices_or_a_clear_error():
    model = resnet.resnet18(num_classes=10).eval()
    for targets in ("cat", 12, -1, 1.5):
        with pytest.raises(ValueError, match="targets must be class indices from 0 to 9"):
            gradcam.GradCAM(model, ["layer4"])(torch.randn(2, 3, 32, 32), targets)
    assert gradcam.GradCAM(model, ["layer4"])(torch.randn(2, 3, 32, 32), [1, 2])[2].tolist() == [1, 2]


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


def test_the_most_confused_pairs_are_the_largest_off_diagonal_cells():
    labels = np.array([0] * 6 + [1] * 5 + [2] * 4)
    predicted = np.array([0, 1, 1, 1, 2, 2] + [1, 0, 0, 2, 2] + [0, 0, 1, 2])
    # Off the diagonal: 0->1: 3, 0->2: 2, 1->0: 2, 1->2: 2, 2->0: 2, 2->1: 1. Ties in row-major order.
    assert gradcam.most_confused(labels, predicted, 3, 4) == [(0, 1, 3), (0, 2, 2), (1, 0, 2), (1, 2, 2)]
    assert gradcam.most_confused(labels, labels, 3, 4) == []  # nothing confused: no pairs


def test_gradcam_confused_explains_each_image_as_class_does(trained_run, data_dir, tmp_path):
    checkpoint, npy = str(trained_run / "best.pt"), tmp_path / "confused.npy"
    common = ["--checkpoint", checkpoint, "--layer", "layer4", "--device", "cpu", "--out", str(tmp_path / "c.png")]
    assert gradcam.main(["--confused", "2", "--data-dir", data_dir, "--save-npy", str(npy), *common]) == 0
    maps = np.load(npy)
    data = augment.load_dataset("cifar10", data_dir, download=False, test_only=True)
    model, loaded = gradcam.load_model(checkpoint, torch.device("cpu"))
    labels, predicted = data.test_labels, gradcam.predictions(model, data.test_images, loaded, "cpu")
    confusion = np.zeros((10, 10), int)
    np.add.at(confusion, (labels, predicted), 1)
    np.fill_diagonal(confusion, 0)
    pairs = gradcam.most_confused(labels, predicted, 10, 2)
    assert [count for _, _, count in pairs] == sorted(confusion.flat, reverse=True)[:2] and pairs[0][2] > 0
    # The images shown: each pair's first CONFUSED_IMAGES in the seeded order (--seed 0).
    order = np.random.default_rng(0).permutation(len(labels))
    chosen = [(i, true, guess) for true, guess, _ in pairs
              for i in order[(labels[order] == true) & (predicted[order] == guess)][:gradcam.CONFUSED_IMAGES]]
    assert maps.shape == (len(chosen), 2, 32, 32)
    for row, (i, true, guess) in enumerate(chosen):
        Image.fromarray(data.test_images[i]).save(tmp_path / "one.png")
        for side, explained in enumerate((true, guess)):
            assert gradcam.main(["--image", str(tmp_path / "one.png"), "--class", str(explained), *common,
                                 "--save-npy", str(tmp_path / "one.npy")]) == 0
            assert np.abs(np.load(tmp_path / "one.npy")[0, 0] - maps[row, side]).max() < 1e-5


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
    pickled_model = tmp_path / "model.pt"  # a whole model, pickled: loading it would run its code
    torch.save(torch.nn.Linear(2, 2), pickled_model)
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
        (["--confused", "0", "--checkpoint", checkpoint], "--confused takes a count of at least 1"),
        (["--confused", "26", "--checkpoint", checkpoint], "--confused takes at most 25 pairs"),
        (["--confused", "2", "--checkpoint", checkpoint, "--class", "cat"], "--class works with --image only"),
        (["--image", image, "--correct", "3", "--checkpoint", checkpoint], "(not several)"),
        (["--misclassified", "4", "--checkpoint", checkpoint, "--class", "cat"], "--class works with --image only"),
        (["--correct", "4", "--checkpoint", checkpoint, "--layer", "layer3", "layer4"], "give one --layer"),
        (["--image", image, "--checkpoint", checkpoint, "--out", str(tmp_path / "x.doc")], "--out"),
        (["--image", image, "--checkpoint", checkpoint, "--out", str(tmp_path / "x")], "extension"),
        (["--image", image, "--misclassified"], "expected one argument (see"),
        (["--image", image, "--checkpoint", str(trained_run)], "is a folder; give the last.pt or best.pt in it"),
        (["--image", image, "--checkpoint", checkpoint, "--save-npy", str(tmp_path)], "--save-npy"),
        (["--image", image, "--checkpoint", checkpoint, "--save-npy", str(tmp_path / "no" / "m.npy")],
         "its folder does not exist"),
        (["--image", image, "--checkpoint", checkpoint, "--out", str(tmp_path / "no" / "x.png")],
         "its folder does not exist"),
        (["--image", image, "--checkpoint", str(pickled_model)], "refused: it holds a torch.nn"),
    ]
    for argv, message in cases:
        code, err = run_main(gradcam, argv, capsys)
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, (argv, err)
        assert "\x1b" not in err, err  # torch's message has terminal escapes: not in ours
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
