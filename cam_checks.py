"""Checks of whether a Grad-CAM map says something about the model, in numbers, for gradcam.py's
--sanity-check, --faithfulness and --shortcut: the model-parameter randomisation test of Adebayo et al.
(NeurIPS 2018, "Sanity Checks for Saliency Maps"), the deletion and insertion curves of Petsiuk et al.
(BMVC 2018, "RISE") and the shortcut that train.py --plant-shortcut plants (its patch is stamped here too,
for augment.split_data), each beside the baselines that give its numbers a scale. The maths takes
models, maps and images as tensors and knows nothing of the command line. Nothing happens on import.

    # cam(model, method, targets) -> (maps (N, H, W) in [0, 1], targets): Grad-CAM of the images at hand
    result, draw = cam_checks.sanity_check(model, cam, images, inputs, seed=0)   # result["rows"]: the table
    result, draw = cam_checks.faithfulness(model, cam, images, inputs, seed=0)
    result, draw = cam_checks.shortcut(model, cam, images, inputs, 0, clean_inputs, places, planted, 4)
"""
import copy

import numpy as np
import torch
import torch.nn.functional as F

import cli


# gradcam.py --help ends with this: what each number means and how to read it.
HELP = """--sanity-check N: the model-parameter randomisation test of Adebayo et al. ("Sanity Checks for
Saliency Maps", NeurIPS 2018). The maps of N seeded test images, each for the trained model's predicted class,
are computed again as the model's parts are re-initialised one more at a time from the output back (linear,
then layer4 too, ... conv1). Each row compares the maps with the trained model's, per image, by Spearman's
rank correlation (do the same pixels rank high?) and SSIM (Wang et al. 2004: do the maps look alike?), as the
mean over the images with its 95% bootstrap interval. A map that says something about the model falls
towards the floor row (the trained maps of other images: how alike unrelated maps are) once the layers it
depends on are random; a map that stays near 1 comes from the input alone, as the control row's edge map
does by construction. A trained map that is blank (zero everywhere: no evidence for the class) is left out
(a first line says how many); a randomised model's blank map counts as 0 for Spearman, and the last column
gives their share.

--faithfulness N: the deletion and insertion curves of Petsiuk et al. ("RISE", BMVC 2018) for Grad-CAM and
Grad-CAM++ (--method aside) and two baselines, a random map and a centred Gaussian blob. The pixels of each
of N seeded test images are replaced by the dataset's mean colour in the order the map ranks them, most
relevant first, in 16 steps (deletion), or revealed in that order on an image of the mean colour
(insertion), and the probability of the trained model's predicted class is read at each step. The area
under that curve, from 0 to all of the pixels: lower is better for deletion, higher for insertion, each
as the mean with its 95% bootstrap interval. A map is faithful in so far as it beats the baselines, not
by its own number: a map that ranks pixels at random, or only by their nearness to the centre, scores
too (pixels of the mean colour are unlike any image's, so removing almost any takes the probability
down), and the baselines' rows say how much.

--shortcut N, for a model trained with train.py --plant-shortcut CLASS (a 4x4 patch on 80% of CLASS's
training images, the one case whose right explanation is known): N seeded test images of the other classes
are stamped with the patch at a random place. The first line says how many the patch sends to CLASS. The
table gives, for the maps of CLASS (Grad-CAM, Grad-CAM++ and a random map), the share of each map's mass
inside the patch (mean with its 95% bootstrap interval), that share over chance (the patch's share of the
image), and how often the map's peak lies inside the patch (a blank map has neither). A method that finds
what the model uses puts its mass and its peak on the patch, far above chance and the random map.

Each writes its numbers as JSON beside the picture (its name with .json)."""


# ----------------------------------------------------------------------------- the sanity check

def cascading_randomisation(model, explain, seed=0):
    """Re-initialise `model`'s top-level parts one more at a time, from the output back (`linear`, then
    `layer4` too, ... `conv1`: Adebayo et al.'s cascade), with PyTorch's own initialisation (reset_parameters,
    BatchNorm's statistics too), seeded, drawn on the CPU so that every device gets the same weights.
    Returns [(part's name, explain(the model so far randomised))]; `model` is left as it was."""
    on_cpu, on_device, stages = copy.deepcopy(model).cpu(), copy.deepcopy(model), []
    with torch.random.fork_rng(devices=[]):  # the caller's random state stays as it was
        torch.default_generator.manual_seed(seed)  # the CPU's alone: torch.manual_seed would reseed every GPU
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


