"""Text to image tab: a prompt gives images in 1-4 steps; the distilled student beside its teacher.

Every registered ``text_to_image`` model is a choice: the embedded student and teacher, local
diffusers folders, hub ids and finished runs. A folder whose scheduler is an ``LCMScheduler`` is a
DMD2 student (``pipelines/training/distill_dmd2.py``): it runs in 1-4 steps at guidance 1 (the
teacher's guidance is distilled in); any other portrait pipeline is a teacher, at the best setting
the text-to-image benchmark measured for it (its card's ``benchmark_teacher_steps`` and
``benchmark_teacher_guidance``), else 25 steps and guidance 4; hub families take their own
conventions (``pipelines.hub_models.DEFAULTS``). With a one-step
model the images follow the prompt as it is typed (``trigger_mode="always_last"`` drops the
keystrokes typed while one generation runs). Shown only when the registry holds such a model.
"""

from __future__ import annotations

import json
import secrets
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gradio as gr
import torch

from studio.registry import ASSETS_DIR, GPU_QUEUE, ModelRegistry
from studio.validation import MAX_SEED, parse_seed
from studio.zerogpu import gpu_handler, work_duration

__all__ = ["build", "ModelDefaults", "Generation", "Comparison", "model_defaults", "card_teacher",
           "load_model", "check_settings", "generate", "compare", "save_images", "MAX_BATCH", "TEACHER_MAX_STEPS",
           "STUDENT_MAX_STEPS"]

MAX_BATCH = 8              # images per generation
STUDENT_MAX_STEPS = 4      # a distilled student is trained for 1-4 steps
TEACHER_MAX_STEPS = 50
GUIDANCE_MAX = 20          # the guidance slider's top
TEACHER_STEPS, TEACHER_GUIDANCE = 25, 4.0
STUDENT_GUIDANCE = 1.0     # guidance_scale=1: the conditional branch alone (guidance distilled in)


@dataclass(frozen=True)
class ModelDefaults:
    """How a model is run by default, and what the tab lets a person change."""
    role: str                       # "student" (distilled, few steps) | "teacher" | "unknown"
    steps: int                      # default num_inference_steps
    max_steps: int                  # the steps slider's maximum
    guidance_scale: float           # default guidance
    negative_prompts: bool = True   # whether the model takes a negative prompt
    teacher: str | None = None      # registered name of the teacher its card names
    note: str = ""                  # one line about the model (its card's title, or why it is unknown)

    @property
    def one_step(self) -> bool:
        """A one-step model: cheap enough to regenerate as the prompt is typed (not a model whose
        files could not be read: it would fail at every keystroke)."""
        return self.steps == 1 and self.role != "unknown"


@dataclass
class Generation:
    """One generation: the images, its wall time and the info line the tab shows."""
    images: list[Any]
    seconds: float                  # the pipeline call, loading excluded
    seed: int
    steps: int
    guidance_scale: float
    info: str
    notes: list[str] = field(default_factory=list)

    @property
    def seconds_per_image(self) -> float:
        return self.seconds / max(1, len(self.images))


@dataclass
class Comparison:
    """The student and the teacher on the same prompt and seed."""
    student: Generation
    teacher: Generation
    speedup: float                  # teacher seconds / student seconds
    info: str


