"""Sketch to anime tab: a portrait that follows every stroke (AniFaceDrawing).

The canvas's change event (every stroke, eraser or undo) runs the sketch encoder and the
generator; ``trigger_mode="always_last"`` drops the strokes drawn while one update runs, so the
portrait always catches up with the latest drawing. Shown only when a generator of the registry
carries a trained sketch encoder (``<generator>/sketch_encoder/``).
"""

from __future__ import annotations

import secrets
import tempfile
import threading
from pathlib import Path
from typing import Any

import gradio as gr
import numpy as np

from studio.registry import GPU_QUEUE, ModelRegistry
from studio.zerogpu import gpu_handler, steps_duration
from studio.validation import MAX_SEED, parse_seed

__all__ = ["build", "sketch_generators", "PipelineCache", "draw"]

CANVAS = 512
EMPTY_NOTE = "✏️ Draw a face on the canvas (pick the brush at its left): the portrait follows every stroke."


def sketch_generators(registry: ModelRegistry) -> list[str]:
    """Registered generators that carry a sketch encoder."""
    names = []
    for name in registry.names("stylegan2"):
        folder = Path(registry.spec(name).location)
        if folder.is_dir() and (folder / "sketch_encoder" / "config.json").is_file():
            names.append(name)
    return names


class PipelineCache:
    """One SketchToImagePipeline per generator, built on first use."""

    def __init__(self, registry: ModelRegistry) -> None:
        self.registry = registry
        self._pipes: dict[str, Any] = {}
        self._lock = threading.Lock()

    def get(self, name: str):
        from pipelines.sketch_to_image import SketchToImagePipeline, load_colour_basis, load_sketch_encoder
        from pipelines.stylegan_inversion import load_encoder

        if not name:
            raise ValueError("choose a generator first")
        with self._lock:
            if name not in self._pipes:
                folder = Path(self.registry.spec(name).location)
                G = self.registry.get(name)
                device = next(G.parameters()).device
                image_encoder = load_encoder(folder / "encoder", device=device) if (folder / "encoder").is_dir() else None
                evaluator = None
                if self.registry.names("evaluator"):
                    evaluator = self.registry.get(self.registry.names("evaluator")[0])
                self._pipes[name] = SketchToImagePipeline(
                    G, load_sketch_encoder(folder / "sketch_encoder", device=device), evaluator=evaluator,
                    image_encoder=image_encoder, colour_basis=load_colour_basis(folder))
            return self._pipes[name]


def _canvas_image(value: Any) -> np.ndarray | None:
    """The composite of a Sketchpad value (RGBA array), or None for an untouched canvas."""
    if value is None:
        return None
    if isinstance(value, dict):
        composite = value.get("composite")
        return None if composite is None else np.asarray(composite)
    return np.asarray(value)


def draw(pipe: Any, image: Any, *, candidates: int, colour_seed: int, reference: Any = None) -> tuple[list, Any, str]:
    """Run the pipeline on a canvas or an upload: ``(gallery items, prepared sketch, note markdown)``.
    With a ``reference`` image, colours and fine style come from it (one candidate) instead of seeds."""
    if image is None:
        return [], None, EMPTY_NOTE
    if reference is not None:
        out = pipe(sketch=image, num_candidates=1, reference_image=reference)
    else:
        out = pipe(sketch=image, num_candidates=int(candidates), colour_seed=int(colour_seed))
    items = [(img, f"seed {seed}" if seed is not None else "reference colours")
             for img, seed in zip(out.images, out.seeds)]
    ms = 1000 * sum(out.timings.values())
    lines = [f"{len(out.images)} candidate(s) in {ms:.0f} ms"] + [f"⚠️ {n}" for n in out.notes]
    return items, out.sketch, "  \n".join(lines)


