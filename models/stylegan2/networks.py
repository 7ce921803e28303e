"""StyleGAN2-ADA generator and discriminator, compatible with the official state dicts.

Architecture of Karras et al. 2020, "Analyzing and Improving the Image Quality of StyleGAN"
(StyleGAN2: weight demodulation, skip generator, residual discriminator) with the configuration
and conditioning of Karras et al. 2020, "Training Generative Adversarial Networks with Limited
Data" (StyleGAN2-ADA). Parameter and buffer names, shapes, constructor keywords and the order of
floating-point operations follow NVlabs/stylegan2-ada-pytorch, so an official ``state_dict()``
loads one to one (``load_state_dict(strict=True)``) and reproduces the official outputs.

Half precision (``num_fp16_res``) is used only on CUDA; elsewhere those blocks run in float32.
On CUDA, float32 parity (~1e-5) needs TF32 off (``torch.backends.cudnn.allow_tf32 = False``,
``torch.backends.cuda.matmul.allow_tf32 = False``); with TF32 on, outputs differ by ~1e-2.
This module does no file I/O; see ``pipelines/stylegan_io.py`` for loading and saving.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
from torch import nn

from .ops import (
    ACTIVATIONS,
    bias_act,
    conv2d_resample,
    downsample2d,
    modulated_conv2d,
    normalize_2nd_moment,
    setup_filter,
    upsample2d,
)

__all__ = [
    "FullyConnectedLayer",
    "Conv2dLayer",
    "MappingNetwork",
    "SynthesisLayer",
    "ToRGBLayer",
    "SynthesisBlock",
    "SynthesisNetwork",
    "Generator",
    "DiscriminatorBlock",
    "MinibatchStdLayer",
    "DiscriminatorEpilogue",
    "Discriminator",
]

NOISE_MODES = ("random", "const", "none")


def _assert_shape(x: torch.Tensor, shape: list[int | None], name: str) -> None:
    """Check ``x.shape`` against ``shape`` (``None`` matches any size)."""
    ok = (
        isinstance(x, torch.Tensor)
        and x.ndim == len(shape)
        and all(s is None or int(d) == s for d, s in zip(x.shape, shape))
    )
    if not ok:
        expected = "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"
        got = list(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{name}: expected shape {expected}, got {got}")


def _half_precision(use_fp16: bool, force_fp32: bool, device: torch.device) -> bool:
    """Blocks marked fp16 run in half precision only on CUDA (CPU convolutions stay float32)."""
    return use_fp16 and not force_fp32 and device.type == "cuda"


def _plain(value: Any) -> Any:
    """Deep-copy constructor arguments into plain JSON-friendly containers."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return copy.deepcopy(value)


# ---------------------------------------------------------------------------------------------
# Basic layers
# ---------------------------------------------------------------------------------------------


class FullyConnectedLayer(nn.Module):
    """Dense layer with equalised learning rate (Karras et al. 2018, Sec. 4.1).

    The weight is stored divided by ``lr_multiplier`` and rescaled at run time by
    ``lr_multiplier / sqrt(in_features)``, which makes the effective learning rate of the layer
    ``lr_multiplier`` times that of the optimiser.
    """

    def __init__(
        self,
        in_features: int,  # input width
        out_features: int,  # output width
        bias: bool = True,  # add a bias before the activation
        activation: str = "linear",  # 'linear', 'lrelu', ... (see ops.ACTIVATIONS)
        lr_multiplier: float = 1,  # learning-rate multiplier (0.01 in the mapping network)
        bias_init: float = 0,  # initial bias value (1 for style affines: styles start at 1)
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.activation = activation
        self.weight = nn.Parameter(torch.randn([out_features, in_features]) / lr_multiplier)
        self.bias = nn.Parameter(torch.full([out_features], float(bias_init))) if bias else None
        self.weight_gain = lr_multiplier / math.sqrt(in_features)
        self.bias_gain = lr_multiplier

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, in] -> [B, out]
        w = self.weight.to(x.dtype) * self.weight_gain
        b = self.bias
        if b is not None:
            b = b.to(x.dtype)
            if self.bias_gain != 1:
                b = b * self.bias_gain
        if self.activation == "linear" and b is not None:
            return torch.addmm(b.unsqueeze(0), x, w.t())
        return bias_act(x.matmul(w.t()), b, act=self.activation)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, activation={self.activation}"


