"""Learning curves (loss, accuracy, calibration, learning rate) from train.py's log.json, as a picture.

    python plot_curves.py log.json                          # writes log_curves.png (+ log_confusion.png, log_probe.*)
    python plot_curves.py seed/log.json log.json --labels seed ours --out compare.png

Several logs share one picture, a colour each; a single finished run also gets its confusion matrix,
per-class accuracy and reliability diagram; a run with train.py --probe (the default) gets its probe
images' Grad-CAM maps through training, as a grid (log_probe.png) and an animation (log_probe.gif); a run
in progress plots the epochs it has. No torch: it starts fast.
"""
import io
import json
import math
import os
import sys
import zipfile

import cli
from cli import UsageError, warn

LOG_FORMAT = "resnet18-cifar-log/1"  # train.py writes this (runfiles.py); a test keeps the two equal
RECORD_KEYS = ("epoch", "lr", "train_loss", "train_acc", "test_loss", "test_acc", "test_acc_tta", "seconds")
PROBE_NAME = "probe.npz"  # train.py --probe writes it beside log.json (probe.py); a test keeps the two equal
PROBE_EPOCH_KEYS = ("epochs", "maps_true", "maps_predicted", "predicted", "probability", "probability_true")
PROBE_KEYS = ("images", "labels", "classes", "layer", *PROBE_EPOCH_KEYS)
PROBE_ROWS = 10  # epochs in the grid picture (evenly spaced, the first and last among them); the GIF has all


def build_parser():
    parser = cli.Parser(prog=os.path.basename(__file__), description=__doc__.split("\n\n")[0])
    parser.add_argument("logs", nargs="+", metavar="LOG", help="log.json file(s) written by train.py")
    parser.add_argument("--out", help="picture to write, in the format its extension names (.png, .pdf, ...) "
                                      "(default: LOG_curves.png beside the first log; compare_curves.png for several)")
    parser.add_argument("--labels", nargs="+", help="one name per log (default: from the paths)")
    parser.add_argument("--no-confusion", dest="confusion", action="store_false",
                        help="skip a finished run's confusion-matrix picture (NAME_confusion.EXT beside the curves)")
    return parser


# ----------------------------------------------------------------------------- reading

def read_log(path):
    """Load and check one training log; every failure is one line."""
    try:
        with open(path) as f:
            log = json.load(f)
    except FileNotFoundError:
        raise UsageError(f"log {path} not found; train.py writes log.json into its --out-dir") from None
    except IsADirectoryError:
        raise UsageError(f"{path} is a folder, not a log file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise UsageError(f"{path} is not JSON ({type(error).__name__}); give the log.json that train.py "
                         f"wrote") from None
    if not isinstance(log, dict) or log.get("format") != LOG_FORMAT or not isinstance(log.get("epochs"), list):
        raise UsageError(f"{path} is JSON but not a training log written by train.py")
    if not log["epochs"]:
        raise UsageError(f"{path} has no finished epoch yet; plot it after the first epoch")
    for record in log["epochs"]:
        numbers = isinstance(record, dict) and all(type(record.get(key)) in (int, float) for key in RECORD_KEYS)
        if not numbers:
            raise UsageError(f"{path} has an epoch record without numbers for {', '.join(RECORD_KEYS)}")
    return log


def evaluated_on(log):
    """What the log's "test" accuracies were measured on, in words."""
    data = log.get("data") or {}
    held_out = data.get("official") is False
    if data.get("test_subset"):
        return f"{data['test_images']} {'held-out images, not the official test set' if held_out else 'test images'}"
    return "held-out images, not the official test set" if held_out else "test set"


def accuracy_name(log):
    """'test', or 'held-out' where the images are not the official test set."""
    return "held-out" if (log.get("data") or {}).get("official") is False else "test"


def nan_epochs(log):
    return [r["epoch"] for r in log["epochs"] if any(isinstance(r.get(k), float) and math.isnan(r[k])
                                                     for k in ("train_loss", "test_loss", "test_acc", "train_acc"))]


