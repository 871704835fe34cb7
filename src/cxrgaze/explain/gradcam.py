"""Grad-CAM (Selvaraju et al. 2017) on the deepest encoder feature map, via ``pytorch-grad-cam``.

``pytorch_grad_cam`` hooks one module that outputs one tensor and calls a model that
returns logits; a :class:`~cxrgaze.models.GazeNet` returns a pair (U-Net) and its encoder a
list, so :func:`gradcam` runs a wrapper ``head(last_features(preprocess(x)))`` whose
``last_features`` (``encoder(x)[-1]``) is the hooked layer. The model's own modules get no
hooks, and the model's train/eval modes, ``requires_grad`` flags and ``.grad`` tensors are
as before the call.
"""

from __future__ import annotations

import numpy as np
import torch
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from torch import Tensor, nn

from cxrgaze.models import GazeNet


class _LastFeatures(nn.Module):
    """The deepest encoder feature map ``encoder(x)[-1]`` as a module's one output."""

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, x: Tensor) -> Tensor:
        return self.encoder(x)[-1]  # (B, C, h, w)


class _Classifier(nn.Module):
    """Grey ``(B, 1, H, W)`` -> class logits ``(B, K)`` through the encoder and the head."""

    def __init__(self, model: GazeNet) -> None:
        super().__init__()
        self.preprocess = model.preprocess  # a bound method, not a submodule
        self.last_features = _LastFeatures(model.encoder)
        self.head = model.classification_head

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.last_features(self.preprocess(x)))

    def zero_grad(self, set_to_none: bool = True) -> None:
        """No-op: ``pytorch_grad_cam`` calls it before its backward pass, which would
        clear the caller's ``.grad`` tensors; the parameters do not require grad there."""


def gradcam(model: GazeNet, images: Tensor, target: Tensor | None = None) -> np.ndarray:
    """Grad-CAM maps ``(B, H, W)`` float32 in [0, 1] of ``images`` ``(B, 1, H, W)`` in [0, 1].

    ``target`` (B,) class indices; ``None`` takes each image's predicted class. The maps
    are computed in eval mode (BatchNorm running statistics, no dropout) whatever the
    model's mode, on the deepest encoder feature map (``H / 32`` by ``W / 32`` for the
    usual encoders), upsampled bilinearly and min-max scaled per image. A map is all
    zero where the ReLU'd weighted sum of the feature channels is constant (for example
    a 1 x 1 feature map, i.e. images under 64 pixels). Not usable inside
    ``torch.inference_mode``.
    """
    if images.ndim != 4 or images.shape[1] != 1:
        raise ValueError(f"expected grey images of shape (B, 1, H, W), got {tuple(images.shape)}")
    targets = None
    if target is not None:
        if target.shape != (images.shape[0],):
            raise ValueError(f"target must have shape ({images.shape[0]},), got {tuple(target.shape)}")
        targets = [ClassifierOutputTarget(int(k)) for k in target.tolist()]

    modes = [(m, m.training) for m in model.modules()]
    params = list(model.parameters())
    requires = [p.requires_grad for p in params]
    # Gradients reach the hooked feature map through the input only, so none land on
    # the parameters.
    x = images.detach().clone().requires_grad_(True)
    try:
        for p in params:
            p.requires_grad_(False)
        with torch.enable_grad():
            # GradCAM's constructor registers the hooks and puts the wrapper in eval mode.
            wrapper = _Classifier(model)
            cam = GradCAM(model=wrapper, target_layers=[wrapper.last_features])
            try:
                maps = cam(input_tensor=x, targets=targets)  # (B, H, W)
            finally:
                cam.activations_and_grads.release()
    finally:
        for p, flag in zip(params, requires):
            p.requires_grad_(flag)
        for m, flag in modes:
            m.train(flag)
    return np.asarray(maps, dtype=np.float32)
