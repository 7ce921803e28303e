"""Evaluate text-to-image pipelines of the portrait world: fixed prompt sets, adherence, FD-world
and speed against a teacher.

The text-to-image benchmark (``benchmarks/text_to_image.py``) reports all of these with its sweeps; the
distillation scripts call :func:`evaluate_student` at the end of a run and write its figures into the
student's card (adherence, FD-world, speedup over the teacher).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from pipelines.data.portrait_world import HELD_OUT_COMBINATIONS, PortraitWorld, caption_attributes
from pipelines.evaluation import Evaluator, adherence_by_attribute, frechet_distance, prompt_adherence

__all__ = ["prompt_set", "naming_caption", "real_images", "heldout_captions", "generate", "adherence",
           "autoencoder_ceiling", "time_call", "time_calls", "speed_figures", "evaluate_student", "STAGES",
           "TIMING_BATCH"]

TIMING_BATCH = 8
STAGES = ("text_encoding", "denoising", "decoding")   # the pipelines' timings, one per network
PROMPT_SEED = 31_000_000
FD_PROMPT_SEED = 32_000_000
REAL_SEED = 33_000_000
CEILING_SEED = 34_000_000


# -- prompts ------------------------------------------------------------------------------------
def naming_caption(world: PortraitWorld, attrs, must_name: dict[str, str], seed: int, tries: int = 200) -> str:
    """A caption of ``attrs`` (phrasing drawn from ``seed``) that names every attribute of ``must_name``."""
    for k in range(tries):
        caption = world.caption(attrs, np.random.default_rng([seed, k]))
        named = caption_attributes(caption)
        if all(named.get(n) == v for n, v in must_name.items()):
            return caption
    raise RuntimeError(f"no caption of {attrs} names {must_name} in {tries} tries")


def prompt_set(n: int, seed: int = PROMPT_SEED, *, heldout_share: float = 0.5) -> list[dict[str, Any]]:
    """``n`` fixed prompts: world captions, the first ``heldout_share`` of them of held-out portraits
    whose caption names their held-out combination. Each: {"prompt", "held_out"}."""
    world = PortraitWorld()
    rng = np.random.default_rng(seed)
    n_held = int(round(n * heldout_share))
    out = []
    for i in range(n):
        held = i < n_held
        attrs = world.sample_attributes(rng, split="heldout" if held else "train")
        must = {}
        if held:
            d = attrs.to_dict()
            must = next(c for c in HELD_OUT_COMBINATIONS if all(d[k] == v for k, v in c.items()))
        out.append({"prompt": naming_caption(world, attrs, must, seed + i), "held_out": held})
    return out


def real_images(n: int, size: int, seed: int = REAL_SEED) -> list:
    """``n`` held-out world renders (PIL)."""
    world = PortraitWorld()
    return [world.sample(seed + i, size=size, split="heldout", with_line_art=False).image for i in range(n)]


def heldout_captions(n: int, seed: int = FD_PROMPT_SEED) -> list[str]:
    world = PortraitWorld()
    return [world.sample(seed + i, size=world.MIN_SIZE, split="heldout", with_line_art=False).caption
            for i in range(n)]



# -- sampling -----------------------------------------------------------------------------------
def generate(pipe, prompts: Sequence[str], *, steps: int, guidance: float, images_per_prompt: int = 1,
             seed: int = 0, batch: int = 16, **kwargs) -> torch.Tensor:
    """Images [len(prompts) * images_per_prompt, 3, H, W] in [-1, 1] (float32, CPU), image i of
    prompt j from a fixed seed: chunks of ``batch`` images, chunk k seeded ``seed + k``."""
    per_call = max(1, batch // images_per_prompt)
    out = []
    for k, start in enumerate(range(0, len(prompts), per_call)):
        res = pipe(prompt=list(prompts[start:start + per_call]), num_inference_steps=steps,
                   guidance_scale=guidance, num_images_per_prompt=images_per_prompt, output_type="pt",
                   generator=torch.Generator().manual_seed(seed + k), **kwargs)
        out.append(res.images.float().cpu())
    return torch.cat(out)


def adherence(evaluator: Evaluator, images: torch.Tensor, prompts: Sequence[str], images_per_prompt: int = 1) -> float:
    return prompt_adherence(evaluator.predict_attributes(images),
                            [p for p in prompts for _ in range(images_per_prompt)])



@torch.no_grad()
def autoencoder_ceiling(encoder, decoders: dict[str, Any], evaluator: Evaluator, *, n: int = 512,
                        seed: int = CEILING_SEED, batch: int = 64) -> dict[str, dict[str, float]]:
    """How much of what a caption asks survives the autoencoder, whatever the UNet does.

    ``n`` held-out renders are encoded by ``encoder`` (a pipeline: its ``encode_images``, posterior
    mean), decoded by each pipeline of ``decoders`` (``decode_latents``; they must share the
    encoder's latent space) and scored against their own captions. Returns, per decoder name,
    ``{"all": adherence, <attribute>: share, ...}``; "real" scores the renders themselves. A teacher
    decoded by an autoencoder cannot be expected to beat that autoencoder's figure.
    """
    from pipelines.images import pil_to_tensor

    world = PortraitWorld()
    samples = [world.sample(seed + i, size=world.MIN_SIZE, split="heldout", with_line_art=False) for i in range(n)]
    captions = [s.caption for s in samples]
    real = pil_to_tensor([s.image for s in samples])
    outputs: dict[str, list[torch.Tensor]] = {"real": [real]}
    for start in range(0, n, batch):
        latents = encoder.encode_images(real[start:start + batch])
        for name, pipe in decoders.items():
            outputs.setdefault(name, []).append(pipe.decode_latents(latents.to(pipe.unet.dtype)).cpu())
    figures = {}
    for name, chunks in outputs.items():
        predicted = evaluator.predict_attributes(torch.cat(chunks))
        figures[name] = {"all": prompt_adherence(predicted, captions), **adherence_by_attribute(predicted, captions)}
    return figures


# -- timing -------------------------------------------------------------------------------------
def sync(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_call(call: Callable[[], Any], *, repeats: int, device: torch.device | str = "cpu") -> dict[str, float]:
    """A warm-up call, then medians over ``repeats`` calls: "total" (wall clock, seconds) and each
    key of the output's ``timings``."""
    return time_calls({"call": call}, repeats=repeats, device=device)["call"]


def time_calls(calls: Mapping[str, Callable[[], Any]], *, repeats: int,
               device: torch.device | str = "cpu") -> dict[str, dict[str, float]]:
    """:func:`time_call` for several calls side by side: a warm-up call of each, then ``repeats``
    rounds that run every call once, in turn. Interleaved, a drift of the machine's speed (another
    process, the clock) reaches every call alike and stays out of their ratios, which timing one
    call's repeats after the other's would not."""
    for call in calls.values():
        call()
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in calls}
    for _ in range(repeats):
        for name, call in calls.items():
            sync(device)
            t0 = time.perf_counter()
            out = call()
            sync(device)
            runs[name].append({"total": time.perf_counter() - t0, **dict(getattr(out, "timings", {}))})
    return {name: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for name, rs in runs.items()}


