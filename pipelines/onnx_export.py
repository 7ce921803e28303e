"""ONNX export of :class:`~pipelines.text_to_image.PortraitDiffusionPipeline` and a pipeline that runs
the export with ONNX Runtime.

:func:`export_onnx` writes three graphs, each with a dynamic batch axis, checked with
``onnx.checker`` and compared with eager PyTorch on the CPU (the figures go into the card)::

    onnx/
        onnx_config.json       what inference needs besides the tokenizer: scheduler config, latent
                               shape, VAE scaling, max_length, prediction type, file sizes
        text_encoder/model.onnx         input_ids, attention_mask [B, L] int64 -> token states
                                        [B, L, D], padding positions zeroed (as encode_prompts does)
        unet/model.onnx                 sample [B, C, h, w], timestep [B] float32,
                                        encoder_hidden_states [B, L, D] -> prediction [B, C, h, w]
        vae_decoder/model.onnx          scaled latents [B, C, h, w] (the UNet's space) ->
                                        images [B, 3, H, W] in [-1, 1] (unscaling and clamp inside)
        one_step/model.onnx             input_ids, attention_mask [B, l] int64 and noise [B, C, h, w] ->
                                        images [B, 3, H, W] in [-1, 1] and latents [B, C, h, w]: the
                                        whole one-step call without guidance in one graph (below)
        text_encoder/model.int8.onnx, unet/model.int8.onnx, one_step/model.int8.onnx
                                        dynamically quantised (int8 weights of MatMul and Gather)
        card.json, README.md

The one-step graph is what a one-step student runs (one step, guidance 1): MiniLM, the UNet at the
scheduler's single timestep, the scheduler's update and the decoder, traced together. The update
of one step is linear in the noise and the prediction for the schedulers the studio samples with
(:func:`one_step_update` probes it and refuses one that is not), so it becomes two constants; the
timestep is a constant too, and ONNX Runtime folds the UNet's time embedding away. One session then
runs the whole call: no hand-over of token states and latents between three sessions and PyTorch.
The three graphs stay for every other call (more steps, classifier-free guidance, latent output).

The graphs come from the TorchScript exporter (``torch.onnx.export(..., dynamo=False)``): the
dynamo exporter needs ``onnxscript``, which the studio does not install, and the traced graphs of
diffusers' UNet and VAE and of the BERT text encoder match eager PyTorch to float rounding.

:class:`OnnxPortraitPipeline` runs the export with the PyTorch pipeline's own input checks and
sampling loop (:func:`~pipelines.text_to_image.denoise`); only the networks run in ONNX Runtime,
and a one-step call without guidance runs the one-step graph. The tokenizer is MiniLM's, loaded as
:mod:`pipelines.text_encoder` loads it.

    python -m pipelines.onnx_export --pipeline runs/teacher/pipeline --out runs/teacher/onnx
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shlex
import sys
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from pipelines.cards import write_card
from pipelines.images import tensor_to_pil
from pipelines.text_encoder import PACKAGE_NAME, minilm_path, pad_states, tokenize_prompts, trim_padding
from pipelines.text_to_image import (SCHEDULER_CLASSES, PortraitDiffusionPipeline, ProgressCallback,
                                     TextToImageOutput, scheduler_classes, check_negative_mode,
                                     check_sampling_inputs, denoise, initial_noise, negative_prompts, step_params)

__all__ = ["export_onnx", "OnnxPortraitPipeline", "OneStepUpdate", "one_step_update", "ONNX_CONFIG_NAME",
           "DEFAULT_OPSET"]

ONNX_CONFIG_NAME = "onnx_config.json"
FORMAT = "portrait-diffusion-onnx"     # onnx_config.json's "format": what wrote the folder
FORMAT_VERSION = 1
DEFAULT_OPSET = 17                     # the TorchScript exporter's best-tested opset; has LayerNormalization
GRAPHS = ("text_encoder", "unet", "vae_decoder")
ONE_STEP = "one_step"                  # the optional fourth graph: a whole one-step call
INT8_GRAPHS = ("text_encoder", "unet", ONE_STEP)
# Ops whose weights quantize_dynamic turns into int8. Conv is left in fp32: ONNX Runtime has no CPU
# kernel for ConvInteger with int8 weights.
INT8_OP_TYPES = ("MatMul", "Gather")
EXPORT_BATCH = 2                       # batch of the example inputs the graphs are traced with


# -- the graphs: small wrappers around the pipeline's networks -----------------------------------
class TextEncoderGraph(torch.nn.Module):
    """MiniLM token states with padding zeroed, as :func:`pipelines.text_encoder.encode_prompts`."""

    def __init__(self, text_encoder: torch.nn.Module) -> None:
        super().__init__()
        self.text_encoder = text_encoder

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.text_encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return hidden * attention_mask.unsqueeze(-1).to(hidden.dtype)              # [B, L, D]


class UNetGraph(torch.nn.Module):
    """The UNet's prediction; one timestep per sample ([B] float32) so the batch axis stays dynamic."""

    def __init__(self, unet: torch.nn.Module) -> None:
        super().__init__()
        self.unet = unet

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor,
                encoder_hidden_states: torch.Tensor) -> torch.Tensor:
        return self.unet(sample, timestep, encoder_hidden_states=encoder_hidden_states,
                         return_dict=False)[0]                                       # [B, C, h, w]