def sanity_check(model, cam, images, inputs, seed=0):
    """Adebayo et al.'s cascading randomisation for the maps `cam` draws of uint8 `images` (normalized:
    `inputs`), each for the trained model's prediction. Returns the rows and the figure's drawing."""
    trained, targets = cam(model)
    drawn = trained.reshape(len(trained), -1).amax(dim=1) > 0  # a blank map ranks nothing: nothing to compare
    if drawn.sum() < 2:
        raise cli.UsageError(f"only {int(drawn.sum())} of the {len(trained)} trained maps show anything (the others "
                             f"are blank): too few to compare; give more test images or another --layer")
    stages = cascading_randomisation(model, lambda randomised: cam(randomised, targets=targets)[0][drawn], seed)
    trained, images = trained[drawn], images[drawn]
    rows = sanity_rows(trained, stages, edge_maps(images), seed)
    result = {"rows": rows, "blank_trained_maps": int((~drawn).sum())}
    if not drawn.all():
        result["summary"] = (f"{int((~drawn).sum())} of the {len(drawn)} trained maps are blank (no evidence for the "
                             f"predicted class) and are left out: the rows compare the other {int(drawn.sum())}")
    return result, lambda title: sanity_figure(images, trained, stages, rows, title)


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


def interval_text(value, scale=1, digits=3):
    return f"{scale * value['mean']:.{digits}f} [{scale * value['low']:.{digits}f}, {scale * value['high']:.{digits}f}]"


# The printed columns: a row's key -> (header, how its value is written); keys not here (curves) are JSON only.
COLUMNS = {"randomised": ("randomised, from the output back", str), "map": ("map", str),
           "spearman": ("Spearman [95% interval]", interval_text), "ssim": ("SSIM [95% interval]", interval_text),
           "blank_maps": ("blank maps", lambda share: f"{100 * share:.0f}%"),
           "deletion_auc": ("deletion AUC [95% interval]", interval_text),
           "insertion_auc": ("insertion AUC [95% interval]", interval_text),
           "mass_in_patch": ("map mass in the patch [95% interval]", lambda v: interval_text(v, 100, 1) + " %"),
           "times_chance": ("x chance", lambda ratio: f"{ratio:.1f}"),
           "peak_in_patch": ("peak in the patch", lambda share: f"{100 * share:.0f}%")}


def report(result):
    """A check's result as printed: its summary line, if any, then its table."""
    rows = result["rows"]
    header = tuple(COLUMNS[key][0] for key in rows[0] if key in COLUMNS)
    lines = [tuple(COLUMNS[key][1](value) for key, value in row.items() if key in COLUMNS) for row in rows]
    widths = [max(len(line[i]) for line in [header] + lines) for i in range(len(header))]
    table = "\n".join("  ".join(text.ljust(width) for text, width in zip(line, widths)).rstrip()
                      for line in [header] + lines)
    return f"{result['summary']}\n{table}" if "summary" in result else table


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


# ----------------------------------------------------------------------------- faithfulness

def removal_order(maps, seed=0):
    """Each map's pixel indices, most relevant first; ties (a blank region has no order) in a seeded random order."""
    flat = maps.reshape(len(maps), -1).cpu().double().numpy()
    return np.lexsort((np.random.default_rng(seed).random(flat.shape), -flat), axis=-1)


def perturbation_curves(model, inputs, targets, maps, steps=16, seed=0):
    """Deletion and insertion (Petsiuk et al. 2018): the explained class's probability as each image's pixels
    are replaced by the dataset's mean colour (0 once normalized), most relevant first, in `steps` equal
    steps; and as they are revealed in the same order on an image of the mean colour. Two (N, steps + 1)
    arrays, from 0 to all of the pixels."""
    count, _, height, width = inputs.shape
    order = torch.from_numpy(removal_order(maps, seed)).to(inputs.device)
    place = torch.empty_like(order).scatter_(1, order, torch.arange(height * width, device=order.device)
                                             .expand(count, -1))  # each pixel's place in its order
    deletion, insertion = [], []
    for step in range(steps + 1):
        taken = (place < round(step * height * width / steps)).reshape(count, 1, height, width)
        for curve, kept in ((deletion, ~taken), (insertion, taken)):
            curve.append(probabilities(model, inputs * kept).gather(1, targets[:, None].cpu())[:, 0])
    return torch.stack(deletion, dim=1).numpy(), torch.stack(insertion, dim=1).numpy()


def probabilities(model, inputs, batch=256):
    """The model's class probabilities (on the CPU) for `inputs`, a batch at a time: N may be the test set."""
    with torch.no_grad():
        return torch.cat([model(inputs[start:start + batch]).float().softmax(dim=1).cpu()
                          for start in range(0, len(inputs), batch)])


def area_under(curves):
    """The trapezoid area under curves sampled at equal steps over [0, 1], one per row."""
    return (curves[:, :-1] + curves[:, 1:]).sum(axis=1) / (2 * (curves.shape[1] - 1))


