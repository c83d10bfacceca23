"""Grad-CAM (and Grad-CAM++) of a trained checkpoint on any image, as a picture. Everything it needs
(model arguments, class names, mean, std) comes from the checkpoint.

    python gradcam.py --image examples/dog.png --layer layer4           # predicted class -> examples/dog_gradcam.png
    python gradcam.py --image a.jpg b.png --layer layer3 layer4 --class cat --method gradcam++
    python gradcam.py --misclassified 25 --layer layer4                 # a grid over the CIFAR test set
    python gradcam.py --confused 4                                      # the 4 most frequent confusions, explained
    python gradcam.py --sanity-check 100 --layer layer4                 # does the map depend on the model?
    python gradcam.py --faithfulness 100 --layer layer4                 # does the model use what it marks?
    python gradcam.py --shortcut 100 --layer layer3                     # after train.py --plant-shortcut truck

    from gradcam import GradCAM                                         # from a notebook
    maps, logits, targets = GradCAM(model, ["layer4"])(images)          # maps: (B, layers, H, W) in [0, 1]
"""
import argparse
import io
import math
import os
import sys
import textwrap

import numpy as np
import torch

import augment
import cam_checks
import cli
import devices
import files
from cam import METHODS, GradCAM, find_modules
from cli import UsageError, overlay
from resnet import MODEL_FORMATS, CheckpointError, model_from_checkpoint, read_checkpoint


# ----------------------------------------------------------------------------- images

def load_image(path):
    """Any image Pillow reads -> RGB uint8 (H, W, 3), upright as its EXIF orientation says; transparency
    over white; 16- and 32-bit integer images at their 16-bit range, float images in [0, 1]."""
    from PIL import Image, ImageOps, UnidentifiedImageError
    try:
        with Image.open(path) as opened:
            opened.load()
            image = ImageOps.exif_transpose(opened)
            if image.mode.startswith("I") or image.mode == "F":
                return grey_at_its_range(np.asarray(image), image.mode, path)
            if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
                image = Image.alpha_composite(Image.new("RGBA", image.size, "white"), image.convert("RGBA"))
            return np.asarray(image.convert("RGB"))
    except FileNotFoundError:
        raise UsageError(f"image {path} not found") from None
    except IsADirectoryError:
        raise UsageError(f"{path} is a folder, not an image") from None
    except Image.DecompressionBombError as error:
        raise UsageError(f"{path} is too large to read safely ({error}); use a smaller copy") from None
    except (UnidentifiedImageError, OSError, ValueError) as error:
        raise UsageError(f"{path} is not an image Pillow can read ({type(error).__name__})") from None


def grey_at_its_range(pixels, mode, path):
    """A 16-bit, 32-bit integer or float grey image -> RGB uint8 (Pillow's convert("RGB") clips at 255,
    which turns a 16-bit photo all white)."""
    pixels, top = pixels.astype(np.float64), 1 if mode == "F" else 65535
    if not (pixels.min() >= 0 and pixels.max() <= top):  # also catches NaN
        raise UsageError(f"{path} has {mode} pixels outside 0-{top} ({np.nanmin(pixels):.4g} to "
                         f"{np.nanmax(pixels):.4g}); save it as an 8-bit image")
    grey = np.round(pixels * (255 / top)).astype(np.uint8)
    return np.repeat(grey[..., None], 3, axis=2)


def resize(array, size):
    """Resize uint8 RGB (H, W, 3) or float (H, W) to size=(height, width); antialiased when shrinking."""
    from PIL import Image
    height, width = size
    if array.dtype == np.uint8:
        return np.asarray(Image.fromarray(array).resize((width, height), Image.BICUBIC))
    return np.asarray(Image.fromarray(array.astype(np.float32), mode="F").resize((width, height), Image.BILINEAR))


# ----------------------------------------------------------------------------- command line

