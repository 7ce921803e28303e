"""Train the embedded CLIP (PortraitCLIP) contrastively on portrait-world renders and captions.

    python -m pipelines.training.train_clip --out_dir runs/clip --steps 3000 --export_to assets/clip

Reads top to bottom: config -> run folder -> data (an image bank, and for every image a pool of
pre-tokenized captions in fresh phrasings) -> open_clip model from the registered config ->
resume -> loop -> checkpoints -> zero-shot evaluation on held-out renders -> export (fp16
safetensors + ``open_clip_config.json`` + card), loadable with
``open_clip.create_model_and_transforms(name, pretrained=<folder>/open_clip_model.safetensors)``.

The loss is CLIP's symmetric InfoNCE with a learnable temperature (Radford et al. 2021, fig. 3).
Because the world knows which attributes every caption mentions, ``multi_positive`` counts every
image a caption describes correctly as a positive of that caption (the image-text-label contrast
of UniCL, Yang et al. 2022) instead of treating it as a negative; short captions such as "an anime
girl with glasses" then teach rather than confuse. ``hard_negatives`` adds, for every image, a
counterfactual caption that differs from a true one in a single attribute value (NegCLIP,
Yuksekgonul et al. 2023): a batch can no longer be told apart by hair colour and background alone,
so eye colour, expression, glasses and the rest are learnt too.
"""

from __future__ import annotations

import math
import shlex
import sys
import time
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from pipelines.cards import write_card
from pipelines.clip_models import (EMBEDDED_NAME, PROMPT_TEMPLATES, WEIGHTS_FILE, load_clip, prepare_images,
                                   save_clip, value_phrases, zero_shot_accuracy)
from pipelines.data.bank import ImageBank, render_bank
from pipelines.data.portrait_world import ATTRIBUTES, PortraitAttributes, PortraitWorld, caption_attributes
from pipelines.device import select_device
from pipelines.training.runs import (RunFolder, capture_rng_state, config_to_dict, parse_config,
                                     restore_rng_state, seed_everything)

Progress = Callable[[int, int, object], None]


@dataclass
class ClipTrainConfig:
    """Training configuration of the embedded CLIP."""
    out_dir: str = "runs/clip"
    model: str = EMBEDDED_NAME      # a registered open_clip config (pipelines/clip_configs/)
    render_size: int = 0            # size of the rendered training images (0: the model's input size);
                                    # smaller renders are upsampled to the input size, as in the studio
    train_images: int = 60000       # rendered training images (train split)
    val_images: int = 4000          # rendered held-out images (held-out attribute combinations)
    world_captions: int = 4         # captions per image in the world's own varied phrasings
    prompt_captions: int = 2        # captions per image naming 1-3 of its attributes ("... with glasses")
    multi_positive: bool = True     # every image a caption describes counts as its positive (UniCL)
    hard_negatives: bool = True     # add per image the twin of a prompt caption with one value changed
    steps: int = 3000               # optimiser steps (the most, when max_train_minutes is set)
    max_train_minutes: Optional[float] = None  # stop after this much wall-clock loop time (evaluations
                                    # included); the cosine LR schedule then follows whichever of
                                    # steps / time runs out first, so a time-bound run still anneals
    batch: int = 512
    lr: float = 1e-3                # AdamW peak learning rate (linear warm-up, cosine decay)
    warmup: int = 200               # warm-up steps
    weight_decay: float = 0.1       # on weight matrices only
    grad_clip: float = 1.0          # max global gradient norm (0: off)
    augment: bool = True            # small shifts/zoom, flips, blur, noise; never a colour change
    augment_zoom: float = 0.06      # zoom range (+-); 0: no resampling, shifts by whole pixels only
    augment_blur: float = 1.0       # largest Gaussian blur sigma in pixels, on half the images (0: none)
    bf16: bool = True               # bf16 autocast on CUDA (the CPU always runs fp32)
    checkpoint_every: int = 500
    log_every: int = 50
    eval_every: int = 500           # zero-shot accuracy on eval_images held-out renders (0: only at the end)
    eval_images: int = 1000
    seed: int = 0
    device: str = "auto"
    workers: int = 2                # render / tokenizer processes
    resume: bool = False
    init_from: str = ""             # start from these weights (an exported folder, its .safetensors or a
                                    # run checkpoint .pt) with a fresh optimiser and schedule
    export_to: str = ""             # also write the final model (with card) here, e.g. assets/clip

    def validate(self) -> None:
        if self.steps <= 0 or self.batch <= 1:
            raise ValueError("steps must be positive and batch at least 2")
        if self.lr <= 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if self.max_train_minutes is not None and not self.max_train_minutes > 0:
            raise ValueError(f"max_train_minutes must be positive, got {self.max_train_minutes}")
        if self.world_captions < 1 or self.prompt_captions < 0:
            raise ValueError("world_captions must be >= 1 and prompt_captions >= 0")
        if self.hard_negatives and self.prompt_captions < 1:
            raise ValueError("hard_negatives needs prompt_captions >= 1 (the negatives are their twins)")
        if self.train_images < self.batch:
            raise ValueError(f"train_images ({self.train_images}) must be at least batch ({self.batch})")
        if open_clip.get_model_config(self.model) is None:
            raise ValueError(f"unknown open_clip config {self.model!r}")
        if not 0 <= self.augment_zoom < 0.5 or self.augment_blur < 0:
            raise ValueError("augment_zoom must be in [0, 0.5) and augment_blur >= 0")
        if self.render_size < 0 or 0 < self.render_size < 16:
            raise ValueError(f"render_size must be 0 (the model's input size) or at least 16, got {self.render_size}")