class VaeDecoderGraph(torch.nn.Module):
    """Scaled latents -> images in [-1, 1], as :meth:`PortraitDiffusionPipeline.decode_latents`."""

    def __init__(self, vae: torch.nn.Module, scaling_factor: float, shift_factor: float) -> None:
        super().__init__()
        self.vae = vae
        self.scaling_factor = float(scaling_factor)
        self.shift_factor = float(shift_factor)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        z = latents / self.scaling_factor + self.shift_factor
        return self.vae.decode(z).sample.clamp(-1, 1)                                # [B, 3, H, W]


@dataclass(frozen=True)
class OneStepUpdate:
    """One sampling step of a scheduler as constants: the UNet runs on ``input_scale * x`` at
    ``timestep``, with ``x = init_sigma * noise``, and the step returns
    ``sample_coef * x + pred_coef * prediction``."""

    timestep: float
    init_sigma: float
    input_scale: float
    sample_coef: float
    pred_coef: float


def one_step_update(scheduler) -> OneStepUpdate:
    """Probe ``scheduler``'s one-step sampling (``set_timesteps(1)``, ``scale_model_input``, ``step``)
    for the linear map :class:`OneStepUpdate` describes, on a copy (the scheduler keeps its state).

    The coefficients come from unit inputs; random inputs stepped with two generator seeds must then
    give the linear map's result (to 1e-5 relative), else ``ValueError``: a step that adds noise,
    clips or thresholds its estimate has no such map, and no one-step graph.
    """
    sch = copy.deepcopy(scheduler)
    kwargs = {"generator": None} if "generator" in step_params(sch) else {}

    def timestep() -> torch.Tensor:          # a fresh schedule before every step (schedulers count steps)
        sch.set_timesteps(1)
        return sch.timesteps[0]

    def step(pred: torch.Tensor, x: torch.Tensor, seed: int) -> torch.Tensor:
        t = timestep()
        if kwargs:
            kwargs["generator"] = torch.Generator().manual_seed(seed)
        return sch.step(pred, t, x, **kwargs).prev_sample.float()

    def model_input(x: torch.Tensor) -> torch.Tensor:
        return sch.scale_model_input(x, timestep()).float()

    shape = (2, 4, 3, 3)
    ones, zeros = torch.ones(shape), torch.zeros(shape)
    input_scale = model_input(ones)
    sample_coef, pred_coef = step(zeros, ones, 0), step(ones, zeros, 0)
    g = torch.Generator().manual_seed(0)
    x, pred = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    constant = all(float(c.max() - c.min()) <= 1e-6 * max(1.0, float(c.abs().max()))
                   for c in (input_scale, sample_coef, pred_coef))
    name = type(scheduler).__name__
    if not constant or not torch.allclose(model_input(x), input_scale * x, rtol=1e-5, atol=1e-6):
        raise ValueError(f"{name}'s one-step model input is not a constant multiple of the noise")
    affine = sample_coef * x + pred_coef * pred
    for seed in (1, 2):
        if not torch.allclose(step(pred, x, seed), affine, rtol=1e-5, atol=1e-5):
            raise ValueError(f"{name}'s one-step update is not linear in the sample and the prediction "
                             "(it adds noise, clips or thresholds)")
    return OneStepUpdate(timestep=float(timestep()), init_sigma=float(sch.init_noise_sigma),
                         input_scale=float(input_scale.flatten()[0]), sample_coef=float(sample_coef.flatten()[0]),
                         pred_coef=float(pred_coef.flatten()[0]))