def summary(log):
    """Final and best test accuracy, epochs, time and device, from the epoch records (a run in progress too)."""
    epochs = log["epochs"]
    finite = [r for r in epochs if not math.isnan(r["test_acc"])] or epochs
    best = max(finite, key=lambda r: (r["test_acc"], -r["epoch"]))
    env = log.get("environment", {})
    return {"epochs_done": epochs[-1]["epoch"], "epochs_planned": log.get("args", {}).get("epochs"),
            "evaluated_on": evaluated_on(log), "accuracy_name": accuracy_name(log),
            "final_test_acc": epochs[-1]["test_acc"], "final_test_acc_tta": epochs[-1]["test_acc_tta"],
            "best_test_acc": best["test_acc"], "best_test_acc_epoch": best["epoch"],
            "total_seconds": sum(r["seconds"] for r in epochs),
            "device": env.get("device_name", env.get("device", "?"))}


def one_line(s):
    planned = f"/{s['epochs_planned']}" if s["epochs_planned"] else ""
    return (f"final {s['accuracy_name']} {100 * s['final_test_acc']:.2f}% (flip TTA "
            f"{100 * s['final_test_acc_tta']:.2f}%; {s['evaluated_on']}), "
            f"best {100 * s['best_test_acc']:.2f}% at epoch {s['best_test_acc_epoch']}, "
            f"{s['epochs_done']}{planned} epochs, {s['total_seconds'] / 60:.1f} min, {s['device']}")


def table(labels, summaries):
    header = ("run", "epochs", "final acc", "flip TTA", "best acc", "best epoch", "minutes", "evaluated on",
              "device")
    rows = [(label, f"{s['epochs_done']}/{s['epochs_planned'] or '?'}", f"{100 * s['final_test_acc']:.2f}%",
             f"{100 * s['final_test_acc_tta']:.2f}%", f"{100 * s['best_test_acc']:.2f}%",
             str(s["best_test_acc_epoch"]), f"{s['total_seconds'] / 60:.1f}", s["evaluated_on"], s["device"])
            for label, s in zip(labels, summaries)]
    widths = [max(len(row[i]) for row in [header] + rows) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in [header] + rows)


# ----------------------------------------------------------------------------- pictures

def curves_figure(logs, labels, summaries):
    figure = cli.new_figure((20, 4.6))
    loss_axis, acc_axis, ece_axis, lr_axis = figure.subplots(1, 4)
    for index, (log, label, s) in enumerate(zip(logs, labels, summaries)):
        colour = f"C{index}"

        def plot(axis, key, style, marker, name, scale=1.0):
            # The records that have the key: a run resumed from an earlier version has some without ECE.
            records = [r for r in log["epochs"] if key in r]
            if records:  # a single point draws no line: markers, one shape per series, instead
                axis.plot([r["epoch"] for r in records], [scale * r[key] for r in records], style, color=colour,
                          marker=marker if len(records) < 2 else None,
                          label=f"{label} {name}" if len(logs) > 1 else name)

        tested = s["accuracy_name"]
        plot(loss_axis, "train_loss", "-", "o", "train")
        plot(loss_axis, "val_loss", ":", "D", "validation")
        plot(loss_axis, "test_loss", "--", "s", tested)
        plot(acc_axis, "train_acc", "-", "o", "train", 100)
        plot(acc_axis, "val_acc", ":", "D", "validation", 100)
        plot(acc_axis, "test_acc", "--", "s", tested, 100)
        plot(acc_axis, "test_acc_tta", "-.", "^", f"{tested}, flip TTA", 100)
        plot(ece_axis, "test_ece", "--", "s", tested, 100)
        plot(ece_axis, "test_ece_scaled", ":", "v", f"{tested}, temperature from validation", 100)
        plot(lr_axis, "lr", "-", "o", "learning rate")
        acc_axis.plot([s["best_test_acc_epoch"]], [100 * s["best_test_acc"]], "*", color=colour, markersize=12,
                      label=f"best {tested} ({100 * s['best_test_acc']:.2f}%)" if len(logs) == 1 else None)
    loss_axis.set(title="loss (training criterion)", xlabel="epoch", ylabel="loss", yscale="log")
    acc_axis.set(title="accuracy", xlabel="epoch", ylabel="accuracy (%)")
    ece_axis.set(title="expected calibration error (15 bins)", xlabel="epoch", ylabel="ECE (%)")
    lr_axis.set(title="learning rate (at each epoch's start)", xlabel="epoch", ylabel="lr", yscale="log")
    from matplotlib.ticker import MaxNLocator
    last_epoch = max(s["epochs_done"] for s in summaries)
    for axis in (loss_axis, acc_axis, ece_axis, lr_axis):
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        if last_epoch < 3:  # matplotlib would spread one or two epochs over fractions
            axis.set_xlim(0.5, last_epoch + 0.5)
            axis.set_xticks(range(1, last_epoch + 1))
        axis.grid(alpha=0.3)
        if axis.lines:  # a log of an earlier version has no calibration
            axis.legend(fontsize=8)
    if len(logs) == 1:
        figure.suptitle(f"{labels[0]}: {one_line(summaries[0])}", fontsize=11)
    else:
        figure.suptitle("final accuracy: " + "; ".join(f"{label} {100 * s['final_test_acc']:.2f}% {s['accuracy_name']}"
                                                      for label, s in zip(labels, summaries)), fontsize=11)
    figure.tight_layout()
    return figure