# --------------------------------------------------------------------------------------------
# captions: a pool of pre-tokenized captions per image, with the attributes each one mentions
# --------------------------------------------------------------------------------------------

def prompt_caption(attributes: PortraitAttributes, rng: np.random.Generator
                   ) -> tuple[tuple[str, dict[str, str]], tuple[str, dict[str, str]]]:
    """A short caption naming 1-3 random attributes of the portrait in the zero-shot phrasing
    ("an anime girl with blue eyes and a hat"), and its counterfactual twin: the same caption with
    one of those attributes changed to a value the portrait does not have (a hard negative, as in
    NegCLIP, Yuksekgonul et al. 2023). Each comes with the ``{name: value}`` it mentions."""
    values = attributes.to_dict()
    names = list(ATTRIBUTES)
    chosen = [names[i] for i in rng.choice(len(names), size=int(rng.integers(1, 4)), replace=False)]
    picks = rng.random(len(chosen))                     # which phrasing of each value
    template = PROMPT_TEMPLATES[int(rng.integers(len(PROMPT_TEMPLATES)))]
    flipped = chosen[int(rng.integers(len(chosen)))]
    others = [v for v in ATTRIBUTES[flipped] if v != values[flipped]]
    twin_values = {**values, flipped: others[int(rng.integers(len(others)))]}

    def compose(vals: dict[str, str]) -> tuple[str, dict[str, str]]:
        phrases = []
        for name, u in zip(chosen, picks):
            options = value_phrases(name, vals[name])
            phrases.append(options[int(u * len(options))])
        text = phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]
        return template.format(text), {n: vals[n] for n in chosen}

    return compose(values), compose(twin_values)


@dataclass
class CaptionPool:
    """Pre-tokenized captions of every bank image (K = world_captions + prompt_captions)."""
    tokens: torch.Tensor        # [N, K, context] int32
    mentions: torch.Tensor      # [N, K, A] int8: value index of each attribute named, -1 if not named
    neg_tokens: torch.Tensor    # [N, prompt_captions, context] int32: the twins of the prompt captions
    neg_mentions: torch.Tensor  # [N, prompt_captions, A] int8

    def to(self, device: torch.device) -> "CaptionPool":
        return CaptionPool(*(t.to(device) for t in (self.tokens, self.mentions, self.neg_tokens, self.neg_mentions)))