# -- what a model is ------------------------------------------------------------------------------
def _read_json(file: Path) -> dict[str, Any]:
    try:
        data = json.loads(file.read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def _same_folder(a: str | Path, b: str | Path) -> bool:
    try:
        return Path(a).resolve() == Path(b).resolve()
    except OSError:
        return False


def card_teacher(registry: ModelRegistry, name: str) -> str | None:
    """The registered text-to-image model that ``name``'s card names as its teacher, if any
    (``card.json`` -> ``config.teacher``, a folder; relative paths from the working directory or the
    repository root)."""
    folder = Path(registry.spec(name).location)
    config = _read_json(folder / "card.json").get("config") if folder.is_dir() else None
    teacher = config.get("teacher") if isinstance(config, dict) else None
    if not isinstance(teacher, str) or not teacher:
        return None
    candidates = [Path(teacher)] if Path(teacher).is_absolute() else [Path(teacher), ASSETS_DIR.parent / teacher]
    for other in registry.names("text_to_image"):
        if other == name:
            continue
        location = registry.spec(other).location
        if any(_same_folder(c, location) for c in candidates if c.exists()):
            return other
    return None


def _student_steps(card: dict[str, Any]) -> int:
    """A DMD2 student's own step count from its card (1 when the card does not say)."""
    figures, config = card.get("figures"), card.get("config")
    steps = figures.get("student_steps") if isinstance(figures, dict) else None
    if not isinstance(steps, int) and isinstance(config, dict) and isinstance(config.get("student_timesteps"), list):
        steps = len(config["student_timesteps"])
    return steps if isinstance(steps, int) and 1 <= steps <= STUDENT_MAX_STEPS else 1


def _teacher_setting(card: dict[str, Any]) -> tuple[int, float]:
    """A portrait teacher's steps and guidance: the best setting the benchmark measured (in its card),
    else :data:`TEACHER_STEPS` and :data:`TEACHER_GUIDANCE`."""
    figures = card.get("figures") if isinstance(card.get("figures"), dict) else {}
    steps, guidance = figures.get("benchmark_teacher_steps"), figures.get("benchmark_teacher_guidance")
    numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (steps, guidance))
    if numbers and isinstance(steps, int) and 1 <= steps <= TEACHER_MAX_STEPS and 1 <= guidance <= GUIDANCE_MAX:
        return steps, float(guidance)
    return TEACHER_STEPS, TEACHER_GUIDANCE


def model_defaults(registry: ModelRegistry, name: str) -> ModelDefaults:
    """Defaults for ``name``, read from its files without loading its weights (never raises for
    a model that cannot load: that is reported when it is used)."""
    from pipelines.hub_models import DEFAULTS, detect_family

    spec = registry.spec(name)
    folder = Path(spec.location)
    card = _read_json(folder / "card.json") if folder.is_dir() else {}
    title = card.get("title", "") if isinstance(card.get("title"), str) else ""
    index = _read_json(folder / "model_index.json") if folder.is_dir() else {}
    if index.get("_class_name") == "PortraitDiffusionPipeline":
        scheduler = (index.get("scheduler") or [None, None])[1]
        if scheduler == "LCMScheduler":      # a DMD2 student
            return ModelDefaults("student", _student_steps(card), STUDENT_MAX_STEPS, STUDENT_GUIDANCE,
                                 teacher=card_teacher(registry, name), note=title or "distilled student (LCMScheduler)")
        steps, guidance = _teacher_setting(card)
        return ModelDefaults("teacher", steps, TEACHER_MAX_STEPS, guidance, note=title or f"teacher ({scheduler})")
    try:
        family = detect_family(spec.location)
    except Exception as exc:  # noqa: BLE001 - offline hub id, not a model: shown, raised again on use
        return ModelDefaults("unknown", 1, STUDENT_MAX_STEPS, 0.0, note=f"⚠️ {exc}")
    if family in DEFAULTS:
        d = DEFAULTS[family]
        return ModelDefaults("student", d.steps, max(d.allowed_steps), d.guidance_scale,
                             negative_prompts=d.negative_prompts,
                             note=title or f"{family}: steps {list(d.allowed_steps)}, guidance {d.guidance_scale:g}")
    return ModelDefaults("teacher", TEACHER_STEPS, TEACHER_MAX_STEPS, TEACHER_GUIDANCE, note=title or family)


def load_model(registry: ModelRegistry, name: str) -> tuple[Any, float]:
    """The loaded pipeline of ``name`` (the registry keeps it) and the seconds loading took now
    (0 when it was loaded before). Any failure becomes a ``ValueError`` naming the model."""
    if not name:
        raise ValueError("choose a model first")
    was_loaded = registry.is_loaded(name)
    t0 = time.perf_counter()
    try:
        pipe = registry.get(name)
    except Exception as exc:  # noqa: BLE001 - hub offline, not a model, broken weights, missing package
        raise ValueError(f"{name} could not be loaded: {exc}") from exc
    return pipe, 0.0 if was_loaded else time.perf_counter() - t0


def _whole(value: Any, what: str) -> int:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be a whole number, not {value!r}") from None
    if number != int(number):
        raise ValueError(f"{what} must be a whole number, not {value!r}")
    return int(number)