def confusion_figure(log, label):
    classes, matrix = log["classes"], log["confusion_matrix"]
    per_class = log["per_class_accuracy"]
    figure = cli.new_figure((20, 6))
    matrix_axis, bar_axis, reliability_axis = figure.subplots(1, 3, gridspec_kw={"width_ratios": [1.3, 1, 1]})
    image = matrix_axis.imshow(matrix, cmap="Blues")
    darkest = max(max(row) for row in matrix)
    if len(classes) <= 20:  # CIFAR-100's 10,000 cells would be unreadable numbers
        for i, row in enumerate(matrix):
            for j, count in enumerate(row):
                matrix_axis.text(j, i, str(count), ha="center", va="center", fontsize=7,
                                 color="white" if count > 0.5 * darkest else "black")
    matrix_axis.set(xticks=range(len(classes)), yticks=range(len(classes)), xlabel="predicted", ylabel="true",
                    title=f"confusion matrix ({evaluated_on(log)}, final epoch)")
    matrix_axis.set_xticklabels(classes, rotation=45, ha="right")
    matrix_axis.set_yticklabels(classes)
    figure.colorbar(image, ax=matrix_axis, fraction=0.046)
    # None: no image of that class was evaluated (a --test-subset smaller than the classes): no bar, not 0%.
    accuracies = [None if per_class[name] is None else 100 * per_class[name] for name in classes]
    bar_axis.barh(range(len(classes)), [value or 0 for value in accuracies], color="C0")
    bar_axis.set(yticks=range(len(classes)), xlim=(0, 100), xlabel="accuracy (%)", title="per-class accuracy")
    bar_axis.set_yticklabels(classes)
    bar_axis.invert_yaxis()
    for y, value in enumerate(accuracies):
        bar_axis.text(value or 0, y, " no images" if value is None else f" {value:.1f}%", va="center", fontsize=8)
    reliability_diagram(reliability_axis, log)
    figure.suptitle(f"{label}: final {accuracy_name(log)} accuracy {100 * log['epochs'][-1]['test_acc']:.2f}% "
                    f"({evaluated_on(log)})", fontsize=11)
    figure.tight_layout()
    return figure


def reliability_diagram(axis, log):
    """The final epoch's accuracy against confidence in 15 equal-width bins (Guo et al. 2017): bars under the
    diagonal are over-confident. The share of images in each bin is printed on its bar."""
    bins = log.get("reliability")
    axis.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence (top class's probability)", ylabel="accuracy",
             title="reliability diagram (final epoch)")
    if not bins:
        axis.text(0.5, 0.5, "not in this log (an earlier train.py)", ha="center", va="center")
        return
    width, total = 1 / len(bins["count"]), sum(bins["count"])
    filled = [(i, count, right) for i, (count, right) in enumerate(zip(bins["count"], bins["accuracy"])) if count]
    axis.bar([(i + 0.5) * width for i, _, _ in filled], [right for _, _, right in filled], width=width,
             edgecolor="white", color="C0", label="accuracy in the bin")
    axis.plot([0, 1], [0, 1], "--", color="gray", label="calibrated")
    for i, count, right in filled:
        axis.text((i + 0.5) * width, right, f"{100 * count / total:.0f}%", ha="center", va="bottom", fontsize=7)
    ece = log["epochs"][-1].get("test_ece")
    axis.legend(fontsize=8, loc="upper left", title=None if ece is None else f"ECE {100 * ece:.2f}%")