def _caption_chunk(args: tuple) -> tuple[np.ndarray, ...]:
    """The caption pool arrays of one slice of the bank, and how many captions filled the context."""
    model_name, labels, first, seed, n_world, n_prompt = args
    world, tokenizer = PortraitWorld(), open_clip.get_tokenizer(model_name)
    names = list(ATTRIBUTES)
    n = len(labels)
    texts, neg_texts = [], []
    mentions = np.full((n, n_world + n_prompt, len(names)), -1, dtype=np.int8)
    neg_mentions = np.full((n, n_prompt, len(names)), -1, dtype=np.int8)
    for i, row in enumerate(labels):
        attrs = PortraitAttributes.from_indices([int(v) for v in row])
        for k in range(n_world + n_prompt):
            rng = np.random.default_rng([seed, first + i, k])   # fresh phrasings, fixed per run
            if k < n_world:
                text = world.caption(attrs, rng)
                named = caption_attributes(text)
            else:
                (text, named), (neg_text, neg_named) = prompt_caption(attrs, rng)
                neg_texts.append(neg_text)
                for name, value in neg_named.items():
                    neg_mentions[i, k - n_world, names.index(name)] = ATTRIBUTES[name].index(value)
            texts.append(text)
            for name, value in named.items():
                mentions[i, k, names.index(name)] = ATTRIBUTES[name].index(value)
    tokens = tokenizer(texts)                                    # [n * K, context]
    context = tokens.shape[-1]
    neg_tokens = tokenizer(neg_texts) if neg_texts else torch.zeros(0, context, dtype=torch.long)
    full = int((tokens[:, -1] != 0).sum())                       # no padding left: maybe truncated
    return (tokens.numpy().astype(np.int32).reshape(n, -1, context), mentions,
            neg_tokens.numpy().astype(np.int32).reshape(n, n_prompt, context), neg_mentions, full)


def build_caption_pool(bank: ImageBank, config: ClipTrainConfig, cache: Path) -> CaptionPool:
    """For every bank image, ``world_captions`` captions in the world's phrasings and
    ``prompt_captions`` short ones with their twins; cached to ``cache`` for resumed runs."""
    keys = ("tokens", "mentions", "neg_tokens", "neg_mentions")
    if cache.exists():
        with np.load(cache) as z:
            if (z["tokens"].shape[:2] == (len(bank), config.world_captions + config.prompt_captions)
                    and z["neg_tokens"].shape[1] == config.prompt_captions):
                return CaptionPool(*(torch.from_numpy(z[k]) for k in keys))
    labels = bank.labels.numpy()
    if (labels < 0).any():
        raise ValueError("the caption pool needs a bank without outliers")
    workers = max(1, config.workers)
    bounds = np.linspace(0, len(bank), min(workers * 4, len(bank)) + 1).astype(int)
    jobs = [(config.model, labels[a:b], int(a), config.seed, config.world_captions, config.prompt_captions)
            for a, b in zip(bounds[:-1], bounds[1:]) if b > a]
    if workers == 1:
        parts = [_caption_chunk(j) for j in jobs]
    else:
        # Forked workers start at once. Torch runs on one thread meanwhile: a forked child that
        # enters an OpenMP region its parent had started (any large tensor op) waits forever.
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            with get_context("spawn" if torch.cuda.is_initialized() else "fork").Pool(workers) as pool:
                parts = pool.map(_caption_chunk, jobs)
        finally:
            torch.set_num_threads(threads)
    arrays = {k: np.concatenate([p[j] for p in parts]) for j, k in enumerate(keys)}
    full = sum(p[-1] for p in parts)
    if full:
        n_texts = arrays["tokens"].shape[0] * arrays["tokens"].shape[1]
        print(f"warning: {full} of {n_texts} captions fill the whole context "
              f"({arrays['tokens'].shape[-1]} tokens) and may have been truncated", flush=True)
    tmp = cache.with_name(cache.name + ".tmp.npz")
    np.savez(tmp, **arrays)
    tmp.replace(cache)
    return CaptionPool(*(torch.from_numpy(arrays[k]) for k in keys))


# --------------------------------------------------------------------------------------------
# augmentation and loss
# --------------------------------------------------------------------------------------------