def speed_figures(teacher, student, prompts: Sequence[str], *, teacher_steps: int, teacher_guidance: float,
                  repeats: int, student_steps: int = 1, others: Mapping[str, Any] | None = None,
                  device: torch.device | str = "cpu") -> dict[str, float]:
    """Teacher (its setting) and student (``student_steps``, guidance 1) on the same batch of prompts,
    end to end ("speedup") and for the denoising loop alone ("denoise_speedup"), timed side by side
    (:func:`time_calls`). ``others``: more pipelines run like the student in the same rounds, each
    reported as ``<name>_batch_ms`` and ``<name>_<stage>_ms``."""
    prompts = list(prompts)

    def teacher_call():
        return teacher(prompt=prompts, num_inference_steps=teacher_steps, guidance_scale=teacher_guidance,
                       generator=torch.Generator().manual_seed(0))

    def like_student(pipe, batch: list[str]):
        return lambda: pipe(prompt=batch, num_inference_steps=student_steps, guidance_scale=1.0,
                            generator=torch.Generator().manual_seed(0))

    calls = {"teacher": teacher_call, "student": like_student(student, prompts),
             "one": like_student(student, prompts[:1])}
    calls.update({name: like_student(pipe, prompts) for name, pipe in (others or {}).items()})
    timed = time_calls(calls, repeats=repeats, device=device)
    t, s = timed["teacher"], timed["student"]
    figures = {"speedup": t["total"] / s["total"], "denoise_speedup": t["denoising"] / s["denoising"],
               "timing_batch": len(prompts), "student_latency_ms": 1000 * timed["one"]["total"]}
    for name in ("teacher", "student", *(others or {})):
        figures[f"{name}_batch_ms"] = 1000 * timed[name]["total"]
        for k in STAGES:
            figures[f"{name}_{k}_ms"] = 1000 * timed[name][k]
    return figures


# -- a student against its teacher ----------------------------------------------------------------
def evaluate_student(student, teacher, evaluator: Evaluator, *, prompts: int = 16, student_steps: int = 1,
                     teacher_steps: int = 25, teacher_guidance: float = 4.0, fd_images: int = 64,
                     repeats: int = 2, device: torch.device | str = "cpu") -> dict[str, float]:
    """What a finished distillation run writes into its student's card.

    ``student_adherence`` / ``teacher_adherence`` on :func:`prompt_set` (half of it held-out
    combinations), ``fd_world_student`` / ``fd_world_teacher`` against held-out renders and their
    ratio, and ``speedup`` / ``denoise_speedup`` for a batch of :data:`TIMING_BATCH` prompts. A
    quick version of ``python -m benchmarks.text_to_image`` (fewer prompts and images, one teacher
    setting), cheap enough to run at the end of every run.
    """
    texts = [p["prompt"] for p in prompt_set(prompts)]
    student_kw = dict(steps=student_steps, guidance=1.0)
    teacher_kw = dict(steps=teacher_steps, guidance=teacher_guidance)
    figures = {"student_adherence": adherence(evaluator, generate(student, texts, **student_kw), texts),
               "teacher_adherence": adherence(evaluator, generate(teacher, texts, **teacher_kw), texts)}
    real = evaluator.features(real_images(fd_images, size=PortraitWorld.MIN_SIZE))
    captions = heldout_captions(fd_images)
    fd_student = frechet_distance(evaluator.features(generate(student, captions, **student_kw, seed=1)), real)
    fd_teacher = frechet_distance(evaluator.features(generate(teacher, captions, **teacher_kw, seed=1)), real)
    figures.update(fd_world_student=fd_student, fd_world_teacher=fd_teacher, fd_ratio=fd_student / fd_teacher)
    batch = (texts * TIMING_BATCH)[:TIMING_BATCH]
    speed = speed_figures(teacher, student, batch, teacher_steps=teacher_steps, teacher_guidance=teacher_guidance,
                          repeats=repeats, student_steps=student_steps, device=device)
    figures.update({k: speed[k] for k in ("speedup", "denoise_speedup", "student_latency_ms")})
    figures.update(prompts=len(texts), fd_images=fd_images, student_steps=student_steps,
                   teacher_steps=teacher_steps, teacher_guidance=teacher_guidance)
    return figures