# ----------------------------------------------------------------------------- the probe (train.py --probe)

def read_probe(log_path, log):
    """The probe.npz beside a log whose run wrote one (train.py --probe), up to the log's last epoch; None
    without one. A damaged file is a warning: the curves are still drawn."""
    path = os.path.join(os.path.dirname(log_path), PROBE_NAME)
    if not (log.get("args") or {}).get("probe") or not os.path.exists(path):
        return None  # a log of --probe 0 (or of an earlier version): a probe.npz beside it is not its own
    import numpy as np
    try:
        with np.load(path, allow_pickle=False) as stored:
            probe = {key: stored[key] for key in PROBE_KEYS}
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as error:
        warn(f"{path} is not a probe file that train.py wrote ({type(error).__name__}); its pictures are skipped")
        return None
    kept = probe["epochs"] <= log["epochs"][-1]["epoch"]  # a kill may leave it an epoch ahead of the log
    return {key: value[kept] if key in PROBE_EPOCH_KEYS else value for key, value in probe.items()}


def probe_cell(axis, image, heatmap, text, colour):
    axis.imshow(cli.overlay(image, heatmap.astype(float)), interpolation="nearest")
    axis.set(xticks=[], yticks=[])
    axis.set_xlabel(text, fontsize=7, color=colour, labelpad=2)
    for spine in axis.spines.values():
        spine.set_visible(False)


def probe_epoch(true_axes, predicted_axes, probe, e):
    """Epoch index `e`'s maps: for the true class (with its probability), for the prediction (right: green)."""
    classes = probe["classes"]
    for i, (true_axis, predicted_axis) in enumerate(zip(true_axes, predicted_axes)):
        label, predicted = probe["labels"][i], probe["predicted"][e, i]
        probe_cell(true_axis, probe["images"][i], probe["maps_true"][e, i],
                   f"p({classes[label]}) {100 * probe['probability_true'][e, i]:.0f}%", "black")
        probe_cell(predicted_axis, probe["images"][i], probe["maps_predicted"][e, i],
                   f"{classes[predicted]} {100 * probe['probability'][e, i]:.0f}%",
                   "darkgreen" if predicted == label else "firebrick")


def probe_title(probe, label, log):
    return (f"{label}: Grad-CAM at {probe['layer']} of {len(probe['labels'])} fixed {accuracy_name(log)} images "
            f"through training: for the true class (its probability), and for the prediction")


def probe_figure(probe, label, log):
    """The grid: a row per epoch (at most PROBE_ROWS), two columns per image."""
    import numpy as np
    count, shown = len(probe["labels"]), np.unique(np.linspace(0, len(probe["epochs"]) - 1, PROBE_ROWS).round())
    figure = cli.new_figure((2 * count + 1, 1.3 * len(shown) + 1))
    axes = figure.subplots(len(shown), 2 * count, squeeze=False)
    for row, e in zip(axes, shown.astype(int)):
        probe_epoch(row[0::2], row[1::2], probe, e)
        row[0].set_ylabel(f"epoch {probe['epochs'][e]}", fontsize=9)
    for i, label_index in enumerate(probe["labels"]):
        axes[0, 2 * i].set_title(f"{probe['classes'][label_index]}:\ntrue class", fontsize=8)
        axes[0, 2 * i + 1].set_title("\npredicted", fontsize=8)
    figure.suptitle(probe_title(probe, label, log), fontsize=10)
    figure.tight_layout()
    return figure