def augment(x: torch.Tensor, generator: torch.Generator, *, zoom: float = 0.06, blur: float = 1.0) -> torch.Tensor:
    """Label-preserving changes that keep colours (colours are labels): a per-image shift of up to
    1/16 of the side and zoom of +-``zoom``, horizontal flips, Gaussian blur (sigma up to ``blur``
    px) on half the images and a little pixel noise. With ``zoom=0`` nothing is resampled: shifts
    are whole pixels, so one-pixel lines stay sharp. x: [B, 3, H, W] in [-1, 1]; all random numbers
    come from ``generator``, which lives on x's device."""
    b, dev = x.shape[0], x.device
    rand = lambda *shape: torch.rand(shape, generator=generator, device=dev)  # noqa: E731
    # 1. affine resampling: zoom, shift, flip (border padding repeats the background)
    scale = 1 + (rand(b) - 0.5) * 2 * zoom
    flip = torch.where(rand(b) < 0.5, -1.0, 1.0)
    shift = (rand(b, 2) - 0.5) * (2 / 16) * 2          # in normalised [-1, 1] units
    if zoom == 0:                                       # whole pixels: the sampling grid hits pixel centres
        side = torch.tensor([x.shape[-1], x.shape[-2]], device=dev, dtype=shift.dtype)
        shift = torch.round(shift * side / 2) * 2 / side
    theta = torch.zeros(b, 2, 3, device=dev)
    theta[:, 0, 0] = flip / scale
    theta[:, 1, 1] = 1 / scale
    theta[:, :, 2] = shift
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    # 2. separable Gaussian blur (sigma up to `blur` px) on half of the batch
    if blur > 0:
        sigma = (rand(b) * blur).clamp_min(1e-3) * (rand(b) < 0.5)
        k = torch.arange(-2, 3, device=dev, dtype=x.dtype)
        kern = torch.exp(-(k[None] ** 2) / (2 * sigma[:, None].clamp_min(1e-3) ** 2))
        kern = (kern / kern.sum(1, keepdim=True)).repeat_interleave(3, 0)      # [B*3, 5]
        xb = x.reshape(1, b * 3, *x.shape[-2:])
        xb = F.conv2d(F.pad(xb, (2, 2, 0, 0), mode="replicate"), kern[:, None, None, :], groups=b * 3)
        xb = F.conv2d(F.pad(xb, (0, 0, 2, 2), mode="replicate"), kern[:, None, :, None], groups=b * 3)
        x = xb.reshape_as(x)
    # 3. pixel noise
    noise = torch.randn(x.shape, generator=generator, device=dev) * rand(b, 1, 1, 1) * 0.04
    return (x + noise).clamp(-1, 1)


def positives(labels: torch.Tensor, mentions: torch.Tensor) -> torch.Tensor:
    """[B, T] bool: caption j describes image i (every attribute it mentions matches).

    labels: [B, A] value indices; mentions: [T, A] value indices, -1 where not mentioned."""
    m = mentions[None].long()                                           # [1, T, A]
    return ((m < 0) | (m == labels[:, None].long())).all(-1)            # [B, T]


def contrastive_loss(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor,
                     match: torch.Tensor | None = None) -> torch.Tensor:
    """Symmetric InfoNCE over unit features (CLIP, Radford et al. 2021).

    image_features [B, D]; text_features [T, D], T >= B: text i < B is the caption of image i, the
    texts after B are extra negatives for the image-to-text side (hard negatives). ``match``
    [B, T] bool marks further positive pairs; each row's target is then uniform over its
    positives (UniCL, Yang et al. 2022)."""
    b, t = image_features.shape[0], text_features.shape[0]
    logits = logit_scale * image_features.float() @ text_features.float().T   # [B, T]
    target = torch.zeros(b, t, dtype=torch.bool, device=logits.device)
    target[:, :b] = torch.eye(b, dtype=torch.bool, device=logits.device)
    if match is not None:
        target |= match
    target = target.float()
    loss_i = -(target / target.sum(1, keepdim=True) * logits.log_softmax(1)).sum(1).mean()
    target_t = target[:, :b].T                                               # [B_txt, B_img]
    loss_t = -(target_t / target_t.sum(1, keepdim=True) * logits[:, :b].T.log_softmax(1)).sum(1).mean()
    return (loss_i + loss_t) / 2