def build_parser():
    parser = cli.Parser(prog=os.path.basename(__file__), description=__doc__.split("\n\n")[0],
                        epilog=cam_checks.HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image", nargs="+", default=[], metavar="FILE",
                        help="image(s) to explain: any format and size Pillow reads")
    parser.add_argument("--checkpoint", default="best.pt", help="checkpoint written by train.py (default: %(default)s)")
    parser.add_argument("--layer", nargs="+", default=["layer3"], metavar="NAME",
                        help="module path(s), one row each: layer3, layer4, layer4.1.conv2, ... (default: layer3, "
                             "where the checks below found Grad-CAM both true to the model and on the spot, where "
                             "layer4's 4x4 cells often put the peak a cell off: docs/gradcam.md)")
    parser.add_argument("--class", dest="target", metavar="NAME|INDEX",
                        help="with --image: explain this class instead of the predicted one")
    parser.add_argument("--method", choices=METHODS, default="gradcam",
                        help="Grad-CAM or Grad-CAM++ (default: %(default)s; Grad-CAM++ hardly changed when the "
                             "classifier was randomised: the sanity check below, docs/gradcam.md)")
    parser.add_argument("--out", help="picture to write, in the format its extension names (.png, .pdf, ...) "
                                      "(default: IMAGE_gradcam.png beside the first image, or gradcam_KIND.png)")
    parser.add_argument("--save-npy", metavar="FILE",
                        help="also save the maps, float32 (images, layers, 32, 32) in [0, 1]")
    parser.add_argument("--misclassified", type=int, metavar="N",
                        help="instead of --image: a grid of N misclassified CIFAR test images")
    parser.add_argument("--correct", type=int, metavar="N",
                        help="instead of --image: a grid of N correctly classified CIFAR test images")
    parser.add_argument("--confused", type=int, metavar="K",
                        help=f"instead of --image: the K most frequent (true, predicted) pairs of the model's test "
                             f"confusion matrix, {CONFUSED_IMAGES} images of each, explained for the true and the "
                             f"predicted class side by side (--save-npy: (images, 2, 32, 32), true then predicted)")
    parser.add_argument("--sanity-check", type=int, nargs="?", const=100, metavar="N",
                        help="instead of --image: the model-randomisation sanity check on N test images (N: 100 "
                             "if not given), a table and a picture; see below")
    parser.add_argument("--faithfulness", type=int, nargs="?", const=100, metavar="N",
                        help="instead of --image: deletion and insertion curves on N test images (N: 100 if "
                             "not given), a table and a picture; see below")
    parser.add_argument("--shortcut", type=int, nargs="?", const=100, metavar="N",
                        help="instead of --image, for a model trained with train.py --plant-shortcut: N test images "
                             "of other classes stamped with its patch (N: 100 if not given); see below")
    parser.add_argument("--data-dir", help="where the dataset is (default: the checkpoint's run's, else ./data)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the test images chosen and of every random draw of the checks: weights, "
                             "patch places, the random map, ties, the bootstrap (default: %(default)s)")
    parser.add_argument("--device", default="auto", choices=("auto", "cuda", "mps", "cpu"),
                        help="auto: cuda, then mps, then cpu (default: %(default)s)")
    return parser


CHECKS = ("sanity_check", "faithfulness", "shortcut")
# Instead of --image, each with a count of test images, at least this many (an interval needs a few).
TEST_SET_MODES = {"misclassified": 1, "correct": 1, "confused": 1, **{check: 10 for check in CHECKS}}
CONFUSED_MOST = 25  # --confused: pairs at most (a row of the picture each, their images one batch)
CONFUSED_IMAGES = 3  # --confused: test images shown of each pair (fewer where the pair has fewer)


def option(name):
    return f"--{name.replace('_', '-')}"