class OneStepGraph(torch.nn.Module):
    """A whole one-step call without guidance: token ids and mask [P, l] of P prompts, noise
    [P * n, C, h, w] for n images of each (prompt-major, as ``num_images_per_prompt`` orders them) ->
    (images [P * n, 3, H, W] in [-1, 1], final latents [P * n, C, h, w]), as ``denoise`` at one step
    computes them with ``update``'s scheduler. Each prompt is encoded once."""

    def __init__(self, text_encoder: TextEncoderGraph, unet: UNetGraph, vae_decoder: VaeDecoderGraph, *,
                 update: OneStepUpdate, max_length: int) -> None:
        super().__init__()
        self.text_encoder, self.unet, self.vae_decoder = text_encoder, unet, vae_decoder
        self.update = update
        self.max_length = int(max_length)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        u = self.update
        states = self.text_encoder(input_ids, attention_mask)                         # [P, l, D]
        states = torch.nn.functional.pad(states, (0, 0, 0, self.max_length - states.shape[1]))
        per_prompt = noise.shape[0] // input_ids.shape[0]
        states = states.unsqueeze(1).expand(-1, per_prompt, -1, -1).flatten(0, 1)     # [B, L, D]
        x = noise * u.init_sigma                                                      # [B, C, h, w]
        timestep = torch.full((noise.shape[0],), u.timestep, dtype=torch.float32)
        pred = self.unet(x * u.input_scale, timestep, states)
        latents = u.sample_coef * x + u.pred_coef * pred
        return self.vae_decoder(latents), latents


# Input and output names of each graph (the ONNX pipeline feeds them by name).
_IO = {
    "text_encoder": (("input_ids", "attention_mask"), ("last_hidden_state",)),
    "unet": (("sample", "timestep", "encoder_hidden_states"), ("out_sample",)),
    "vae_decoder": (("latents",), ("images",)),
    ONE_STEP: (("input_ids", "attention_mask", "noise"), ("images", "latents")),
}


