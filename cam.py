"""Grad-CAM (Selvaraju et al. 2017) and Grad-CAM++ (Chattopadhyay et al. 2018) of any PyTorch model, as
maps in [0, 1]: the method alone, which gradcam.py draws and cam_checks.py checks. Equal to the grad-cam
package's maps (pytorch-grad-cam) within 1e-5 (a test). Nothing happens on import.

    maps, logits, targets = cam.GradCAM(model, ["layer3"])(images)   # maps: (B, layers, H, W)
"""
import torch
import torch.nn.functional as F

from cli import UsageError

METHODS = ("gradcam", "gradcam++")


def channel_weights(activations, gradients, method):
    """Grad-CAM: the spatial mean of d(score)/dA. Grad-CAM++: Chattopadhyay et al. 2018, eq. 19."""
    if method == "gradcam":
        return gradients.mean(dim=(2, 3))
    grads_2 = gradients ** 2
    grads_3 = grads_2 * gradients
    sum_activations = activations.sum(dim=(2, 3), keepdim=True)
    alpha = grads_2 / (2 * grads_2 + sum_activations * grads_3 + 1e-6)
    alpha = torch.where(gradients != 0, alpha, torch.zeros_like(alpha))
    return (F.relu(gradients) * alpha).sum(dim=(2, 3))


def min_max(maps, eps=1e-7):
    """Scale each (H, W) map to [0, 1]; the small eps keeps an all-zero map at zero."""
    maps = maps - maps.amin(dim=(-2, -1), keepdim=True)
    return maps / (maps.amax(dim=(-2, -1), keepdim=True) + eps)


def cam_map(activations, gradients, method, size):
    """ReLU(sum_k w_k A_k), normalized, upsampled bilinearly to `size`, normalized again (as pytorch-grad-cam)."""
    weights = channel_weights(activations, gradients, method)
    cam = F.relu((weights[:, :, None, None] * activations).sum(dim=1))
    cam = F.interpolate(min_max(cam)[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]
    return min_max(cam)


def find_modules(model, layers):
    """Module paths such as 'layer4' or 'layer4.1.conv2' -> modules; an unknown name lists the valid ones."""
    named = dict(model.named_modules())
    unknown = [name for name in layers if name not in named or name == ""]
    if unknown:
        valid = ", ".join(name for name in named if name)
        raise UsageError(f"unknown layer {unknown[0]!r}; valid layers: {valid}")
    return {name: named[name] for name in layers}


class GradCAM:
    """Grad-CAM or Grad-CAM++ maps of `model` at one or more layers (module paths). Called with a normalized
    batch (B, 3, H, W), it returns (maps, logits, targets): maps (B, layers, H, W) in [0, 1] for `targets`
    (class indices; default: the predicted class), computed on the raw logit. Hooks exist only during a
    call; the model's modes, requires_grad flags and parameters' .grad are left as found."""

    def __init__(self, model, layers, method="gradcam"):
        if method not in METHODS:
            raise UsageError(f"unknown method {method!r}; use one of {', '.join(METHODS)}")
        self.model, self.method = model, method
        self.layers = [layers] if isinstance(layers, str) else list(layers)
        self.modules = find_modules(model, self.layers)

    def __call__(self, images, targets=None):
        # Each module's own mode: a model training with frozen BatchNorm layers (bn.eval()) keeps them so.
        modes = {module: module.training for module in self.model.modules()}
        self.model.eval()
        outputs = {}
        hooks = [module.register_forward_hook(lambda _m, _i, out, name=name: outputs.__setitem__(name, out))
                 for name, module in self.modules.items()]
        try:
            # An input that needs a gradient makes a graph even when every parameter is frozen.
            images = images.detach().clone().requires_grad_(True)
            with torch.enable_grad():
                logits = self.model(images)
                targets = logits.argmax(dim=1) if targets is None else class_indices(targets, logits.shape[1])
                targets = torch.as_tensor(targets, device=logits.device).reshape(-1).expand(len(images))
                score = logits.gather(1, targets[:, None]).sum()  # samples are independent in eval mode
                activations = [self.feature_map(outputs, name) for name in self.layers]
                gradients = torch.autograd.grad(score, activations)
            maps = [cam_map(a.detach().float(), g.float(), self.method, images.shape[-2:])
                    for a, g in zip(activations, gradients)]
        finally:
            for hook in hooks:
                hook.remove()
            for module, training in modes.items():
                module.training = training
        return torch.stack(maps, dim=1), logits.detach(), targets

    @staticmethod
    def feature_map(outputs, name):
        output = outputs.get(name)
        if not isinstance(output, torch.Tensor) or output.dim() != 4:
            raise UsageError(f"layer {name!r} does not output a (B, C, H, W) feature map; choose a "
                             f"convolutional layer such as layer4")
        return output


def class_indices(targets, num_classes):
    """`targets` as class indices 0..num_classes-1 (an int, a sequence or a tensor); else a ValueError."""
    values = torch.as_tensor(targets) if not isinstance(targets, str) else None
    if values is None or values.is_floating_point() or values.is_complex() or not (
            (values >= 0) & (values < num_classes)).all():
        raise ValueError(f"targets must be class indices from 0 to {num_classes - 1} (got {targets!r}); a class "
                         f"name becomes its index with checkpoint['classes'].index(name)")
    return values
