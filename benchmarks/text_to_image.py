"""Text-to-image figures for the embedded teacher and its one-step student, on this machine, one run.

    python -m benchmarks.text_to_image --json benchmarks/results/text_to_image.json

Prompts: a fixed set of portrait-world captions (fixed seeds), half of them of portraits with a
held-out attribute combination that the caption names; every image has a fixed seed. Adherence is
the share of the attributes a prompt names that the evaluator reads in its image
(:func:`pipelines.evaluation.prompt_adherence`), pooled over all images.

- teacher_adherence: the teacher at its best setting of a small sweep (``--teacher_steps`` x
  ``--teacher_guidance``); teacher_steps / teacher_guidance say which (the fewest steps within
  ``--tolerance`` of the best adherence); the sweep's figures are teacher_adherence_s{steps}_g{guidance};
- student_adherence: the student at 1 step, guidance 1 (its guidance is distilled in);
  student_adherence_s{steps}: the same student at each of ``--student_steps`` (default 2 and 4);
- fd_ratio: FD-world(student, real) / FD-world(teacher, real); real = held-out world renders,
  the generated images come from the captions of other held-out portraits;
- speedup: teacher time / student time for the same batch of 8 prompts, end to end (text encoding,
  denoising, decoding to PIL), teacher at its best setting; denoise_speedup: the denoising loop alone;
- onnx_speedup: eager student / ONNX Runtime student (fp32 export, CPU, same batch of 8) with
  onnx_max_abs_diff, the largest difference of their images in [0, 1] from the same noise; the
  ONNX pipeline runs as it samples a one-step student, through the export's one-step graph
  (onnx_one_step = 1; 0 when the export has none). The same for the int8 dynamically quantised
  graphs (onnx_int8_*), with their adherence. Each stage apart comes from the three graphs
  (onnx[_int8]_staged_{text_encoding,denoising,decoding}_ms and _speedup against onnx_eager_*_ms;
  onnx[_int8]_staged_speedup end to end; without a one-step graph, onnx[_int8]_<stage>_*).
  onnx_latency_speedup: the same for one prompt, one image (onnx_latency_ms against
  onnx_eager_latency_ms). These run in their own ``--onnx_repeats`` rounds (``--skip_onnx``
  leaves them out; ``--onnx_only`` measures them alone, in a few minutes, without the int8
  student's adherence and without ``--card``);
- negative_suppression: share of student images showing ``--negative_attribute`` (glasses=yes) when
  the prompt asks for it and the negative prompt names it (NASA, ``negative_mode="nasa"``), divided
  by that share without the negative prompt (the denominator floored at one image, so that the
  ratio stays finite); negative_other_adherence_drop: adherence to the prompt's other attributes
  without the negative prompt minus with it; at the pipeline's NASA strength (``--nasa_scale``,
  ``negative_nasa_scale``), and ``negative_suppression_s{scale}`` for each of ``--nasa_sweep``;
- student_latency_ms: one prompt, one image, end to end;
- autoencoder_ceiling: the adherence of ``--ceiling_images`` held-out renders after the teacher's
  autoencoder (encoded to the posterior mean, decoded), each scored against its own caption; what
  the teacher could reach at best through that decoder (student_autoencoder_ceiling: the student's
  decoder on the same latents; real_adherence: the renders themselves). The captions' attribute mix
  differs from the prompt set's, so compare per attribute: adherence_by_attribute (JSON only) gives
  the teacher's, the student's and the ceilings' share for each attribute;
- student_autoencoder: the student's autoencoder class. When it is not the teacher's (a tiny decoder
  distilled by ``pipelines.training.distill_tiny_vae``), the student's UNet is also decoded by the
  teacher's autoencoder: student_adherence_full_decoder, fd_ratio_full_decoder, speedup_full_decoder.

Timings: a warm-up call of each pipeline compared, then ``--repeats`` rounds that run each of them once
in turn (teacher, student, the student at batch 1 and with the teacher's decoder), and the medians;
interleaved, a drift of the machine's speed stays out of the ratios. The ONNX figures take their own
``--onnx_repeats`` rounds (eager, ONNX fp32 and int8, one-step and three-graph, batch 8 and 1): a
round is under a second, and this machine's speed swings by up to 2x within seconds.
``--threads`` torch threads (2 by default). The teacher comes from
``python -m pipelines.training.train_diffusion_teacher`` (its ``<out_dir>/pipeline``), the student from
``python -m pipelines.training.distill_dmd2``. ``--card`` merges the figures into the student's card
(as ``benchmark_*``), and the teacher's own (``teacher_*``, ``autoencoder_ceiling``) into the teacher's
card, where the studio reads its best setting.
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.common import command_line, parser, write
from pipelines.cards import add_figures, read_card
from pipelines.data.portrait_world import ATTRIBUTES, PortraitWorld, caption_attributes
from pipelines.evaluation import (EMBEDDED_EVALUATOR, Evaluator, adherence_by_attribute, frechet_distance,
                                 prompt_adherence)
from pipelines.text_to_image import DEFAULT_NASA_SCALE, PortraitDiffusionPipeline
from pipelines.text_to_image_eval import (STAGES, TIMING_BATCH, adherence, autoencoder_ceiling, generate,
                                         heldout_captions, naming_caption, prompt_set, real_images, speed_figures,
                                         time_calls)

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_TEACHER = ROOT / "assets" / "portrait_teacher"
DEFAULT_STUDENT = ROOT / "assets" / "portrait_student"
MAKERS = {
    "teacher": "python -m pipelines.training.train_diffusion_teacher --out_dir runs/portrait_teacher "
               "(then copy runs/portrait_teacher/pipeline to {path})",
    "student": "python -m pipelines.training.distill_dmd2 --teacher <teacher folder> --out_dir runs/dmd2 "
               "(then copy its exported pipeline folder to {path})",
}
# What a negative prompt says to suppress an attribute value.
NEGATIVE_PHRASES = {
    ("glasses", "yes"): "glasses", ("accessory", "hat"): "hat", ("accessory", "ribbon"): "hair ribbon",
    ("bangs", "yes"): "bangs", ("expression", "smile"): "smiling", ("expression", "laughing"): "laughing",
    ("expression", "surprised"): "surprised",
}
NEGATIVE_SEED = 34_000_000


# -- models -------------------------------------------------------------------------------------
def check_model(path: str | Path, role: str) -> Path:
    """``path`` if it is a pipeline folder, else FileNotFoundError saying which script makes one."""
    path = Path(path)
    if not (path / PortraitDiffusionPipeline.model_index_name).is_file():
        state = "does not exist" if not path.exists() else \
            f"is not a PortraitDiffusionPipeline folder (no {PortraitDiffusionPipeline.model_index_name})"
        raise FileNotFoundError(f"the {role} {path} {state}; make one with "
                                + MAKERS[role].format(path=path) + f", or pass --{role} PATH")
    return path


def attribute_prompts(n: int, name: str, value: str, seed: int = NEGATIVE_SEED) -> list[str]:
    """``n`` world captions of portraits with ``name`` = ``value`` that name it."""
    world = PortraitWorld()
    rng = np.random.default_rng(seed)
    return [naming_caption(world, world.sample_attributes(rng, split="any").replace(**{name: value}),
                            {name: value}, seed + i) for i in range(n)]


def teacher_sweep(teacher, evaluator: Evaluator, prompts: Sequence[str], *, steps: Sequence[int],
                  guidance: Sequence[float], images_per_prompt: int, tolerance: float = 0.0,
                  seed: int = 0) -> tuple[dict[tuple[int, float], float], tuple[int, float], torch.Tensor]:
    """Adherence of every (steps, guidance), the chosen setting (the fewest steps, then the lowest
    guidance, whose adherence is within ``tolerance`` of the best) and the images of that setting."""
    scores, images = {}, {}
    for g in guidance:
        for s in steps:
            images[(s, g)] = generate(teacher, prompts, steps=s, guidance=g, images_per_prompt=images_per_prompt,
                                      seed=seed)
            scores[(s, g)] = adherence(evaluator, images[(s, g)], prompts, images_per_prompt)
    best = max(scores.values())
    chosen = min((k for k, v in scores.items() if v >= best - tolerance), key=lambda k: (k[0], k[1]))
    return scores, chosen, images[chosen]


def onnx_figures(student_folder: str | Path, prompts: Sequence[str], *, repeats: int,
                 text_encoder_path: str | None = None, evaluator: Evaluator | None = None,
                 adherence_prompts: Sequence[str] = (), images_per_prompt: int = 1) -> dict[str, float]:
    """Export the student to a temporary folder and compare ONNX Runtime with eager PyTorch on the
    CPU, at 1 step on the same batch and the same noise: the fp32 graphs (``onnx_*``) and the int8
    dynamically quantised ones (``onnx_int8_*``), each as the ONNX pipeline samples (the one-step
    graph, where the export has one) and through the three graphs (``*_staged_*``, stage by stage),
    and one image alone (``onnx_latency_*``). With ``evaluator`` and ``adherence_prompts``, the int8
    student's adherence on them too (the fp32 graphs match eager to rounding)."""
    from pipelines.onnx_export import ONE_STEP, OnnxPortraitPipeline, export_onnx, read_onnx_config

    eager = PortraitDiffusionPipeline.from_pretrained(student_folder, device="cpu", dtype=torch.float32,
                                                      text_encoder_path=text_encoder_path)
    prompts = list(prompts)
    latents = torch.randn((len(prompts), *eager.latent_shape), generator=torch.Generator().manual_seed(0))
    figures: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = export_onnx(student_folder, Path(tmp) / "onnx", quantize_int8=True,
                             text_encoder_path=text_encoder_path)
        one_step = ONE_STEP in read_onnx_config(folder)["files"]

        def run(pipe, batch: int = len(prompts)):
            return lambda: pipe(prompt=prompts[:batch], num_inference_steps=1, guidance_scale=1.0,
                                latents=latents[:batch], generator=torch.Generator().manual_seed(0))

        def load(int8: bool, staged: bool = False) -> OnnxPortraitPipeline:
            return OnnxPortraitPipeline.from_pretrained(folder, providers=["CPUExecutionProvider"], int8=int8,
                                                        one_step=not staged, text_encoder_path=text_encoder_path)

        common = dict(prompt=prompts, num_inference_steps=1, guidance_scale=1.0, latents=latents, output_type="pt")
        a = eager(**common).images                                      # [B, 3, H, W] in [-1, 1]
        pipes = {"onnx": load(False), "onnx_int8": load(True)}
        # the stage-by-stage figures come from the three graphs
        staged = {prefix: f"{prefix}_staged" if one_step else prefix for prefix in pipes}
        if one_step:
            pipes.update({staged[prefix]: load(prefix == "onnx_int8", staged=True) for prefix in ("onnx", "onnx_int8")})
        calls = {"eager": run(eager), **{prefix: run(pipe) for prefix, pipe in pipes.items()},
                 "eager_latency": run(eager, 1), "onnx_latency": run(pipes["onnx"], 1)}
        timed = time_calls(calls, repeats=repeats)
        figures["onnx_one_step"] = int(one_step)
        figures["onnx_eager_batch_ms"] = 1000 * timed["eager"]["total"]
        for stage in STAGES:
            figures[f"onnx_eager_{stage}_ms"] = 1000 * timed["eager"][stage]
        for prefix, onnx in pipes.items():
            b = onnx(**common).images
            figures.update({f"{prefix}_speedup": timed["eager"]["total"] / timed[prefix]["total"],
                            f"{prefix}_max_abs_diff": float((a - b).abs().max()) / 2,  # in [0, 1] units
                            f"{prefix}_batch_ms": 1000 * timed[prefix]["total"]})
        for prefix in staged.values():      # where the runtime gains: text encoder, UNet, decoder apart
            for stage in STAGES:
                figures[f"{prefix}_{stage}_ms"] = 1000 * timed[prefix][stage]
                figures[f"{prefix}_{stage}_speedup"] = timed["eager"][stage] / timed[prefix][stage]
        figures.update(onnx_eager_latency_ms=1000 * timed["eager_latency"]["total"],
                       onnx_latency_ms=1000 * timed["onnx_latency"]["total"],
                       onnx_latency_speedup=timed["eager_latency"]["total"] / timed["onnx_latency"]["total"])
        if evaluator is not None and adherence_prompts:
            images = generate(pipes["onnx_int8"], list(adherence_prompts), steps=1, guidance=1.0,
                              images_per_prompt=images_per_prompt)
            figures["onnx_int8_student_adherence"] = adherence(evaluator, images, list(adherence_prompts),
                                                               images_per_prompt)
    return figures