def check_settings(defaults: ModelDefaults, steps: Any, batch: Any, guidance: Any) -> tuple[int, int, float]:
    """(steps, batch, guidance) checked against the model's ranges; ``ValueError`` otherwise."""
    steps, batch = _whole(steps, "steps"), _whole(batch, "the batch size")
    what = {"student": "this distilled student", "teacher": "this teacher"}.get(defaults.role, "this model")
    if not 1 <= steps <= defaults.max_steps:
        raise ValueError(f"steps must be between 1 and {defaults.max_steps} for {what}, got {steps}")
    if not 1 <= batch <= MAX_BATCH:
        raise ValueError(f"the batch size must be between 1 and {MAX_BATCH} images, got {batch}")
    try:
        guidance = float(guidance)
    except (TypeError, ValueError):
        raise ValueError(f"guidance must be a number, not {guidance!r}") from None
    if not 0.0 <= guidance <= GUIDANCE_MAX:
        raise ValueError(f"guidance must be between 0 and {GUIDANCE_MAX}, got {guidance:g}")
    return steps, batch, guidance


# -- running --------------------------------------------------------------------------------------
def _ms(seconds: float) -> str:
    return f"{1000 * seconds:.0f} ms" if seconds < 10 else f"{seconds:.1f} s"


def generate(registry: ModelRegistry, name: str, *, prompt: str, negative_prompt: str = "", steps: Any = None,
             guidance_scale: Any = None, batch: Any = 1, seed: int = 0) -> Generation:
    """Run ``name`` once; ``None`` steps / guidance take the model's defaults. Raises ``ValueError``
    with a message a person can act on (bad settings, a model that cannot load)."""
    defaults = model_defaults(registry, name)
    steps, batch, guidance = check_settings(defaults, defaults.steps if steps is None else steps, batch,
                                            defaults.guidance_scale if guidance_scale is None else guidance_scale)
    pipe, load_seconds = load_model(registry, name)
    prompt = (prompt or "").strip()
    negative = (negative_prompt or "").strip() or None
    notes = []
    if not prompt:
        notes.append("Empty prompt: generated unconditionally (no text condition).")
    if negative and not defaults.negative_prompts:
        notes.append("This model takes no negative prompt; it was ignored.")
        negative = None
    generator = torch.Generator("cpu").manual_seed(seed)   # CPU noise: the same images on every device
    t0 = time.perf_counter()
    out = pipe(prompt=prompt, negative_prompt=negative, num_inference_steps=steps, guidance_scale=guidance,
               num_images_per_prompt=batch, generator=generator)
    seconds = time.perf_counter() - t0
    if any(out.truncated):
        limit = getattr(pipe, "max_length", None)
        notes.append(f"The prompt is longer than the text encoder's {limit or 'maximum'} tokens; "
                     "its end was cut and had no effect.")
    images = list(out.images)
    gen = Generation(images, seconds, seed, steps, guidance, "", notes)
    info = (f"**{_ms(gen.seconds_per_image)} per image** · {len(images)} image(s) in {_ms(seconds)} · "
            f"{steps} step(s) · guidance {guidance:g} · seed {seed} · {name}")
    if load_seconds:
        info += f" · loaded in {load_seconds:.1f} s"
    gen.info = info
    return gen


def compare(registry: ModelRegistry, student: str, teacher: str, *, prompt: str, negative_prompt: str = "",
            steps: Any = None, guidance_scale: Any = None, seed: int = 0) -> Comparison:
    """The student (with ``steps`` / ``guidance_scale``, default its own) and the teacher (its own
    defaults) on one image of the same prompt and seed; both models are loaded before timing."""
    if not teacher:
        raise ValueError("choose a teacher to compare with (its card names none that is registered)")
    if teacher == student:
        raise ValueError(f"{student} is both the model and the teacher: choose another teacher to compare with")
    load_model(registry, student)
    load_model(registry, teacher)
    s = generate(registry, student, prompt=prompt, negative_prompt=negative_prompt, steps=steps,
                 guidance_scale=guidance_scale, batch=1, seed=seed)
    t = generate(registry, teacher, prompt=prompt, negative_prompt=negative_prompt, batch=1, seed=seed)
    speedup = t.seconds / max(s.seconds, 1e-9)
    info = (f"**{speedup:.1f}x faster**: student {_ms(s.seconds)} ({s.steps} step(s), guidance "
            f"{s.guidance_scale:g}) · teacher {_ms(t.seconds)} ({t.steps} steps, guidance {t.guidance_scale:g}) · "
            f"seed {seed}")
    return Comparison(s, t, speedup, info)


