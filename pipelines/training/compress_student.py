"""Compress a distilled text-to-image student into a cheaper UNet by knowledge distillation (BK-SDM).

A one-step student that keeps the teacher's UNet can be at most ``2 x teacher steps`` times faster
than the teacher at denoising (the teacher's classifier-free guidance doubles its batch). To go past
that the student's UNet has to cost less per call. As in BK-SDM (Kim et al. 2023, "BK-SDM:
A Lightweight, Fast, and Cheap Version of Stable Diffusion"), the smaller UNet is the source's own
with parts removed, it starts from the source's weights, and it learns to reproduce the source
by output-level and feature-level distillation:

- ``drop_mid_block``: no mid block (BK-SDM-Base removes it);
- ``attention_heads``: the heads of each level's transformers (``attention_head_dim`` in the diffusers
  config is the head count). This UNet's 8 heads of 8 channels at full resolution make the softmax
  and the narrow batched matmuls cost more than their FLOPs: one head of 64 channels runs the same
  weights at about 0.75 of the time on this CPU, but mixes the heads, so it needs this training;
- ``drop_attention``: transformers removed by level (as ``distill_dmd2 --student_drop_attention``);
- ``drop_down_attention``: transformers removed from a level's down block only; its up block keeps
  theirs (BK-SDM's cuts, too, leave the decoder side more of the network). At 16x16 that is one of
  the level's three transformers, about a seventh of the 5.87 M student's call at batch 8;
- ``only_cross_attention``: by level, the transformers' self-attention attends to the text instead
  (diffusers' ``only_cross_attention``). At full resolution that is 256 queries against the
  prompt's 52 tokens instead of 256; its key and value projections start as the same block's
  cross-attention ones.

The source is a student (e.g. DMD2's), so the training needs no images: noise and world captions
in, the source's outputs (and its down/up block features) as the targets. A share of each batch is
at the student's later steps (2-4-step sampling): there the input is the source's one-step estimate
re-noised to that step's timestep, as the sampler does.

    python -m pipelines.training.compress_student --source assets/portrait_student --out_dir runs/compress

Output: ``<out_dir>/pipeline/`` (a ``PortraitDiffusionPipeline`` folder with the source's VAE, text
encoder and scheduler, and a card), plus the run folder's config.json, metrics.jsonl, samples/ and
checkpoints/. ``--resume true`` continues a killed run. ``distill_dmd2 --student_init`` can go on
from the result with distribution matching.
"""

from __future__ import annotations

import copy
import json
import os
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from pipelines.text_to_image import PortraitDiffusionPipeline
from pipelines.evaluation import ASSETS, EMBEDDED_EVALUATOR
from pipelines.text_encoder import PromptEncoder
from pipelines.training.distill_dmd2 import (add_noise, evaluate_into_cards, predict_x0, save_sample_grid,
                                             save_student, student_unet_config, training_device,
                                             validate_eval_fields)
from pipelines.training.runs import (RunFolder, RunningMeans, StopFlag, capture_rng_state, check_fields,
                                     config_to_dict, parse_config, resume_from_checkpoint, seed_everything)
from pipelines.training.train_autoencoder import FINISH_RESERVE_S, set_scheduled_lr

__all__ = ["CompressConfig", "compressed_unet_config", "make_compressed_unet", "train", "main"]