def negative_figures(student, evaluator: Evaluator, *, name: str, value: str, negative_prompt: str, n: int,
                     images_per_prompt: int, seed: int = 0, nasa_scale: float = DEFAULT_NASA_SCALE,
                     sweep: Sequence[float] = ()) -> dict[str, float]:
    """The student on prompts asking for ``name`` = ``value``, without and with ``negative_prompt`` (NASA)."""
    prompts = attribute_prompts(n, name, value)
    common = dict(steps=1, guidance=1.0, images_per_prompt=images_per_prompt, seed=seed)
    plain = evaluator.predict_attributes(generate(student, prompts, **common))
    share_plain = float(np.mean([p[name] == value for p in plain]))
    others = [{k: v for k, v in caption_attributes(p).items() if k != name} for p in prompts
              for _ in range(images_per_prompt)]
    asked = [o for o in others if o]
    keep = [i for i, o in enumerate(others) if o]

    def steered(scale: float) -> tuple[float, float, float]:
        """(suppression, share with the negative prompt, other-attribute adherence drop) at ``scale``."""
        negated = evaluator.predict_attributes(generate(student, prompts, **common, negative_prompt=negative_prompt,
                                                        negative_mode="nasa", nasa_scale=scale))
        share_neg = float(np.mean([p[name] == value for p in negated]))
        drop = (prompt_adherence([plain[i] for i in keep], asked)
                - prompt_adherence([negated[i] for i in keep], asked)) if asked else 0.0
        return share_neg / max(share_plain, 1 / len(plain)), share_neg, drop

    suppression, share_neg, drop = steered(nasa_scale)
    figures = {"negative_suppression": suppression, "negative_share_without": share_plain,
               "negative_share_with": share_neg, "negative_other_adherence_drop": drop,
               "negative_nasa_scale": nasa_scale}
    for scale in sweep:
        if scale != nasa_scale:
            figures[f"negative_suppression_s{scale:g}"], _, figures[f"negative_other_adherence_drop_s{scale:g}"] = \
                steered(scale)
    return figures