def save_images(items: list | None) -> list[str]:
    """Write gallery items (file paths or PIL images, alone or with a caption) as PNGs to download."""
    from PIL import Image

    if not items:
        raise ValueError("generate some images first")
    folder = Path(tempfile.mkdtemp(prefix="text_to_image_"))
    paths = []
    for i, item in enumerate(items):
        src = item[0] if isinstance(item, (list, tuple)) else item
        image = src if isinstance(src, Image.Image) else Image.open(src)
        dst = folder / f"image_{i}.png"
        image.convert("RGB").save(dst)
        paths.append(str(dst))
    return paths


def _format(gen: Generation) -> tuple[list, str]:
    items = [(img, f"seed {gen.seed} · image {i + 1}") for i, img in enumerate(gen.images)]
    return items, "  \n".join([gen.info, *[f"⚠️ {n}" for n in gen.notes]])


# -- the tab --------------------------------------------------------------------------------------
def _model_updates(registry: ModelRegistry, name: str | None, teachers: list[str]):
    """Steps slider, guidance, teacher dropdown and the model line for the chosen model."""
    if not name:
        return gr.update(), gr.update(), gr.update(), ""
    d = model_defaults(registry, name)
    teacher = d.teacher or next((t for t in teachers if t != name and model_defaults(registry, t).role == "teacher"),
                                None)
    live = " · the images follow the prompt as you type" if d.one_step else ""
    line = f"<small>{d.role}: {d.steps} step(s) by default (1–{d.max_steps}), guidance {d.guidance_scale:g}{live}" \
           f"<br>{d.note}</small>"
    return (gr.Slider(minimum=1, maximum=d.max_steps, value=d.steps, step=1),
            gr.Slider(value=d.guidance_scale), gr.Dropdown(choices=teachers, value=teacher), line)