class Conv2dLayer(nn.Module):
    """Convolution with equalised learning rate, optional FIR up/downsampling and output clamp."""

    def __init__(
        self,
        in_channels: int,  # input channels
        out_channels: int,  # output channels
        kernel_size: int,  # square kernel size in pixels
        bias: bool = True,  # add a bias before the activation
        activation: str = "linear",  # activation function
        up: int = 1,  # integer upsampling factor
        down: int = 1,  # integer downsampling factor
        resample_filter: list[float] | None = None,  # FIR taps for resampling, None = [1, 3, 3, 1]
        conv_clamp: float | None = None,  # clamp outputs to +-conv_clamp, None = no clamp
        channels_last: bool = False,  # store the weight channels-last (a speed hint only)
        trainable: bool = True,  # False = weight and bias are buffers (Freeze-D)
    ) -> None:
        super().__init__()
        self.activation = activation
        self.up = up
        self.down = down
        self.conv_clamp = conv_clamp
        self.register_buffer("resample_filter", setup_filter([1, 3, 3, 1] if resample_filter is None else resample_filter))
        self.padding = kernel_size // 2
        self.weight_gain = 1 / math.sqrt(in_channels * kernel_size**2)
        self.act_gain = ACTIVATIONS[activation].def_gain

        memory_format = torch.channels_last if channels_last else torch.contiguous_format
        weight = torch.randn([out_channels, in_channels, kernel_size, kernel_size]).to(memory_format=memory_format)
        bias_tensor = torch.zeros([out_channels]) if bias else None
        if trainable:
            self.weight = nn.Parameter(weight)
            self.bias = nn.Parameter(bias_tensor) if bias_tensor is not None else None
        else:
            self.register_buffer("weight", weight)
            if bias_tensor is not None:
                self.register_buffer("bias", bias_tensor)
            else:
                self.bias = None

    def forward(self, x: torch.Tensor, gain: float = 1) -> torch.Tensor:
        w = self.weight * self.weight_gain
        b = self.bias.to(x.dtype) if self.bias is not None else None
        x = conv2d_resample(
            x, w.to(x.dtype), f=self.resample_filter, up=self.up, down=self.down, padding=self.padding,
            flip_weight=(self.up == 1),  # correlation is slightly faster; transposed conv needs a flip
        )
        act_clamp = self.conv_clamp * gain if self.conv_clamp is not None else None
        return bias_act(x, b, act=self.activation, gain=self.act_gain * gain, clamp=act_clamp)


# ---------------------------------------------------------------------------------------------
# Generator
# ---------------------------------------------------------------------------------------------


class MappingNetwork(nn.Module):
    """z (+ label c) -> w: an MLP of ``num_layers`` equalised dense layers (Karras et al. 2019).

    Also tracks ``w_avg``, the running mean of w used for the truncation trick.
    """

    def __init__(
        self,
        z_dim: int,  # latent z width, 0 = no latent (the discriminator's label mapping)
        c_dim: int,  # label width, 0 = unconditional
        w_dim: int,  # intermediate latent w width
        num_ws: int | None,  # copies of w to output, None = return [B, w_dim] without broadcasting
        num_layers: int = 8,  # dense layers
        embed_features: int | None = None,  # label embedding width, None = w_dim
        layer_features: int | None = None,  # hidden width, None = w_dim
        activation: str = "lrelu",  # hidden activation
        lr_multiplier: float = 0.01,  # learning-rate multiplier of the dense layers
        w_avg_beta: float | None = 0.995,  # decay of the w_avg moving average, None = do not track
    ) -> None:
        super().__init__()
        self.z_dim = z_dim
        self.c_dim = c_dim
        self.w_dim = w_dim
        self.num_ws = num_ws
        self.num_layers = num_layers
        self.w_avg_beta = w_avg_beta

        if embed_features is None:
            embed_features = w_dim
        if c_dim == 0:
            embed_features = 0
        if layer_features is None:
            layer_features = w_dim
        features = [z_dim + embed_features] + [layer_features] * (num_layers - 1) + [w_dim]

        if c_dim > 0:
            self.embed = FullyConnectedLayer(c_dim, embed_features)
        for idx in range(num_layers):
            layer = FullyConnectedLayer(features[idx], features[idx + 1], activation=activation, lr_multiplier=lr_multiplier)
            setattr(self, f"fc{idx}", layer)
        if num_ws is not None and w_avg_beta is not None:
            self.register_buffer("w_avg", torch.zeros([w_dim]))

    def forward(
        self,
        z: torch.Tensor | None,  # [B, z_dim]
        c: torch.Tensor | None,  # [B, c_dim]
        truncation_psi: float = 1,
        truncation_cutoff: int | None = None,
        skip_w_avg_update: bool = False,
    ) -> torch.Tensor:  # [B, num_ws, w_dim] (or [B, w_dim] when num_ws is None)
        # Normalise and concatenate the inputs.
        x = None
        if self.z_dim > 0:
            _assert_shape(z, [None, self.z_dim], "z")
            x = normalize_2nd_moment(z.to(torch.float32))
        if self.c_dim > 0:
            _assert_shape(c, [None, self.c_dim], "c")
            y = normalize_2nd_moment(self.embed(c.to(torch.float32)))
            x = torch.cat([x, y], dim=1) if x is not None else y

        for idx in range(self.num_layers):
            x = getattr(self, f"fc{idx}")(x)

        # Track the mean of w while training (the truncation centre).
        if self.w_avg_beta is not None and self.training and not skip_w_avg_update:
            with torch.no_grad():
                self.w_avg.copy_(x.detach().mean(dim=0).lerp(self.w_avg, self.w_avg_beta))

        if self.num_ws is not None:
            x = x.unsqueeze(1).repeat([1, self.num_ws, 1])

        # Truncation trick: w' = w_avg + psi * (w - w_avg), optionally on the first layers only.
        if truncation_psi != 1:
            if self.w_avg_beta is None:
                raise ValueError("truncation needs w_avg, but this mapping network does not track it")
            if self.num_ws is None or truncation_cutoff is None:
                x = self.w_avg.lerp(x, truncation_psi)
            else:
                head = self.w_avg.lerp(x[:, :truncation_cutoff], truncation_psi)
                x = torch.cat([head, x[:, truncation_cutoff:]], dim=1)
        return x