def baseline_maps(count, size, seed=0):
    """The two maps every faithfulness score needs beside it: uniform noise (ranks pixels at random) and a
    centred Gaussian blob of sigma a quarter of the side (an object is often in the middle of the picture)."""
    height, width = size
    noise = torch.rand((count, height, width), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    ys, xs = torch.meshgrid(torch.arange(height) - (height - 1) / 2, torch.arange(width) - (width - 1) / 2,
                            indexing="ij")
    blob = torch.exp(-(xs ** 2 + ys ** 2) / (2 * (height / 4) ** 2)).expand(count, height, width)
    return {"random map": noise, "centred blob": blob}


def faithfulness(model, cam, images, inputs, seed=0):
    """Deletion and insertion for Grad-CAM, Grad-CAM++ and the baselines, each for the trained model's
    prediction. Returns the rows (the mean curves with them) and the figure's drawing."""
    gradcam, targets = cam(model, method="gradcam")
    maps = {"Grad-CAM": gradcam, "Grad-CAM++": cam(model, method="gradcam++", targets=targets)[0],
            **baseline_maps(len(inputs), tuple(inputs.shape[-2:]), seed)}
    rows = []
    for name, chosen in maps.items():
        deletion, insertion = perturbation_curves(model, inputs, targets, chosen, seed=seed)
        rows.append({"map": name, "deletion_auc": mean_with_interval(area_under(deletion), seed),
                     "insertion_auc": mean_with_interval(area_under(insertion), seed),
                     "deletion_curve": deletion.mean(axis=0).tolist(),
                     "insertion_curve": insertion.mean(axis=0).tolist()})
    return {"rows": rows}, lambda title: faithfulness_figure(rows, title)


def faithfulness_figure(rows, title):
    figure = cli.new_figure((12, 4.6))
    for axis, kind, better in zip(figure.subplots(1, 2), ("deletion", "insertion"), ("lower", "higher")):
        for row in rows:
            curve = row[f"{kind}_curve"]
            axis.plot(np.linspace(0, 1, len(curve)), curve, "o-" if "Grad" in row["map"] else "--", markersize=3,
                      label=f"{row['map']} (AUC {row[f'{kind}_auc']['mean']:.3f})")
        verb = "replaced by the mean colour" if kind == "deletion" else "revealed on the mean colour"
        axis.set(title=f"{kind}: the most relevant pixels {verb} first\n({better} area under the curve: more faithful)",
                 xlabel=f"fraction of the pixels {'removed' if kind == 'deletion' else 'revealed'}",
                 ylabel="probability of the explained class", ylim=(0, 1.02))
        axis.title.set_fontsize(9)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    return figure


# ----------------------------------------------------------------------------- the planted shortcut

# --plant-shortcut: a 4x4 checkerboard of magenta and green (a pattern of no CIFAR class) stamped at a random
# place on most of one class's training images. The model learns it as that class's sign: the one case in
# which the right explanation is known (gradcam.py --shortcut measures whether Grad-CAM finds it).
SHORTCUT_PATCH = np.array([[[255, 0, 255], [0, 255, 0]] * 2, [[0, 255, 0], [255, 0, 255]] * 2] * 2, dtype=np.uint8)
SHORTCUT_SHARE = 0.8  # of the class's training images


def stamp_shortcut(images, seed):
    """Copies of uint8 (N, H, W, 3) images with the patch at a seeded random place each, and the places
    (N, 2) as (top, left)."""
    size = len(SHORTCUT_PATCH)
    places = np.random.default_rng(seed).integers(0, np.array(images.shape[1:3]) - size + 1, (len(images), 2))
    stamped = images.copy()
    for image, (top, left) in zip(stamped, places):
        image[top:top + size, left:left + size] = SHORTCUT_PATCH
    return stamped, places


def planted_shortcut(text, classes):
    """What --plant-shortcut CLASS does, as log.json and the checkpoint record it (None without it)."""
    if text is None:
        return None
    index = cli.class_index(text, classes, "--plant-shortcut")
    return {"class": index, "class_name": classes[index], "share_of_its_training_images": SHORTCUT_SHARE,
            "patch": "4x4 magenta and green checkerboard at a random place"}


def plant_shortcut(images, labels, target, seed):
    """`images` with the patch on SHORTCUT_SHARE of class `target`'s (chosen and placed by `seed`)."""
    members = np.flatnonzero(labels == target)
    chosen = np.random.default_rng([seed, target]).permutation(members)[:round(SHORTCUT_SHARE * len(members))]
    images = images.copy()
    images[chosen] = stamp_shortcut(images[chosen], seed)[0]
    return images


def patch_masks(places, size, shape):
    """(N, H, W) booleans: True inside each image's patch, whose top left corner is at `places` (N, 2)."""
    masks = torch.zeros((len(places), *shape), dtype=torch.bool)
    for mask, (top, left) in zip(masks, places):
        mask[top:top + size, left:left + size] = True
    return masks


def shortcut(model, cam, images, inputs, seed, clean_inputs, places, planted, patch_size):
    """The one case with a known right answer: test images of other classes stamped with the planted patch
    (`inputs`; `clean_inputs` without it) at `places`. How many the patch sends to the planted class
    (`planted`, as planted_shortcut describes it), and for each map of that class the share of its
    mass inside the patch, against chance (the patch's share of the image) and a random map, and how often
    its peak lies inside (a blank map's: never)."""
    target = planted["class"]
    before = (probabilities(model, clean_inputs).argmax(dim=1) == target).float().mean().item()
    after = (probabilities(model, inputs).argmax(dim=1) == target).float().mean().item()
    targets = torch.full((len(inputs),), target, device=inputs.device)
    inside = patch_masks(places, patch_size, tuple(inputs.shape[-2:])).double()
    chance = patch_size ** 2 / inside[0].numel()
    maps = {"Grad-CAM": cam(model, method="gradcam", targets=targets)[0],
            "Grad-CAM++": cam(model, method="gradcam++", targets=targets)[0],
            "random map": baseline_maps(len(inputs), tuple(inputs.shape[-2:]), seed)["random map"]}
    rows = []
    for name, chosen in maps.items():
        chosen = chosen.double()
        mass = (chosen * inside).sum(dim=(1, 2)) / chosen.sum(dim=(1, 2)).clamp_min(1e-12)  # a blank map: 0
        flat = chosen.reshape(len(chosen), -1)
        peaks = inside.reshape(len(inside), -1).gather(1, flat.argmax(dim=1, keepdim=True))[:, 0]
        peaks = peaks * (flat.amax(dim=1) > 0)  # a blank map's argmax is its first pixel: no peak
        interval = mean_with_interval(mass.numpy(), seed)
        rows.append({"map": name, "mass_in_patch": interval, "times_chance": interval["mean"] / chance,
                     "peak_in_patch": float(peaks.mean())})
    summary = (f"the patch sent {100 * after:.0f}% of {len(inputs)} test images of other classes to "
               f"{planted['class_name']} ({100 * before:.0f}% went there without it); it covers {100 * chance:.1f}% "
               f"of an image (chance)")
    result = {"summary": summary, "flip_rate": after, "planted_class_without_patch": before, "chance": chance,
              "rows": rows}
    return result, lambda title: shortcut_figure(images, maps, places, patch_size, rows, chance, title)


def shortcut_figure(images, maps, places, patch_size, rows, chance, title, shown=6):
    """The stamped images (the patch outlined) above their maps for the planted class, and the mass in the patch."""
    from matplotlib.patches import Rectangle
    shown = min(shown, len(images))
    figure = cli.new_figure((1.7 * shown + 4, 1.8 * (1 + len(maps)) + 0.6))
    grid = figure.add_gridspec(1 + len(maps), shown + 2)
    pictures = [("stamped image", [image.permute(1, 2, 0).cpu().numpy() for image in images])]
    pictures += [(name, list(chosen)) for name, chosen in maps.items()]
    for row, (name, column_pictures) in enumerate(pictures):
        for column in range(shown):
            axis = figure.add_subplot(grid[row, column])
            picture = column_pictures[column]
            axis.imshow(picture if picture.ndim == 3 else picture.cpu().numpy(), cmap="jet", vmin=0, vmax=1,
                        interpolation="nearest")
            top, left = places[column]
            axis.add_patch(Rectangle((left - 0.5, top - 0.5), patch_size, patch_size, fill=False, edgecolor="white",
                                     linewidth=1.5))
            axis.axis("off")
            if column == 0:
                axis.set_title(name, fontsize=8, loc="left")
    bars = figure.add_subplot(grid[:, shown:])
    values = [100 * row["mass_in_patch"]["mean"] for row in rows]
    errors = [[100 * (row["mass_in_patch"]["mean"] - row["mass_in_patch"]["low"]) for row in rows],
              [100 * (row["mass_in_patch"]["high"] - row["mass_in_patch"]["mean"]) for row in rows]]
    bars.bar(range(len(rows)), values, yerr=errors, color=["C0", "C1", "grey"][:len(rows)], capsize=4)
    bars.axhline(100 * chance, color="black", linestyle="--", label="chance (patch area)")
    bars.set_xticks(range(len(rows)), [row["map"] for row in rows], fontsize=8)
    bars.set(ylabel="map mass inside the patch (%)", title="mass in the patch")
    bars.title.set_fontsize(9)
    bars.legend(fontsize=8)
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    return figure