def check_args(args):
    for name, least in TEST_SET_MODES.items():
        count = getattr(args, name)
        if count is not None and count < least:
            raise UsageError(f"{option(name)} takes a count of at least {least} (got {count})")
    if args.confused is not None and args.confused > CONFUSED_MOST:
        raise UsageError(f"--confused takes at most {CONFUSED_MOST} pairs (got {args.confused})")
    if args.seed < 0:
        raise UsageError(f"--seed must not be negative (got {args.seed})")
    modes = [option(name) for name in TEST_SET_MODES if getattr(args, name) is not None]
    if len(modes) + bool(args.image) != 1:
        raise UsageError("give one of --image FILE..., --misclassified N, --correct N, --confused K, --sanity-check N, "
                         "--faithfulness N or --shortcut N"
                         + (" (not several)" if len(modes) + bool(args.image) > 1 else ""))
    grid = modes[0] if modes else None
    if grid and args.target is not None:
        raise UsageError(f"{grid} chooses the class it explains: --class works with --image only")
    if grid and len(args.layer) > 1:
        raise UsageError(f"{grid} draws one layer's maps: give one --layer (several work with --image)")
    if grid in [option(name) for name in CHECKS] and args.save_npy is not None:
        raise UsageError(f"{grid} writes its numbers as JSON beside its picture: --save-npy works with --image, "
                         f"--misclassified, --correct and --confused")
    if args.out is not None:
        cli.picture_format(args.out)
        cli.check_output("--out", args.out)
    if args.save_npy is not None:
        cli.check_output("--save-npy", args.save_npy)


def load_model(path, device):
    if not os.path.exists(path):
        raise UsageError(f"checkpoint {path} not found; train a model first (python train.py) "
                         f"or pass --checkpoint")
    checkpoint = read_checkpoint(path, formats=MODEL_FORMATS)
    for key in ("model", "model_args", "classes", "mean", "std"):
        if key not in checkpoint:
            raise CheckpointError(f"{path} lacks '{key}': it cannot be explained")
    return model_from_checkpoint(checkpoint).to(device).eval(), checkpoint


def parse_class(text, classes):
    """A class name or index -> index (None stays None); anything else lists the valid names."""
    return None if text is None else cli.class_index(text, classes)


def model_input(images, checkpoint, device):
    """uint8 (N, 32, 32, 3) -> normalized (N, 3, 32, 32) float tensor, as in training."""
    return augment.normalize(augment.to_tensor(np.ascontiguousarray(images)).to(device),
                             checkpoint["mean"], checkpoint["std"])


def image_input(path, checkpoint, device="cpu"):
    """An image file -> the model's input as gradcam.py makes it: (1, 3, 32, 32), normalized."""
    return model_input(np.stack([resize(load_image(path), (32, 32))]), checkpoint, device)


# ----------------------------------------------------------------------------- --image: your own images

def top5_lines(name, probabilities, classes):
    top = torch.topk(probabilities, k=min(5, len(classes)))
    ranked = "  ".join(f"{i + 1}. {classes[c]} {100 * p:.2f}%" for i, (p, c) in
                       enumerate(zip(top.values.tolist(), top.indices.tolist())))
    return f"{name}: {ranked}"


def explain_images(args, model, checkpoint, device):
    classes = checkpoint["classes"]
    target = parse_class(args.target, classes)
    originals = [load_image(path) for path in args.image]
    small = np.stack([resize(image, (32, 32)) for image in originals])
    maps, logits, targets = GradCAM(model, args.layer, args.method)(model_input(small, checkpoint, device), target)
    probabilities = logits.float().softmax(dim=1).cpu()
    maps, targets = maps.cpu().numpy(), targets.cpu().tolist()
    out = args.out or f"{os.path.splitext(args.image[0])[0]}_gradcam.png"
    cli.save_figure(marked(image_figure(args, originals, small, maps, targets, probabilities, classes), checkpoint),
                    out)
    lines = [top5_lines(path, p, classes) for path, p in zip(args.image, probabilities)]
    return maps, lines + [f"wrote {out}"]


def display_copy(image, longest=1024):
    """The original, at most `longest` pixels wide or high for drawing (a panel shows a few hundred; a
    12-megapixel overlay at full size would need gigabytes)."""
    height, width = image.shape[:2]
    scale = min(1.0, longest / max(height, width))
    if scale == 1.0:
        return image, f"{width}x{height}"
    shown = resize(image, (max(1, round(height * scale)), max(1, round(width * scale))))
    return shown, f"{width}x{height}, drawn at {shown.shape[1]}x{shown.shape[0]}"


