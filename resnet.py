"""ResNet18, CIFAR variant, and the checkpoint format that train.py writes and gradcam.py reads.

The CIFAR variant (He et al. 2016, as in kuangliu/pytorch-cifar): a 3x3 stride-1 stem and no max-pool,
so a 32x32 image keeps its resolution into layer1; BasicBlock stages [2, 2, 2, 2] at 64/128/256/512
channels named layer1..layer4; global average pool; a linear head that returns logits.

    from resnet import resnet18
    model = resnet18(num_classes=10)           # 11,173,962 parameters
    logits = model(torch.randn(8, 3, 32, 32))  # (8, 10)

Nothing happens on import.
"""
import os
import pickle
import re
import zipfile

import torch
import torch.nn as nn
import torch.nn.functional as F

# Written into every checkpoint; read_checkpoint refuses files without it. Format 1 (earlier versions)
# holds the same model, classes, mean and std, which is all gradcam.py reads: it accepts both.
CHECKPOINT_FORMAT = "resnet18-cifar-checkpoint/2"
MODEL_FORMATS = ("resnet18-cifar-checkpoint/1", CHECKPOINT_FORMAT)


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with a residual connection (projection shortcut when the shape changes)."""

    def __init__(self, in_channels, out_channels, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        # Not in place: Grad-CAM hooks may hold bn2's output, and an in-place add would change it.
        return F.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    def __init__(self, blocks_per_stage=(2, 2, 2, 2), num_classes=10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        channels = 64
        for index, (width, blocks) in enumerate(zip((64, 128, 256, 512), blocks_per_stage)):
            stride = 1 if index == 0 else 2
            stage = []
            for block in range(blocks):
                stage.append(BasicBlock(channels, width, stride if block == 0 else 1))
                channels = width
            self.add_module(f"layer{index + 1}", nn.Sequential(*stage))
        self.linear = nn.Linear(512, num_classes)

    def forward(self, x):                       # (B, 3, 32, 32)
        out = F.relu(self.bn1(self.conv1(x)))   # (B, 64, 32, 32)
        out = self.layer1(out)                  # (B, 64, 32, 32)
        out = self.layer2(out)                  # (B, 128, 16, 16)
        out = self.layer3(out)                  # (B, 256, 8, 8)
        out = self.layer4(out)                  # (B, 512, 4, 4)
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.linear(out)                 # (B, num_classes) logits


def resnet18(num_classes=10):
    """The CIFAR ResNet18; 10 classes give 11,173,962 parameters."""
    return ResNet((2, 2, 2, 2), num_classes=num_classes)


class CheckpointError(ValueError):
    """A checkpoint file that is missing, unreadable, unsafe or not one of ours."""


def read_checkpoint(path, map_location="cpu", formats=(CHECKPOINT_FORMAT,)):
    """Load a checkpoint written by train.py in one of `formats`, safely (weights_only: no code in it can run).

    Raises CheckpointError with a one-line reason for anything else.
    """
    if os.path.isdir(path):
        raise CheckpointError(f"checkpoint {path} is a folder; give the last.pt or best.pt in it")
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path} not found")
    # torch.save writes a zip archive; anything else (random bytes, a truncated copy) is not a checkpoint.
    if not zipfile.is_zipfile(path):
        raise CheckpointError(f"checkpoint {path} is corrupt or not a PyTorch file (not a zip archive); give a "
                              f"last.pt or best.pt that train.py wrote")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        # weights_only refuses anything but tensors and plain values: a pickle that would run code lands here.
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(error))
        holds = f"a {found.group(1)}" if found else "more than tensors and plain values"
        raise CheckpointError(f"checkpoint {path} refused: it holds {holds}, and loading it could run code; "
                              f"give a last.pt or best.pt that train.py wrote") from None
    except Exception as error:  # damaged bytes fail in many ways (IndexError, KeyError, RuntimeError, ...)
        raise CheckpointError(f"checkpoint {path} is corrupt or not a PyTorch file ({type(error).__name__}); "
                              f"give a last.pt or best.pt that train.py wrote") from None
    found = checkpoint.get("format") if isinstance(checkpoint, dict) else None
    if isinstance(found, str) and found.startswith(CHECKPOINT_FORMAT.split("/")[0] + "/") and found not in formats:
        raise CheckpointError(f"{path} was saved by another version of train.py (format {found}; this reads "
                              f"{' or '.join(formats)}): start a new run, or use the version that wrote it")
    if found not in formats:
        raise CheckpointError(f"{path} is not a checkpoint written by train.py "
                              f"(no '{CHECKPOINT_FORMAT}' format tag)")
    return checkpoint


def model_from_checkpoint(checkpoint):
    """Rebuild the model a checkpoint describes and load its weights."""
    model = resnet18(**checkpoint["model_args"])
    model.load_state_dict(checkpoint["model"])
    return model
