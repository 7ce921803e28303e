"""Portrait world tab: pick attributes and a seed, see the portrait, its line art and caption."""

from __future__ import annotations

import json
import secrets
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import gradio as gr
import numpy as np

from pipelines.data.portrait_world import ATTRIBUTES, PortraitAttributes, PortraitWorld
from studio.registry import GPU_QUEUE, ModelRegistry
from studio.zerogpu import gpu_handler
from studio.validation import MAX_SEED, parse_seed

RANDOM = "random"

_world = PortraitWorld()


def _labels(name: str) -> str:
    return name.replace("_", " ").capitalize()


def resolve_attributes(choices: dict[str, str], seed: int) -> PortraitAttributes:
    """Fill the attributes left on "random" from ``seed``; validate the rest."""
    rng = np.random.default_rng(seed)
    drawn = _world.sample_attributes(rng, split="any").to_dict()
    chosen = {name: (drawn[name] if value in (None, "", RANDOM) else value) for name, value in choices.items()}
    return PortraitAttributes.from_dict(chosen)


def render_portrait(choices: dict[str, str], seed_text: str, size: int, sketch_fraction: float,
                    registry: ModelRegistry | None = None) -> dict[str, Any]:
    """Everything the tab shows for one portrait. Raises ValueError with a readable message."""
    seed = parse_seed(seed_text)
    try:
        size = int(size)
    except (TypeError, ValueError):
        raise ValueError(f"the resolution must be a whole number of pixels from {PortraitWorld.MIN_SIZE} "
                         f"to {PortraitWorld.MAX_SIZE}, not {size!r}") from None
    attrs = resolve_attributes(choices, seed)
    portrait = _world.render(attrs, seed=seed, size=size)
    sketch = _world.render_sketch(portrait.strokes, size=size, fraction=float(sketch_fraction))
    reading = None
    if registry is not None and registry.names("evaluator"):
        evaluator = registry.get(registry.names("evaluator")[0])
        pred = evaluator.predict_attributes([portrait.image])[0]
        reading = {name: (pred[name] if pred[name] == value else f"{pred[name]} (drawn: {value})")
                   for name, value in attrs.to_dict().items()}
    return {"portrait": portrait, "sketch": sketch, "attributes": attrs, "seed": seed, "reading": reading}


def _bundle(result: dict[str, Any]) -> str:
    """Write image, line art, partial sketch, caption and labels into one zip for download."""
    p = result["portrait"]
    folder = Path(tempfile.mkdtemp(prefix="portrait_"))
    stem = f"portrait_seed{result['seed']}"
    p.image.save(folder / f"{stem}.png")
    p.line_art.save(folder / f"{stem}_lineart.png")
    result["sketch"].save(folder / f"{stem}_sketch.png")
    (folder / f"{stem}.txt").write_text(p.caption + "\n")
    (folder / f"{stem}.json").write_text(json.dumps({"seed": result["seed"], "attributes": p.attributes.to_dict(),
                                                     "caption": p.caption}, indent=1))
    archive = folder / f"{stem}.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for f in sorted(folder.iterdir()):
            if f != archive:
                z.write(f, f.name)
    return str(archive)


def build(registry: ModelRegistry, demo: gr.Blocks) -> dict[str, Any]:
    """Add the Portrait world tab to ``demo`` (the Blocks being built); returns the components
    other tabs wire to (``image``, the portrait, and ``send``, its "edit in StyleGAN" button)."""
    with gr.Tab("Portrait world", id="portrait_world"):
        gr.Markdown("The embedded data set every model of the studio learns from: a procedural "
                    "renderer of anime portraits with exact labels, line art and captions.")
        with gr.Row():
            with gr.Column(scale=1):
                dropdowns: dict[str, gr.Dropdown] = {}
                items = list(ATTRIBUTES.items())
                for i in range(0, len(items), 2):
                    with gr.Row():
                        for name, values in items[i:i + 2]:
                            dropdowns[name] = gr.Dropdown([RANDOM, *values], value=RANDOM, label=_labels(name),
                                                          elem_id=f"world_{name}", min_width=120)
                with gr.Row():
                    seed = gr.Textbox(value="0", label="Seed", elem_id="world_seed", scale=3)
                    randomise = gr.Button("Random seed", scale=1, elem_id="world_randomise")
                size = gr.Slider(PortraitWorld.MIN_SIZE, PortraitWorld.MAX_SIZE, value=256, step=32,
                                 label="Resolution (px)", elem_id="world_size")
                fraction = gr.Slider(0.0, 1.0, value=0.5, step=0.05, label="Sketch progress",
                                     info="share of the strokes drawn, in drawing order")
            with gr.Column(scale=2):
                with gr.Row():
                    image = gr.Image(label="Portrait", type="pil", format="png", elem_id="world_image")
                    line_art = gr.Image(label="Line art", type="pil", format="png", elem_id="world_lineart")
                    sketch = gr.Image(label="Partial sketch", type="pil", format="png")
                caption = gr.Textbox(label="Caption", interactive=False, elem_id="world_caption")
                with gr.Row():
                    reading = gr.JSON(label="What the evaluator reads", elem_id="world_reading")
                    download = gr.File(label="Download (image, line art, sketch, caption, labels)")
                send = gr.Button("Edit this portrait in StyleGAN edit", elem_id="world_send_stylegan")

        names = list(ATTRIBUTES)

        @gpu_handler(20)
        def on_render(*values: Any):
            *attr_values, seed_text, size_value, frac = values
            try:
                result = render_portrait(dict(zip(names, attr_values)), seed_text, size_value, frac, registry)
            except ValueError as exc:
                raise gr.Error(str(exc)) from None
            p = result["portrait"]
            return (p.image, p.line_art, result["sketch"], p.caption,
                    result["reading"] or {"note": "no evaluator is installed"}, _bundle(result))

        inputs = [*dropdowns.values(), seed, size, fraction]
        outputs = [image, line_art, sketch, caption, reading, download]
        for comp in [*dropdowns.values(), size, fraction]:
            comp.change(on_render, inputs, outputs, api_name=False, trigger_mode="always_last",
                        concurrency_id=GPU_QUEUE)
        seed.submit(on_render, inputs, outputs, api_name="render_portrait", concurrency_id=GPU_QUEUE)
        randomise.click(lambda: str(secrets.randbelow(MAX_SEED + 1)), None, seed, api_name=False).then(
            on_render, inputs, outputs, api_name=False, concurrency_id=GPU_QUEUE)
        demo.load(on_render, inputs, outputs, api_name=False, concurrency_id=GPU_QUEUE)
    return {"image": image, "send": send}