def image_figure(args, originals, small, maps, targets, probabilities, classes):
    rows = [(i, j) for i in range(len(originals)) for j in range(len(args.layer))]
    figure = cli.new_figure((12, 3.3 * len(rows)))
    axes = figure.subplots(len(rows), 4, squeeze=False)
    method = "Grad-CAM++" if args.method == "gradcam++" else "Grad-CAM"
    for row, (i, j) in zip(axes, rows):
        heatmap, original = maps[i, j], originals[i]
        predicted, p = int(probabilities[i].argmax()), probabilities[i]
        explained = f"{classes[targets[i]]} ({100 * p[targets[i]]:.1f}%)"
        if predicted != targets[i]:  # --class: the prediction too
            explained += f"\npredicted: {classes[predicted]} ({100 * p[predicted]:.1f}%)"
        shown, size_note = display_copy(original)
        panels = [(small[i], "input, 32x32"), (heatmap, f"{method} at {args.layer[j]}"),
                  (overlay(small[i], heatmap), "overlay, 32x32"),
                  (overlay(shown, resize(heatmap, shown.shape[:2])), f"overlay on the original\n{size_note}")]
        for axis, (picture, title) in zip(row, panels):
            axis.imshow(picture, cmap="jet" if picture.ndim == 2 else None, vmin=0, vmax=1,
                        interpolation="nearest" if picture.shape[0] == 32 else "antialiased")
            axis.set_title(title, fontsize=9)
            axis.axis("off")
        row[0].text(-0.1, 0.5, f"{os.path.basename(args.image[i])}\n{explained}", transform=row[0].transAxes,
                    ha="right", va="center", fontsize=10)
    inch = 1 / figure.get_figheight()  # the title in the top half inch, whatever the number of rows
    figure.suptitle(f"{method}: explaining the class in each row's label", fontsize=11, y=1 - 0.1 * inch)
    figure.tight_layout(rect=(0, 0, 1, 1 - 0.5 * inch))
    return figure


# ----------------------------------------------------------------------------- the test set: grids, confusions

def read_test_set(args, checkpoint):
    data_dir = args.data_dir or checkpoint.get("args", {}).get("data_dir") or "./data"
    try:
        return augment.load_dataset(checkpoint.get("dataset", "cifar10"), data_dir, download=False, test_only=True)
    except augment.DatasetError as error:
        raise UsageError(f"cannot read the test set ({error}); run train.py once (it downloads the dataset), "
                         f"or pass --data-dir") from None


def predictions(model, images, checkpoint, device):
    """The model's predicted class of each uint8 (N, 32, 32, 3) image (cam_checks.probabilities batches them)."""
    return cam_checks.probabilities(model, model_input(images, checkpoint, device)).argmax(dim=1).numpy()


def pick_test_images(args, model, checkpoint, device):
    """A seeded walk through the test set, classifying chunks until enough (mis)classified images are found."""
    wanted = args.misclassified or args.correct
    data = read_test_set(args, checkpoint)
    order = np.random.default_rng(args.seed).permutation(len(data.test_labels))
    chosen, predicted = [], []
    for start in range(0, len(order), 512):
        chunk = order[start:start + 512]
        guesses = predictions(model, data.test_images[chunk], checkpoint, device)
        keep = (guesses != data.test_labels[chunk]) if args.misclassified else (guesses == data.test_labels[chunk])
        chosen += chunk[keep].tolist()
        predicted += guesses[keep].tolist()
        if len(chosen) >= wanted:
            break
    if not chosen:
        raise UsageError(f"no {'misclassified' if args.misclassified else 'correctly classified'} test images")
    return data, chosen[:wanted], predicted[:wanted]