# --------------------------------------------------------------------------------------------
# training
# --------------------------------------------------------------------------------------------

def load_init_weights(model: torch.nn.Module, path: Path) -> None:
    """Load earlier weights (an exported .safetensors, or a run checkpoint .pt) into ``model``, which
    may take a larger or smaller input than the model they came from: a ViT's position embedding
    is resized by open_clip, a ModifiedResNet's attention-pool position grid here (bicubic, as
    open_clip does for ViTs), so a model trained at 64 px can go on at 128 px."""
    if path.suffix == ".pt":
        state = torch.load(path, map_location="cpu", weights_only=True)["model"]
    else:
        state = load_file(str(path))
    open_clip.model.resize_pos_embed(state, model)
    own = model.state_dict()
    key = "visual.attnpool.positional_embedding"
    if key in state and key in own and state[key].shape != own[key].shape:
        old, new = state[key], own[key]
        g_old, g_new = math.isqrt(old.shape[0] - 1), math.isqrt(new.shape[0] - 1)
        grid = old[1:].float().reshape(1, g_old, g_old, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, size=(g_new, g_new), mode="bicubic", align_corners=False)
        state[key] = torch.cat([old[:1].float(), grid.permute(0, 2, 3, 1).reshape(g_new * g_new, -1)]).to(new.dtype)
    model.load_state_dict({k: v.to(own[k].dtype) if k in own else v for k, v in state.items()})


def vision_summary(vision_cfg: dict) -> str:
    """One line on a vision tower config: a ViT's depth, width and patch, or a ModifiedResNet's stages."""
    size = vision_cfg["image_size"]
    if isinstance(vision_cfg["layers"], (list, tuple)):
        return (f"ModifiedResNet (blocks {list(vision_cfg['layers'])}, width {vision_cfg['width']}, "
                f"attention pooling, {size} px input)")
    return (f"ViT ({vision_cfg['layers']} layers, width {vision_cfg['width']}, "
            f"patch {vision_cfg.get('patch_size', 16)}, {size} px input)")


