"""CLIP edit tab: type what should change ("blue hair and glasses") and the portrait changes.

A portrait comes from the StyleGAN edit tab's session, an upload (aligned and inverted) or a
random sample; each edit runs one of three methods (StyleCLIP latent optimisation, global
directions, the text mapper) on the current state, and edits chain with an undo history. The
per-user :class:`~pipelines.clip_edit_session.CLIPEditSession` lives in ``gr.State``; a failed
action raises ``gr.Error`` and leaves it as it was. Shown only when the registry holds a CLIP and
a generator.
"""

from __future__ import annotations

import json
import secrets
import threading
from pathlib import Path
from typing import Any

import gradio as gr
from PIL import Image

from pipelines.clip_edit import NEUTRAL_TEXT, world_vocabulary
from pipelines.clip_edit_session import CLIPEditOutput, CLIPEditor, CLIPEditSession
from pipelines.stylegan_session import load_upload
from studio.registry import GPU_QUEUE, ModelRegistry
from studio.zerogpu import gpu_handler, steps_duration
from studio.tabs.stylegan_edit import EditorCache
from studio.validation import MAX_SEED, parse_seed

__all__ = ["build", "CLIPEditorCache", "start_from_sample", "start_from_upload", "start_from_session",
           "apply_text_edit", "undo_edit", "format_output", "format_history"]

METHOD_LABELS = {
    "optimise": "StyleCLIP optimisation (any text, seconds)",
    "global": "global directions (instant, α and β)",
    "mapper": "text mapper (instant, one pass)",
}


class CLIPEditorCache:
    """One :class:`CLIPEditor` per (generator, CLIP) pair, built on first use."""

    def __init__(self, registry: ModelRegistry, stylegan: EditorCache | None = None) -> None:
        self.registry = registry
        self.stylegan = stylegan or EditorCache(registry)
        self._editors: dict[tuple[str, str], CLIPEditor] = {}
        self._lock = threading.Lock()

    def get(self, generator: str, clip: str) -> CLIPEditor:
        if not generator or not clip:
            raise ValueError("choose a generator and a CLIP model first")
        with self._lock:
            key = (generator, clip)
            if key not in self._editors:
                self._editors[key] = CLIPEditor.from_stylegan(
                    self.stylegan.get(generator), self.registry.get(clip), clip_name=clip,
                    vocabulary=world_vocabulary() if _world_trained(self.registry.spec(clip).location) else None)
            return self._editors[key]


def _world_trained(location: str) -> bool:
    """Whether a CLIP folder holds a PortraitCLIP (trained on the portrait world's captions only)."""
    config = Path(location) / "open_clip_config.json"
    try:
        return json.loads(config.read_text()).get("model_name", "").startswith("PortraitCLIP")
    except (OSError, ValueError, AttributeError):
        return False


# -- what the handlers do (plain functions, so tests call them without a browser) -----------------

# (session, image before the last edit, current image, info markdown, history markdown)
Shown = tuple[CLIPEditSession, Image.Image, Image.Image, str, str]


def _show(editor: CLIPEditor, session: CLIPEditSession) -> Shown:
    image = editor.render(session)
    before = editor.render(session, session.history[-2]) if session.can_undo else image
    notes = "  \n".join(f"ℹ️ {n}" for n in editor.load_notes)
    info = f"**Source**: {session.source.source} · generator **{session.source.generator}**" + (
        "  \n" + notes if notes else "")
    return session, before, image, info, format_history(session)


def start_from_sample(editors: CLIPEditorCache, generator: str, clip: str, seed: int) -> Shown:
    editor = editors.get(generator, clip)
    return _show(editor, editor.start(editor.stylegan.sample(seed)))


def start_from_upload(editors: CLIPEditorCache, generator: str, clip: str, path: str, *, align: bool,
                      steps: int = 150, callback: Any = None) -> Shown:
    editor = editors.get(generator, clip)
    image, notes = load_upload(path)
    method = "encoder" if "encoder" in editor.stylegan.methods() else "optimise-w+"
    source = editor.stylegan.invert(image, method=method, steps=steps, align=align, notes=notes, callback=callback)
    return _show(editor, editor.start(source))


def start_from_session(editors: CLIPEditorCache, clip: str, stylegan_session: Any) -> Shown:
    if stylegan_session is None:
        raise ValueError("the StyleGAN edit tab has no portrait yet: sample or upload one there first")
    editor = editors.get(stylegan_session.generator, clip)
    return _show(editor, editor.start(stylegan_session))


