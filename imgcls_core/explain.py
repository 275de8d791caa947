"""Seeing inside a trained model: its first-layer filters, each stage's feature maps, Grad-CAM.

Grad-CAM (Selvaraju et al., 2017) weights the last stage's feature maps by the
mean gradient of the explained class's logit over each map, keeps the positive
part and scales it up to the input: where the model looked for that class.
The "last stage" and the "first conv" come from a model's ``stage_names``
(ResNet: ``layer4``; cnn3: ``block3``).

At the end of training the session writes, next to the test artifacts:
``filters.png`` (first-layer filters), ``feature_maps.png`` (the first
channels of every stage for a few test images), ``gradcam_misclassified.png``
(a gallery of the misclassified test images, most confident first) and
``gradcam_correct.png`` (a few correct ones).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

GALLERY = 16  # misclassified images shown
CORRECT = 8
FEATURE_IMAGES = 4
FEATURE_CHANNELS = 8


def stage_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of each stage's last module, in order (the model's ``stage_names``)."""
    names = getattr(model, "stage_names", None)
    if not names:
        raise ValueError(f"{type(model).__name__} defines no stage_names: no stages to look inside")
    return [(stage[-1], model.get_submodule(stage[-1])) for stage in names]


def first_conv(model: nn.Module) -> nn.Conv2d:
    return next(m for m in model.modules() if isinstance(m, nn.Conv2d))