@dataclass
class CompressConfig:
    """Knowledge distillation of a student pipeline into a smaller UNet."""

    source: str = str(ASSETS / "portrait_student")  # the student to compress (a PortraitDiffusionPipeline
                                                    # folder whose UNet does not have these cuts yet)
    teacher: str = str(ASSETS / "portrait_teacher")  # the multi-step teacher, for the end-of-run evaluation only
    out_dir: str = "runs/compress"
    resume: bool = False
    device: str = "auto"
    mixed_precision: str = "auto"             # "auto" (bf16 autocast on CUDA only), "bf16", "no"
    seed: int = 0

    # the smaller UNet (everything not removed starts as the source's weights)
    attention_heads: tuple[int, ...] = (1, 2, 8)   # per down level (mirrored up; the mid block: the last)
    drop_mid_block: bool = True
    drop_attention: tuple[int, ...] = ()           # down levels whose transformers go (with their mirrors)
    drop_down_attention: tuple[int, ...] = ()      # down levels whose transformers go (their mirrors stay)
    only_cross_attention: tuple[bool, ...] = ()    # per down level (mirrored up): the self-attention becomes a
                                                   # second cross-attention to the text; () = as the source

    # data: captions of world renders (the bank is shared with the other scripts' cache)
    real_images: int = 4000
    bank_seed: int = 0
    bank_cache: str = "runs/cache"
    workers: int = 0
    captions_per_image: int = 1
    student_steps: int = 4                    # later steps trained for: the source's 1..student_steps grid
    first_step_share: float = 0.5             # share of each batch at the first (pure-noise) step

    # loss (BK-SDM: output KD + feature KD, both weight 1)
    feature_weight: float = 1.0

    # optimisation
    batch: int = 32
    lr: float = 1e-4
    warmup_steps: int = 50
    total_steps: int = 2000
    grad_clip: float = 1.0
    weight_decay: float = 0.0
    max_minutes: float = 0.0                  # wall-time budget of the whole run (0 = none)

    # logging, export, evaluation
    log_every: int = 20
    sample_every: int = 250
    checkpoint_every: int = 250
    keep_checkpoints: int = 2
    num_samples: int = 9
    eval_prompts: int = 16                    # prompts of the world's fixed set; 0 = no evaluation
    eval_teacher_steps: int = 10
    eval_teacher_guidance: float = 4.0
    evaluator: str = str(EMBEDDED_EVALUATOR)

    def validate(self) -> None:
        """Refuse bad values before any work (no folder is created)."""
        validate_eval_fields(self)
        check_fields(self, positive_ints=("batch", "total_steps", "log_every", "sample_every", "checkpoint_every",
                                          "keep_checkpoints", "num_samples", "real_images", "captions_per_image",
                                          "student_steps", "eval_teacher_steps"),
                     nonneg_ints=("warmup_steps", "workers"),
                     positive=("lr", "grad_clip"), nonneg=("feature_weight", "weight_decay", "max_minutes"))
        if not 0 <= self.first_step_share <= 1:
            raise ValueError(f"first_step_share must be in [0, 1], got {self.first_step_share}")
        if self.mixed_precision not in ("auto", "bf16", "no"):
            raise ValueError(f"mixed_precision must be auto, bf16 or no, got {self.mixed_precision!r}")
        for name in ("source", "teacher"):
            index = Path(getattr(self, name)) / PortraitDiffusionPipeline.model_index_name
            if (name == "source" or self.eval_prompts) and not index.is_file():
                raise ValueError(f"{name} {getattr(self, name)!r} is not a text-to-image pipeline folder (no "
                                 f"{index.name})")
        source_unet = {k: v for k, v in json.loads((Path(self.source) / "unet" / "config.json").read_text()).items()
                       if not k.startswith("_")}
        if compressed_unet_config(source_unet, self.attention_heads, self.drop_mid_block, self.drop_attention,
                                  self.only_cross_attention, self.drop_down_attention) == source_unet:
            raise ValueError(f"source {self.source!r}: its UNet already has these cuts (attention_heads "
                             f"{list(self.attention_heads)}, drop_mid_block {self.drop_mid_block}, "
                             f"only_cross_attention {list(self.only_cross_attention)}); compress a student with the "
                             "teacher's UNet, e.g. the pipeline/ of a DMD2 run, or choose other cuts")


def compressed_unet_config(config: dict[str, Any], attention_heads: tuple[int, ...], drop_mid_block: bool,
                           drop_attention: tuple[int, ...] = (),
                           only_cross_attention: tuple[bool, ...] = (),
                           drop_down_attention: tuple[int, ...] = ()) -> dict[str, Any]:
    """The source UNet's diffusers config with the given cuts; raises ``ValueError`` on a cut that
    does not fit it (a head count that does not divide its level's width, a level out of range)."""
    levels = len(config["block_out_channels"])
    cross_only = tuple(only_cross_attention)
    if cross_only and (len(cross_only) != levels or not all(isinstance(v, bool) for v in cross_only)):
        raise ValueError(f"only_cross_attention must give true or false per level ({levels}), got {list(cross_only)}")
    heads = tuple(attention_heads)
    if heads:
        if len(heads) != levels:
            raise ValueError(f"attention_heads must give one head count per level ({levels}), got {list(heads)}")
        for h, width in zip(heads, config["block_out_channels"]):
            if isinstance(h, bool) or not isinstance(h, int) or h < 1 or width % h:
                raise ValueError(f"attention_heads: {h!r} heads do not divide a level of {width} channels")
    if config.get("num_attention_heads") is not None and heads:
        raise ValueError("the source UNet sets num_attention_heads; attention_heads only handles the "
                         "attention_head_dim form of the config")
    out = {k: v for k, v in student_unet_config(config, tuple(drop_attention)).items() if not k.startswith("_")}
    down = list(out["down_block_types"])
    for i in drop_down_attention:
        if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < levels:
            raise ValueError(f"drop_down_attention: {i!r} is not a down-block index (0..{levels - 1}: {down})")
        if down[i] != "CrossAttnDownBlock2D":
            raise ValueError(f"drop_down_attention: down block {i} is a {down[i]}, with no transformers to drop")
        down[i] = "DownBlock2D"
    out["down_block_types"] = down
    if heads:
        out["attention_head_dim"] = list(heads)
    if drop_mid_block:
        out["mid_block_type"] = None
    if cross_only:
        source = config.get("only_cross_attention", False)
        as_list = list(source) if isinstance(source, (list, tuple)) else [bool(source)] * levels
        out["only_cross_attention"] = source if list(cross_only) == as_list else list(cross_only)
    return out