def apply_text_edit(editors: CLIPEditorCache, clip: str, session: CLIPEditSession | None, *, text: str,
                    method: str, neutral_text: str = "", alpha: float = 4.0, beta: float = 0.1,
                    strength: float = 1.0, steps: int = 60, callback: Any = None
                    ) -> tuple[CLIPEditOutput, str, str]:
    """One edit of the session's current state: ``(output, info markdown, history markdown)``."""
    if session is None:
        raise ValueError("start from a portrait first: a random sample, an upload or the StyleGAN edit tab's")
    editor = editors.get(session.source.generator, clip)
    out = editor.edit(session, text=text, method=method, neutral_text=neutral_text, alpha=alpha, beta=beta,
                      strength=strength, steps=int(steps), callback=callback)
    return out, format_output(out), format_history(out.session)


def undo_edit(editors: CLIPEditorCache, clip: str, session: CLIPEditSession | None) -> Shown:
    if session is None:
        raise ValueError("nothing to undo: start from a portrait first")
    editor = editors.get(session.source.generator, clip)
    return _show(editor, editor.undo(session))


def format_output(out: CLIPEditOutput) -> str:
    """The result line: method, CLIP score before -> after, time; then warnings and notes."""
    lines = [f"**{METHOD_LABELS.get(out.method, out.method)}** · CLIP score {out.clip_score_before:.3f} → "
             f"**{out.clip_score_after:.3f}** ({out.clip_score_after - out.clip_score_before:+.3f}) · "
             f"{out.seconds:.2f} s"]
    lines += [f"⚠️ {w}" for w in out.warnings]
    lines += [f"ℹ️ {n}" for n in out.notes]
    return "  \n".join(lines)


def format_history(session: CLIPEditSession) -> str:
    """The chain of edits, numbered from the source (0); the numbers are escaped, or Markdown would
    turn the lines after the first into a list of its own."""
    steps = [f"{i}\\. {s.label}" + (f" (CLIP score {s.clip_score:.3f})" if s.clip_score is not None else "")
             for i, s in enumerate(session.history)]
    return "**Edits so far** (undo removes the last)  \n" + "  \n".join(steps)


# -- the tab ---------------------------------------------------------------------------------------

