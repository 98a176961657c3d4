"""Saliency maps for a saliency memory, computed trainer-side where the model is (SAMC, SDM 2023).

:func:`grad_cam` gives each image a map in [0, 1] at input size: Grad-CAM on a convolutional
layer (the last block, normally), for the class the model predicts among ``classes`` (the current
task's). Hand the maps to ``add(..., saliency=maps)`` of a ``kind = "saliency"`` memory; its codec
keeps the pixels whose saliency is >= ``theta`` (:mod:`carousel.kinds.saliency_codec`).

>>> import torch
>>> from torch import nn
>>> net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
...                     nn.Linear(4, 3))
>>> maps = grad_cam(net, torch.rand(2, 1, 8, 8), net[1], classes=[0, 1])
>>> maps.shape, bool(maps.min() >= 0), bool(maps.max() <= 1)
(torch.Size([2, 8, 8]), True, True)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def grad_cam(model: nn.Module, x: torch.Tensor, layer: nn.Module, classes: Sequence[int] | None = None
             ) -> torch.Tensor:
    """Grad-CAM maps ``(n, H, W)`` in [0, 1] for a normalized image batch ``x`` ``(n, C, H, W)``.

    The target of each image is the class with the highest logit among ``classes`` (all classes
    when None). Maps are ReLU(sum_k alpha_k A_k) with alpha_k the spatial mean of the target
    logit's gradient w.r.t. channel k of ``layer``'s output ``A``, bilinearly resized to the input
    size and min-max normalized per image; an image whose map is flat (no positive evidence) gets
    all ones -- keep everything rather than nothing. The model runs in eval mode (batch-norm
    statistics untouched) and its parameters' gradients are not touched either.
    """
    if x.ndim != 4:
        raise ValueError(f"grad_cam needs an image batch (n, C, H, W), got shape {tuple(x.shape)}")
    captured: list[torch.Tensor] = []
    handle = layer.register_forward_hook(lambda _m, _i, out: captured.append(out))
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad():
            logits = model(x)
            if not captured:
                raise ValueError("the layer given to grad_cam did not run in the model's forward pass")
            acts = captured[-1]
            cand = torch.arange(logits.shape[1], device=logits.device) if classes is None else \
                torch.as_tensor(list(classes), device=logits.device, dtype=torch.long)
            target = cand[logits[:, cand].argmax(dim=1)]
            score = logits.gather(1, target[:, None]).sum()
            (grads,) = torch.autograd.grad(score, acts)
    finally:
        handle.remove()
        model.train(was_training)
    with torch.no_grad():
        alpha = grads.mean(dim=(2, 3), keepdim=True)
        cam = F.relu((alpha * acts).sum(dim=1, keepdim=True))
        cam = F.interpolate(cam, size=x.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
        lo = cam.amin(dim=(1, 2), keepdim=True)
        span = cam.amax(dim=(1, 2), keepdim=True) - lo
        flat = span <= 1e-12
        cam = torch.where(flat, torch.ones_like(cam), (cam - lo) / torch.where(flat, torch.ones_like(span), span))
    return cam.clamp_(0.0, 1.0).detach()


def last_conv_block(model: nn.Module) -> nn.Module:
    """The module whose output Grad-CAM should look at: ``model.layer4`` for the ResNets, else the
    last ``Conv2d`` in the model."""
    if hasattr(model, "layer4"):
        return model.layer4
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    if not convs:
        raise ValueError(f"{type(model).__name__} has no convolutional layer for Grad-CAM")
    return convs[-1]