class SynthesisLayer(nn.Module):
    """Style-modulated 3x3 convolution + per-pixel noise + bias + lrelu (StyleGAN2 Fig. 2d)."""

    def __init__(
        self,
        in_channels: int,  # input channels
        out_channels: int,  # output channels
        w_dim: int,  # width of w
        resolution: int,  # output resolution in pixels
        kernel_size: int = 3,  # convolution kernel size
        up: int = 1,  # integer upsampling factor (2 in the first layer of a block)
        use_noise: bool = True,  # add per-pixel noise
        activation: str = "lrelu",  # activation function
        resample_filter: list[float] | None = None,  # FIR taps for upsampling, None = [1, 3, 3, 1]
        conv_clamp: float | None = None,  # clamp outputs to +-conv_clamp, None = no clamp
        channels_last: bool = False,  # store the weight channels-last (a speed hint only)
    ) -> None:
        super().__init__()
        self.resolution = resolution
        self.up = up
        self.use_noise = use_noise
        self.activation = activation
        self.conv_clamp = conv_clamp
        self.register_buffer("resample_filter", setup_filter([1, 3, 3, 1] if resample_filter is None else resample_filter))
        self.padding = kernel_size // 2
        self.act_gain = ACTIVATIONS[activation].def_gain

        self.affine = FullyConnectedLayer(w_dim, in_channels, bias_init=1)
        memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.weight = nn.Parameter(
            torch.randn([out_channels, in_channels, kernel_size, kernel_size]).to(memory_format=memory_format)
        )
        if use_noise:
            self.register_buffer("noise_const", torch.randn([resolution, resolution]))
            self.noise_strength = nn.Parameter(torch.zeros([]))
        self.bias = nn.Parameter(torch.zeros([out_channels]))

    def forward(
        self,
        x: torch.Tensor,  # [B, in_channels, resolution // up, resolution // up]
        w: torch.Tensor,  # [B, w_dim]
        noise_mode: str = "random",
        fused_modconv: bool = True,
        gain: float = 1,
        generator: torch.Generator | None = None,  # draws the 'random' noise
    ) -> torch.Tensor:  # [B, out_channels, resolution, resolution]
        if noise_mode not in NOISE_MODES:
            raise ValueError(f"noise_mode must be one of {NOISE_MODES}, got {noise_mode!r}")
        in_resolution = self.resolution // self.up
        _assert_shape(x, [None, self.weight.shape[1], in_resolution, in_resolution], "SynthesisLayer input")
        styles = self.affine(w)

        noise = None
        if self.use_noise and noise_mode == "random":
            shape = [x.shape[0], 1, self.resolution, self.resolution]
            noise = torch.randn(shape, device=x.device, generator=generator) * self.noise_strength
        if self.use_noise and noise_mode == "const":
            noise = self.noise_const * self.noise_strength

        x = modulated_conv2d(
            x, self.weight, styles, noise=noise, up=self.up, padding=self.padding,
            resample_filter=self.resample_filter, flip_weight=(self.up == 1), fused_modconv=fused_modconv,
        )
        act_clamp = self.conv_clamp * gain if self.conv_clamp is not None else None
        return bias_act(x, self.bias.to(x.dtype), act=self.activation, gain=self.act_gain * gain, clamp=act_clamp)


class ToRGBLayer(nn.Module):
    """Modulated 1x1 convolution to image channels, without demodulation (StyleGAN2 Sec. 4.1)."""

    def __init__(
        self,
        in_channels: int,  # feature channels
        out_channels: int,  # image channels
        w_dim: int,  # width of w
        kernel_size: int = 1,  # convolution kernel size
        conv_clamp: float | None = None,  # clamp outputs to +-conv_clamp, None = no clamp
        channels_last: bool = False,  # store the weight channels-last (a speed hint only)
    ) -> None:
        super().__init__()
        self.conv_clamp = conv_clamp
        self.affine = FullyConnectedLayer(w_dim, in_channels, bias_init=1)
        memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.weight = nn.Parameter(
            torch.randn([out_channels, in_channels, kernel_size, kernel_size]).to(memory_format=memory_format)
        )
        self.bias = nn.Parameter(torch.zeros([out_channels]))
        self.weight_gain = 1 / math.sqrt(in_channels * kernel_size**2)

    def forward(self, x: torch.Tensor, w: torch.Tensor, fused_modconv: bool = True) -> torch.Tensor:
        styles = self.affine(w) * self.weight_gain  # [B, in_channels]
        x = modulated_conv2d(x, self.weight, styles, demodulate=False, fused_modconv=fused_modconv)
        return bias_act(x, self.bias.to(x.dtype), clamp=self.conv_clamp)