def full_decoder_pipeline(student, teacher) -> PortraitDiffusionPipeline:
    """The student's UNet with the teacher's own autoencoder (for a student shipped with a distilled
    tiny decoder)."""
    return PortraitDiffusionPipeline(student.unet, teacher.vae, student.scheduler, student.text_encoder,
                                     student.tokenizer, max_length=student.max_length)


def full_decoder_figures(full, evaluator: Evaluator, texts: Sequence[str], captions: Sequence[str],
                         real: torch.Tensor, *, images_per_prompt: int, fd_teacher: float) -> dict[str, float]:
    """Adherence and FD ratio of :func:`full_decoder_pipeline` (its timing is in :func:`speed_figures`'
    rounds): the ``*_full_decoder`` figures beside the student as shipped."""
    images = generate(full, list(texts), steps=1, guidance=1.0, images_per_prompt=images_per_prompt)
    fd = frechet_distance(evaluator.features(generate(full, list(captions), steps=1, guidance=1.0, seed=1)), real)
    return {"student_adherence_full_decoder": adherence(evaluator, images, list(texts), images_per_prompt),
            "fd_world_student_full_decoder": fd, "fd_ratio_full_decoder": fd / fd_teacher}


# -- the figures --------------------------------------------------------------------------------
def figures_for(teacher, student, evaluator: Evaluator, *, prompts: int = 48, images_per_prompt: int = 2,
                fd_images: int = 256, ceiling_images: int = 512, teacher_steps: Sequence[int] = (10, 25, 50),
                teacher_guidance: Sequence[float] = (4.0,), tolerance: float = 0.0, repeats: int = 15,
                negative_attribute: str = "glasses=yes", negative_prompt: str | None = None,
                nasa_scale: float = DEFAULT_NASA_SCALE, nasa_sweep: Sequence[float] = (0.5, 2.0, 3.0),
                student_folder: str | Path | None = None, skip_onnx: bool = False, onnx_repeats: int | None = None,
                student_steps_sweep: Sequence[int] = (2, 4),
                text_encoder_path: str | None = None, device: torch.device | str = "cpu") -> dict[str, Any]:
    """Every figure of the module docstring for loaded pipelines (``student_folder`` for the ONNX export;
    ``onnx_repeats`` rounds for its timings, default ``repeats``)."""
    name, _, value = negative_attribute.partition("=")
    if name not in ATTRIBUTES or value not in ATTRIBUTES[name]:
        raise ValueError(f"negative_attribute must be NAME=VALUE of the world's attributes, "
                         f"got {negative_attribute!r}")
    phrase = negative_prompt or NEGATIVE_PHRASES.get((name, value))
    if phrase is None:
        raise ValueError(f"no default negative prompt for {negative_attribute}; pass negative_prompt")
    if not skip_onnx and student_folder is None:
        raise ValueError("the ONNX figures need student_folder (or skip_onnx=True)")
    figures: dict[str, Any] = {}
    items = prompt_set(prompts)
    texts = [p["prompt"] for p in items]
    held = [i for i, p in enumerate(items) if p["held_out"]]

    # adherence: the teacher's sweep, the student at one step
    scores, (best_steps, best_guidance), teacher_images = teacher_sweep(
        teacher, evaluator, texts, steps=teacher_steps, guidance=teacher_guidance,
        images_per_prompt=images_per_prompt, tolerance=tolerance)
    for (s, g), v in scores.items():
        figures[f"teacher_adherence_s{s}_g{g:g}"] = v
    figures["teacher_adherence"] = scores[(best_steps, best_guidance)]
    figures["teacher_steps"] = best_steps
    figures["teacher_guidance"] = best_guidance
    student_images = generate(student, texts, steps=1, guidance=1.0, images_per_prompt=images_per_prompt)
    # the evaluator reads each image once; every adherence figure below comes from these readings
    asked = [p for p in texts for _ in range(images_per_prompt)]
    read = {"teacher": evaluator.predict_attributes(teacher_images),
            "student": evaluator.predict_attributes(student_images)}
    figures["student_adherence"] = prompt_adherence(read["student"], asked)
    if held:
        rows = [i * images_per_prompt + k for i in held for k in range(images_per_prompt)]
        for model in ("teacher", "student"):
            figures[f"{model}_adherence_heldout"] = prompt_adherence([read[model][r] for r in rows],
                                                                     [asked[r] for r in rows])
    by_attribute = {model: adherence_by_attribute(read[model], asked) for model in ("teacher", "student")}
    for k in student_steps_sweep:              # the same student sampled in more steps (LCMScheduler, guidance 1)
        more = generate(student, texts, steps=k, guidance=1.0, images_per_prompt=images_per_prompt)
        figures[f"student_adherence_s{k}"] = prompt_adherence(evaluator.predict_attributes(more), asked)
    # what the autoencoder(s) alone let through: held-out renders encoded, decoded, read against their captions
    tiny_student = type(student.vae) is not type(teacher.vae)
    decoders = {"teacher": teacher, **({"student": student} if tiny_student else {})}
    ceiling = autoencoder_ceiling(teacher, decoders, evaluator, n=ceiling_images)
    for model, key, split_key in (("real", "real_adherence", "real"),
                                  ("teacher", "autoencoder_ceiling", "teacher_autoencoder_ceiling"),
                                  ("student", "student_autoencoder_ceiling", "student_autoencoder_ceiling")):
        if model in ceiling:
            figures[key] = ceiling[model]["all"]
            by_attribute[split_key] = {k: v for k, v in ceiling[model].items() if k != "all"}
    figures["adherence_by_attribute"] = by_attribute
    figures["ceiling_images"] = ceiling_images
    figures["prompts"] = len(texts)
    figures["heldout_prompts"] = len(held)
    figures["images_per_prompt"] = images_per_prompt

    # FD-world against held-out renders
    real = evaluator.features(real_images(fd_images, size=PortraitWorld.MIN_SIZE))
    captions = heldout_captions(fd_images)
    fd_teacher = frechet_distance(evaluator.features(
        generate(teacher, captions, steps=best_steps, guidance=best_guidance, seed=1)), real)
    fd_student = frechet_distance(evaluator.features(generate(student, captions, steps=1, guidance=1.0, seed=1)), real)
    figures.update(fd_world_teacher=fd_teacher, fd_world_student=fd_student, fd_ratio=fd_student / fd_teacher,
                   fd_images=fd_images)

    # speed
    batch = (texts * TIMING_BATCH)[:TIMING_BATCH]
    full = full_decoder_pipeline(student, teacher) if tiny_student else None
    figures.update(speed_figures(teacher, student, batch, teacher_steps=best_steps, teacher_guidance=best_guidance,
                                 repeats=repeats, others={"student_full_decoder": full} if full else None,
                                 device=device))
    figures["student_autoencoder"] = type(student.vae).__name__
    if full is not None:
        figures.update(full_decoder_figures(full, evaluator, texts, captions, real,
                                            images_per_prompt=images_per_prompt, fd_teacher=fd_teacher))
        figures["speedup_full_decoder"] = figures["teacher_batch_ms"] / figures["student_full_decoder_batch_ms"]
    if not skip_onnx:
        figures.update(onnx_figures(student_folder, batch, repeats=onnx_repeats or repeats,
                                    text_encoder_path=text_encoder_path,
                                    evaluator=evaluator, adherence_prompts=texts, images_per_prompt=images_per_prompt))

    # negative prompt (NASA)
    figures.update(negative_figures(student, evaluator, name=name, value=value, negative_prompt=phrase,
                                    n=prompts, images_per_prompt=images_per_prompt, nasa_scale=nasa_scale,
                                    sweep=nasa_sweep))
    figures["negative_attribute"] = negative_attribute
    figures["negative_prompt"] = phrase
    return figures


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = parser(__doc__)
    p.add_argument("--teacher", default=str(DEFAULT_TEACHER), help="PortraitDiffusionPipeline folder of the teacher")
    p.add_argument("--student", default=str(DEFAULT_STUDENT), help="PortraitDiffusionPipeline folder of the student")
    p.add_argument("--evaluator", default=str(EMBEDDED_EVALUATOR))
    p.add_argument("--text_encoder_path", default=None, help="MiniLM folder (default: its package)")
    p.add_argument("--prompts", type=int, default=48)
    p.add_argument("--images_per_prompt", type=int, default=2)
    p.add_argument("--fd_images", type=int, default=256)
    p.add_argument("--ceiling_images", type=int, default=512,
                   help="held-out renders for the autoencoder ceiling (encoded, decoded, scored)")
    p.add_argument("--teacher_steps", type=_ints, default=[10, 25, 50], help="comma list, e.g. 10,25,50")
    p.add_argument("--teacher_guidance", type=_floats, default=[4.0], help="comma list, e.g. 3,4.5")
    p.add_argument("--tolerance", type=float, default=0.0,
                   help="the teacher's setting: the fewest steps within this of its best adherence")
    p.add_argument("--negative_attribute", default="glasses=yes")
    p.add_argument("--negative_prompt", default=None, help="default: a phrase naming --negative_attribute")
    p.add_argument("--nasa_scale", type=float, default=DEFAULT_NASA_SCALE,
                   help="NASA strength of the headline negative_suppression (default: the pipeline's)")
    p.add_argument("--nasa_sweep", type=_floats, default=[0.5, 2.0, 3.0],
                   help="further NASA strengths reported as negative_suppression_s{scale} (comma list; '' = none)")
    p.add_argument("--repeats", type=int, default=15,
                   help="rounds of the teacher-student timings after the warm-up (about 2.5 s a round); medians")
    p.add_argument("--onnx_repeats", type=int, default=15,
                   help="rounds of the ONNX timings (eager and ONNX Runtime, each under a second a round)")
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    p.add_argument("--skip_onnx", action="store_true")
    p.add_argument("--onnx_only", action="store_true",
                   help="only the ONNX timings and parity (the student alone; no --card: the card keeps whole runs)")
    p.add_argument("--student_steps", type=_ints, default=[2, 4],
                   help="more step counts of the student, reported as student_adherence_s{steps} "
                        "(comma list; '' = none)")
    args = p.parse_args(argv)
    if args.prompts < 1 or args.images_per_prompt < 1 or args.fd_images < 2 or args.repeats < 1 \
            or args.onnx_repeats < 1 or args.ceiling_images < 1 \
            or not args.teacher_steps or not args.teacher_guidance or any(k < 1 for k in args.student_steps):
        p.error("--prompts, --images_per_prompt, --repeats, --onnx_repeats, --ceiling_images >= 1, --fd_images >= 2, "
                "non-empty teacher sweeps and --student_steps >= 1 are needed")
    if args.onnx_only and (args.skip_onnx or args.card):
        p.error("--onnx_only measures the ONNX figures alone: not with --skip_onnx, nor with --card (a card "
                "takes the figures of a whole run)")
    try:
        student_path = check_model(args.student, "student")
        teacher_path = None if args.onnx_only else check_model(args.teacher, "teacher")
    except FileNotFoundError as exc:
        p.exit(2, f"{p.prog}: {exc}\n")
    torch.set_num_threads(args.threads)
    if args.onnx_only:
        texts = [item["prompt"] for item in prompt_set(args.prompts)]
        figures = onnx_figures(student_path, (texts * TIMING_BATCH)[:TIMING_BATCH], repeats=args.onnx_repeats,
                               text_encoder_path=args.text_encoder_path)
        figures["threads"] = args.threads
        write(figures, args.json, "benchmarks.text_to_image")
        return figures

    teacher = PortraitDiffusionPipeline.from_pretrained(teacher_path, device=args.device,
                                                        text_encoder_path=args.text_encoder_path)
    student = PortraitDiffusionPipeline.from_pretrained(student_path, device=args.device,
                                                        text_encoder_path=args.text_encoder_path)
    evaluator = Evaluator.from_pretrained(args.evaluator, device=args.device)
    figures = figures_for(teacher, student, evaluator, prompts=args.prompts, images_per_prompt=args.images_per_prompt,
                          fd_images=args.fd_images, ceiling_images=args.ceiling_images,
                          teacher_steps=args.teacher_steps, teacher_guidance=args.teacher_guidance,
                          tolerance=args.tolerance, repeats=args.repeats,
                          negative_attribute=args.negative_attribute, negative_prompt=args.negative_prompt,
                          nasa_scale=args.nasa_scale, nasa_sweep=args.nasa_sweep, student_folder=student_path,
                          skip_onnx=args.skip_onnx, onnx_repeats=args.onnx_repeats,
                          student_steps_sweep=args.student_steps,
                          text_encoder_path=args.text_encoder_path, device=args.device)
    figures["threads"] = args.threads
    write(figures, args.json, "benchmarks.text_to_image", card=student_path if args.card else None)
    if args.card and read_card(teacher_path):
        # the teacher's own figures in its card too: the studio runs it at its measured best setting
        add_figures(teacher_path, teacher_card_figures(figures),
                    command=command_line("benchmarks.text_to_image"))
    return figures


def teacher_card_figures(figures: dict[str, Any]) -> dict[str, Any]:
    """The figures that describe the teacher alone (``teacher_*``, and its autoencoder's ceiling)."""
    return {k: v for k, v in figures.items() if k.startswith("teacher_") or k == "autoencoder_ceiling"}


if __name__ == "__main__":
    main()