def build(registry: ModelRegistry, demo: gr.Blocks) -> dict[str, Any] | None:
    """Add the Text to image tab when the registry holds a text-to-image model; returns its
    components (``model``: the model dropdown) or None when the tab is not shown."""
    models = registry.names("text_to_image")
    if not models:
        return None
    # Prefer a student as the first choice: the tab is about fast generation.
    first = next((m for m in models if model_defaults(registry, m).role == "student"), models[0])
    d = model_defaults(registry, first)

    with gr.Tab("Text to image", id="text_to_image"):
        gr.Markdown("Type a prompt: a distilled student draws it in 1–4 steps. **Compare with teacher** runs the "
                    "teacher on the same prompt and seed, side by side, with both times.")
        with gr.Row():
            with gr.Column(scale=1):
                prompt = gr.Textbox(label="Prompt", lines=2, placeholder="a girl with long blue hair and green eyes, "
                                    "smiling", elem_id="t2i_prompt")
                negative = gr.Textbox(label="Negative prompt (optional)", elem_id="t2i_negative")
                model = gr.Dropdown(models, value=first, label="Model", elem_id="t2i_model")
                model_line = gr.Markdown(elem_id="t2i_model_line")
                with gr.Row():
                    steps = gr.Slider(1, d.max_steps, value=d.steps, step=1, label="Steps", elem_id="t2i_steps")
                    batch = gr.Slider(1, MAX_BATCH, value=1, step=1, label="Images", elem_id="t2i_batch")
                with gr.Row():
                    seed = gr.Textbox(value="0", label="Seed", scale=3, elem_id="t2i_seed")
                    randomise = gr.Button("Random seed", scale=1, elem_id="t2i_randomise")
                with gr.Accordion("More", open=False):
                    guidance = gr.Slider(0, GUIDANCE_MAX, value=d.guidance_scale, step=0.5, label="Guidance",
                                         info="1 for distilled students (their guidance is distilled in)",
                                         elem_id="t2i_guidance")
                    live = gr.Checkbox(True, label="Regenerate as I type (one-step models only)", elem_id="t2i_live")
                    teacher = gr.Dropdown(models, value=None, label="Teacher to compare with",
                                          info="the teacher the student's card names, when it is registered",
                                          elem_id="t2i_teacher")
                with gr.Row():
                    run_button = gr.Button("Generate", variant="primary", elem_id="t2i_generate")
                    compare_button = gr.Button("Compare with teacher", elem_id="t2i_compare")
            with gr.Column(scale=1):
                gallery = gr.Gallery(label="Images", columns=4, height=420, format="png", elem_id="t2i_gallery")
                info = gr.Markdown(elem_id="t2i_info")
                with gr.Row():
                    student_image = gr.Image(label="Student", type="pil", format="png", interactive=False,
                                             elem_id="t2i_compare_student")
                    teacher_image = gr.Image(label="Teacher", type="pil", format="png", interactive=False,
                                             elem_id="t2i_compare_teacher")
                compare_info = gr.Markdown(elem_id="t2i_compare_info")
                download = gr.Button("Download the images", elem_id="t2i_download")
                files = gr.File(label="Download", file_count="multiple", interactive=False)

        @gpu_handler(work_duration(15, 1.0, 3, 5))
        def on_generate(name: str, text: str, neg: str, n_steps: float, g: float, n: float, seed_text: str):
            try:
                gen = generate(registry, name, prompt=text, negative_prompt=neg, steps=n_steps, guidance_scale=g,
                               batch=n, seed=parse_seed(seed_text))
            except ValueError as exc:
                raise gr.Error(str(exc)) from None
            return _format(gen)

        def on_type(name: str, text: str, neg: str, n_steps: float, g: float, n: float, seed_text: str, on: bool):
            # Light: decides, and only a one-step model asks for the GPU (on_generate).
            if not on or not name or not model_defaults(registry, name).one_step:
                return gr.update(), gr.update()
            return on_generate(name, text, neg, n_steps, g, n, seed_text)

        @gpu_handler(30 + 2 * TEACHER_MAX_STEPS)   # one image of each; the teacher's steps dominate
        def on_compare(name: str, text: str, neg: str, n_steps: float, teacher_name: str | None, g: float,
                       seed_text: str):
            try:
                c = compare(registry, name, teacher_name or "", prompt=text, negative_prompt=neg, steps=n_steps,
                            guidance_scale=g, seed=parse_seed(seed_text))
            except ValueError as exc:
                raise gr.Error(str(exc)) from None
            notes = dict.fromkeys(c.student.notes + c.teacher.notes)
            return (c.student.images[0], c.teacher.images[0],
                    "  \n".join([c.info, *[f"⚠️ {n}" for n in notes]]))

        def on_download(items: list | None):
            try:
                return save_images(items)
            except ValueError as exc:
                raise gr.Error(str(exc)) from None

        inputs = [model, prompt, negative, steps, guidance, batch, seed]
        outputs = [gallery, info]
        run_button.click(on_generate, inputs, outputs, api_name="text_to_image", concurrency_id=GPU_QUEUE)
        prompt.submit(on_generate, inputs, outputs, api_name=False, concurrency_id=GPU_QUEUE)
        prompt.change(on_type, [*inputs, live], outputs, api_name=False, trigger_mode="always_last",
                      concurrency_id=GPU_QUEUE, show_progress="hidden")
        seed.submit(on_generate, inputs, outputs, api_name=False, concurrency_id=GPU_QUEUE)
        randomise.click(lambda: str(secrets.randbelow(MAX_SEED + 1)), None, seed, api_name=False).then(
            on_generate, inputs, outputs, api_name=False, concurrency_id=GPU_QUEUE)
        compare_button.click(on_compare, [model, prompt, negative, steps, teacher, guidance, seed],
                             [student_image, teacher_image, compare_info], api_name="text_to_image_compare",
                             concurrency_id=GPU_QUEUE)
        model.change(lambda name: _model_updates(registry, name, registry.names("text_to_image")), model,
                     [steps, guidance, teacher, model_line], api_name=False)
        demo.load(lambda name: _model_updates(registry, name, registry.names("text_to_image")), model,
                  [steps, guidance, teacher, model_line], api_name=False)
        download.click(on_download, gallery, files, api_name=False)
    return {"model": model, "teacher": teacher, "gallery": gallery}