def make_compressed_unet(source_unet: nn.Module, cfg: CompressConfig) -> nn.Module:
    """The smaller UNet, every weight it keeps copied from ``source_unet`` (same names and shapes)."""
    from diffusers import UNet2DConditionModel

    config = {k: v for k, v in source_unet.config.items() if not k.startswith("_")}
    unet = UNet2DConditionModel.from_config(compressed_unet_config(
        config, tuple(cfg.attention_heads), cfg.drop_mid_block, tuple(cfg.drop_attention),
        tuple(cfg.only_cross_attention), tuple(cfg.drop_down_attention)))
    weights = source_unet.state_dict()
    shapes = {k: v.shape for k, v in unet.state_dict().items()}
    for key in [k for k in weights if k in shapes and weights[k].shape != shapes[k]]:
        # a self-attention turned cross-attention: its key and value projections now read the text,
        # so they start as the cross-attention's of the same transformer block
        twin = key.replace(".attn1.to_k.", ".attn2.to_k.").replace(".attn1.to_v.", ".attn2.to_v.")
        if twin == key or weights[twin].shape != shapes[key]:
            raise RuntimeError(f"compressed UNet: {key} is {tuple(shapes[key])} here and "
                               f"{tuple(weights[key].shape)} in the source")
        weights[key] = weights[twin]
    missing, unexpected = unet.load_state_dict(weights, strict=False)
    dropped = [k for k in unexpected if not (k.startswith("mid_block.") or ".attentions." in k)]
    if missing or dropped:
        raise RuntimeError(f"compressed UNet does not match the source's: missing {missing[:5]}, "
                           f"unexpected {dropped[:5]}")
    param = next(source_unet.parameters())
    return unet.to(param.device, param.dtype)


@dataclass
class Captions:
    """World captions (no empty one) and their text states [N, L, D] on the training device."""

    texts: list[str]
    states: torch.Tensor


def load_captions(source: PortraitDiffusionPipeline, cfg: CompressConfig) -> Captions:
    """The captions of ``cfg.real_images`` world renders (the bank cache the other scripts share),
    ``cfg.captions_per_image`` phrasings each, encoded once by the source's text encoder."""
    from pipelines.training.train_autoencoder import load_bank
    from pipelines.training.train_diffusion_teacher import caption_variants, encode_caption_bank

    bank = load_bank(cfg.real_images, size=source.image_size, seed=cfg.bank_seed, split="train",
                     cache_dir=cfg.bank_cache, workers=cfg.workers)
    variants = caption_variants(bank, cfg.captions_per_image, cfg.seed)
    encoder = PromptEncoder(source.text_encoder, source.tokenizer, source.max_length)
    states, ids, empty_id = encode_caption_bank(variants, encoder, torch.float32)
    keep = sorted(set(ids.flatten().tolist()) - {empty_id})
    texts = {i: caps[j % len(caps)] for caps, row in zip(variants, ids.tolist()) for j, i in enumerate(row)}
    return Captions([texts[i] for i in keep], states[keep].to(source.unet.device))


class BlockFeatures:
    """The hidden states each down and up block of a UNet returns, kept per forward call."""

    def __init__(self, unet: nn.Module) -> None:
        self.values: list[torch.Tensor] = []
        self._handles = [block.register_forward_hook(self._keep)
                         for block in list(unet.down_blocks) + list(unet.up_blocks)]

    def _keep(self, module: nn.Module, args: Any, output: Any) -> None:
        self.values.append(output[0] if isinstance(output, tuple) else output)

    def pop(self) -> list[torch.Tensor]:
        values, self.values = self.values, []
        return values