# -- export -------------------------------------------------------------------------------------
def export_onnx(pipeline_folder: str | os.PathLike[str], out_dir: str | os.PathLike[str], *,
                opset: int = DEFAULT_OPSET, quantize_int8: bool = True, one_step: bool = True,
                text_encoder_path: str | os.PathLike[str] | None = None, command: str | None = None) -> Path:
    """Export the pipeline in ``pipeline_folder`` (written by ``PortraitDiffusionPipeline.save_pretrained``)
    to ``out_dir``: three fp32 graphs, the one-step graph (unless ``one_step`` is False, or the
    scheduler's one step is not linear: the config then says why), their int8 variants (unless
    ``quantize_int8`` is False), ``onnx_config.json`` and a card. Returns ``out_dir``.

    ``text_encoder_path`` is passed to ``PortraitDiffusionPipeline.from_pretrained`` (default: MiniLM
    from its package). Each graph is checked with ``onnx.checker`` and compared with eager PyTorch on
    its example inputs; the largest absolute differences go into the card's figures.
    """
    import onnx

    if isinstance(opset, bool) or not isinstance(opset, int) or not 14 <= opset <= 20:
        raise ValueError(f"opset must be an integer in [14, 20] (scaled_dot_product_attention needs 14), got {opset!r}")
    pipeline_folder, out_dir = Path(pipeline_folder), Path(out_dir)
    if not (pipeline_folder / PortraitDiffusionPipeline.model_index_name).is_file():
        raise FileNotFoundError(f"{pipeline_folder} is not a PortraitDiffusionPipeline folder "
                                f"(no {PortraitDiffusionPipeline.model_index_name})")
    if out_dir.resolve() == pipeline_folder.resolve():
        raise ValueError("out_dir must differ from the pipeline folder")
    pipe = PortraitDiffusionPipeline.from_pretrained(pipeline_folder, device="cpu", dtype=torch.float32,
                                                     text_encoder_path=text_encoder_path)
    scale, shift = pipe.latent_scale_shift()
    graphs: dict[str, torch.nn.Module] = {
        "text_encoder": TextEncoderGraph(pipe.text_encoder),
        "unet": UNetGraph(pipe.unet),
        "vae_decoder": VaeDecoderGraph(pipe.vae, scale, shift),
    }
    update, one_step_skipped = None, "not asked for (--no-one-step)"
    if one_step:
        try:
            update = one_step_update(pipe.scheduler)
        except ValueError as exc:
            one_step_skipped = str(exc)
    if update is not None:
        graphs[ONE_STEP] = OneStepGraph(graphs["text_encoder"], graphs["unet"], graphs["vae_decoder"],
                                        update=update, max_length=pipe.max_length)
    inputs = _example_inputs(pipe)
    tokens = {0: "batch", 1: "tokens"}
    dynamic_axes = {
        "text_encoder": {"input_ids": tokens, "attention_mask": tokens, "last_hidden_state": tokens},
        "unet": {"sample": {0: "batch"}, "timestep": {0: "batch"},
                 "encoder_hidden_states": tokens, "out_sample": {0: "batch"}},
        "vae_decoder": {"latents": {0: "batch"}, "images": {0: "batch"}},
        ONE_STEP: {"input_ids": tokens, "attention_mask": tokens, "noise": {0: "batch"},
                   "images": {0: "batch"}, "latents": {0: "batch"}},
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    files: dict[str, dict[str, Any]] = {}
    figures: dict[str, float] = {}
    for name, graph in graphs.items():
        graph.eval()
        path = out_dir / name / "model.onnx"
        path.parent.mkdir(exist_ok=True)
        input_names, output_names = _IO[name]
        with torch.no_grad(), warnings.catch_warnings():
            # Tracing warns about Python conditions on shapes in diffusers and transformers: channel
            # asserts and the UNet's upsample-size check (channels and latent size stay as traced),
            # a contiguity copy for batches >= 64 and a > 2**31-element path (no change in value),
            # BERT's mask padding (zero for any token count). None changes the graphs' values. The
            # exporter also warns that advanced indexing is wrong for negative indices: BERT's mask
            # builder indexes with aranges, never negative.
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            warnings.filterwarnings("ignore", message="Exporting aten::index operator")
            expected = graph(*inputs[name])                                      # eager PyTorch reference
            expected = (expected[0] if isinstance(expected, tuple) else expected).numpy()  # (the images)
            torch.onnx.export(graph, inputs[name], str(path), dynamo=False, opset_version=opset,
                              input_names=list(input_names), output_names=list(output_names),
                              dynamic_axes=dynamic_axes[name], do_constant_folding=True)
        onnx.checker.check_model(str(path))
        files[name] = {"fp32": _file_entry(out_dir, path)}
        figures[f"{name}_max_abs_diff_fp32"] = _max_abs_diff(path, inputs[name], input_names, expected)
        if quantize_int8 and name in INT8_GRAPHS:
            int8_path = path.with_name("model.int8.onnx")
            _quantize(path, int8_path)
            onnx.checker.check_model(str(int8_path))
            files[name]["int8"] = _file_entry(out_dir, int8_path)
            figures[f"{name}_max_abs_diff_int8"] = _max_abs_diff(int8_path, inputs[name], input_names, expected)
        if name == "vae_decoder":
            image_hw = tuple(int(x) for x in expected.shape[-2:])

    c, h, w = pipe.latent_shape
    config = {
        "format": FORMAT, "format_version": FORMAT_VERSION,
        "source_pipeline": str(pipeline_folder),
        "exporter": "torch.onnx.export (TorchScript, dynamo=False)", "opset": opset,
        "torch_version": torch.__version__,
        "text_encoder": {"package": PACKAGE_NAME, "hidden_size": int(pipe.text_encoder.config.hidden_size),
                         "vocab_size": int(pipe.text_encoder.config.vocab_size)},
        "max_length": pipe.max_length,
        "latent_shape": [c, h, w],
        "image_size": list(image_hw),
        "scaling_factor": scale, "shift_factor": shift,
        "prediction_type": pipe.scheduler.config.get("prediction_type", "epsilon"),
        "scheduler": json.loads(pipe.scheduler.to_json_string()),   # carries _class_name
        "max_batch_size": PortraitDiffusionPipeline.max_batch_size,
        "int8_op_types": list(INT8_OP_TYPES) if quantize_int8 else [],
        ONE_STEP: asdict(update) if update is not None else {"skipped": one_step_skipped},
        "files": files,
    }
    (out_dir / ONNX_CONFIG_NAME).write_text(json.dumps(config, indent=1))
    write_card(
        out_dir, title=f"{pipeline_folder.name} (ONNX)", task="text-to-image (ONNX Runtime)",
        architecture=f"ONNX opset {opset}: MiniLM text encoder, UNet2DConditionModel, "
                     f"{type(pipe.vae).__name__} decoder"
                     + (", and the three in one one-step graph" if update is not None else "")
                     + f"; latents {c}x{h}x{w}; {config['prediction_type']} prediction"
                     + (f"; int8 dynamic quantisation of the text encoder and UNet"
                        f"{' and of the one-step graph' if update is not None else ''}" if quantize_int8 else ""),
        source=f"ONNX export of the PortraitDiffusionPipeline at {pipeline_folder}",
        command=command or f"python -m pipelines.onnx_export --pipeline {shlex.quote(str(pipeline_folder))} "
                           f"--out {shlex.quote(str(out_dir))}" + ("" if quantize_int8 else " --no-int8")
                           + ("" if one_step else " --no-one-step"),
        config={k: config[k] for k in ("opset", "exporter", "max_length", "latent_shape", "image_size",
                                       "scaling_factor", "shift_factor", "prediction_type")},
        figures={**figures, **{f"{n}_{kind}_mb": round(e["bytes"] / 2**20, 2)
                               for n, entry in files.items() for kind, e in entry.items()}},
        notes="`max_abs_diff` figures: largest absolute difference between ONNX Runtime (CPU) and eager "
              f"PyTorch (fp32) on the export's example inputs (batch {EXPORT_BATCH} and 1; for the one-step "
              "graph, its images). Run with `OnnxPortraitPipeline.from_pretrained(folder)` "
              "(pipelines/onnx_export.py)."
              + (f" One-step graph: {update}." if update is not None else f" No one-step graph: {one_step_skipped}."),
    )
    return out_dir


def _example_inputs(pipe: PortraitDiffusionPipeline) -> dict[str, tuple[torch.Tensor, ...]]:
    """Traced example inputs of each graph, batch ``EXPORT_BATCH``, shaped as the pipeline feeds them."""
    g = torch.Generator().manual_seed(0)
    prompts = ["an anime portrait with long red hair and glasses", ""][:EXPORT_BATCH]
    input_ids, mask, _ = tokenize_prompts(prompts, pipe.max_length, tokenizer=pipe.tokenizer)
    with torch.no_grad():
        context = TextEncoderGraph(pipe.text_encoder)(input_ids, mask)                  # [B, L, D]
    latents = torch.randn((EXPORT_BATCH, *pipe.latent_shape), generator=g)               # [B, C, h, w]
    timestep = torch.tensor([999.0, 500.0][:EXPORT_BATCH])
    # the one-step graph gets its token ids trimmed, as the pipeline feeds them (padding below max_length)
    return {"text_encoder": (input_ids, mask), "unet": (latents, timestep, context), "vae_decoder": (latents,),
            ONE_STEP: (*trim_padding(input_ids, mask), latents)}


def _file_entry(root: Path, path: Path) -> dict[str, Any]:
    return {"path": path.relative_to(root).as_posix(), "bytes": path.stat().st_size}


def _quantize(src: Path, dst: Path) -> None:
    """int8 weights (QInt8, one scale per output channel) for INT8_OP_TYPES; activations are
    quantised per call (dynamic). Per-channel scales halve MiniLM's error against per-tensor ones."""
    import logging

    from onnxruntime.quantization import QuantType, quantize_dynamic

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)           # quantize_dynamic logs a "consider pre-processing" warning
    try:
        quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, per_channel=True,
                         op_types_to_quantize=list(INT8_OP_TYPES))
    finally:
        root.setLevel(level)


