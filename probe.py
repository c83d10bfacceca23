"""train.py --probe N: how the explanation forms during training. N test images, chosen once, get their
Grad-CAM maps at layer4 (for the true and for the predicted class) and their predictions after every epoch;
the epochs so far travel in the checkpoint (a resume goes on with them) and are written to probe.npz beside
log.json, which `plot_curves.py log.json` draws as a grid and an animation. Nothing happens on import.

    picked = probe.pick(test_labels, 8, seed)                             # one per class first, seeded
    saved = probe.state(images[picked], labels[picked], picked, [])        # what the checkpoint keeps
    saved["epochs"].append(probe.explain(trainer, saved, epoch))           # maps: (8, 32, 32) float16
    probe.write("probe.npz", saved, classes)

probe.npz (numpy.load reads it, no pickle): images (N, 32, 32, 3) uint8, labels (N,), indices (N,) into the
test set, classes, layer, epochs (E,), maps_true and maps_predicted (E, N, 32, 32) float16 in [0, 1],
predicted (E, N), probability (E, N: of the predicted class), probability_true (E, N).
"""
import io

import numpy as np
import torch

import files
from cam import GradCAM

PROBE_NAME = "probe.npz"
LAYER = "layer4"
MOST = 100  # images: a batch with gradients each epoch, and 400 KiB an epoch in every checkpoint


def pick(labels, count, seed):
    """`count` test-image indices, seeded: a random image of each class first, then a second of each, ..."""
    labels = torch.as_tensor(labels)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    shuffled = labels[order]
    rank_in_class = torch.zeros_like(shuffled)
    for label in shuffled.unique():
        rank_in_class[shuffled == label] = torch.arange(int((shuffled == label).sum()))
    first = torch.argsort(rank_in_class * (int(labels.max()) + 1) + shuffled, stable=True)
    return order[first[:count]]


def explain(trainer, saved, epoch):
    """Epoch `epoch`'s maps and predictions of the probe's images (`saved`: state()), in float32 and the
    model's eval mode, as gradcam.py computes them; CPU tensors."""
    cam = GradCAM(trainer.model, [LAYER])
    inputs = trainer.inputs(saved["images"].to(trainer.device))
    labels = saved["labels"].to(trainer.device)
    maps_true, logits, _ = cam(inputs, labels)
    maps_predicted, _, predicted = cam(inputs)
    probabilities = logits.float().softmax(dim=1)
    return {"epoch": epoch, "maps_true": maps_true[:, 0].half().cpu(),
            "maps_predicted": maps_predicted[:, 0].half().cpu(), "predicted": predicted.cpu(),
            "probability": probabilities.gather(1, predicted[:, None])[:, 0].cpu(),
            "probability_true": probabilities.gather(1, labels[:, None])[:, 0].cpu()}


def state(images, labels, indices, epochs):
    """What a checkpoint keeps of the probe (CPU tensors and plain values): its images and the epochs so far."""
    return {"images": images.cpu(), "labels": labels.cpu(), "indices": indices.cpu(), "epochs": epochs}


def write(path, saved, classes):
    """probe.npz, atomically, from a checkpoint's probe (state())."""
    epochs = saved["epochs"]
    arrays = {key: torch.stack([epoch[key] for epoch in epochs]).numpy() for key in epochs[0] if key != "epoch"}
    buffer = io.BytesIO()
    np.savez(buffer, images=saved["images"].permute(0, 2, 3, 1).numpy(), labels=saved["labels"].numpy(),
             indices=saved["indices"].numpy(), classes=np.asarray(classes, dtype=str), layer=np.asarray(LAYER),
             epochs=np.asarray([epoch["epoch"] for epoch in epochs]), **arrays)
    files.atomic_write(path, buffer.getbuffer())