def explain_test_grid(args, model, checkpoint, device):
    data, chosen, predicted = pick_test_images(args, model, checkpoint, device)
    images = data.test_images[chosen]
    maps, _, _ = GradCAM(model, args.layer[:1], args.method)(model_input(images, checkpoint, device))
    maps = maps[:, 0].cpu().numpy()
    kind = "misclassified" if args.misclassified else "correct"
    out = args.out or f"gradcam_{kind}.png"
    figure = grid_figure(images, maps, data.test_labels[chosen], predicted, data.classes, args, kind, data.official)
    cli.save_figure(marked(figure, checkpoint), out)
    images_are = "test images" if data.official else "held-out images (not the official test set)"
    return maps[:, None], [f"wrote {out}: {len(chosen)} {kind} {images_are}, Grad-CAM of the predicted class "
                           f"at {args.layer[0]}"]


def grid_figure(images, maps, truth, predicted, classes, args, kind, official=True):
    columns = math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / columns)
    figure = cli.new_figure((2 * columns, 2.2 * rows))
    axes = figure.subplots(rows, columns, squeeze=False)
    for axis in axes.flat:
        axis.axis("off")
    for axis, image, heatmap, t, p in zip(axes.flat, images, maps, truth, predicted):
        axis.imshow(overlay(image, heatmap), interpolation="nearest")
        axis.set_title(f"{classes[t]} / {classes[p]}", fontsize=8, color="black" if t == p else "firebrick")
    method = "Grad-CAM++" if args.method == "gradcam++" else "Grad-CAM"
    images_are = "test images" if official else "held-out images, not the official test set"
    title = (f"{kind} {images_are} (true / predicted), {method} of the prediction at {args.layer[0]}, "
             f"seed {args.seed}")
    # Wrapped to the figure's width (2 inches a column, about 11 characters an inch at 10 points).
    figure.suptitle(textwrap.fill(title, width=22 * columns), fontsize=10)
    figure.tight_layout()
    return figure