def gradcam(model: nn.Module, images: torch.Tensor, classes: torch.Tensor | None = None
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(heatmaps N x H x W in [0, 1], explained classes, their probabilities)`` for a preprocessed
    batch; ``classes`` defaults to the predicted ones. The model's parameters get no gradient."""
    cam, logits, classes = _gradcam(model, images, classes)
    return cam, classes, logits.softmax(1).gather(1, classes[:, None])[:, 0]


def gradcam_and_logits(model: nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(heatmaps of the predicted classes, the batch's logits)`` from one forward pass (cpu, float)."""
    cam, logits, _ = _gradcam(model, images, None)
    return cam, logits


def _gradcam(model: nn.Module, images: torch.Tensor, classes: torch.Tensor | None
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(heatmaps, logits, explained classes)``, all on the cpu."""
    import threading

    _, layer = stage_modules(model)[-1]
    seen: list[torch.Tensor] = []
    me = threading.get_ident()  # a server may run other forward passes of this model meanwhile

    def keep(_module, _inputs, out) -> torch.Tensor | None:
        if threading.get_ident() != me:
            return None
        # The last stage's maps as a leaf: autograd records only the head after it. The stages
        # before it ran without recording (no saved activations: a ResNet-50 batch of 32 at
        # 224 px peaks at +0.4 GB instead of +2.8 GB with the whole forward pass recorded).
        leaf = out.detach().requires_grad_()
        seen.append(leaf)
        torch.set_grad_enabled(True)  # this thread, until the no_grad block below ends
        return leaf

    handle = layer.register_forward_hook(keep)
    model.eval()
    try:
        with torch.no_grad():
            logits = model(images)
        with torch.enable_grad():
            classes = logits.argmax(1) if classes is None else classes.to(logits.device)
            score = logits.gather(1, classes[:, None]).sum()
            (grad,) = torch.autograd.grad(score, seen[0])
    finally:
        handle.remove()
    maps = seen[0].detach()
    cam = torch.relu((grad.mean(dim=(2, 3), keepdim=True) * maps).sum(1, keepdim=True))
    cam = F.interpolate(cam, size=images.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    cam = cam / cam.flatten(1).amax(1).clamp_min(1e-12)[:, None, None]
    return cam.cpu(), logits.detach().float().cpu(), classes.detach().cpu()


def unnormalize(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """A normalized ``N x 3 x H x W`` batch back in [0, 1]."""
    m = torch.tensor(mean, dtype=images.dtype).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=images.dtype).view(1, -1, 1, 1)
    return (images.detach().cpu() * s + m).clamp(0, 1)


def overlay(images: torch.Tensor, heatmaps: torch.Tensor, alpha: float = 0.5) -> torch.Tensor:
    """Heatmaps (jet colour map) blended over ``N x 3 x H x W`` images in [0, 1]."""
    from matplotlib import colormaps

    heat = torch.from_numpy(colormaps["jet"](heatmaps.numpy())[..., :3]).permute(0, 3, 1, 2).float()
    return ((1 - alpha) * images.float() + alpha * heat).clamp(0, 1)


def overlay_png(image: torch.Tensor, heatmap: torch.Tensor) -> bytes:
    """One overlay (``3 x H x W`` image in [0, 1], ``H x W`` heatmap) as PNG bytes."""
    import io

    from PIL import Image

    blended = overlay(image[None], heatmap[None])[0]
    buf = io.BytesIO()
    Image.fromarray((blended.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def save_filters(model: nn.Module, path: Path) -> Path:
    """The first conv layer's filters as one grid (each filter scaled to [0, 1], enlarged)."""
    from torchvision.utils import save_image

    weight = first_conv(model).weight.detach().float().cpu()
    if weight.shape[1] != 3:
        weight = weight.mean(1, keepdim=True).expand(-1, 3, -1, -1)
    low = weight.flatten(1).amin(1).view(-1, 1, 1, 1)
    high = weight.flatten(1).amax(1).view(-1, 1, 1, 1)
    scaled = (weight - low) / (high - low).clamp_min(1e-12)
    scaled = F.interpolate(scaled, scale_factor=max(1, 32 // weight.shape[-1]), mode="nearest")
    save_image(scaled, path, nrow=8, padding=2, pad_value=1.0)
    return path


def save_feature_maps(model: nn.Module, images: torch.Tensor, mean, std, path: Path) -> Path:
    """A row per image: the image, then the first channels of each stage's output."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from torchvision.utils import make_grid

    stages = stage_modules(model)
    outputs: dict[str, torch.Tensor] = {}
    handles = [m.register_forward_hook(lambda _m, _i, out, n=n: outputs.__setitem__(n, out.detach().clone().cpu()))
               for n, m in stages]
    model.eval()
    try:
        with torch.no_grad():
            model(images)
    finally:
        for handle in handles:
            handle.remove()
    shown = unnormalize(images, mean, std)
    fig, axes = plt.subplots(len(images), len(stages) + 1, figsize=(2.2 * (len(stages) + 1), 2.2 * len(images)),
                             squeeze=False)
    for row in range(len(images)):
        axes[row][0].imshow(shown[row].permute(1, 2, 0).numpy())
        axes[row][0].set_title("input", fontsize=8)
        for col, (name, _) in enumerate(stages, start=1):
            maps = outputs[name][row, :FEATURE_CHANNELS, None]
            low, high = maps.amin(dim=(1, 2, 3), keepdim=True), maps.amax(dim=(1, 2, 3), keepdim=True)
            grid = make_grid((maps - low) / (high - low).clamp_min(1e-12), nrow=4, padding=1, pad_value=1.0)
            axes[row][col].imshow(grid[0].numpy(), cmap="viridis")
            axes[row][col].set_title(f"{name} {tuple(outputs[name].shape[1:])}", fontsize=8)
    for ax in axes.flat:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def save_gallery(images: torch.Tensor, heatmaps: torch.Tensor, titles: list[str], path: Path,
                 mean, std, columns: int = 4) -> Path:
    """Grad-CAM overlays with a title each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    blended = overlay(unnormalize(images, mean, std), heatmaps)
    rows = max(1, -(-len(blended) // columns))
    fig, axes = plt.subplots(rows, columns, figsize=(2.4 * columns, 2.6 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, image, title in zip(axes.flat, blended, titles):
        ax.imshow(image.permute(1, 2, 0).numpy())
        ax.set_title(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_model_views(model: nn.Module, dataset, logits: torch.Tensor, labels: torch.Tensor,
                      classes: Sequence[str], mean, std, out: Path, device: torch.device) -> dict[str, Path]:
    """The end-of-training views of ``model`` (see the module docstring) from the test split's
    preprocessed ``dataset`` and its predictions (``logits``/``labels`` in the same order); their paths.

    Multi-label ``labels`` (N x C multi-hot): an image is misclassified when its most probable class
    is not one of its labels, and the views explain that class."""
    out = Path(out)
    files = {"filters": save_filters(model, out / "filters.png")}
    multi = labels.ndim == 2
    probs = logits.float().sigmoid() if multi else logits.float().softmax(1)
    confidence, predicted = probs.max(1)
    hit = labels[torch.arange(len(labels)), predicted] > 0.5 if multi else predicted == labels
    wrong = [int(i) for i in torch.nonzero(~hit).flatten()]
    wrong.sort(key=lambda i: -float(confidence[i]))  # the most confidently wrong first
    right = [int(i) for i in torch.nonzero(hit).flatten()][:CORRECT]
    if multi:
        names = ["+".join(classes[c] for c in torch.nonzero(row > 0.5).flatten().tolist()) or "none"
                 for row in labels]
        labels = labels.argmax(1)  # one class per image below: its first label
    else:
        names = [classes[int(y)] for y in labels]

    def batch(indices: list[int]) -> torch.Tensor:
        return torch.stack([dataset[i][0] for i in indices]).to(device)

    first_of_class: dict[int, int] = {}
    for i, label in enumerate(labels.tolist()):  # one image of each of the first classes
        first_of_class.setdefault(label, i)
    sample = list(first_of_class.values())[:FEATURE_IMAGES]
    if sample:
        files["feature_maps"] = save_feature_maps(model, batch(sample), mean, std, out / "feature_maps.png")
    for name, indices in (("gradcam_misclassified", wrong[:GALLERY]), ("gradcam_correct", right)):
        if not indices:
            continue
        images = batch(indices)
        heat, explained, _ = gradcam(model, images)
        titles = [f"true {names[i]}, pred {classes[int(c)]} ({float(probs[i, int(c)]):.2f})"
                  for i, c in zip(indices, explained)]
        files[name] = save_gallery(images.cpu(), heat, titles, out / f"{name}.png", mean, std)
    return files