def build(registry: ModelRegistry, demo: gr.Blocks, *, send_to: Any = None, tabs: Any = None) -> dict[str, Any] | None:
    """Add the Sketch to anime tab when a generator has a sketch encoder; ``send_to``: the StyleGAN
    edit tab's hidden image input (the "edit in StyleGAN" hand-off)."""
    generators = sketch_generators(registry)
    if not generators:
        return None
    pipes = PipelineCache(registry)

    with gr.Tab("Sketch to anime", id="sketch"):
        gr.Markdown("Draw a face — outline, eyes, hair, details — and the portrait follows every stroke. "
                    "The sketch decides the structure; a seed (or a reference) decides colours and fine "
                    "style, and how each candidate finishes what is not drawn yet. Upload a drawing or a "
                    "photo to start from its lines.")
        with gr.Row():
            with gr.Column(scale=1):
                canvas = gr.Sketchpad(label="Canvas (pen, eraser, undo, clear)", type="numpy", image_mode="RGBA",
                                      canvas_size=(CANVAS, CANVAS), height=CANVAS,
                                      brush=gr.Brush(default_size=4, colors=["#000000"], color_mode="fixed"),
                                      elem_id="sketch_canvas")
                upload = gr.File(label="Or start from a drawing / photo", type="filepath", file_types=["image"],
                                 elem_id="sketch_upload")
            with gr.Column(scale=1):
                gallery = gr.Gallery(label="Portraits", columns=2, height=CANVAS, format="png", elem_id="sketch_gallery")
                note = gr.Markdown(EMPTY_NOTE,
                                   elem_id="sketch_note")
                with gr.Row():
                    generator = gr.Dropdown(generators, value=generators[0], label="Generator")
                    candidates = gr.Slider(1, 8, value=4, step=1, label="Candidates")
                with gr.Row():
                    seed = gr.Textbox(value="0", label="Seed (colours, and what is not drawn yet)", scale=3,
                                      elem_id="sketch_seed")
                    random_seed = gr.Button("Random seed", scale=1)
                reference = gr.Image(label="Colour reference (optional): colours and fine style from this portrait",
                                     type="pil", image_mode="RGB", height=160, sources=["upload", "clipboard"],
                                     elem_id="sketch_reference")
                prepared = gr.Image(label="What the encoder reads", type="pil", format="png", interactive=False,
                                    height=160)
                with gr.Row():
                    send = gr.Button("Edit the first portrait in StyleGAN edit", elem_id="sketch_send")
                    download = gr.Button("Download the portraits")
                files = gr.File(label="Download", file_count="multiple", interactive=False)

        @gpu_handler(steps_duration(10, 2, 2))
        def run(name: str, value: Any, n: float, seed_text: str, ref: Any):
            try:
                image = _canvas_image(value)
                items, sketch, text = draw(pipes.get(name), image, candidates=int(n), colour_seed=parse_seed(seed_text),
                                           reference=ref)
            except ValueError as exc:
                raise gr.Error(str(exc)) from None
            return items, sketch, text

        @gpu_handler(steps_duration(10, 2, 2))
        def run_upload(name: str, path: str | None, n: float, seed_text: str, ref: Any):
            if not path:
                return gr.update(), gr.update(), gr.update()
            from pipelines.stylegan_session import load_upload

            try:
                image, notes = load_upload(path)
                items, sketch, text = draw(pipes.get(name), image, candidates=int(n), colour_seed=parse_seed(seed_text),
                                           reference=ref)
            except ValueError as exc:
                raise gr.Error(str(exc)) from None
            return items, sketch, "  \n".join([text, *[f"⚠️ {n}" for n in notes]])

        def save(items: list | None):
            if not items:
                raise gr.Error("draw something first")
            folder = Path(tempfile.mkdtemp(prefix="sketch_"))
            paths = []
            for i, item in enumerate(items):
                src = item[0] if isinstance(item, (list, tuple)) else item
                dst = folder / f"portrait_{i}.png"
                dst.write_bytes(Path(src).read_bytes())
                paths.append(str(dst))
            return paths

        def first(items: list | None):
            if not items:
                raise gr.Error("draw something first")
            src = items[0][0] if isinstance(items[0], (list, tuple)) else items[0]
            from PIL import Image
            return Image.open(src).convert("RGB")

        inputs = [generator, canvas, candidates, seed, reference]
        outputs = [gallery, prepared, note]
        canvas.change(run, inputs, outputs, api_name=False, trigger_mode="always_last", concurrency_id=GPU_QUEUE,
                      show_progress="hidden")
        for comp in (candidates, generator, reference):
            comp.change(run, inputs, outputs, api_name=False, trigger_mode="always_last", concurrency_id=GPU_QUEUE)
        seed.submit(run, inputs, outputs, api_name=False, concurrency_id=GPU_QUEUE)
        random_seed.click(lambda: str(secrets.randbelow(MAX_SEED + 1)), None, seed, api_name=False).then(
            run, inputs, outputs, api_name=False, concurrency_id=GPU_QUEUE)
        upload.upload(run_upload, [generator, upload, candidates, seed, reference], outputs, api_name="sketch_to_portrait",
                      concurrency_id=GPU_QUEUE)
        download.click(save, gallery, files, api_name=False)
        if send_to is not None:
            if tabs is not None:
                send.click(lambda items: (first(items), gr.Tabs(selected="stylegan_edit")), gallery, [send_to, tabs],
                           api_name=False)
            else:
                send.click(first, gallery, send_to, api_name=False)
    return {"gallery": gallery, "canvas": canvas, "generator": generator}