def _max_abs_diff(path: Path, inputs: tuple[torch.Tensor, ...], names: tuple[str, ...], expected: np.ndarray) -> float:
    """Largest |ONNX Runtime - eager| at the traced batch and at batch 1 (the batch axis is dynamic)."""
    session = _session(path, ["CPUExecutionProvider"])
    diff = 0.0
    for batch in (len(expected), 1):
        got = session.run(None, {n: x[:batch].numpy() for n, x in zip(names, inputs)})[0]
        diff = max(diff, float(np.abs(got - expected[:batch]).max()))
    return diff


def _session(path: Path, providers: list[str]):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = max(1, torch.get_num_threads())
    options.inter_op_num_threads = 1
    # Worker threads spin between the nodes of a run, and stop when the run ends. Left to spin on,
    # an idle session's workers keep two cores busy for about 50 ms after every run (measured:
    # 45-62 ms of CPU in the 200 ms after a one-step run of the student), taking them from the next
    # session and from PyTorch (an eager call right after: 218 against 175 ms); never spinning makes
    # every parallel node wake a sleeping worker (the three-graph student: 185 against 174 ms).
    options.add_session_config_entry("session.intra_op.allow_spinning", "1")
    options.add_session_config_entry("session.force_spinning_stop", "1")
    options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    options.log_severity_level = 3                     # errors only: no per-node placement warnings
    return ort.InferenceSession(str(path), options, providers=providers)


# -- inference ----------------------------------------------------------------------------------
def default_providers() -> list[str]:
    """CUDA first where ONNX Runtime has it and a GPU is present, else the CPU."""
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers() and torch.cuda.is_available():
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