def train(config: ClipTrainConfig, progress: Progress | None = None) -> Path:
    """Run (or resume) a training run; returns the folder of the exported model."""
    # 1. config and run folder
    config.validate()
    run = RunFolder(config.out_dir)
    resuming = run.create(config, resume=config.resume)
    seed_everything(config.seed)
    device = select_device(config.device)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    render_size = config.render_size or open_clip.get_model_config(config.model)["vision_cfg"]["image_size"]

    # 2. data, prepared before CUDA starts (the caption workers fork)
    t0 = time.time()
    train_bank = render_bank(config.train_images, size=render_size, seed=config.seed, split="train",
                             workers=config.workers, cache=run.path / "train_bank.npz")
    val_bank = render_bank(config.val_images, size=render_size, seed=config.seed + 10_000_000,
                           split="heldout", workers=config.workers, cache=run.path / "val_bank.npz")
    t1 = time.time()
    pool = build_caption_pool(train_bank, config, run.path / "captions.npz")
    n_texts = pool.tokens.shape[0] * (pool.tokens.shape[1] + pool.neg_tokens.shape[1])
    print(f"rendered {len(train_bank)} + {len(val_bank)} images in {t1 - t0:.1f}s; "
          f"{n_texts} captions tokenized in {time.time() - t1:.1f}s", flush=True)
    images = train_bank.images.to(device)        # [N, 3, H, W] uint8, held on the device
    labels = train_bank.labels.to(device)        # [N, A]
    pool = pool.to(device)
    eval_idx = torch.arange(min(config.eval_images, len(val_bank)))

    # 3. network and optimiser
    use_bf16 = config.bf16 and device.type == "cuda" and torch.cuda.is_bf16_supported()
    model = open_clip.create_model(config.model, device=device)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "logit_scale" not in n]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2 or "logit_scale" in n]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=config.lr, betas=(0.9, 0.98), eps=1e-6, fused=device.type == "cuda")
    gen = torch.Generator(device=device).manual_seed(config.seed)  # batches and augmentation
    step, trained_s = 0, 0.0
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model {config.model}: {n_params / 1e6:.2f}M parameters on {device}"
          f"{' (bf16 autocast)' if use_bf16 else ''}", flush=True)

    # 4. resume, or start from earlier weights
    if config.init_from and not resuming:
        init = Path(config.init_from)
        init = init / WEIGHTS_FILE if init.is_dir() else init
        load_init_weights(model, init)
        print(f"initialised from {init}", flush=True)
    if resuming:
        ckpt = run.load_checkpoint()
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        gen.set_state(ckpt["data_rng"])
        restore_rng_state(ckpt["rng"])
        step, trained_s = int(ckpt["step"]), float(ckpt["trained_s"])
        run.truncate_metrics(step)
        print(f"resumed from step {step}", flush=True)

    def schedule_progress(s: int, seconds: float) -> float:
        done = s / config.steps
        if config.max_train_minutes is not None:
            done = max(done, seconds / (60 * config.max_train_minutes))
        return min(done, 1.0)

    def lr_at(s: int, seconds: float) -> float:
        warm = min(1.0, (s + 1) / max(1, config.warmup))
        return config.lr * warm * 0.5 * (1 + math.cos(math.pi * schedule_progress(s, seconds)))

    def checkpoint(s: int) -> None:
        run.save_checkpoint(s, {"model": model.state_dict(), "optimizer": opt.state_dict(),
                                "data_rng": gen.get_state(),
                                "rng": capture_rng_state(), "step": s, "trained_s": trained_s,
                                "config": config_to_dict(config)})

    tokenizer = open_clip.get_tokenizer(config.model)

    def evaluate(idx: torch.Tensor) -> dict[str, float]:
        return zero_shot_accuracy(model, tokenizer, val_bank.images[idx], val_bank.labels[idx])

    # 5. loop
    run.set_status("running", step=step, total=config.steps)
    model.train()
    t_start, trained_before = time.time(), trained_s   # trained_s: wall-clock seconds of the loop
    t_last, steps_since = time.time(), 0
    while step < config.steps and schedule_progress(step, trained_s) < 1.0:
        # drawn on the device: no host-device synchronisation inside a step
        idx = torch.randint(0, len(train_bank), (config.batch,), generator=gen, device=device)
        k = torch.randint(0, pool.tokens.shape[1], (config.batch,), generator=gen, device=device)
        x = images[idx].float().div_(127.5).sub_(1.0)                   # [B, 3, H, W] in [-1, 1]
        if config.augment:
            x = augment(x, gen, zoom=config.augment_zoom, blur=config.augment_blur)
        text, named = pool.tokens[idx, k], pool.mentions[idx, k]       # [B, context], [B, A]
        if config.hard_negatives:  # one counterfactual twin per image: [2B, context], [2B, A]
            j = torch.randint(0, pool.neg_tokens.shape[1], (config.batch,), generator=gen, device=device)
            text = torch.cat([text, pool.neg_tokens[idx, j]])
            named = torch.cat([named, pool.neg_mentions[idx, j]])
        match = positives(labels[idx], named) if config.multi_positive else None
        lr = lr_at(step, trained_s)
        for g in opt.param_groups:
            g["lr"] = lr
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_bf16):
            img_f = model.encode_image(prepare_images(model, x), normalize=True)   # [B, D]
            txt_f = model.encode_text(text.long(), normalize=True)                # [B or 2B, D]
        loss = contrastive_loss(img_f, txt_f, model.logit_scale.exp(), match)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if config.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        step += 1
        steps_since += 1
        trained_s = trained_before + time.time() - t_start
        last = step >= config.steps or schedule_progress(step, trained_s) >= 1.0
        if step % config.log_every == 0 or last:
            loss_value = loss.item()  # synchronises the device, so the timing below is real
            dt = time.time() - t_last
            run.log_metrics(step, loss=loss_value, lr=lr, logit_scale=model.logit_scale.exp().item(),
                            steps_per_s=steps_since / dt, images_per_s=steps_since * config.batch / dt)
            print(f"step {step}/{config.steps} loss {loss_value:.4f} scale {model.logit_scale.exp().item():.1f} "
                  f"lr {lr:.2e} ({steps_since / dt:.2f} steps/s, {steps_since * config.batch / dt:.0f} img/s, "
                  f"{trained_s:.0f}s trained)", flush=True)
            t_last, steps_since = time.time(), 0
            run.set_status("running", step=step, total=config.steps)
        if config.eval_every and step % config.eval_every == 0 and not last:
            t_eval = time.time()
            figures = evaluate(eval_idx)
            run.log_metrics(step, **{f"val_{k}": v for k, v in figures.items()})
            print(f"step {step} held-out zero-shot {figures['clip_zero_shot_accuracy']:.3f} "
                  f"({time.time() - t_eval:.1f}s)", flush=True)
            model.train()
            t_last += time.time() - t_eval
            trained_s = trained_before + time.time() - t_start
        if progress is not None:
            progress(step, config.steps, None)
        if step % config.checkpoint_every == 0:
            checkpoint(step)
    if run.latest_checkpoint() is None or run.latest_checkpoint().name != f"step_{step:07d}.pt":
        checkpoint(step)

    # 6. held-out zero-shot evaluation
    model.eval()
    figures = evaluate(torch.arange(len(val_bank)))
    train_idx = torch.arange(min(len(train_bank), len(val_bank)))
    figures["train_clip_zero_shot_accuracy"] = zero_shot_accuracy(
        model, tokenizer, train_bank.images[train_idx], train_bank.labels[train_idx])["clip_zero_shot_accuracy"]
    figures = {("heldout_" + k if k.startswith("zs_") else k): v for k, v in figures.items()}
    run.log_metrics(step, **figures)
    print("held-out zero-shot:", {k: round(v, 4) for k, v in figures.items()}, flush=True)

    # 7. export: fp16 safetensors + open_clip_config.json + card, checked by loading it back
    targets = [run.path / "clip"] + ([Path(config.export_to)] if config.export_to else [])
    command = "python -m pipelines.training.train_clip " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    cfg = open_clip.get_model_config(config.model)
    for folder in targets:
        save_clip(model, folder, model_name=config.model, fp16=True)
        write_card(folder, title="PortraitCLIP (embedded CLIP)",
                   task="image-text embedding for CLIP editing and zero-shot attribute reading",
                   architecture=(f"open_clip {config.model}: {vision_summary(cfg['vision_cfg'])}, on "
                                 f"{render_size}-px renders + text transformer ({cfg['text_cfg']['layers']} layers, width "
                                 f"{cfg['text_cfg']['width']}, context {cfg['text_cfg']['context_length']}, "
                                 f"open_clip BPE), embed_dim {cfg['embed_dim']}, {n_params / 1e6:.2f}M parameters"),
                   source=f"training run {config.out_dir} ({step} steps, {trained_s:.0f}s)",
                   command=command, config=config_to_dict(config),
                   figures={k: round(v, 4) for k, v in figures.items()},
                   notes="Load it with `open_clip.create_model_and_transforms(\"" + config.model + "\", "
                         "pretrained=\"<folder>/open_clip_model.safetensors\")` after importing "
                         "`pipelines.clip_models` (which registers the config), or with "
                         "`pipelines.clip_models.load_clip(\"<folder>\")`. Zero-shot figures: for each "
                         "attribute, the value whose prompts (\"an anime portrait with blue hair\", ...) "
                         "are closest to the image, on renders of attribute combinations held out of "
                         "training. Training captions: the world's own varied captions plus short "
                         "captions naming 1-3 attributes in the prompt phrasing.")
    loaded = load_clip(targets[0], device=device)
    with torch.no_grad():
        x = val_bank.batch(torch.arange(min(8, len(val_bank))), device)
        drift = (loaded.model.encode_image(prepare_images(loaded.model, x), normalize=True)
                 - model.encode_image(prepare_images(model, x), normalize=True)).abs().max().item()
    print(f"exported to {', '.join(map(str, targets))} (fp16 reload max feature difference {drift:.2e})", flush=True)
    run.set_status("finished", step=step, total=config.steps, figures=figures)
    return targets[-1]


def main(argv: list[str] | None = None) -> None:
    train(parse_config(ClipTrainConfig, argv))


if __name__ == "__main__":
    main()