class SynthesisBlock(nn.Module):
    """One resolution of the synthesis network: (up-)conv, conv, and the toRGB branch.

    ``architecture='skip'`` (the StyleGAN2 default, Fig. 7b) sums upsampled toRGB outputs of all
    resolutions; 'resnet' adds a residual 1x1 path; 'orig' emits RGB at the last block only.
    """

    def __init__(
        self,
        in_channels: int,  # input channels, 0 = first block (starts from a learned constant)
        out_channels: int,  # output channels
        w_dim: int,  # width of w
        resolution: int,  # resolution of this block in pixels
        img_channels: int,  # image channels
        is_last: bool,  # last block (always has a toRGB)
        architecture: str = "skip",  # 'orig', 'skip' or 'resnet'
        resample_filter: list[float] | None = None,  # FIR taps for upsampling, None = [1, 3, 3, 1]
        conv_clamp: float | None = None,  # clamp conv outputs to +-conv_clamp, None = no clamp
        use_fp16: bool = False,  # run this block in half precision (CUDA only)
        fp16_channels_last: bool = False,  # channels-last memory format for fp16 blocks
        **layer_kwargs: Any,  # passed to SynthesisLayer (use_noise, activation, kernel_size)
    ) -> None:
        if architecture not in ("orig", "skip", "resnet"):
            raise ValueError(f"architecture must be 'orig', 'skip' or 'resnet', got {architecture!r}")
        super().__init__()
        resample_filter = [1, 3, 3, 1] if resample_filter is None else resample_filter
        self.in_channels = in_channels
        self.w_dim = w_dim
        self.resolution = resolution
        self.img_channels = img_channels
        self.is_last = is_last
        self.architecture = architecture
        self.use_fp16 = use_fp16
        self.channels_last = use_fp16 and fp16_channels_last
        self.register_buffer("resample_filter", setup_filter(resample_filter))
        self.num_conv = 0  # ws consumed by convolutions
        self.num_torgb = 0  # ws consumed by toRGB

        if in_channels == 0:
            self.const = nn.Parameter(torch.randn([out_channels, resolution, resolution]))
        else:
            self.conv0 = SynthesisLayer(
                in_channels, out_channels, w_dim=w_dim, resolution=resolution, up=2,
                resample_filter=resample_filter, conv_clamp=conv_clamp, channels_last=self.channels_last,
                **layer_kwargs,
            )
            self.num_conv += 1
        self.conv1 = SynthesisLayer(
            out_channels, out_channels, w_dim=w_dim, resolution=resolution,
            conv_clamp=conv_clamp, channels_last=self.channels_last, **layer_kwargs,
        )
        self.num_conv += 1
        if is_last or architecture == "skip":
            self.torgb = ToRGBLayer(
                out_channels, img_channels, w_dim=w_dim, conv_clamp=conv_clamp, channels_last=self.channels_last
            )
            self.num_torgb += 1
        if in_channels != 0 and architecture == "resnet":
            self.skip = Conv2dLayer(
                in_channels, out_channels, kernel_size=1, bias=False, up=2,
                resample_filter=resample_filter, channels_last=self.channels_last,
            )

    def forward(
        self,
        x: torch.Tensor | None,  # [B, in_channels, resolution / 2, resolution / 2], None in the first block
        img: torch.Tensor | None,  # [B, img_channels, resolution / 2, resolution / 2] or None
        ws: torch.Tensor,  # [B, num_conv + num_torgb, w_dim]
        force_fp32: bool = False,
        fused_modconv: bool | None = None,
        **layer_kwargs: Any,  # noise_mode, generator
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        _assert_shape(ws, [None, self.num_conv + self.num_torgb, self.w_dim], f"ws of block {self.resolution}")
        w_iter = iter(ws.unbind(dim=1))
        half = _half_precision(self.use_fp16, force_fp32, ws.device)
        dtype = torch.float16 if half else torch.float32
        memory_format = torch.channels_last if self.channels_last and half else torch.contiguous_format
        if fused_modconv is None:
            # Grouped convolution is faster at inference; training uses the unfused form.
            fused_modconv = (not self.training) and (dtype == torch.float32 or int(ws.shape[0]) == 1)

        # Input.
        if self.in_channels == 0:
            x = self.const.to(dtype=dtype, memory_format=memory_format)
            x = x.unsqueeze(0).repeat([ws.shape[0], 1, 1, 1])
        else:
            _assert_shape(x, [None, self.in_channels, self.resolution // 2, self.resolution // 2], "block input")
            x = x.to(dtype=dtype, memory_format=memory_format)

        # Main layers.
        if self.in_channels == 0:
            x = self.conv1(x, next(w_iter), fused_modconv=fused_modconv, **layer_kwargs)
        elif self.architecture == "resnet":
            y = self.skip(x, gain=math.sqrt(0.5))
            x = self.conv0(x, next(w_iter), fused_modconv=fused_modconv, **layer_kwargs)
            x = self.conv1(x, next(w_iter), fused_modconv=fused_modconv, gain=math.sqrt(0.5), **layer_kwargs)
            x = y + x
        else:
            x = self.conv0(x, next(w_iter), fused_modconv=fused_modconv, **layer_kwargs)
            x = self.conv1(x, next(w_iter), fused_modconv=fused_modconv, **layer_kwargs)

        # ToRGB: the image so far is upsampled with the [1, 3, 3, 1] filter and this block's RGB added.
        if img is not None:
            _assert_shape(img, [None, self.img_channels, self.resolution // 2, self.resolution // 2], "block image")
            img = upsample2d(img, self.resample_filter)
        if self.is_last or self.architecture == "skip":
            y = self.torgb(x, next(w_iter), fused_modconv=fused_modconv)
            y = y.to(dtype=torch.float32, memory_format=torch.contiguous_format)
            img = img + y if img is not None else y

        assert x.dtype == dtype
        assert img is None or img.dtype == torch.float32
        return x, img


class SynthesisNetwork(nn.Module):
    """ws -> image: a chain of :class:`SynthesisBlock` from 4x4 to ``img_resolution``."""

    def __init__(
        self,
        w_dim: int,  # width of w
        img_resolution: int,  # output resolution, a power of two >= 4
        img_channels: int,  # image channels
        channel_base: int = 32768,  # channels at resolution r are min(channel_base // r, channel_max)
        channel_max: int = 512,  # maximum channels of any block
        num_fp16_res: int = 0,  # run the N highest resolutions in fp16 (CUDA only)
        **block_kwargs: Any,  # passed to SynthesisBlock (architecture, conv_clamp, ...)
    ) -> None:
        if img_resolution < 4 or img_resolution & (img_resolution - 1) != 0:
            raise ValueError(f"img_resolution must be a power of two >= 4, got {img_resolution}")
        super().__init__()
        self.w_dim = w_dim
        self.img_resolution = img_resolution
        self.img_resolution_log2 = int(math.log2(img_resolution))
        self.img_channels = img_channels
        self.block_resolutions = [2**i for i in range(2, self.img_resolution_log2 + 1)]
        channels = {res: min(channel_base // res, channel_max) for res in self.block_resolutions}
        fp16_resolution = max(2 ** (self.img_resolution_log2 + 1 - num_fp16_res), 8)

        self.num_ws = 0
        for res in self.block_resolutions:
            is_last = res == img_resolution
            block = SynthesisBlock(
                channels[res // 2] if res > 4 else 0, channels[res], w_dim=w_dim, resolution=res,
                img_channels=img_channels, is_last=is_last, use_fp16=(res >= fp16_resolution), **block_kwargs,
            )
            self.num_ws += block.num_conv
            if is_last:
                self.num_ws += block.num_torgb
            setattr(self, f"b{res}", block)

    def forward(self, ws: torch.Tensor, **block_kwargs: Any) -> torch.Tensor:
        """``ws``: ``[B, num_ws, w_dim]`` -> image ``[B, img_channels, R, R]`` (about [-1, 1]).

        Keywords: ``noise_mode`` ('random' | 'const' | 'none'), ``generator`` (for 'random'),
        ``force_fp32``, ``fused_modconv``.
        """
        _assert_shape(ws, [None, self.num_ws, self.w_dim], "ws")
        ws = ws.to(torch.float32)
        x = img = None
        w_idx = 0
        for res in self.block_resolutions:
            block = getattr(self, f"b{res}")
            # Consecutive blocks share one w: a block's toRGB uses the next block's first w.
            block_ws = ws.narrow(1, w_idx, block.num_conv + block.num_torgb)
            w_idx += block.num_conv
            x, img = block(x, img, block_ws, **block_kwargs)
        return img


class Generator(nn.Module):
    """StyleGAN2-ADA generator: ``G(z, c) = synthesis(mapping(z, c))``.

    Keyword names match the official ``training.networks.Generator``; :attr:`init_kwargs` holds
    the constructor arguments (JSON-serialisable) so a config rebuilds the same network.
    """

    def __init__(
        self,
        z_dim: int,  # latent z width
        c_dim: int,  # label width, 0 = unconditional
        w_dim: int,  # intermediate latent w width
        img_resolution: int,  # output resolution (4 ... 1024, a power of two)
        img_channels: int,  # output channels (3 = RGB)
        mapping_kwargs: dict[str, Any] | None = None,  # MappingNetwork arguments
        synthesis_kwargs: dict[str, Any] | None = None,  # SynthesisNetwork / block / layer arguments
    ) -> None:
        super().__init__()
        mapping_kwargs = _plain(mapping_kwargs or {})
        synthesis_kwargs = _plain(synthesis_kwargs or {})
        self._init_kwargs = dict(
            z_dim=z_dim, c_dim=c_dim, w_dim=w_dim, img_resolution=img_resolution, img_channels=img_channels,
            mapping_kwargs=mapping_kwargs, synthesis_kwargs=synthesis_kwargs,
        )
        self.z_dim = z_dim
        self.c_dim = c_dim
        self.w_dim = w_dim
        self.img_resolution = img_resolution
        self.img_channels = img_channels
        self.synthesis = SynthesisNetwork(
            w_dim=w_dim, img_resolution=img_resolution, img_channels=img_channels, **synthesis_kwargs
        )
        self.num_ws = self.synthesis.num_ws
        self.mapping = MappingNetwork(z_dim=z_dim, c_dim=c_dim, w_dim=w_dim, num_ws=self.num_ws, **mapping_kwargs)

    @property
    def init_kwargs(self) -> dict[str, Any]:
        """The constructor arguments (a deep copy): ``Generator(**G.init_kwargs)`` rebuilds it."""
        return copy.deepcopy(self._init_kwargs)

    def forward(
        self,
        z: torch.Tensor,  # [B, z_dim]
        c: torch.Tensor | None,  # [B, c_dim]; ignored (may be None or [B, 0]) when c_dim == 0
        truncation_psi: float = 1,
        truncation_cutoff: int | None = None,
        noise_mode: str = "random",  # 'random' | 'const' | 'none'
        **synthesis_kwargs: Any,  # generator, force_fp32, fused_modconv
    ) -> torch.Tensor:  # [B, img_channels, img_resolution, img_resolution]
        ws = self.mapping(z, c, truncation_psi=truncation_psi, truncation_cutoff=truncation_cutoff)
        return self.synthesis(ws, noise_mode=noise_mode, **synthesis_kwargs)


# ---------------------------------------------------------------------------------------------
# Discriminator
# ---------------------------------------------------------------------------------------------


class DiscriminatorBlock(nn.Module):
    """One resolution of the discriminator: (fromRGB), conv, down-conv, and a residual 1x1 path."""

    def __init__(
        self,
        in_channels: int,  # input channels, 0 = first block (reads the image)
        tmp_channels: int,  # channels between the two convolutions
        out_channels: int,  # output channels
        resolution: int,  # resolution of this block in pixels
        img_channels: int,  # image channels
        first_layer_idx: int,  # index of this block's first layer (for freeze_layers)
        architecture: str = "resnet",  # 'orig', 'skip' or 'resnet'
        activation: str = "lrelu",  # activation function
        resample_filter: list[float] | None = None,  # FIR taps for downsampling, None = [1, 3, 3, 1]
        conv_clamp: float | None = None,  # clamp conv outputs to +-conv_clamp, None = no clamp
        use_fp16: bool = False,  # run this block in half precision (CUDA only)
        fp16_channels_last: bool = False,  # channels-last memory format for fp16 blocks
        freeze_layers: int = 0,  # Freeze-D: layers with index < freeze_layers are not trainable
    ) -> None:
        if in_channels not in (0, tmp_channels):
            raise ValueError(f"in_channels must be 0 or tmp_channels ({tmp_channels}), got {in_channels}")
        if architecture not in ("orig", "skip", "resnet"):
            raise ValueError(f"architecture must be 'orig', 'skip' or 'resnet', got {architecture!r}")
        super().__init__()
        resample_filter = [1, 3, 3, 1] if resample_filter is None else resample_filter
        self.in_channels = in_channels
        self.resolution = resolution
        self.img_channels = img_channels
        self.first_layer_idx = first_layer_idx
        self.architecture = architecture
        self.use_fp16 = use_fp16
        self.channels_last = use_fp16 and fp16_channels_last
        self.register_buffer("resample_filter", setup_filter(resample_filter))

        self.num_layers = 0

        def next_trainable() -> bool:
            trainable = self.first_layer_idx + self.num_layers >= freeze_layers
            self.num_layers += 1
            return trainable

        common = dict(activation=activation, conv_clamp=conv_clamp, channels_last=self.channels_last)
        if in_channels == 0 or architecture == "skip":
            self.fromrgb = Conv2dLayer(img_channels, tmp_channels, kernel_size=1, trainable=next_trainable(), **common)
        self.conv0 = Conv2dLayer(tmp_channels, tmp_channels, kernel_size=3, trainable=next_trainable(), **common)
        self.conv1 = Conv2dLayer(
            tmp_channels, out_channels, kernel_size=3, down=2, trainable=next_trainable(),
            resample_filter=resample_filter, **common,
        )
        if architecture == "resnet":
            self.skip = Conv2dLayer(
                tmp_channels, out_channels, kernel_size=1, bias=False, down=2, trainable=next_trainable(),
                resample_filter=resample_filter, channels_last=self.channels_last,
            )

    def forward(
        self,
        x: torch.Tensor | None,  # [B, in_channels, resolution, resolution], None in the first block
        img: torch.Tensor | None,  # [B, img_channels, resolution, resolution] (first block / 'skip')
        force_fp32: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        device = (x if x is not None else img).device
        half = _half_precision(self.use_fp16, force_fp32, device)
        dtype = torch.float16 if half else torch.float32
        memory_format = torch.channels_last if self.channels_last and half else torch.contiguous_format

        if x is not None:
            _assert_shape(x, [None, self.in_channels, self.resolution, self.resolution], "block input")
            x = x.to(dtype=dtype, memory_format=memory_format)

        # FromRGB.
        if self.in_channels == 0 or self.architecture == "skip":
            _assert_shape(img, [None, self.img_channels, self.resolution, self.resolution], "image")
            img = img.to(dtype=dtype, memory_format=memory_format)
            y = self.fromrgb(img)
            x = x + y if x is not None else y
            img = downsample2d(img, self.resample_filter) if self.architecture == "skip" else None

        # Main layers; the residual sum is scaled by sqrt(1/2) to keep the variance.
        if self.architecture == "resnet":
            y = self.skip(x, gain=math.sqrt(0.5))
            x = self.conv0(x)
            x = self.conv1(x, gain=math.sqrt(0.5))
            x = y + x
        else:
            x = self.conv0(x)
            x = self.conv1(x)

        assert x.dtype == dtype
        return x, img


class MinibatchStdLayer(nn.Module):
    """Append the minibatch standard deviation as extra feature maps (Karras et al. 2018, Sec. 3)."""

    def __init__(
        self,
        group_size: int | None,  # samples per statistics group, None = the whole minibatch
        num_channels: int = 1,  # feature groups, each giving one extra channel
    ) -> None:
        super().__init__()
        self.group_size = group_size
        self.num_channels = num_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [N, C, H, W] -> [N, C + F, H, W]
        n, c, h, w = x.shape
        g = min(self.group_size, n) if self.group_size is not None else n
        if n % g != 0:
            raise ValueError(f"batch size {n} must be divisible by the minibatch-std group size {g}")
        f = self.num_channels
        y = x.reshape(g, -1, f, c // f, h, w)  # [G, n, F, c, H, W]: sample i goes to group i % n
        y = y - y.mean(dim=0)  # deviation from the group mean
        y = y.square().mean(dim=0)  # [n, F, c, H, W] variance over the group
        y = (y + 1e-8).sqrt()  # standard deviation
        y = y.mean(dim=[2, 3, 4])  # [n, F] averaged over channels and pixels
        y = y.reshape(-1, f, 1, 1).repeat(g, 1, h, w)  # [N, F, H, W]
        return torch.cat([x, y], dim=1)


class DiscriminatorEpilogue(nn.Module):
    """The 4x4 head: minibatch std, conv, fc, out, and the projection onto the label (cmap)."""

    def __init__(
        self,
        in_channels: int,  # input channels
        cmap_dim: int,  # width of the mapped label, 0 = unconditional
        resolution: int,  # resolution of this block (4)
        img_channels: int,  # image channels
        architecture: str = "resnet",  # 'orig', 'skip' or 'resnet'
        mbstd_group_size: int | None = 4,  # minibatch-std group size, None = whole minibatch
        mbstd_num_channels: int = 1,  # minibatch-std features, 0 = disable the layer
        activation: str = "lrelu",  # activation function
        conv_clamp: float | None = None,  # clamp conv outputs to +-conv_clamp, None = no clamp
    ) -> None:
        if architecture not in ("orig", "skip", "resnet"):
            raise ValueError(f"architecture must be 'orig', 'skip' or 'resnet', got {architecture!r}")
        super().__init__()
        self.in_channels = in_channels
        self.cmap_dim = cmap_dim
        self.resolution = resolution
        self.img_channels = img_channels
        self.architecture = architecture

        if architecture == "skip":
            self.fromrgb = Conv2dLayer(img_channels, in_channels, kernel_size=1, activation=activation)
        self.mbstd = (
            MinibatchStdLayer(group_size=mbstd_group_size, num_channels=mbstd_num_channels)
            if mbstd_num_channels > 0
            else None
        )
        self.conv = Conv2dLayer(
            in_channels + mbstd_num_channels, in_channels, kernel_size=3, activation=activation, conv_clamp=conv_clamp
        )
        self.fc = FullyConnectedLayer(in_channels * resolution**2, in_channels, activation=activation)
        self.out = FullyConnectedLayer(in_channels, 1 if cmap_dim == 0 else cmap_dim)

    def forward(
        self,
        x: torch.Tensor | None,  # [B, in_channels, 4, 4]; None when the image itself is 4x4
        img: torch.Tensor | None,  # [B, img_channels, 4, 4] ('skip' only)
        cmap: torch.Tensor | None,  # [B, cmap_dim] mapped label, or None
        force_fp32: bool = False,  # the epilogue always runs in float32
    ) -> torch.Tensor:  # [B, 1] logits
        if x is not None:
            _assert_shape(x, [None, self.in_channels, self.resolution, self.resolution], "epilogue input")
            x = x.to(dtype=torch.float32, memory_format=torch.contiguous_format)
        if self.architecture == "skip":
            _assert_shape(img, [None, self.img_channels, self.resolution, self.resolution], "image")
            y = self.fromrgb(img.to(dtype=torch.float32, memory_format=torch.contiguous_format))
            x = x + y if x is not None else y
        if x is None:
            raise ValueError("the epilogue received no features and has no fromrgb layer")

        if self.mbstd is not None:
            x = self.mbstd(x)
        x = self.conv(x)
        x = self.fc(x.flatten(1))
        x = self.out(x)

        # Projection discriminator (Miyato & Koyama 2018): logit = <out, cmap> / sqrt(cmap_dim).
        if self.cmap_dim > 0:
            _assert_shape(cmap, [None, self.cmap_dim], "cmap")
            x = (x * cmap).sum(dim=1, keepdim=True) * (1 / math.sqrt(self.cmap_dim))
        return x


class Discriminator(nn.Module):
    """StyleGAN2-ADA discriminator (residual by default), conditional through a projected label.

    Keyword names match the official ``training.networks.Discriminator``; :attr:`init_kwargs`
    holds the constructor arguments.
    """

    def __init__(
        self,
        c_dim: int,  # label width, 0 = unconditional
        img_resolution: int,  # input resolution (4 ... 1024, a power of two)
        img_channels: int,  # input channels
        architecture: str = "resnet",  # 'orig', 'skip' or 'resnet'
        channel_base: int = 32768,  # channels at resolution r are min(channel_base // r, channel_max)
        channel_max: int = 512,  # maximum channels of any block
        num_fp16_res: int = 0,  # run the N highest resolutions in fp16 (CUDA only)
        conv_clamp: float | None = None,  # clamp conv outputs to +-conv_clamp, None = no clamp
        cmap_dim: int | None = None,  # mapped label width, None = channels at 4x4
        block_kwargs: dict[str, Any] | None = None,  # DiscriminatorBlock arguments
        mapping_kwargs: dict[str, Any] | None = None,  # MappingNetwork arguments (label mapping)
        epilogue_kwargs: dict[str, Any] | None = None,  # DiscriminatorEpilogue arguments
    ) -> None:
        if img_resolution < 4 or img_resolution & (img_resolution - 1) != 0:
            raise ValueError(f"img_resolution must be a power of two >= 4, got {img_resolution}")
        super().__init__()
        block_kwargs = _plain(block_kwargs or {})
        mapping_kwargs = _plain(mapping_kwargs or {})
        epilogue_kwargs = _plain(epilogue_kwargs or {})
        self._init_kwargs = dict(
            c_dim=c_dim, img_resolution=img_resolution, img_channels=img_channels, architecture=architecture,
            channel_base=channel_base, channel_max=channel_max, num_fp16_res=num_fp16_res, conv_clamp=conv_clamp,
            cmap_dim=cmap_dim, block_kwargs=block_kwargs, mapping_kwargs=mapping_kwargs,
            epilogue_kwargs=epilogue_kwargs,
        )
        self.c_dim = c_dim
        self.img_resolution = img_resolution
        self.img_resolution_log2 = int(math.log2(img_resolution))
        self.img_channels = img_channels
        self.block_resolutions = [2**i for i in range(self.img_resolution_log2, 2, -1)]
        channels = {res: min(channel_base // res, channel_max) for res in self.block_resolutions + [4]}
        fp16_resolution = max(2 ** (self.img_resolution_log2 + 1 - num_fp16_res), 8)

        if cmap_dim is None:
            cmap_dim = channels[4]
        if c_dim == 0:
            cmap_dim = 0

        common = dict(img_channels=img_channels, architecture=architecture, conv_clamp=conv_clamp)
        layer_idx = 0
        for res in self.block_resolutions:
            block = DiscriminatorBlock(
                channels[res] if res < img_resolution else 0, channels[res], channels[res // 2], resolution=res,
                first_layer_idx=layer_idx, use_fp16=(res >= fp16_resolution), **block_kwargs, **common,
            )
            setattr(self, f"b{res}", block)
            layer_idx += block.num_layers
        if c_dim > 0:
            self.mapping = MappingNetwork(
                z_dim=0, c_dim=c_dim, w_dim=cmap_dim, num_ws=None, w_avg_beta=None, **mapping_kwargs
            )
        if img_resolution == 4:
            # No block reads the image, so the epilogue does it with its own fromRGB ('skip' head).
            common["architecture"] = "skip"
        self.b4 = DiscriminatorEpilogue(channels[4], cmap_dim=cmap_dim, resolution=4, **epilogue_kwargs, **common)

    @property
    def init_kwargs(self) -> dict[str, Any]:
        """The constructor arguments (a deep copy): ``Discriminator(**D.init_kwargs)`` rebuilds it."""
        return copy.deepcopy(self._init_kwargs)

    def forward(
        self,
        img: torch.Tensor,  # [B, img_channels, img_resolution, img_resolution]
        c: torch.Tensor | None,  # [B, c_dim]; ignored when c_dim == 0
        **block_kwargs: Any,  # force_fp32
    ) -> torch.Tensor:  # [B, 1] logits
        _assert_shape(img, [None, self.img_channels, self.img_resolution, self.img_resolution], "img")
        x = None
        for res in self.block_resolutions:
            x, img = getattr(self, f"b{res}")(x, img, **block_kwargs)
        cmap = self.mapping(None, c) if self.c_dim > 0 else None
        return self.b4(x, img, cmap)