class OnnxPortraitPipeline:
    """:class:`PortraitDiffusionPipeline` with its networks in ONNX Runtime (a folder of :func:`export_onnx`).

    Same ``__call__`` arguments and :class:`TextToImageOutput` as the PyTorch pipeline, same input
    checks and sampling loop (:func:`~pipelines.text_to_image.denoise`, run on the CPU in torch);
    NASA negative prompts (attention processors) have no ONNX graph and are refused. A call of one
    step without guidance (a one-step student's) runs the one-step graph when there is one: the
    same images as the three graphs, in one session.

    Args:
        text_encoder, unet, vae_decoder: ``onnxruntime.InferenceSession`` of the three graphs.
        scheduler: a diffusers scheduler; tokenizer: MiniLM's tokenizer.
        config: the export's ``onnx_config.json``.
        one_step: session of the one-step graph, or None to sample every call through the three.
    """

    def __init__(self, text_encoder, unet, vae_decoder, scheduler, tokenizer, *, config: dict[str, Any],
                 one_step=None) -> None:
        self.text_encoder = text_encoder
        self.unet = unet
        self.vae_decoder = vae_decoder
        self.one_step = one_step
        self.scheduler = scheduler
        self.tokenizer = tokenizer
        self.config = config
        self.max_length = int(config["max_length"])
        self.max_batch_size = int(config.get("max_batch_size", PortraitDiffusionPipeline.max_batch_size))
        self.device = torch.device("cpu")        # where latents live between the ONNX Runtime calls

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike[str], *, providers: list[str] | None = None,
                        int8: bool = False, one_step: bool = True,
                        text_encoder_path: str | os.PathLike[str] | None = None) -> "OnnxPortraitPipeline":
        """Load an export. ``providers`` default to :func:`default_providers`; ``int8`` picks the
        quantised text encoder and UNet (and one-step graph); ``one_step`` loads the one-step graph
        where the export has one (False: every call through the three graphs); ``text_encoder_path``
        says where MiniLM's tokenizer is (default: its package, or ``$MINILM_PATH``)."""
        import onnxruntime as ort
        from transformers import BertTokenizerFast

        folder = Path(folder)
        config = read_onnx_config(folder)
        if providers is None:
            providers = default_providers()
        available = ort.get_available_providers()
        missing = [p for p in providers if p not in available]
        if not providers or missing:
            raise ValueError(f"execution providers {missing or providers} are not available; "
                             f"this onnxruntime has {available}")
        sessions = {}
        names = GRAPHS + ((ONE_STEP,) if one_step and ONE_STEP in config["files"] else ())
        for name in names:
            kind = "int8" if int8 and name in INT8_GRAPHS else "fp32"
            entry = config["files"].get(name, {}).get(kind)
            if entry is None:
                hint = " (it was exported with --no-int8; load with int8=False)" if kind == "int8" else ""
                raise FileNotFoundError(f"{folder / ONNX_CONFIG_NAME} lists no {kind} {name} graph{hint}")
            path = folder / entry["path"]
            _check_file(path, entry["bytes"], folder)
            try:
                sessions[name] = _session(path, list(providers))
            except Exception as exc:        # onnxruntime raises its own exception types
                raise ValueError(f"onnxruntime cannot load {path} (a corrupt or truncated file? "
                                 f"re-run the export): {exc}") from exc
        scheduler_config = dict(config["scheduler"])
        scheduler_name = scheduler_config.get("_class_name")
        schedulers = scheduler_classes()
        if scheduler_name not in schedulers:
            raise ValueError(f"{folder / ONNX_CONFIG_NAME}: unsupported scheduler {scheduler_name!r}; "
                             f"one of {sorted(SCHEDULER_CLASSES)}")
        scheduler = schedulers[scheduler_name].from_config(scheduler_config)
        tokenizer = BertTokenizerFast.from_pretrained(minilm_path(text_encoder_path))
        vocab = config["text_encoder"]["vocab_size"]
        if len(tokenizer) > vocab:
            raise ValueError(f"the tokenizer at {minilm_path(text_encoder_path)} has {len(tokenizer)} tokens; "
                             f"the exported text encoder knows {vocab}")
        return cls(sessions["text_encoder"], sessions["unet"], sessions["vae_decoder"], scheduler, tokenizer,
                   config=config, one_step=sessions.get(ONE_STEP))

    @property
    def providers(self) -> list[str]:
        """The execution providers the UNet session runs on, best first."""
        return self.unet.get_providers()

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """(channels, height, width) of the UNet's latents."""
        c, h, w = self.config["latent_shape"]
        return int(c), int(h), int(w)

    # -- building blocks --------------------------------------------------------------------
    def encode_prompt(self, prompts: list[str]) -> tuple[torch.Tensor, list[bool]]:
        """MiniLM token states [B, max_length, D] float32 (padding zeroed) and truncation flags."""
        input_ids, mask, truncated = tokenize_prompts(prompts, self.max_length, tokenizer=self.tokenizer)
        input_ids, mask = trim_padding(input_ids, mask)            # the graph's token axis is dynamic
        hidden = self.text_encoder.run(None, {"input_ids": input_ids.numpy(), "attention_mask": mask.numpy()})[0]
        return pad_states(torch.from_numpy(hidden), self.max_length), truncated

    def predict(self, sample: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """One UNet call: sample [B, C, h, w], a 0-d or [B] timestep, context [B, L, D] -> [B, C, h, w]."""
        t = np.broadcast_to(np.asarray(timestep.detach().cpu().float().numpy(), dtype=np.float32),
                            (sample.shape[0],))
        out = self.unet.run(None, {"sample": sample.detach().cpu().float().numpy(),
                                   "timestep": np.ascontiguousarray(t),
                                   "encoder_hidden_states": context.detach().cpu().float().numpy()})[0]
        return torch.from_numpy(out)

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents [B, C, h, w] -> images [B, 3, H, W] in [-1, 1] (float32)."""
        images = self.vae_decoder.run(None, {"latents": latents.detach().cpu().float().numpy()})[0]
        return torch.from_numpy(images)

    def run_one_step(self, prompts: list[str], noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list[bool]]:
        """The one-step graph: P prompts and noise [P * n, C, h, w] (n images of each, prompt-major) ->
        (images [P * n, 3, H, W] in [-1, 1], latents [P * n, C, h, w], truncation flags of the prompts)."""
        if self.one_step is None:
            raise ValueError("this pipeline has no one-step graph (exported with --no-one-step, a scheduler "
                             "whose one step is not linear, or loaded with one_step=False)")
        if not prompts or noise.shape[0] % len(prompts):
            raise ValueError(f"{noise.shape[0]} noise samples are not a whole number of images for each of "
                             f"{len(prompts)} prompt(s)")
        input_ids, mask, truncated = tokenize_prompts(prompts, self.max_length, tokenizer=self.tokenizer)
        input_ids, mask = trim_padding(input_ids, mask)
        images, latents = self.one_step.run(None, {"input_ids": input_ids.numpy(), "attention_mask": mask.numpy(),
                                                   "noise": noise.detach().cpu().float().numpy()})
        return torch.from_numpy(images), torch.from_numpy(latents), truncated

    # -- sampling ---------------------------------------------------------------------------
    def __call__(self, *, prompt: str | list[str], negative_prompt: str | list[str] | None = None,
                 num_inference_steps: int = 25, guidance_scale: float = 4.0,
                 generator: torch.Generator | None = None, num_images_per_prompt: int = 1,
                 output_type: str = "pil", callback: ProgressCallback | None = None,
                 latents: torch.Tensor | None = None, guidance_rescale: float = 0.0,
                 negative_mode: str = "auto", nasa_scale: float = 1.0) -> TextToImageOutput:
        """Generate images for ``prompt``, as :meth:`PortraitDiffusionPipeline.__call__` does.

        A ``negative_prompt`` goes to the unconditional branch of classifier-free guidance
        (``negative_mode`` "cfg", or "auto" with ``guidance_scale`` > 1); NASA ("nasa", or "auto"
        with ``guidance_scale`` <= 1) is refused with a ``ValueError``.
        """
        prompts = check_sampling_inputs(self, prompt, negative_prompt, num_inference_steps, guidance_scale,
                                        num_images_per_prompt, output_type, callback, latents, guidance_rescale)
        check_negative_mode(negative_mode, nasa_scale)
        use_nasa = negative_mode == "nasa" or (negative_mode == "auto" and guidance_scale <= 1)
        if negative_prompt is not None and use_nasa:
            raise ValueError("NASA negative prompts (negative_mode='nasa', or 'auto' with guidance_scale <= 1) "
                             "are not supported by the ONNX pipeline: they replace the UNet's attention "
                             "processors, which the exported graph fixes. Use guidance_scale > 1 with "
                             "negative_mode='cfg' or 'auto', or the PyTorch PortraitDiffusionPipeline.")
        n = num_images_per_prompt
        use_cfg = guidance_scale != 1.0
        timings: dict[str, float] = {}
        if self.one_step is not None and num_inference_steps == 1 and not use_cfg and output_type != "latent":
            return self._one_step_call(prompts, n, generator=generator, latents=latents, output_type=output_type,
                                       callback=callback)

        # 1. Encode the prompts (and the negative / empty prompts for guidance).
        t0 = time.perf_counter()
        negatives = negative_prompts(negative_prompt, len(prompts))
        cond, truncated = self.encode_prompt(prompts)
        cond = cond.repeat_interleave(n, dim=0)                                # [B, L, D]
        if use_cfg:
            uncond, _ = self.encode_prompt(negatives)
            context = torch.cat([uncond.repeat_interleave(n, dim=0), cond])   # [2B, L, D]
        else:
            context = cond
        timings["text_encoding"] = time.perf_counter() - t0

        # 2-3. Timesteps, initial noise and the denoising loop (the UNet in ONNX Runtime).
        t0 = time.perf_counter()
        latents = denoise(
            self.scheduler, lambda model_in, t: self.predict(model_in, t, context),
            shape=(len(prompts) * n, *self.latent_shape), num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale, use_cfg=use_cfg, guidance_rescale=guidance_rescale,
            generator=generator, latents=latents, callback=callback, device=self.device)
        timings["denoising"] = time.perf_counter() - t0

        # 4. Decode the latents to images.
        t0 = time.perf_counter()
        if output_type == "latent":
            images: list[Image.Image] | torch.Tensor = latents
        else:
            pixels = self.decode_latents(latents)                              # [B, 3, H, W]
            images = tensor_to_pil(pixels) if output_type == "pil" else pixels
        timings["decoding"] = time.perf_counter() - t0
        return TextToImageOutput(images=images, latents=latents, timings=timings, truncated=truncated)

    def _one_step_call(self, prompts: list[str], n: int, *, generator: torch.Generator | None,
                       latents: torch.Tensor | None, output_type: str,
                       callback: ProgressCallback | None) -> TextToImageOutput:
        """``__call__`` at one step without guidance, through the one-step graph (checked inputs).
        Its timings have one stage, ``one_step``: the graph runs text encoding, denoising and decoding."""
        t0 = time.perf_counter()
        # 1. The same noise as the sampling loop draws, one sample per image.
        noise = initial_noise((len(prompts) * n, *self.latent_shape), generator=generator, latents=latents,
                              device=self.device)
        # 2. Text encoder, UNet, the scheduler's step and the decoder, in one run.
        pixels, final, truncated = self.run_one_step(prompts, noise)
        if callback is not None:
            callback(1, 1, final)
        images = tensor_to_pil(pixels) if output_type == "pil" else pixels
        return TextToImageOutput(images=images, latents=final, timings={"one_step": time.perf_counter() - t0},
                                 truncated=truncated)


def read_onnx_config(folder: str | os.PathLike[str]) -> dict[str, Any]:
    """The ``onnx_config.json`` of an export, with clear errors for anything else."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} does not exist or is not a folder")
    file = folder / ONNX_CONFIG_NAME
    if not file.is_file():
        hint = ""
        if (folder / PortraitDiffusionPipeline.model_index_name).is_file():
            hint = (f"; it is a PyTorch pipeline folder: export it with python -m pipelines.onnx_export "
                    f"--pipeline {folder} --out DIR")
        raise FileNotFoundError(f"{folder} is not an ONNX export of a PortraitDiffusionPipeline "
                                f"(no {ONNX_CONFIG_NAME}){hint}")
    try:
        config = json.loads(file.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{file} is not valid JSON: {exc}") from exc
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise ValueError(f"{file} was not written by pipelines.onnx_export (format {FORMAT!r} expected)")
    if config.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{file} has format_version {config.get('format_version')!r}; this studio reads "
                         f"{FORMAT_VERSION}: re-run the export")
    missing = [k for k in ("files", "scheduler", "latent_shape", "max_length", "text_encoder") if k not in config]
    if missing:
        raise ValueError(f"{file} lacks {missing}: re-run the export")
    return config


