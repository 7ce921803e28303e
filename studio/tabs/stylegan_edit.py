"""StyleGAN edit tab: a source (random sample, upload, latent file or a portrait sent from another
tab), its inversion, and edits with named directions, SeFa sliders and (multi-modal) truncation.

Each user's :class:`~pipelines.stylegan_session.EditSession` lives in ``gr.State``; a failed
action raises ``gr.Error`` and leaves that state as it was, so earlier work is never lost.
"""

from __future__ import annotations

import secrets
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Any

import gradio as gr

from pipelines.stylegan_session import (COLOUR_EDITS, NAMED_EDITS, NUM_SEFA_SLIDERS, EditSession, StyleGANEditor,
                                        load_upload)
from studio.registry import GPU_QUEUE, ModelRegistry, add_local
from studio.zerogpu import gpu_handler, steps_duration
from studio.validation import MAX_SEED, parse_seed

__all__ = ["build", "EditorCache", "import_generator"]

COLOUR_LABELS = {"hair_color": "Hair colour", "eye_color": "Eye colour", "skin_tone": "Skin tone",
                 "background": "Background"}
METHOD_HELP = {
    "encoder": "encoder (one pass, instant)",
    "encoder+pti": "encoder + pivotal tuning (detail)",
    "optimise-w": "optimise in W",
    "optimise-w+": "optimise in W+",
    "optimise+pti": "optimise in W + pivotal tuning (best detail, slowest)",
}


class EditorCache:
    """One :class:`StyleGANEditor` per registered generator, built on first use."""

    def __init__(self, registry: ModelRegistry) -> None:
        self.registry = registry
        self._editors: dict[str, StyleGANEditor] = {}
        self._lock = threading.Lock()

    def get(self, name: str) -> StyleGANEditor:
        if not name:
            raise ValueError("choose a generator first")
        with self._lock:
            if name not in self._editors:
                spec = self.registry.spec(name)
                evaluator = None
                if self.registry.names("evaluator"):
                    evaluator = self.registry.get(self.registry.names("evaluator")[0])
                folder = Path(spec.location)
                self._editors[name] = StyleGANEditor(self.registry.get(name), name=name,
                                                     folder=folder if folder.is_dir() else None, evaluator=evaluator)
            return self._editors[name]


def import_generator(registry: ModelRegistry, files: list[str], target_root: str | Path) -> str:
    """Register uploaded generator files: an official ``.pkl`` (read by the restricted loader and
    converted once to safetensors) or a studio ``model.safetensors`` + ``config.json`` pair.
    Returns the new registry name. Raises ``ValueError`` with a readable message."""
    from pipelines.stylegan_io import convert_pickle, load_generator

    paths = [Path(f) for f in (files or [])]
    if not paths:
        raise ValueError("choose a .pkl snapshot, or a model.safetensors with its config.json, to import")
    suffixes = {p.suffix.lower() for p in paths}
    root = Path(target_root)
    if ".pkl" in suffixes:
        pkl = next(p for p in paths if p.suffix.lower() == ".pkl")
        folder = root / pkl.stem
        convert_pickle(pkl, folder)  # never executes the pickle's code; raises CheckpointError (ValueError)
    elif ".safetensors" in suffixes:
        weights = next(p for p in paths if p.suffix.lower() == ".safetensors")
        configs = [p for p in paths if p.suffix.lower() == ".json"]
        if not configs:
            raise ValueError("a safetensors generator needs its config.json: select both files together")
        stem = weights.stem if weights.stem != "model" else "generator"
        folder, n = root / stem, 1
        while folder.exists():
            n += 1
            folder = root / f"{stem}_{n}"
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(weights, folder / "model.safetensors")
        shutil.copyfile(configs[0], folder / "config.json")
        try:
            load_generator(folder)  # validate now, not at first use
        except ValueError:
            shutil.rmtree(folder, ignore_errors=True)
            raise
    else:
        names = ", ".join(p.name for p in paths)
        raise ValueError(f"{names}: not a generator file; import an official StyleGAN2-ADA .pkl or a studio "
                         "model.safetensors + config.json")
    spec = add_local(registry, folder, name=f"{folder.name} (imported)", source="local")
    return spec.name


