"""Adaptive discriminator augmentation (ADA) of Karras et al. 2020, "Training Generative
Adversarial Networks with Limited Data", in plain PyTorch.

The pipe is applied to every image the discriminator sees, real and generated. Each op is applied
to each image independently with probability ``p``; since all ops are differentiable and ``p``
stays below the point where augmentations "leak" into the generator (about 0.8, Sec. 2.2), the
generator learns the clean distribution. The training loop adjusts ``p`` (Sec. 3, the r_t
heuristic); here ``p`` is only a buffer, so it travels with ``state_dict``.

Ops (a subset of the paper's "bgc" pipeline, Appendix B, with simpler sampling):
- geometric, composed into one affine matrix per image and resampled once with bilinear
  ``grid_sample`` (reflection padding): x-flip, integer translation, isotropic scaling, small
  rotation;
- colour, composed into one affine colour matrix per image: brightness, contrast, saturation,
  hue rotation about the luma axis.

Images are ``[B, C, H, W]`` in about [-1, 1]; an image that drew no op is returned bit-exact.
The whole pipe is twice differentiable with respect to its input, as R1 needs.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["AugmentPipe"]


def _rotation_about_luma(theta: torch.Tensor) -> torch.Tensor:
    """[B] angles -> [B, 3, 3] rotations of RGB space about the grey axis (Rodrigues)."""
    v = torch.full((3,), 1.0 / math.sqrt(3.0), device=theta.device, dtype=theta.dtype)
    vvt = torch.outer(v, v)
    cross = torch.tensor([[0.0, -v[2], v[1]], [v[2], 0.0, -v[0]], [-v[1], v[0], 0.0]],
                         device=theta.device, dtype=theta.dtype)
    eye = torch.eye(3, device=theta.device, dtype=theta.dtype)
    c, s = theta.cos()[:, None, None], theta.sin()[:, None, None]
    return c * eye + s * cross + (1 - c) * vvt


class AugmentPipe(nn.Module):
    """Differentiable augmentations, each applied per image with probability ``p`` (ADA).

    Strengths follow Appendix B of Karras et al. 2020 except the rotation, which is kept small
    (portraits are upright) and applied with probability ``p`` rather than the paper's
    ``1 - sqrt(1 - p)`` twice.
    """

    def __init__(
        self,
        *,
        xflip: bool = True,
        translate: bool = True,
        scale: bool = True,
        rotate: bool = True,
        color: bool = True,
        translate_max: float = 0.125,  # fraction of the image size, rounded to whole pixels
        scale_std: float = 0.2,  # log2 std of the isotropic scale factor
        rotate_max_deg: float = 15.0,  # uniform in [-max, max] degrees
        brightness_std: float = 0.2,  # additive, in [-1, 1] units
        contrast_std: float = 0.5,  # log2 std of the multiplicative contrast factor
        saturation_std: float = 1.0,  # log2 std of the chroma scale about the grey axis
        hue_max: float = 1.0,  # uniform rotation in [-hue_max * pi, hue_max * pi] about grey
    ) -> None:
        super().__init__()
        self.xflip, self.translate, self.scale, self.rotate, self.color = xflip, translate, scale, rotate, color
        self.translate_max = translate_max
        self.scale_std = scale_std
        self.rotate_max = math.radians(rotate_max_deg)
        self.brightness_std = brightness_std
        self.contrast_std = contrast_std
        self.saturation_std = saturation_std
        self.hue_max = hue_max
        self.register_buffer("p", torch.zeros([]))  # augmentation probability, adjusted by the loop

    def _mask(self, b: int, device: torch.device) -> torch.Tensor:
        return torch.rand(b, device=device) < self.p  # [B] bool, no host sync

    def _geometric(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        dev = x.device
        # Matrix mapping output pixel coordinates (centred, in pixels) to input ones: [B, 3, 3].
        eye = torch.eye(3, device=dev).expand(b, 3, 3)
        mat = eye.clone()
        touched = torch.zeros(b, dtype=torch.bool, device=dev)
        if self.xflip:
            m = self._mask(b, dev) & (torch.rand(b, device=dev) < 0.5)
            flip = eye.clone()
            flip[:, 0, 0] = torch.where(m, -1.0, 1.0)
            mat, touched = mat @ flip, touched | m
        if self.translate:
            m = self._mask(b, dev)
            t = (torch.rand(b, 2, device=dev) * 2 - 1) * self.translate_max
            t = torch.round(t * torch.tensor([w, h], device=dev, dtype=t.dtype))
            tr = eye.clone()
            tr[:, :2, 2] = torch.where(m[:, None], t, 0.0)
            mat, touched = mat @ tr, touched | m
        if self.scale:
            m = self._mask(b, dev)
            s = torch.exp2(torch.randn(b, device=dev) * self.scale_std)
            s = torch.where(m, s, 1.0)
            sc = eye.clone()
            sc[:, 0, 0] = s
            sc[:, 1, 1] = s
            mat, touched = mat @ sc, touched | m
        if self.rotate:
            m = self._mask(b, dev)
            a = (torch.rand(b, device=dev) * 2 - 1) * self.rotate_max
            a = torch.where(m, a, 0.0)
            rot = eye.clone()
            rot[:, 0, 0], rot[:, 0, 1] = a.cos(), -a.sin()
            rot[:, 1, 0], rot[:, 1, 1] = a.sin(), a.cos()
            mat, touched = mat @ rot, touched | m
        # Output grid in centred pixel coordinates -> input coordinates -> normalised [-1, 1].
        ys = torch.arange(h, device=dev, dtype=torch.float32) - (h - 1) / 2
        xs = torch.arange(w, device=dev, dtype=torch.float32) - (w - 1) / 2
        gy, gx = torch.meshgrid(ys, xs, indexing="ij")
        pts = torch.stack([gx, gy, torch.ones_like(gx)], dim=-1).reshape(1, h * w, 3)  # [1, HW, 3]
        src = (pts @ mat.transpose(1, 2))[..., :2]  # [B, HW, 2]
        grid = src / torch.tensor([w / 2, h / 2], device=dev)  # align_corners=False convention
        grid = grid.reshape(b, h, w, 2).to(x.dtype)
        out = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
        return torch.where(touched[:, None, None, None], out, x)

    def _colour(self, x: torch.Tensor) -> torch.Tensor:
        b, c = x.shape[:2]
        if c != 3:
            return x
        dev = x.device
        eye3 = torch.eye(3, device=dev).expand(b, 3, 3)
        mat = eye3.clone()  # [B, 3, 3] linear part
        off = torch.zeros(b, 3, device=dev)  # [B, 3] offset
        touched = torch.zeros(b, dtype=torch.bool, device=dev)
        # brightness: x + d
        m = self._mask(b, dev)
        d = torch.where(m, torch.randn(b, device=dev) * self.brightness_std, 0.0)
        off, touched = off + d[:, None], touched | m
        # contrast: k * x (about mid grey, 0 in [-1, 1] units)
        m = self._mask(b, dev)
        k = torch.where(m, torch.exp2(torch.randn(b, device=dev) * self.contrast_std), 1.0)
        mat, off, touched = mat * k[:, None, None], off * k[:, None], touched | m
        v = torch.full((3,), 1.0 / math.sqrt(3.0), device=dev)
        vvt = torch.outer(v, v)
        # hue: rotate the chroma about the grey axis
        m = self._mask(b, dev)
        theta = torch.where(m, (torch.rand(b, device=dev) * 2 - 1) * math.pi * self.hue_max, 0.0)
        hue = torch.where(m[:, None, None], _rotation_about_luma(theta), eye3)
        mat, off, touched = hue @ mat, (hue @ off[..., None])[..., 0], touched | m
        # saturation: scale the chroma (the part orthogonal to grey)
        m = self._mask(b, dev)
        s = torch.where(m, torch.exp2(torch.randn(b, device=dev) * self.saturation_std), 1.0)
        sat = vvt + (eye3 - vvt) * s[:, None, None]
        mat, off, touched = sat @ mat, (sat @ off[..., None])[..., 0], touched | m
        out = torch.einsum("bij,bjhw->bihw", mat.to(x.dtype), x) + off.to(x.dtype)[:, :, None, None]
        return torch.where(touched[:, None, None, None], out, x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] -> [B, C, H, W], each op applied per image with probability ``p``."""
        if x.ndim != 4:
            raise ValueError(f"expected [B, C, H, W], got {tuple(x.shape)}")
        if self.xflip or self.translate or self.scale or self.rotate:
            x = self._geometric(x)
        if self.color:
            x = self._colour(x)
        return x
