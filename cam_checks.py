"""Checks of whether a Grad-CAM map says something about the model, in numbers: the model-parameter
randomisation test of Adebayo et al. (NeurIPS 2018, "Sanity Checks for Saliency Maps"). gradcam.py's
--sanity-check runs it; the maths here takes maps as tensors and knows nothing of the command line.
Nothing happens on import.

    stages = cam_checks.cascading_randomisation(model, lambda m: maps_of(m))   # [(part, maps), ...]
    rows = cam_checks.sanity_rows(trained_maps, stages, edge_maps(images))
"""
import copy

import numpy as np
import torch
import torch.nn.functional as F

import cli


def cascading_randomisation(model, explain, seed=0):
    """Re-initialise `model`'s top-level parts one more at a time, from the output back (`linear`, then
    `layer4` too, ... `conv1`: Adebayo et al.'s cascade), with PyTorch's own initialisation (reset_parameters,
    BatchNorm's statistics too), seeded, drawn on the CPU so that every device gets the same weights.
    Returns [(part's name, explain(the model so far randomised))]; `model` is left as it was."""
    on_cpu, on_device, stages = copy.deepcopy(model).cpu(), copy.deepcopy(model), []
    with torch.random.fork_rng(devices=[]):  # the caller's random state stays as it was
        torch.manual_seed(seed)
        for name, part in reversed(list(on_cpu.named_children())):
            for module in part.modules():
                if hasattr(module, "reset_parameters"):
                    module.reset_parameters()
            on_device.load_state_dict(on_cpu.state_dict())
            stages.append((name, explain(on_device)))
    return stages


def edge_maps(images):
    """The control: each image's edges (the Sobel gradient magnitude of its grey level), scaled to [0, 1].
    It depends on the input alone, so randomising the model cannot change it. uint8 (N, 3, H, W) ->
    (N, H, W)."""
    grey = F.pad(images.double().mean(dim=1, keepdim=True), (1, 1, 1, 1), mode="replicate")
    sobel = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]], dtype=grey.dtype,
                         device=grey.device)
    gradients = F.conv2d(grey, torch.stack([sobel, sobel.T])[:, None])
    magnitude = gradients.pow(2).sum(dim=1).sqrt()
    low = magnitude.amin(dim=(1, 2), keepdim=True)
    return (magnitude - low) / (magnitude.amax(dim=(1, 2), keepdim=True) - low + 1e-7)


def average_ranks(values):
    """Ranks from 0, ties sharing the mean of their places (Spearman's convention)."""
    order = np.argsort(values, kind="stable")
    ordered = values[order]
    starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]])
    group_sizes = np.diff(np.r_[starts, len(values)])
    ranks = np.empty(len(values))
    ranks[order] = np.repeat(starts + (group_sizes - 1) / 2, group_sizes)
    return ranks


def spearman(maps, others):
    """Spearman's rank correlation of each pair of maps (N, H, W) -> (N,). A blank map (one value
    everywhere, as a map whose ReLU removed everything) ranks nothing: 0."""
    correlations = []
    for a, b in zip(maps.reshape(len(maps), -1).cpu().double().numpy(), others.reshape(len(others), -1)
                    .cpu().double().numpy()):
        a, b = average_ranks(a) - (len(a) - 1) / 2, average_ranks(b) - (len(b) - 1) / 2
        scale = np.sqrt((a * a).sum() * (b * b).sum())
        correlations.append(float((a * b).sum() / scale) if scale > 0 else 0.0)
    return np.array(correlations)


def ssim(maps, others, size=11, sigma=1.5):
    """The structural similarity of each pair of maps in [0, 1] (N, H, W) -> (N,): Wang et al. 2004, a
    Gaussian window of 11x11 pixels with sigma 1.5 over the map (valid positions), K1 0.01, K2 0.03."""
    x, y = maps[:, None].double(), others[:, None].double().to(maps.device)
    offsets = torch.arange(size, dtype=x.dtype, device=x.device) - (size - 1) / 2
    g = torch.exp(-offsets ** 2 / (2 * sigma ** 2))
    window = (torch.outer(g, g) / g.sum() ** 2)[None, None]
    mean_x, mean_y = F.conv2d(x, window), F.conv2d(y, window)
    var_x = F.conv2d(x * x, window) - mean_x ** 2
    var_y = F.conv2d(y * y, window) - mean_y ** 2
    covariance = F.conv2d(x * y, window) - mean_x * mean_y
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    similarity = ((2 * mean_x * mean_y + c1) * (2 * covariance + c2)
                  / ((mean_x ** 2 + mean_y ** 2 + c1) * (var_x + var_y + c2)))
    return similarity.mean(dim=(1, 2, 3)).cpu().numpy()