def _check_file(path: Path, expected_bytes: int, folder: Path) -> None:
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the ONNX export {folder}: re-run the export")
    size = path.stat().st_size
    if size != expected_bytes:
        state = "truncated" if size < expected_bytes else "changed"
        raise ValueError(f"{path} is {state}: {size} bytes, the export wrote {expected_bytes}; re-run the export")


# -- command line -------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description="Export a PortraitDiffusionPipeline folder to ONNX")
    parser.add_argument("--pipeline", required=True, help="folder written by PortraitDiffusionPipeline.save_pretrained")
    parser.add_argument("--out", required=True, help="folder to write the ONNX graphs, onnx_config.json and card into")
    parser.add_argument("--opset", type=int, default=DEFAULT_OPSET)
    parser.add_argument("--no-int8", dest="int8", action="store_false", help="skip the int8 variants")
    parser.add_argument("--no-one-step", dest="one_step", action="store_false",
                        help="skip the one-step graph (text encoder, UNet, scheduler step and decoder in one)")
    parser.add_argument("--text_encoder_path", default=None, help="MiniLM folder (default: its package)")
    args = parser.parse_args(argv)
    command = "python -m pipelines.onnx_export " + " ".join(shlex.quote(a) for a in (argv if argv is not None
                                                                                  else sys.argv[1:]))
    out = export_onnx(args.pipeline, args.out, opset=args.opset, quantize_int8=args.int8, one_step=args.one_step,
                      text_encoder_path=args.text_encoder_path, command=command)
    skipped = json.loads((out / ONNX_CONFIG_NAME).read_text())[ONE_STEP].get("skipped")
    if skipped:
        print(f"no one-step graph: {skipped}")
    card = json.loads((out / "card.json").read_text())
    for name, value in card["figures"].items():
        print(f"{name}: {value:.3g}" if isinstance(value, float) else f"{name}: {value}")
    print(out)
    return out


if __name__ == "__main__":
    main()