def _format_info(session: EditSession, editor: StyleGANEditor) -> str:
    info = session.info
    lines = [f"**Source**: {session.source} · generator **{editor.name}**"]
    if "seconds" in info:
        lines.append(f"**{METHOD_HELP.get(info['method'], info['method'])}**: {info['seconds']:.2f} s, "
                     f"reconstruction error (MSE in [-1, 1]) {info['reconstruction_error']:.4f}")
    for note in info.get("notes", []):
        lines.append(f"⚠️ {note}")
    return "  \n".join(lines)


def build(registry: ModelRegistry, demo: gr.Blocks, *, runs_dir: str | None = "runs") -> dict[str, Any]:
    """Add the StyleGAN edit tab; returns the components other tabs wire to (``receive``: a
    hidden image input that inverts whatever is put into it)."""
    editors = EditorCache(registry)
    import_root = Path(runs_dir) / "imported" if runs_dir else Path(tempfile.mkdtemp(prefix="stylegan_import_"))
    generators = registry.names("stylegan2")
    default = generators[0] if generators else None
    colour_attrs = [a for a in COLOUR_EDITS if a in ("hair_color", "eye_color")]

    with gr.Tab("StyleGAN edit", id="stylegan_edit"):
        gr.Markdown("Invert a portrait into the studio's StyleGAN2-ADA generator (or one you import) and edit "
                    "it: attribute directions fitted from the evaluator's readings (InterFaceGAN), closed-form "
                    "SeFa directions, and truncation towards the mean or the nearest mode.")
        session = gr.State(None)
        with gr.Row():
            with gr.Column(scale=1):
                generator = gr.Dropdown(generators, value=default, label="Generator", elem_id="sg_generator")
                with gr.Accordion("Import a generator", open=False):
                    import_files = gr.File(label="Official .pkl, or model.safetensors + config.json",
                                           file_count="multiple", type="filepath", elem_id="sg_import_files")
                    import_button = gr.Button("Import (converted safely, never executed)")
                with gr.Tab("Random sample"):
                    with gr.Row():
                        seed = gr.Textbox(value="0", label="Seed", scale=3, elem_id="sg_seed")
                        random_seed = gr.Button("Random", scale=1)
                    sample_button = gr.Button("Sample", variant="primary", elem_id="sg_sample")
                with gr.Tab("Upload"):
                    # a file input (not gr.Image): whatever arrives reaches load_upload, which says
                    # clearly when it is not an image
                    upload = gr.File(label="Portrait or photo (PNG, JPEG, WebP, ...)", type="filepath",
                                     file_types=["image"], elem_id="sg_upload")
                    align = gr.Checkbox(False, label="Align face (photos: dlib 68-point landmarks, FFHQ crop)")
                    method = gr.Dropdown([(METHOD_HELP[m], m) for m in
                                          (editors.get(default).methods() if default else ["optimise-w+"])],
                                         value="encoder" if default and editors.get(default).encoder is not None
                                         else "optimise-w+", label="Inversion method", elem_id="sg_method")
                    with gr.Row():
                        steps = gr.Slider(10, 1000, value=150, step=10, label="Optimisation steps")
                        pti_steps = gr.Slider(10, 500, value=80, step=10, label="Tuning steps (PTI)")
                    invert_button = gr.Button("Invert", variant="primary", elem_id="sg_invert")
                with gr.Tab("Latent file"):
                    latent_file = gr.File(label="A latent exported here (.npz) or a .npy array", type="filepath",
                                          file_types=[".npz", ".npy"])
                received = gr.Image(visible=False, type="pil")  # images sent from other tabs
            with gr.Column(scale=2):
                with gr.Row():
                    target = gr.Image(label="Input (aligned / cropped)", type="pil", format="png", interactive=False)
                    before = gr.Image(label="Before (reconstruction / sample)", type="pil", format="png",
                                      interactive=False, elem_id="sg_before")
                    after = gr.Image(label="After (edited)", type="pil", format="png", interactive=False,
                                     elem_id="sg_after")
                pasted = gr.Image(label="Edited face pasted back into the photo", type="pil", format="png",
                                  visible=False, interactive=False)
                info = gr.Markdown("Sample a portrait or upload one to start.", elem_id="sg_info")
                with gr.Accordion("Guided edits (latent classifier)", open=True, visible=False) as guided_box:
                    guided = gr.Dropdown([], value=[], multiselect=True, elem_id="sg_guided",
                                         label="Make the portrait show (one value per attribute)",
                                         info="Each edit takes its own path in W+, holding the other attributes "
                                              "where they are; the sliders below then act on the result.")
                with gr.Accordion("Attribute directions (InterFaceGAN)", open=True):
                    named = {}
                    labels = list(NAMED_EDITS)
                    for i in range(0, len(labels), 3):
                        with gr.Row():
                            for label in labels[i:i + 3]:
                                named[label] = gr.Slider(-4, 4, value=0, step=0.1, label=label,
                                                         elem_id=f"sg_edit_{label.lower().replace(' ', '_')}")
                    colour_value, colour_strength = {}, {}
                    with gr.Row():
                        for attr in colour_attrs:
                            with gr.Column(min_width=160):
                                colour_value[attr] = gr.Dropdown([], label=f"{COLOUR_LABELS[attr]}: target")
                                colour_strength[attr] = gr.Slider(0, 5, value=0, step=0.1,
                                                                  label=f"{COLOUR_LABELS[attr]}: strength")
                with gr.Accordion("SeFa directions (closed form)", open=False):
                    with gr.Row():
                        sefa_first = gr.Slider(0, 1, value=0, step=1, label="First layer")
                        sefa_last = gr.Slider(0, 1, value=1, step=1, label="Last layer")
                    sefa = [gr.Slider(-5, 5, value=0, step=0.1, label=f"SeFa {i + 1}") for i in range(NUM_SEFA_SLIDERS)]
                with gr.Accordion("Truncation", open=False):
                    with gr.Row():
                        psi = gr.Slider(0, 1, value=1.0, step=0.05, label="ψ (1 = none)", elem_id="sg_psi")
                        trunc_mode = gr.Radio([("towards the mean w", "global"), ("towards the nearest mode", "multimodal")],
                                              value="global", label="Truncate")
                with gr.Row():
                    reading = gr.JSON(label="What the evaluator reads in the edit")
                    with gr.Column():
                        export_button = gr.Button("Export PNG + latent", elem_id="sg_export")
                        exported = gr.File(label="Download", file_count="multiple", interactive=False)

        edit_inputs = [session, generator, *named.values(), *[colour_value[a] for a in colour_attrs],
                       *[colour_strength[a] for a in colour_attrs], sefa_first, sefa_last, *sefa, psi, trunc_mode,
                       guided]

        def _edited(values: list[Any]) -> tuple[EditSession, StyleGANEditor, Any]:
            sess, name, *rest = values
            if sess is None:
                raise ValueError("sample a portrait or upload one first")
            editor = editors.get(sess.generator)
            n = len(named)
            named_vals = dict(zip(named, rest[:n]))
            k = len(colour_attrs)
            colours = {a: (v, s) for a, v, s in zip(colour_attrs, rest[n:n + k], rest[n + k:n + 2 * k])}
            first, last, *rest2 = rest[n + 2 * k:]
            sefa_vals, (psi_val, mode, guided_vals) = rest2[:NUM_SEFA_SLIDERS], rest2[NUM_SEFA_SLIDERS:]
            available = editor.named_edits()
            w = editor.edit_latent(sess, edits={available[l]: v for l, v in named_vals.items() if l in available},
                                   colour_edits=colours, sefa=sefa_vals, sefa_layers=(int(first), int(last)),
                                   psi=float(psi_val), truncation=mode, guided=list(guided_vals or []))
            return sess, editor, w

        @gpu_handler(20)
        def on_edit(*values: Any):
            try:
                sess, editor, w = _edited(list(values))
                image = editor.render(sess, w)
            except ValueError as exc:
                raise gr.Error(str(exc)) from None
            photo = editor.paste(sess, image)
            return image, gr.update(value=photo, visible=photo is not None), editor.read(image)

        def controls_for(name: str):
            """Slider visibility, colour choices, SeFa ranges and methods for generator ``name``."""
            editor = editors.get(name)
            available = editor.named_edits()
            updates = [gr.update(visible=label in available, value=0) for label in named]
            updates += [gr.update(choices=editor.colour_values(a), value=None) for a in colour_attrs]
            updates += [gr.update(value=0) for _ in colour_attrs]
            _, sefa_names = editor.sefa(0, editor.num_ws - 1)
            updates += [gr.update(maximum=editor.num_ws - 1, value=0), gr.update(maximum=editor.num_ws - 1,
                                                                                 value=editor.num_ws - 1)]
            updates += [gr.update(label=sefa_names[i], value=0) for i in range(NUM_SEFA_SLIDERS)]
            methods = editor.methods()
            updates += [gr.update(choices=[(METHOD_HELP[m], m) for m in methods],
                                  value="encoder" if "encoder" in methods else "optimise-w+")]
            choices = editor.guided_choices()
            updates += [gr.update(choices=choices, value=[]), gr.update(visible=bool(choices))]
            return updates

        control_outputs = [*named.values(), *[colour_value[a] for a in colour_attrs],
                           *[colour_strength[a] for a in colour_attrs], sefa_first, sefa_last, *sefa, method,
                           guided, guided_box]

        def on_generator(name: str):
            if not name:
                return [gr.update() for _ in control_outputs]
            try:
                return controls_for(name)
            except ValueError as exc:
                raise gr.Error(str(exc)) from None

        def on_sefa_layers(name: str, first: float, last: float):
            try:
                _, sefa_names = editors.get(name).sefa(int(first), max(int(first), int(last)))
            except ValueError as exc:
                raise gr.Error(str(exc)) from None
            return [gr.update(label=sefa_names[i]) for i in range(NUM_SEFA_SLIDERS)]

        @gpu_handler(20)
        def on_sample(name: str, seed_text: str):
            try:
                s = editors.get(name).sample(parse_seed(seed_text))
                return s, None, editors.get(name).render(s), _format_info(s, editors.get(name))
            except ValueError as exc:
                raise gr.Error(str(exc)) from None

        @gpu_handler(steps_duration(20, 0.05, 4, 5))
        def on_invert(name: str, path: str | None, align_face: bool, method_name: str, n_steps: float,
                      n_pti: float, progress=gr.Progress()):
            if not path:
                raise gr.Error("upload an image first (PNG, JPEG or WebP)")
            try:
                editor = editors.get(name)
                image, notes = load_upload(path)
                sess = editor.invert(image, method=method_name, steps=int(n_steps), pti_steps=int(n_pti),
                                     align=bool(align_face), notes=notes,
                                     callback=lambda i, n, _p: progress((i, n), desc="inverting"))
            except ValueError as exc:
                raise gr.Error(str(exc)) from None
            return sess, sess.target, editor.render(sess), _format_info(sess, editor)

        @gpu_handler(steps_duration(20, 0.05, 3, 4))
        def on_received(name: str, image: Any, method_name: str, n_steps: float, n_pti: float):
            if image is None:
                return gr.update(), gr.update(), gr.update(), gr.update()
            try:
                editor = editors.get(name)
                image, notes = load_upload(image)
                sess = editor.invert(image, method=method_name, steps=int(n_steps), pti_steps=int(n_pti),
                                     notes=notes, source="sent from another tab")
            except ValueError as exc:
                raise gr.Error(str(exc)) from None
            return sess, sess.target, editor.render(sess), _format_info(sess, editor)

        @gpu_handler(20)
        def on_latent(name: str, path: str | None):
            if not path:
                return gr.update(), gr.update(), gr.update(), gr.update()
            try:
                editor = editors.get(name)
                sess = editor.load_latent(path)
            except ValueError as exc:
                raise gr.Error(str(exc)) from None
            return sess, None, editor.render(sess), _format_info(sess, editor)

        @gpu_handler(20)
        def on_export(*values: Any):
            try:
                sess, editor, w = _edited(list(values))
                image = editor.render(sess, w)
            except ValueError as exc:
                raise gr.Error(str(exc)) from None
            folder = Path(tempfile.mkdtemp(prefix="stylegan_edit_"))
            png = folder / "edit.png"
            image.save(png)
            npz = StyleGANEditor.save_latent(sess, w, folder / "edit_latent.npz")
            files = [str(png), str(npz)]
            photo = editor.paste(sess, image)
            if photo is not None:
                photo.save(folder / "edit_in_photo.png")
                files.append(str(folder / "edit_in_photo.png"))
            return files

        @gpu_handler(60)
        def on_import(files: list[str] | None):
            try:
                name = import_generator(registry, files or [], import_root)
            except ValueError as exc:
                raise gr.Error(str(exc)) from None
            gr.Info(f"imported {name}")
            return gr.update(choices=registry.names("stylegan2"), value=name)

        source_outputs = [session, target, before, info]
        queue = dict(concurrency_id=GPU_QUEUE)
        # a new generator: its controls, then a sample of it (a latent belongs to one generator)
        generator.change(on_generator, generator, control_outputs, api_name=False).then(
            on_sample, [generator, seed], source_outputs, api_name=False, **queue).then(
            on_edit, edit_inputs, [after, pasted, reading], api_name=False, **queue)
        for comp in (sefa_first, sefa_last):
            comp.release(on_sefa_layers, [generator, sefa_first, sefa_last], sefa, api_name=False)
        random_seed.click(lambda: str(secrets.randbelow(MAX_SEED + 1)), None, seed, api_name=False).then(
            on_sample, [generator, seed], source_outputs, api_name=False, **queue).then(
            on_edit, edit_inputs, [after, pasted, reading], api_name=False, **queue)
        sample_button.click(on_sample, [generator, seed], source_outputs, api_name="stylegan_sample", **queue).then(
            on_edit, edit_inputs, [after, pasted, reading], api_name=False, **queue)
        seed.submit(on_sample, [generator, seed], source_outputs, api_name=False, **queue).then(
            on_edit, edit_inputs, [after, pasted, reading], api_name=False, **queue)
        invert_button.click(on_invert, [generator, upload, align, method, steps, pti_steps], source_outputs,
                            api_name="stylegan_invert", **queue).then(
            on_edit, edit_inputs, [after, pasted, reading], api_name=False, **queue)
        latent_file.upload(on_latent, [generator, latent_file], source_outputs, api_name=False, **queue).then(
            on_edit, edit_inputs, [after, pasted, reading], api_name=False, **queue)
        received.change(on_received, [generator, received, method, steps, pti_steps], source_outputs,
                        api_name=False, **queue).then(
            on_edit, edit_inputs, [after, pasted, reading], api_name=False, **queue)
        for comp in [*named.values(), *colour_strength.values(), *colour_value.values(), *sefa, psi, trunc_mode,
                     guided]:
            comp.change(on_edit, edit_inputs, [after, pasted, reading], api_name=False, trigger_mode="always_last",
                        **queue)
        export_button.click(on_export, edit_inputs, exported, api_name=False, **queue)
        import_button.click(on_import, import_files, generator, api_name=False, **queue)  # .change does the rest
        if default:
            demo.load(on_generator, generator, control_outputs, api_name=False).then(
                on_sample, [generator, seed], source_outputs, api_name=False, **queue).then(
                on_edit, edit_inputs, [after, pasted, reading], api_name=False, **queue)
    return {"receive": received, "generator": generator, "session": session}