def mean_with_interval(values, seed=0, resamples=2000):
    """The mean and its 95% percentile-bootstrap interval, over the images (seeded: the same numbers again)."""
    values = np.asarray(values, dtype=np.float64)
    samples = np.random.default_rng(seed).integers(0, len(values), (resamples, len(values)))
    low, high = np.percentile(values[samples].mean(axis=1), [2.5, 97.5])
    return {"mean": float(values.mean()), "low": float(low), "high": float(high)}


def similarity(maps, others, seed):
    """Spearman and SSIM of `others` against `maps`, and the share of `others` that are blank (zero
    everywhere: Grad-CAM's ReLU found no evidence for the class)."""
    return {"spearman": mean_with_interval(spearman(maps, others), seed),
            "ssim": mean_with_interval(ssim(maps, others), seed),
            "blank_maps": float((others.reshape(len(others), -1).amax(dim=1) == 0).double().mean())}


def sanity_rows(trained, stages, edges, seed=0):
    """The sanity check's rows: each stage's maps against the trained model's, then the two rows that give
    the scale: the control (edge maps, which no randomisation changes: 1 by construction) and the floor
    (the trained maps of other images: how alike two unrelated maps are)."""
    other_images = torch.roll(trained, 1, dims=0)
    rows = [{"randomised": "nothing (the trained model)", **similarity(trained, trained, seed)}]
    rows += [{"randomised": f"{'' if i == 0 else '+ '}{name}", **similarity(trained, maps, seed)}
             for i, (name, maps) in enumerate(stages)]
    rows.append({"randomised": "control: edge map (the input alone)", **similarity(edges, edges, seed)})
    rows.append({"randomised": "floor: trained maps of other images", **similarity(trained, other_images, seed)})
    return rows


def sanity_table(rows):
    def cell(value):
        return f"{value['mean']:.3f} [{value['low']:.3f}, {value['high']:.3f}]"
    header = ("randomised, from the output back", "Spearman [95% interval]", "SSIM [95% interval]", "blank maps")
    lines = [(row["randomised"], cell(row["spearman"]), cell(row["ssim"]), f"{100 * row['blank_maps']:.0f}%")
             for row in rows]
    widths = [max(len(line[i]) for line in [header] + lines) for i in range(len(header))]
    return "\n".join("  ".join(text.ljust(width) for text, width in zip(line, widths)).rstrip()
                     for line in [header] + lines)


def sanity_figure(images, trained, stages, rows, title, shown=4):
    """Adebayo et al.'s picture: a row of maps per image as more of the model is randomised; below, the
    mean similarities with their intervals, the control and the floor."""
    columns = 2 + len(stages)
    figure = cli.new_figure((1.5 * columns, 1.6 * shown + 3.2))
    grid = figure.add_gridspec(shown + 2, columns)
    for row in range(min(shown, len(images))):
        pictures = [(images[row].permute(1, 2, 0).cpu().numpy(), "input"), (trained[row], "trained")]
        pictures += [(maps[row], f"+ {name}" if i else name) for i, (name, maps) in enumerate(stages)]
        for column, (picture, label) in enumerate(pictures):
            axis = figure.add_subplot(grid[row, column])
            axis.imshow(picture if picture.ndim == 3 else picture.cpu().numpy(), cmap="jet", vmin=0, vmax=1,
                        interpolation="nearest")
            axis.axis("off")
            if row == 0:
                axis.set_title(label, fontsize=8)
    curves = figure.add_subplot(grid[shown:, :])
    steps = range(len(stages) + 1)
    for key, name, colour in (("spearman", "Spearman", "C0"), ("ssim", "SSIM", "C1")):
        values = [row[key] for row in rows[:len(stages) + 1]]
        curves.plot(steps, [v["mean"] for v in values], "o-", color=colour, label=name)
        curves.fill_between(steps, [v["low"] for v in values], [v["high"] for v in values], color=colour, alpha=0.2)
        curves.axhline(rows[-1][key]["mean"], color=colour, linestyle=":", label=f"{name}, other images (floor)")
    curves.axhline(1.0, color="grey", linestyle="--", label="control: edge map (1)")
    curves.set_xticks(list(steps), ["trained"] + [f"+ {name}" if i else name for i, (name, _) in enumerate(stages)])
    curves.set(ylabel="similarity to the trained maps", ylim=(min(-0.1, curves.get_ylim()[0]), 1.05))
    curves.grid(alpha=0.3)
    curves.legend(fontsize=7, loc="upper right")
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    return figure