def build(registry: ModelRegistry, demo: gr.Blocks, *, source_state: Any = None) -> dict[str, Any] | None:
    """Add the CLIP edit tab when the registry holds a CLIP and a generator (else nothing, and
    None is returned). ``source_state``: the StyleGAN edit tab's ``gr.State`` holding its
    EditSession; with it, a button takes that portrait."""
    generators, clips = registry.names("stylegan2"), registry.names("clip")
    if not generators or not clips:
        return None
    editors = CLIPEditorCache(registry)

    def method_choices(generator: str, clip: str) -> list[tuple[str, str]]:
        try:
            return [(METHOD_LABELS[m], m) for m in editors.get(generator, clip).methods()]
        except Exception:  # noqa: BLE001 - a model that fails to load shows its error on use
            return [(METHOD_LABELS["optimise"], "optimise")]

    first_methods = method_choices(generators[0], clips[0])

    with gr.Tab("CLIP edit", id="clip_edit"):
        gr.Markdown("Type what the portrait should become — *blue hair*, *a smile and glasses* — and it changes, "
                    "nothing else: StyleCLIP latent optimisation, StyleCLIP global directions, or a text mapper "
                    "trained once for this generator and CLIP. Edits chain; *Undo* steps back.")
        session = gr.State(None)
        with gr.Row():
            with gr.Column(scale=1):
                with gr.Row():
                    generator = gr.Dropdown(generators, value=generators[0], label="Generator",
                                            elem_id="clip_generator")
                    clip = gr.Dropdown(clips, value=clips[0], label="CLIP", elem_id="clip_model")
                with gr.Tab("Random sample"):
                    with gr.Row():
                        seed = gr.Textbox(value="0", label="Seed", scale=3, elem_id="clip_seed")
                        random_seed = gr.Button("Random", scale=1)
                    sample_button = gr.Button("Sample", elem_id="clip_sample")
                with gr.Tab("Upload"):
                    upload = gr.File(label="Portrait or photo (PNG, JPEG, WebP, ...)", type="filepath",
                                     file_types=["image"], elem_id="clip_upload")
                    align = gr.Checkbox(False, label="Align face (photos)")
                    invert_button = gr.Button("Invert", elem_id="clip_invert")
                if source_state is not None:
                    with gr.Tab("From StyleGAN edit"):
                        take_button = gr.Button("Use the StyleGAN edit tab's portrait", elem_id="clip_from_stylegan")
                text = gr.Textbox(label="What should change", placeholder="blue hair and glasses", lines=1,
                                  max_lines=3, elem_id="clip_text")
                method = gr.Radio(first_methods, value=first_methods[-1][1], label="Method", elem_id="clip_method")
                neutral = gr.Textbox(label="Neutral text (global directions: what the portrait shows now)",
                                     placeholder=NEUTRAL_TEXT, elem_id="clip_neutral")
                with gr.Row():
                    alpha = gr.Slider(-10, 10, value=4.0, step=0.5, label="α strength (global)", elem_id="clip_alpha")
                    beta = gr.Slider(0.0, 0.5, value=0.1, step=0.01, label="β disentanglement (global)",
                                     elem_id="clip_beta")
                with gr.Row():
                    strength = gr.Slider(0.0, 3.0, value=1.0, step=0.1, label="Strength (mapper)",
                                         elem_id="clip_strength")
                    steps = gr.Slider(10, 300, value=60, step=10, label="Steps (optimisation)", elem_id="clip_steps")
                with gr.Row():
                    apply_button = gr.Button("Apply edit", variant="primary", elem_id="clip_apply")
                    undo_button = gr.Button("Undo", elem_id="clip_undo")
            with gr.Column(scale=2):
                with gr.Row():
                    before = gr.Image(label="Before this edit", type="pil", format="png", interactive=False,
                                      elem_id="clip_before")
                    after = gr.Image(label="After", type="pil", format="png", interactive=False, elem_id="clip_after")
                info = gr.Markdown("Sample a portrait, upload one or take the StyleGAN edit tab's to start.",
                                   elem_id="clip_info")
                history = gr.Markdown("", elem_id="clip_history")

        outputs = [session, before, after, info, history]
        queue = dict(concurrency_id=GPU_QUEUE)

        @gpu_handler(20)
        def on_sample(gen: str, clip_name: str, seed_text: str):
            try:
                return start_from_sample(editors, gen, clip_name, parse_seed(seed_text))
            except ValueError as exc:
                raise gr.Error(str(exc)) from None

        @gpu_handler(60)
        def on_invert(gen: str, clip_name: str, path: str | None, align_face: bool, progress=gr.Progress()):
            if not path:
                raise gr.Error("upload an image first (PNG, JPEG or WebP)")
            try:
                return start_from_upload(editors, gen, clip_name, path, align=bool(align_face),
                                         callback=lambda i, n, _p: progress((i, n), desc="inverting"))
            except ValueError as exc:
                raise gr.Error(str(exc)) from None

        @gpu_handler(60)
        def on_take(clip_name: str, stylegan_session: Any):
            try:
                out = start_from_session(editors, clip_name, stylegan_session)
            except ValueError as exc:
                raise gr.Error(str(exc)) from None
            return (*out, gr.update(value=stylegan_session.generator))

        @gpu_handler(steps_duration(20, 0.1, 8))
        def on_apply(sess: CLIPEditSession | None, clip_name: str, text_value: str, method_name: str,
                     neutral_text: str, a: float, b: float, s: float, n: float, progress=gr.Progress()):
            try:
                out, info_md, history_md = apply_text_edit(
                    editors, clip_name, sess, text=text_value, method=method_name, neutral_text=neutral_text,
                    alpha=float(a), beta=float(b), strength=float(s), steps=int(n),
                    callback=lambda i, total, _p: progress((i, total), desc="optimising"))
            except ValueError as exc:
                raise gr.Error(str(exc)) from None
            return out.session, out.before, out.image, info_md, history_md

        @gpu_handler(20)
        def on_undo(sess: CLIPEditSession | None, clip_name: str):
            try:
                return undo_edit(editors, clip_name, sess)
            except ValueError as exc:
                raise gr.Error(str(exc)) from None

        def on_models(gen: str, clip_name: str):
            choices = method_choices(gen, clip_name)
            return gr.update(choices=choices, value=choices[-1][1])

        sample_button.click(on_sample, [generator, clip, seed], outputs, api_name="clip_sample", **queue)
        seed.submit(on_sample, [generator, clip, seed], outputs, api_name=False, **queue)
        random_seed.click(lambda: str(secrets.randbelow(MAX_SEED + 1)), None, seed, api_name=False).then(
            on_sample, [generator, clip, seed], outputs, api_name=False, **queue)
        invert_button.click(on_invert, [generator, clip, upload, align], outputs, api_name=False, **queue)
        if source_state is not None:
            take_button.click(on_take, [clip, source_state], [*outputs, generator], api_name=False, **queue)
        apply_inputs = [session, clip, text, method, neutral, alpha, beta, strength, steps]
        apply_button.click(on_apply, apply_inputs, outputs, api_name="clip_edit", **queue)
        text.submit(on_apply, apply_inputs, outputs, api_name=False, **queue)
        undo_button.click(on_undo, [session, clip], outputs, api_name=False, **queue)
        generator.input(on_models, [generator, clip], method, api_name=False).then(
            on_sample, [generator, clip, seed], outputs, api_name=False, **queue)
        clip.input(on_models, [generator, clip], method, api_name=False)
        demo.load(on_sample, [generator, clip, seed], outputs, api_name=False, **queue)
    return {"session": session, "generator": generator, "clip": clip}