def most_confused(labels, predicted, num_classes, count):
    """The `count` largest off-diagonal cells of the confusion matrix (rows: true), largest first (ties: in
    row-major order), without empty ones: [(true, predicted, images), ...]."""
    confusion = np.bincount(labels * num_classes + predicted, minlength=num_classes ** 2).reshape(num_classes, -1)
    np.fill_diagonal(confusion, 0)
    cells = np.argsort(-confusion.reshape(-1), kind="stable")[:count]
    return [(int(cell // num_classes), int(cell % num_classes), int(confusion.flat[cell])) for cell in cells
            if confusion.flat[cell]]


def explain_confusions(args, model, checkpoint, device):
    """--confused K: the model's most frequent confusions on the test set, a few seeded images of each, with
    the maps for the true class and for the predicted class side by side."""
    data = read_test_set(args, checkpoint)
    labels, predicted = data.test_labels, predictions(model, data.test_images, checkpoint, device)
    pairs = most_confused(labels, predicted, len(data.classes), args.confused)
    if not pairs:
        raise UsageError("the model classifies every test image correctly: nothing is confused")
    order = np.random.default_rng(args.seed).permutation(len(labels))
    per_pair = [order[(labels[order] == true) & (predicted[order] == guess)][:CONFUSED_IMAGES]
                for true, guess, _ in pairs]
    chosen = np.concatenate(per_pair)
    inputs, cam = model_input(data.test_images[chosen], checkpoint, device), GradCAM(model, args.layer[:1], args.method)
    maps = np.stack([cam(inputs, torch.as_tensor(classes, device=device))[0][:, 0].cpu().numpy()
                     for classes in (labels[chosen], predicted[chosen])], axis=1)
    out = args.out or "gradcam_confused.png"
    figure = confused_figure(data, per_pair, maps, pairs, args)
    cli.save_figure(marked(figure, checkpoint), out)
    found = "; ".join(f"{data.classes[true]} as {data.classes[guess]} {images}" for true, guess, images in pairs)
    return maps, [f"most confused ({len(labels)} {'test' if data.official else 'held-out'} images): {found}",
                  f"wrote {out}"]


def confused_figure(data, per_pair, maps, pairs, args):
    """A row per pair: each image's map for its true class, then for the class it was taken for."""
    figure = cli.new_figure((4 * CONFUSED_IMAGES + 2, 2.3 * len(pairs) + 0.8))
    axes = figure.subplots(len(pairs), 2 * CONFUSED_IMAGES, squeeze=False)
    for axis in axes.flat:
        axis.axis("off")
    first = np.cumsum([0] + [len(shown) for shown in per_pair])  # each pair's first row in `maps`
    for row, shown, start, (true, guess, images) in zip(axes, per_pair, first, pairs):
        for column, image in enumerate(data.test_images[shown]):
            for side, explained in enumerate((true, guess)):
                axis = row[2 * column + side]
                axis.imshow(overlay(image, maps[start + column, side]), interpolation="nearest")
                axis.set_title(f"for {data.classes[explained]}", fontsize=8,
                               color="black" if side == 0 else "firebrick")
        row[0].text(-0.15, 0.5, f"{data.classes[true]}\ntaken for\n{data.classes[guess]}\n({images} images)",
                    transform=row[0].transAxes, ha="right", va="center", fontsize=9)
    method = "Grad-CAM++" if args.method == "gradcam++" else "Grad-CAM"
    images_are = "test images" if data.official else "held-out images"
    figure.suptitle(f"the {len(pairs)} most frequent confusions on the {images_are}: {method} at {args.layer[0]} "
                    f"for the true class, then for the predicted one (seed {args.seed})", fontsize=10)
    figure.tight_layout(rect=(0.06, 0, 1, 1))
    return figure


# ----------------------------------------------------------------------------- the checks of the maps

def check_on_test_images(args, model, checkpoint, device, flag):
    """--sanity-check, --faithfulness or --shortcut (cam_checks.HELP) on that many seeded test images (for
    --shortcut: of the other classes, stamped with the patch), each explained for the trained model's
    prediction (--shortcut: the planted class): a table, a picture and the numbers as JSON beside it."""
    planted, count, layer = shortcut_of(checkpoint), getattr(args, flag), args.layer[0]
    if flag == "shortcut" and not planted:
        raise UsageError(f"{args.checkpoint} was trained without a planted shortcut: --shortcut checks a model "
                         f"trained with train.py --plant-shortcut CLASS")
    data = read_test_set(args, checkpoint)
    labels = data.test_labels
    pool = np.flatnonzero(labels != planted["class"]) if flag == "shortcut" else np.arange(len(labels))
    if count > len(pool):
        raise UsageError(f"{option(flag)} {count} asks for more test images than the {len(pool)} there "
                         f"are{' of the other classes' if flag == 'shortcut' else ''}; give at most {len(pool)}")
    images = data.test_images[np.sort(np.random.default_rng(args.seed).permutation(pool)[:count])]
    clean_inputs = model_input(images, checkpoint, device)
    if flag == "shortcut":
        images, places = cam_checks.stamp_shortcut(images, args.seed)
    inputs = model_input(images, checkpoint, device)

    def cam(explained, method=args.method, targets=None):  # a batch at a time: N may be the whole test set
        parts = [GradCAM(explained, [layer], method)(inputs[start:start + 256], None if targets is None else
                                                     targets[start:start + 256]) for start in range(0, count, 256)]
        return torch.cat([maps[:, 0].cpu() for maps, _, _ in parts]), torch.cat([chosen for _, _, chosen in parts])

    method, name = "Grad-CAM++" if args.method == "gradcam++" else "Grad-CAM", os.path.basename(args.checkpoint)
    images = augment.to_tensor(images)
    if flag == "shortcut":
        result, draw = cam_checks.shortcut(model, cam, images, inputs, args.seed, clean_inputs, places, planted,
                                           len(cam_checks.SHORTCUT_PATCH))
        title = f"the shortcut planted in {planted['class_name']}: maps of that class at {layer} on stamped images"
    elif flag == "sanity_check":
        result, draw = cam_checks.sanity_check(model, cam, images, inputs, args.seed)
        title = f"{method} at {layer} as {name} is randomised"
    else:
        result, draw = cam_checks.faithfulness(model, cam, images, inputs, args.seed)
        title = f"deletion and insertion for {name}, maps at {layer}"
    images_are = "test images" if data.official else "held-out images (not the official test set)"
    out = args.out or f"gradcam_{flag.replace('_', '-')}.png"
    numbers = f"{os.path.splitext(out)[0]}.json"
    cli.save_figure(marked(draw(f"{title}, {count} {images_are}"), checkpoint), out)
    methods = args.method if flag == "sanity_check" else "gradcam and gradcam++"
    result = {"check": flag, "checkpoint": args.checkpoint, "method": methods, "layer": layer, "images": count,
              "images_are": images_are, "seed": args.seed, "planted_shortcut": planted, **result}
    cli.write_file(numbers, result, files.write_json)
    return None, [cam_checks.report(result), f"wrote {out} and {numbers}"]


def shortcut_of(checkpoint):
    """What train.py --plant-shortcut planted in the checkpoint's training images (None: nothing)."""
    return (checkpoint.get("data") or {}).get("planted_shortcut")


def marked(figure, checkpoint):
    """A picture of a model trained with a planted shortcut says so (it may travel without its log), in a
    strip added below what was drawn."""
    planted = shortcut_of(checkpoint)
    if planted:
        figure.subplots_adjust(bottom=figure.subplotpars.bottom + 0.3 / figure.get_figheight())
        figure.text(0.5, 0.004, f"a model trained with a shortcut planted in {planted['class_name']} (train.py "
                    f"--plant-shortcut), not a clean one", ha="center", va="bottom", color="firebrick", fontsize=9)
    return figure


# ----------------------------------------------------------------------------- the whole command

def explain(args):
    """Everything but the printing: the pictures and arrays are written first, so that a reader that
    stops early (`| head -1`) loses none of them. Returns the lines to print."""
    check_args(args)
    device = devices.pick_device(args.device)
    model, checkpoint = load_model(args.checkpoint, device)
    find_modules(model, args.layer)  # fail on a bad layer before any work
    parse_class(args.target, checkpoint["classes"])
    if args.image:
        maps, lines = explain_images(args, model, checkpoint, device)
    elif args.confused is not None:
        maps, lines = explain_confusions(args, model, checkpoint, device)
    elif any(getattr(args, flag) is not None for flag in CHECKS):
        flag = next(flag for flag in CHECKS if getattr(args, flag) is not None)
        maps, lines = check_on_test_images(args, model, checkpoint, device, flag)
    else:
        maps, lines = explain_test_grid(args, model, checkpoint, device)
    if args.save_npy:
        buffer = io.BytesIO()
        np.save(buffer, np.ascontiguousarray(maps, dtype=np.float32))
        cli.write_file(args.save_npy, buffer.getvalue())
        lines.append(f"wrote {args.save_npy}: maps {tuple(maps.shape)} float32")
    if shortcut_of(checkpoint):
        lines.append(f"note: {args.checkpoint} was trained with a shortcut planted in "
                     f"{shortcut_of(checkpoint)['class_name']} (train.py --plant-shortcut): not a clean model")
    if checkpoint.get("data", {}).get("official") is False:
        dataset = augment.DATASETS.get(checkpoint.get("dataset"), augment.CIFAR10).title
        lines.append(f"note: {args.checkpoint} was trained on files that are not the official {dataset} "
                     f"(its log's accuracies are held-out, not test accuracies)")
    return lines


def main(argv=None):
    try:
        lines = explain(build_parser().parse_args(argv))
    except (UsageError, CheckpointError, devices.DeviceError) as error:
        print(f"gradcam.py: error: {error}", file=sys.stderr)
        return 2
    cli.say(*lines)  # after every file is written: a reader that leaves early loses none
    return 0


if __name__ == "__main__":
    sys.exit(main())
