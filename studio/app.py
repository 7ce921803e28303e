"""Builds the studio's Blocks: one tab per task, a shared model registry, one GPU queue."""

from __future__ import annotations

import os

import gradio as gr

from studio.registry import GPU_QUEUE, ModelRegistry, default_registry
from studio.tabs import clip_edit, portrait_world, sketch, stylegan_edit, text_to_image, train

__all__ = ["build_app", "GPU_QUEUE", "on_spaces"]

INTRO = """# Distillation Studio
Fast, distilled image generation and GAN editing — every model here was trained by the studio's
own pipelines on its embedded portrait world, and the same tabs load hub models when you have them."""


def on_spaces() -> bool:
    """True when running on Hugging Face Spaces (it sets SPACE_ID)."""
    return bool(os.environ.get("SPACE_ID"))


def build_app(*, device: str | None = None, registry: ModelRegistry | None = None,
              runs_dir: str | None = "runs", allow_training: bool = True) -> gr.Blocks:
    """The studio's Blocks. ``device``: "auto"/None (CUDA, then MPS, then CPU), "cuda", "cpu", ...;
    finished runs in ``runs_dir`` join the embedded models in the registry. Training (the Distill /
    train tab) is off with ``allow_training=False`` and on Hugging Face Spaces."""
    registry = registry or default_registry(device, runs_dir=runs_dir)
    with gr.Blocks(title="Distillation Studio", analytics_enabled=False) as demo:
        gr.Markdown(INTRO)
        gr.Markdown(f"<small>Device: **{registry.device}** · precision: **{str(registry.dtype).removeprefix('torch.')}**</small>")
        with gr.Tabs() as tabs:
            t2i = text_to_image.build(registry, demo)  # None without a text-to-image model
            world = portrait_world.build(registry, demo)
            stylegan = stylegan_edit.build(registry, demo, runs_dir=runs_dir)
            drawing = sketch.build(registry, demo, send_to=stylegan["receive"], tabs=tabs)
            clip = clip_edit.build(registry, demo, source_state=stylegan["session"])
            if on_spaces():
                why = "This studio runs on Hugging Face Spaces, where training jobs are not started."
            elif not allow_training or runs_dir is None:
                why = "The studio was started with `--no-train`."
            else:
                why = ""
            # "Use this model" in the Distill / train tab: which dropdowns list a new model, and which
            # one selects it (the tab that serves what the run trained).
            targets = [train.UseTarget("stylegan2", stylegan["generator"], selects=("stylegan2", "stylegan_encoder"))]
            if t2i is not None:
                targets += [train.UseTarget("text_to_image", t2i["model"], selects=("text_to_image",)),
                            train.UseTarget("text_to_image", t2i["teacher"])]
            if drawing is not None:
                targets.append(train.UseTarget("stylegan2", drawing["generator"], selects=("sketch_encoder",),
                                               choices=sketch.sketch_generators))
            if clip is not None:
                targets += [train.UseTarget("stylegan2", clip["generator"], selects=("clip_mapper",)),
                            train.UseTarget("clip", clip["clip"], selects=("clip",))]
            train.build(registry, demo, runs_dir=runs_dir or "runs", enabled=not why, reason=why, targets=targets)
        # Hand-offs between tabs: the portrait goes to StyleGAN edit, which inverts it.
        world["send"].click(lambda image: (image, gr.Tabs(selected="stylegan_edit")), world["image"],
                            [stylegan["receive"], tabs], api_name=False)
    demo.registry = registry  # for tests and for app.py's start-up message
    return demo