def probe_animation(probe, label, log, seconds_a_frame=0.6):
    """A GIF, a frame per epoch (the last held three times as long): Pillow, which matplotlib needs anyway."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from PIL import Image
    count = len(probe["labels"])
    figure = cli.new_figure((1.1 * count + 0.6, 3.2))
    canvas, axes = FigureCanvasAgg(figure), figure.subplots(2, count, squeeze=False)
    frames = []
    for e, epoch in enumerate(probe["epochs"]):
        for axis in axes.flat:
            axis.clear()
        probe_epoch(axes[0], axes[1], probe, e)
        axes[0, 0].set_ylabel("true class", fontsize=8)
        axes[1, 0].set_ylabel("predicted", fontsize=8)
        figure.suptitle(f"{label}: epoch {epoch}/{log['args']['epochs']}, Grad-CAM at {probe['layer']}", fontsize=9)
        figure.tight_layout()
        canvas.draw()
        frames.append(Image.fromarray(np.asarray(canvas.buffer_rgba())).convert("RGB").quantize(colors=255))
    buffer = io.BytesIO()
    durations = [round(1000 * seconds_a_frame)] * (len(frames) - 1) + [round(3000 * seconds_a_frame)]
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:], duration=durations, loop=0)
    return buffer.getvalue()


def output_paths(args):
    """The pictures' paths: curves, confusion matrix, probe grid and probe animation."""
    first = os.path.splitext(args.logs[0])[0]
    curves = args.out or (f"{first}_curves.png" if len(args.logs) == 1 else
                          os.path.join(os.path.dirname(args.logs[0]), "compare_curves.png"))
    stem, extension = os.path.splitext(curves)
    stem = stem[:-len('_curves')] if stem.endswith('_curves') else stem
    return curves, f"{stem}_confusion{extension}", f"{stem}_probe{extension}", f"{stem}_probe.gif"


def default_labels(paths):
    """A log's name, or its folder's name for the usual log.json; the path when names collide."""
    names = []
    for path in paths:
        stem = os.path.splitext(os.path.basename(path))[0]
        folder = os.path.basename(os.path.dirname(os.path.abspath(path)))
        names.append(folder if stem == "log" and folder else stem)
    return names if len(set(names)) == len(names) else list(paths)


def plot(args):
    """Write every picture, then return the lines to print (a reader that stops early loses no picture)."""
    if args.labels is not None and len(args.labels) != len(args.logs):
        raise UsageError(f"--labels needs one name per log ({len(args.logs)}), got {len(args.labels)}")
    if args.out is not None:
        cli.picture_format(args.out)
        cli.check_output("--out", args.out)
    logs = [read_log(path) for path in args.logs]
    # A model trained with a planted shortcut (train.py --plant-shortcut) is never shown as a clean one.
    labels = [f"{label} [shortcut planted in {shortcut['class_name']}]" if shortcut else label for label, shortcut
              in zip(args.labels or default_labels(args.logs), ((log.get("data") or {}).get("planted_shortcut")
                                                                  for log in logs))]
    for path, log in zip(args.logs, logs):
        bad = nan_epochs(log)
        if bad:
            warn(f"{path} has NaN losses or accuracies at epoch(s) {', '.join(map(str, bad))}: the "
                 f"run diverged there; those points are missing from the curves")
    summaries = [summary(log) for log in logs]
    curves_path, confusion_path, probe_path, animation_path = output_paths(args)
    cli.save_figure(curves_figure(logs, labels, summaries), curves_path)
    lines = [table(labels, summaries), f"wrote {curves_path}"]
    if args.confusion and len(logs) == 1 and "confusion_matrix" in logs[0]:
        cli.save_figure(confusion_figure(logs[0], labels[0]), confusion_path)
        lines.append(f"wrote {confusion_path}")
    probe = read_probe(args.logs[0], logs[0]) if len(logs) == 1 else None
    if probe is not None and len(probe["epochs"]):
        cli.save_figure(probe_figure(probe, labels[0], logs[0]), probe_path)
        cli.write_file(animation_path, probe_animation(probe, labels[0], logs[0]))
        lines.append(f"wrote {probe_path} and {animation_path}")
    return lines


def main(argv=None):
    try:
        lines = plot(build_parser().parse_args(argv))
    except UsageError as error:
        print(f"plot_curves.py: error: {error}", file=sys.stderr)
        return 2
    cli.say(*lines)  # after every file is written: a reader that leaves early loses none
    return 0


if __name__ == "__main__":
    sys.exit(main())