def train(cfg: CompressConfig) -> Path:
    """Run (or resume) the compression; returns the exported pipeline folder."""
    cfg.validate()
    t_start = time.perf_counter()
    run = RunFolder(cfg.out_dir)
    resumed = run.create(cfg, resume=cfg.resume)
    seed_everything(cfg.seed)
    device, use_bf16, autocast = training_device(cfg.device, cfg.mixed_precision)
    stopper = StopFlag()
    stopper.install()
    step = 0
    try:
        # 1. The source student (frozen) and its noise schedule; the smaller UNet from its weights.
        source = PortraitDiffusionPipeline.from_pretrained(cfg.source, device=device, dtype=torch.float32)
        big = source.unet
        prediction_type = source.scheduler.config.prediction_type
        alphas_cumprod = source.scheduler.alphas_cumprod.to(device, torch.float32)
        source.scheduler.set_timesteps(cfg.student_steps)
        grid = source.scheduler.timesteps.to(device, torch.long)             # e.g. [999, 749, 499, 249]
        channels, size, _ = source.latent_shape
        small = make_compressed_unet(big, cfg).train().requires_grad_(True)
        n_big = sum(p.numel() for p in big.parameters())
        n_small = sum(p.numel() for p in small.parameters())

        # 2. Captions (the bank's, encoded once).
        captions = load_captions(source, cfg)
        print(f"source {cfg.source}: UNet {n_big / 1e6:.2f}M -> {n_small / 1e6:.2f}M parameters, steps at "
              f"{grid.tolist()}, {captions.states.shape[0]} captions, on {device} (bf16 autocast: {use_bf16})",
              flush=True)

        opt = torch.optim.AdamW(small.parameters(), lr=cfg.lr, betas=(0.9, 0.999), weight_decay=cfg.weight_decay)
        if resumed:
            step, _ = resume_from_checkpoint(run, unet=small, opt=opt)
        student = PortraitDiffusionPipeline(small, source.vae, copy.deepcopy(source.scheduler), source.text_encoder,
                                            source.tokenizer, max_length=source.max_length)
        small.train().requires_grad_(True)
        big_features, small_features = BlockFeatures(big), BlockFeatures(small)
        sample_prompts = captions.texts[:cfg.num_samples]

        def checkpoint() -> None:
            run.save_checkpoint(step, {"unet": small.state_dict(), "opt": opt.state_dict(), "step": step,
                                       "rng": capture_rng_state(), "config": config_to_dict(cfg)},
                                keep=cfg.keep_checkpoints)

        def inputs(b: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            """(x_t, t, context): pure noise at the first step; at a later step, the source's one-step
            estimate re-noised to that step's timestep (the sampler's input there)."""
            context = captions.states[torch.randint(0, len(captions.states), (b,), device=device)]
            x_t = torch.randn(b, channels, size, size, device=device)
            later = torch.rand(b, device=device) >= cfg.first_step_share
            k = torch.where(later, torch.randint(1, len(grid), (b,), device=device) if len(grid) > 1
                            else torch.zeros(b, dtype=torch.long, device=device), 0)
            t = grid[k]
            if bool((k > 0).any()):
                with torch.no_grad(), autocast():
                    pred = big(x_t, grid[0].expand(b), encoder_hidden_states=context).sample
                x0 = predict_x0(pred.float(), x_t, alphas_cumprod[grid[0].expand(b)], prediction_type)
                x_t = torch.where((k > 0).view(-1, 1, 1, 1), add_noise(x0, torch.randn_like(x0), alphas_cumprod[t]),
                                  x_t)
            return x_t, t, context

        # 3. The loop.
        run.set_status("running", step=step, total=cfg.total_steps)
        meter = RunningMeans()
        t_loop = t_log = time.perf_counter()
        loop_budget = 60 * cfg.max_minutes - (t_loop - t_start) - FINISH_RESERVE_S
        step_log = step
        while step < cfg.total_steps and not stopper.stop:
            if not set_scheduled_lr(opt, step, t_loop, loop_budget, cfg):
                break
            x_t, t, context = inputs(cfg.batch)
            big_features.pop(), small_features.pop()      # whatever sampling or input making left there
            with torch.no_grad(), autocast():
                target = big(x_t, t, encoder_hidden_states=context).sample.float()
            target_features = [f.float() for f in big_features.pop()]
            with autocast():
                out = small(x_t, t, encoder_hidden_states=context).sample.float()
            features = small_features.pop()
            loss_out = F.mse_loss(out, target)
            loss_feat = sum(F.mse_loss(f.float(), g) for f, g in zip(features, target_features)) / len(features)
            loss = loss_out + cfg.feature_weight * loss_feat
            opt.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(small.parameters(), cfg.grad_clip)
            opt.step()
            step += 1
            meter.add(loss=loss.detach(), loss_out=loss_out.detach(), loss_feat=loss_feat.detach(),
                      grad_norm=grad_norm)
            if step % cfg.log_every == 0 or step == cfg.total_steps:
                elapsed = time.perf_counter() - t_log
                row = {k: float(v) for k, v in meter.pop().items()}
                row.update(lr=opt.param_groups[0]["lr"],
                           images_per_s=(step - step_log) * cfg.batch / max(elapsed, 1e-9))
                run.log_metrics(step, **row)
                run.set_status("running", step=step, total=cfg.total_steps)
                print(f"step {step}/{cfg.total_steps} loss {row['loss']:.5f} (output {row['loss_out']:.5f}, "
                      f"features {row['loss_feat']:.5f}) | {row['images_per_s']:.0f} img/s", flush=True)
                t_log, step_log = time.perf_counter(), step
            if step % cfg.sample_every == 0:
                small.eval()
                save_sample_grid(student, sample_prompts, 1, cfg.seed, run.sample_path(step))
                small.train()
            if step % cfg.checkpoint_every == 0:
                checkpoint()

        latest = run.latest_checkpoint()
        if latest is None or not latest.name.endswith(f"{step:07d}.pt"):
            checkpoint()
        if stopper.stop:
            run.set_status("stopped", step=step, total=cfg.total_steps)
            print(f"stopped at step {step}; resume with --resume true", flush=True)
            return run.path / "pipeline"

        # 4. Export, card, evaluation against the teacher.
        small.eval()
        save_sample_grid(student, sample_prompts, 1, cfg.seed, run.sample_path(step))
        folder = run.path / "pipeline"
        save_student(student, folder, cfg.source)
        final = run.metrics()[-1] if run.metrics() else {}
        figures: dict[str, Any] = {"steps": step, "source_parameters": n_big, "parameters": n_small,
                                   **{f"final_{k}": round(float(final[k]), 6) for k in ("loss_out", "loss_feat")
                                      if k in final}}
        write_compressed_card(folder, cfg, figures)
        if cfg.eval_prompts:
            teacher = PortraitDiffusionPipeline.from_pretrained(cfg.teacher, device=device, dtype=torch.float32)
            figures.update({f"eval_{k}": v for k, v in evaluate_into_cards(
                [folder], student, teacher, cfg, student_steps=1,
                teacher_guidance=cfg.eval_teacher_guidance).items()})
        run.set_status("finished", step=step, total=cfg.total_steps, figures=figures)
        print(f"saved {folder} after {step} steps ({time.perf_counter() - t_start:.0f}s in all)", flush=True)
        return folder
    except BaseException as exc:
        run.set_status("failed", step=step, total=cfg.total_steps, error=f"{type(exc).__name__}: {exc}")
        raise
    finally:
        stopper.uninstall()


def write_compressed_card(folder: Path, cfg: CompressConfig, figures: dict[str, Any]) -> None:
    """The compressed student's card; the source card's title and notes carry over, marked as compressed."""
    from pipelines.cards import read_card, write_card

    source = read_card(cfg.source)
    cuts = [f"attention heads per level {list(cfg.attention_heads)}" if cfg.attention_heads else "",
            "no mid block" if cfg.drop_mid_block else "",
            f"no transformers at down levels {list(cfg.drop_attention)}" if cfg.drop_attention else "",
            f"no transformers in the down blocks of levels {list(cfg.drop_down_attention)} (their up blocks "
            "keep theirs)" if cfg.drop_down_attention else "",
            f"cross-attention only by level {list(cfg.only_cross_attention)}" if cfg.only_cross_attention else ""]
    title = source.get("title", "Text-to-image student")
    write_card(folder, title=f"{title}, compressed (BK-SDM knowledge distillation)",
               task=source.get("task", "text-to-image"),
               architecture=(f"diffusers UNet2DConditionModel {figures['parameters'] / 1e6:.2f}M (source "
                             f"{figures['source_parameters'] / 1e6:.2f}M) with " + ", ".join(c for c in cuts if c)
                             + "; the source's autoencoder, scheduler and text encoder"),
               source=f"knowledge distillation run {cfg.out_dir} of the student {cfg.source}",
               command="python -m pipelines.training.compress_student "
                       + " ".join(shlex.quote(a) for a in sys.argv[1:]),
               config=config_to_dict(cfg), figures=figures,
               notes=("BK-SDM (Kim et al. 2023): the smaller UNet starts from the source's weights and learns its "
                      "outputs and the outputs of every down and up block (MSE). "
                      + str(source.get("notes", ""))))


def main(argv: list[str] | None = None) -> Path:
    return train(parse_config(CompressConfig, argv))


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
