"""imgcls_core.explain: filters, feature maps and Grad-CAM of a trained model, as end-of-training artifacts."""

from __future__ import annotations

import pytest
import torch


def test_gradcam_heatmaps_are_per_image_in_0_1_for_the_predicted_class_and_leave_no_gradient():
    from imgcls_core.explain import gradcam
    from imgcls_core.models import create_model

    torch.manual_seed(0)
    model = create_model("resnet18", 5, small_input=True, width=0.25)
    images = torch.randn(3, 3, 32, 32)
    heat, classes, probs = gradcam(model, images)
    assert heat.shape == (3, 32, 32) and heat.min() >= 0
    assert torch.allclose(heat.flatten(1).amax(1), torch.ones(3))
    with torch.no_grad():
        logits = model(images)
    assert torch.equal(classes, logits.argmax(1))
    assert torch.allclose(probs, logits.softmax(1).amax(1), atol=1e-6)
    assert all(p.grad is None for p in model.parameters())
    other = (classes + 1) % 5  # another class explains other evidence
    assert not torch.allclose(gradcam(model, images, other)[0], heat)


def test_gradcam_equals_the_textbook_computation_without_recording_the_stages_before_the_last():
    """The same heatmaps as Grad-CAM with the whole forward pass recorded, while the stages before
    the last one run without autograd (what bounds an explained batch's memory on a replica)."""
    import torch.nn.functional as F

    from imgcls_core.explain import gradcam
    from imgcls_core.models import create_model

    torch.manual_seed(0)
    model = create_model("resnet18", 5, small_input=True, width=0.25).eval()
    images = torch.randn(4, 3, 32, 32)
    maps: list[torch.Tensor] = []
    handle = model.get_submodule("layer4").register_forward_hook(lambda _m, _i, out: maps.append(out))
    logits = model(images)
    handle.remove()
    (grad,) = torch.autograd.grad(logits.gather(1, logits.argmax(1)[:, None]).sum(), maps[0])
    cam = torch.relu((grad.mean(dim=(2, 3), keepdim=True) * maps[0]).sum(1, keepdim=True))
    cam = F.interpolate(cam, size=(32, 32), mode="bilinear", align_corners=False)[:, 0].detach()
    expected = cam / cam.flatten(1).amax(1).clamp_min(1e-12)[:, None, None]

    recorded: list[bool] = []
    hooks = [model.get_submodule(name).register_forward_hook(lambda _m, _i, out: recorded.append(out.requires_grad))
             for name in ("layer3", "fc")]
    heat, _, _ = gradcam(model, images)
    for hook in hooks:
        hook.remove()
    assert torch.allclose(heat, expected, atol=1e-6)
    assert recorded == [False, True]  # layer3's output not recorded; the head after layer4 is
    assert torch.is_grad_enabled()  # the caller's grad mode is back


def test_gradcam_follows_the_evidence(tiny_config, tmp_path):
    """A cnn3 whose one class fires on bright pixels: its heatmap peaks on the bright half."""
    from imgcls_core.explain import gradcam
    from imgcls_core.models import create_model

    model = create_model("cnn3", 2, width=0.25)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Conv2d):
                module.weight.fill_(0.0)
                module.weight[:, :, 1, 1] = 1.0 / module.weight.shape[1]  # identity-like: brightness flows through
                if module.bias is not None:
                    module.bias.zero_()
        model.fc.weight.fill_(0.0)
        model.fc.weight[1] = 1.0
        model.fc.bias.zero_()
    image = torch.zeros(1, 3, 32, 32)
    image[..., :, 16:] = 1.0  # the right half is bright
    heat, classes, _ = gradcam(model, image, torch.tensor([1]))
    assert heat[0, :, 16:].mean() > 4 * heat[0, :, :16].mean()


def test_a_finished_run_writes_filters_feature_maps_and_gradcam_galleries(tiny_config, tmp_path):
    from PIL import Image

    from imgcls_core.runner import train_and_evaluate

    cfg = tiny_config("train.epochs=1", "optim.lr=0.01", f"train.output_dir={tmp_path / 'views'}")
    result = train_and_evaluate(cfg, log=lambda _m: None)
    out = tmp_path / "views"
    for name in ("filters", "feature_maps", "gradcam_misclassified", "gradcam_correct"):
        assert result.files[name] == out / f"{name}.png"
        with Image.open(out / f"{name}.png") as image:
            assert image.format == "PNG" and min(image.size) > 20
    assert result.test.acc1 < 1.0  # one epoch at a low LR: there are misclassified images to show


def test_overlay_png_is_an_image_of_the_input_size():
    import io

    from PIL import Image

    from imgcls_core.explain import overlay_png

    png = overlay_png(torch.rand(3, 20, 24), torch.rand(20, 24))
    with Image.open(io.BytesIO(png)) as image:
        assert image.size == (24, 20) and image.mode == "RGB"
