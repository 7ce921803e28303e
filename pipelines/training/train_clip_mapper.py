"""Train the text-conditioned latent mapper of the CLIP edit tab for a generator and a CLIP.

StyleCLIP's latent mapper (Patashnik et al. 2021, Sec. 5) made text-conditioned as in
CLIPInverter (Baykal et al. 2023): one :class:`~models.clip_mapper.CLIPTextMapper` learns, for
every text, ``w' = w + M(w, E_T(t))``. Every step takes a batch of latents (the generator's own,
and portrait-world renders inverted with its e4e encoder, as the tab edits inverted portraits)
and for each a text asking for one or two attribute values the portrait does not show ("blue
hair", "a smile and glasses", in the zero-shot prompt phrasing, templates averaged), and
minimises::

    loss = clip_weight         * (1 - cos(E_I(G(w')), E_T(t)))            (StyleCLIP's CLIP loss)
         + l2_weight           * mean((w' - w)^2) / var_w                 (StyleCLIP's L2 on the offset)
         + preservation_weight * L_keep                                   (unmentioned attributes)
         + target_weight       * CE(evaluator(G(w')), asked values)       (the asked attributes)

``L_keep`` is the evaluator's cross-entropy of every attribute the text does not name against its
reading of the source ('attributes'), or its feature distance to the source image ('features').
The target term is the differentiable evaluator's verdict on the asked values; it is cheap and
makes the small CLIP's gradient reliable (``--target_weight 0`` trains on CLIP alone).

Reads top to bottom: config -> run folder -> networks -> latent pool -> mapper -> resume -> loop ->
checkpoints -> held-out figures -> export (safetensors + config.json + card)::

    python -m pipelines.training.train_clip_mapper --generator assets/stylegan2_portraits64 \\
        --clip assets/clip --out_dir runs/clip_mapper --export_to assets/stylegan2_portraits64/clip_mapper

The defaults suit a CPU: 1,500 steps of 8 latents (about 8 minutes for the embedded 64-px
generator, plus a minute to invert the 1,000 renders of the pool); ``--max_train_minutes`` caps
the loop by the clock instead.
"""

from __future__ import annotations

import math
import shlex
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn.functional as F
from PIL import Image

from models.clip_mapper import GROUP_NAMES, CLIPTextMapper
from pipelines.clip_edit import (DOUBLE_EDITS, SINGLE_EDITS, clip_probe, mapper_edit, measure_edits, save_mapper,
                                 text_embedding)
from pipelines.clip_models import image_features, value_phrases
from pipelines.data.portrait_world import ATTRIBUTES
from pipelines.device import select_device
from pipelines.images import make_grid, tensor_to_pil
from pipelines.stylegan_inversion import EvaluatorPerceptualLoss, synthesize, w_statistics
from pipelines.training.runs import (RunFolder, capture_rng_state, config_to_dict, parse_config, restore_rng_state,
                                     seed_everything)

__all__ = ["ClipMapperTrainConfig", "sample_texts", "train", "main"]

Progress = Callable[[int, int, Optional[Image.Image]], None]


@dataclass
class ClipMapperTrainConfig:
    """A text-conditioned latent mapper for one generator and one CLIP (CPU-friendly defaults:
    about 10 minutes for the embedded 64-px generator on a 2-core CPU)."""

    out_dir: str = "runs/clip_mapper"
    resume: bool = False  # continue from the latest checkpoint in out_dir
    device: str = "auto"
    seed: int = 0

    # the networks
    generator: str = "assets/stylegan2_portraits64"  # studio generator folder
    clip: str = "assets/clip"  # CLIP folder (or "embedded")
    evaluator: Optional[str] = "assets/evaluator"  # for preservation and the target term; 'none' = off
    encoder: Optional[str] = None  # e4e encoder for the inverted latents; None = <generator>/encoder if present

    # the latents
    pool_size: int = 1000  # the generator's own latents (mapped z, per-sample truncation)
    truncation_min: float = 0.5  # psi drawn per latent from [truncation_min, 1]
    real_images: int = 1000  # portrait-world renders inverted with the encoder (0 = none)
    real_seed: int = 4_000_000  # bank seed of those renders (the benchmark's held-out seeds differ)
    eval_seed: int = 4_500_000  # bank seed of the held-out figures' renders
    w_avg_samples: int = 5000

    # the texts
    attributes: str = ""  # comma-separated attributes the texts may ask for; "" = all
    double_prob: float = 0.4  # share of texts that ask for two attributes ("blue hair and glasses")

    # the mapper
    hidden: int = 0  # width of the MLPs; 0 = w_dim
    num_layers: int = 4  # FiLM layers per group (StyleCLIP: 4)
    edit_groups: str = "coarse,medium,fine"

    # length and optimiser
    steps: int = 1500  # about 0.3 s a step at batch 8 for the embedded 64-px generator on one CPU core
    batch: int = 8
    lr: float = 5e-4  # Adam
    max_train_minutes: Optional[float] = None  # stop early (checkpoint + export) after this much loop time

    # losses
    clip_weight: float = 1.0
    l2_weight: float = 0.2  # on mean((w' - w)^2) / var_w
    preservation: str = "attributes"  # 'attributes' | 'features' | 'none'
    preservation_weight: float = 1.0
    target_weight: float = 0.5  # evaluator cross-entropy of the asked values (0 = CLIP only)

    # logging, samples, checkpoints, figures
    log_every: int = 25
    sample_every: int = 200
    checkpoint_every: int = 200
    keep_checkpoints: int = 2
    eval_latents: int = 48  # held-out inverted renders (or samples) for the final figures

    export_to: Optional[str] = None  # also write the mapper (with a card) here, e.g. <generator>/clip_mapper

    def validate(self) -> None:
        for name in ("steps", "batch", "log_every", "sample_every", "checkpoint_every", "keep_checkpoints",
                     "eval_latents", "w_avg_samples", "num_layers"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.pool_size < 0 or self.real_images < 0 or self.pool_size + self.real_images <= 0:
            raise ValueError("pool_size and real_images must be >= 0, and one of them positive")
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if not 0 <= self.double_prob <= 1 or not 0 <= self.truncation_min <= 1:
            raise ValueError("double_prob and truncation_min must be in [0, 1]")
        for name in ("clip_weight", "l2_weight", "preservation_weight", "target_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.preservation not in ("attributes", "features", "none"):
            raise ValueError(f"preservation must be 'attributes', 'features' or 'none', got {self.preservation!r}")
        if self.max_train_minutes is not None and not self.max_train_minutes > 0:
            raise ValueError(f"max_train_minutes must be positive, got {self.max_train_minutes}")
        unknown = set(self.attribute_list()) - set(ATTRIBUTES)
        if unknown:
            raise ValueError(f"unknown attributes {sorted(unknown)}; known: {', '.join(ATTRIBUTES)}")
        if self.double_prob > 0 and len(self.attribute_list()) < 2:
            raise ValueError("double edits need at least two attributes (or --double_prob 0)")
        groups = [g for g in self.edit_groups.split(",") if g]
        if not groups or set(groups) - set(GROUP_NAMES):
            raise ValueError(f"edit_groups must name some of {GROUP_NAMES}, got {self.edit_groups!r}")
        if not Path(self.generator).is_dir():
            raise ValueError(f"generator {self.generator!r} is not a studio generator folder")
        if self.clip != "embedded" and not Path(self.clip).exists():
            raise ValueError(f"CLIP {self.clip!r} does not exist; train the embedded one with "
                             "`python -m pipelines.training.train_clip --export_to assets/clip`")
        if self.uses_evaluator() and (self.evaluator in (None, "", "none") or not Path(self.evaluator).exists()):
            raise ValueError(f"evaluator {self.evaluator!r} does not exist; preservation and the target term need "
                             "one (or pass --preservation none --target_weight 0)")
        if self.encoder not in (None, "", "none") and not Path(self.encoder).is_dir():
            raise ValueError(f"encoder {self.encoder!r} is not an encoder folder")

    def attribute_list(self) -> list[str]:
        return [a.strip() for a in self.attributes.split(",") if a.strip()] or list(ATTRIBUTES)

    def uses_evaluator(self) -> bool:
        return (self.preservation != "none" and self.preservation_weight > 0) or self.target_weight > 0

    def encoder_path(self) -> Path | None:
        if self.encoder in ("", "none"):
            return None
        if self.encoder is None:
            default = Path(self.generator) / "encoder"
            return default if (default / "config.json").is_file() else None
        return Path(self.encoder)


# --------------------------------------------------------------------------------------------
# texts
# --------------------------------------------------------------------------------------------

def sample_texts(readings: torch.Tensor, attributes: list[str], double_prob: float, generator: torch.Generator
                 ) -> list[tuple[str, dict[str, str]]]:
    """For each row of ``readings`` (``[B, A]`` value indices of the source portraits), a text asking
    for one attribute value it does not show, or two with probability ``double_prob``: the
    phrase ("blue hair and glasses", phrasing and order drawn at random) and ``{name: value}``."""
    names = list(ATTRIBUTES)
    out = []
    for row in readings.tolist():
        two = len(attributes) > 1 and float(torch.rand([], generator=generator)) < double_prob
        order = torch.randperm(len(attributes), generator=generator)[:2 if two else 1].tolist()
        asked: dict[str, str] = {}
        phrases = []
        for j in order:
            name = attributes[j]
            values = [v for i, v in enumerate(ATTRIBUTES[name]) if i != row[names.index(name)]]
            value = values[int(torch.randint(len(values), [], generator=generator))]
            options = value_phrases(name, value)
            phrases.append(options[int(torch.randint(len(options), [], generator=generator))])
            asked[name] = value
        out.append((" and ".join(phrases), asked))
    return out


class TextCache:
    """Unit CLIP embeddings of phrases (templates averaged, as the editor embeds them), each
    computed once."""

    def __init__(self, clip: Any) -> None:
        self.clip = clip
        self._cache: dict[str, torch.Tensor] = {}

    def __call__(self, phrases: list[str]) -> torch.Tensor:  # -> [B, D]
        for p in phrases:
            if p not in self._cache:
                self._cache[p] = text_embedding(self.clip, p).vector
        return torch.stack([self._cache[p] for p in phrases])


# --------------------------------------------------------------------------------------------
# training
# --------------------------------------------------------------------------------------------

@torch.no_grad()
def _latent_pool(G: Any, encoder: Any, config: ClipMapperTrainConfig, w_avg: torch.Tensor, count: int, real: int,
                 bank_seed: int, cache: Path | None, generator: torch.Generator) -> torch.Tensor:
    """``[count + real, num_ws, w_dim]``: the generator's own latents and inverted world renders."""
    from pipelines.training.train_stylegan_encoder import sample_training_latents

    device = w_avg.device
    parts = []
    for start in range(0, count, 256):
        n = min(256, count - start)
        parts.append(sample_training_latents(G, n, w_avg, truncation_min=config.truncation_min, style_mixing=0.0,
                                             generator=generator))
    if real > 0 and encoder is not None:
        from pipelines.data.bank import render_bank
        bank = render_bank(real, size=G.img_resolution, seed=bank_seed, split="any", workers=1, cache=cache)
        for start in range(0, real, 64):
            x = bank.batch(torch.arange(start, min(start + 64, real)), device)
            parts.append(encoder(x).to(device, torch.float32))
    return torch.cat(parts)


@torch.no_grad()
def _readings(G: Any, evaluator: Any, w_plus: torch.Tensor) -> torch.Tensor:
    """The evaluator's reading ``[N, A]`` (value indices) of the renders of ``w_plus``."""
    out = []
    for chunk in w_plus.split(64):
        logits = evaluator.network(synthesize(G, chunk)).logits
        out.append(torch.stack([logits[name].argmax(1) for name in ATTRIBUTES], 1))
    return torch.cat(out)


def train(config: ClipMapperTrainConfig, progress: Progress | None = None) -> Path:
    """Run (or resume) a mapper training run; returns the folder of the exported mapper."""
    from pipelines.clip_models import load_clip
    from pipelines.evaluation import Evaluator
    from pipelines.stylegan_inversion import load_encoder
    from pipelines.stylegan_io import load_generator

    # 1. Config, run folder, device, seeds.
    config.validate()
    run = RunFolder(config.out_dir)
    resuming = run.create(config, resume=config.resume)
    seed_everything(config.seed)
    device = select_device(config.device)
    step = 0
    try:
        # 2. The frozen networks: generator, CLIP, evaluator, encoder.
        G = load_generator(config.generator, device=device).requires_grad_(False)
        clip = load_clip(config.clip, device=device)
        clip.model.requires_grad_(False)
        evaluator = Evaluator.from_pretrained(config.evaluator, device=device) if config.uses_evaluator() else None
        encoder_path = config.encoder_path()
        encoder = load_encoder(encoder_path, device=device) if encoder_path is not None else None
        if encoder is not None and (encoder.num_ws, encoder.w_dim) != (G.num_ws, G.w_dim):
            raise ValueError(f"the encoder {encoder_path} was trained for another generator")
        w_avg, w_std = w_statistics(G, config.w_avg_samples, torch.Generator(device).manual_seed(config.seed))
        w_var = w_std ** 2 / G.w_dim                                   # variance of one w dimension
        attributes = config.attribute_list()
        texts = TextCache(clip)

        # 3. Latent pools (training and held-out) and their readings.
        pool = _latent_pool(G, encoder, config, w_avg, config.pool_size, config.real_images, config.real_seed,
                            run.path / "real_bank.npz", torch.Generator(device).manual_seed(config.seed + 1))
        n_eval_real = config.eval_latents if encoder is not None else 0
        eval_w = _latent_pool(G, encoder, config, w_avg, config.eval_latents - n_eval_real, n_eval_real,
                              config.eval_seed, run.path / "eval_bank.npz",
                              torch.Generator(device).manual_seed(config.seed + 2))
        if evaluator is not None:
            readings = _readings(G, evaluator, pool)
        else:  # no evaluator: any value may be asked for
            readings = torch.full([len(pool), len(ATTRIBUTES)], -1, dtype=torch.long, device=device)
        print(f"mapper for {config.generator} ({G.num_ws} x {G.w_dim}) and CLIP {config.clip}: {len(pool)} training "
              f"latents ({config.real_images if encoder is not None else 0} inverted renders), on {device}", flush=True)

        # 4. Mapper and optimiser.
        mapper = CLIPTextMapper(G.num_ws, G.w_dim, int(clip_probe(clip).shape[1]), hidden=config.hidden or None,
                                num_layers=config.num_layers,
                                edit_groups=[g for g in config.edit_groups.split(",") if g]).to(device)
        mapper.w_avg.copy_(w_avg)
        mapper.w_std.fill_(math.sqrt(w_var))                       # the std of one w dimension
        opt = torch.optim.Adam(mapper.parameters(), lr=config.lr)
        gen = torch.Generator().manual_seed(config.seed + 3)      # batches and texts (on the CPU)
        perceptual = EvaluatorPerceptualLoss(evaluator) if config.preservation == "features" else None
        n_params = sum(p.numel() for p in mapper.parameters())
        print(f"mapper: {n_params / 1e6:.2f} M parameters, groups {list(mapper.mappers)}", flush=True)

        # 5. Resume.
        train_seconds = 0.0
        if resuming:
            ckpt = run.load_checkpoint()
            mapper.load_state_dict(ckpt["mapper"])
            opt.load_state_dict(ckpt["optimizer"])
            gen.set_state(ckpt["batch_rng"])
            restore_rng_state(ckpt["rng"])
            step = int(ckpt["step"])
            train_seconds = float(ckpt.get("train_seconds", 0.0))
            run.truncate_metrics(step)
            print(f"resumed from step {step}", flush=True)

        def checkpoint() -> None:
            run.save_checkpoint(step, {"step": step, "mapper": mapper.state_dict(), "optimizer": opt.state_dict(),
                                       "batch_rng": gen.get_state(), "rng": capture_rng_state(),
                                       "train_seconds": train_seconds, "config": config_to_dict(config)},
                                keep=config.keep_checkpoints)

        grid_w = eval_w[:4]
        grid_texts = ["blue hair", "glasses and a smile"]

        @torch.no_grad()
        def sample_grid() -> Image.Image:
            rows = [synthesize(G, grid_w)]
            for phrase in grid_texts:
                t = texts([phrase]).to(device).expand(len(grid_w), -1)
                rows.append(synthesize(G, mapper.edit(grid_w, t)))
            return make_grid(tensor_to_pil(torch.cat(rows)), columns=len(grid_w))

        # 6. The loop.
        run.set_status("running", step=step, total=config.steps)
        mapper.train()
        sums: dict[str, float] = {}
        t_log, step_log, t_start = time.time(), step, time.time()
        last_checkpoint = step if resuming else -1
        time_up = False
        while step < config.steps and not time_up:
            # 6a. A batch of latents and, for each, a text asking for what it does not show.
            idx = torch.randint(0, len(pool), [config.batch], generator=gen)
            w = pool[idx.to(device)]                                              # [B, num_ws, w_dim]
            source_read = readings[idx.to(device)]                                # [B, A]
            batch_texts = sample_texts(source_read.cpu(), attributes, config.double_prob, gen)
            t = texts([p for p, _ in batch_texts]).to(device)                     # [B, D]

            # 6b. Edit, render, and the loss terms.
            delta = mapper(w, t)
            images = synthesize(G, w + delta)
            emb = image_features(clip.model, images)                              # [B, D] unit
            terms = {"clip": (1 - (emb * t).sum(1)).mean(), "l2": delta.square().mean() / w_var}
            if evaluator is not None:
                logits = evaluator.network(images).logits
                names = list(ATTRIBUTES)
                target, keep = [], []
                for b, (_, asked) in enumerate(batch_texts):
                    for name in names:
                        lg = logits[name][b:b + 1]
                        if name in asked:
                            y = torch.tensor([ATTRIBUTES[name].index(asked[name])], device=device)
                            target.append(F.cross_entropy(lg, y))
                        elif config.preservation == "attributes":
                            keep.append(F.cross_entropy(lg, source_read[b:b + 1, names.index(name)]))
                terms["target"] = torch.stack(target).mean()
                if keep:
                    terms["keep"] = torch.stack(keep).mean()
                if perceptual is not None:
                    with torch.no_grad():
                        source_images = synthesize(G, w)
                    terms["keep"] = perceptual(images, source_images).mean()
            weights = {"clip": config.clip_weight, "l2": config.l2_weight, "keep": config.preservation_weight,
                       "target": config.target_weight}
            loss = sum(weights[k] * v for k, v in terms.items())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            for k, v in {**terms, "loss": loss}.items():
                sums[k] = sums.get(k, 0.0) + float(v.detach())

            # 7. Metrics, samples, checkpoints.
            if config.max_train_minutes is not None:
                time_up = time.time() - t_start >= config.max_train_minutes * 60
            last = step == config.steps or time_up
            if step % config.log_every == 0 or last:
                elapsed = time.time() - t_log
                train_seconds += elapsed
                n = step - step_log
                row = {k: v / n for k, v in sums.items()}
                row.update(images_per_s=n * config.batch / max(elapsed, 1e-9), train_seconds=train_seconds)
                run.log_metrics(step, **row)
                run.set_status("running", step=step, total=config.steps)
                print(f"step {step}/{config.steps} loss {row['loss']:.4f} clip {row['clip']:.4f} l2 {row['l2']:.4f}"
                      + (f" target {row['target']:.3f}" if "target" in row else "")
                      + (f" keep {row['keep']:.3f}" if "keep" in row else "")
                      + f" ({row['images_per_s']:.1f} img/s)", flush=True)
                sums = {}
                t_log, step_log = time.time(), step
            preview = None
            if step % config.sample_every == 0 or last:
                mapper.eval()
                preview = sample_grid()
                mapper.train()
                preview.save(run.sample_path(step))
            if step % config.checkpoint_every == 0 or last:
                checkpoint()
                last_checkpoint = step
            if progress is not None:
                progress(step, config.steps, preview)
        if last_checkpoint != step:
            checkpoint()

        # 8. Held-out figures: single and double edits of held-out latents, read by the evaluator.
        mapper.eval()
        figures: dict[str, Any] = {"steps": step, "train_seconds": round(train_seconds, 1)}
        if evaluator is not None:
            with torch.no_grad():
                source_images = torch.cat([synthesize(G, c) for c in eval_w.split(64)]).cpu()
            apply = lambda wb, text: mapper_edit(G, clip, mapper, wb, text)  # noqa: E731
            for kind, edits in (("single", SINGLE_EDITS), ("double", DOUBLE_EDITS)):
                m = measure_edits(evaluator, source_images, eval_w, edits, apply)
                figures.update({f"heldout_success_{kind}": m["success"],
                                f"heldout_preservation_{kind}": m["preservation"],
                                f"heldout_clip_gain_{kind}": m["clip_gain"], f"heldout_edits_{kind}": m["edits"]})
            run.log_metrics(step, **{k: float(v) for k, v in figures.items()})
            print("held-out:", {k: round(float(v), 4) for k, v in figures.items()}, flush=True)

        # 9. Export with a card.
        targets_out = [run.path / "clip_mapper"] + ([Path(config.export_to)] if config.export_to else [])
        command = "python -m pipelines.training.train_clip_mapper " + " ".join(shlex.quote(a) for a in sys.argv[1:])
        from pipelines.cards import write_card

        probe = clip_probe(clip)
        for folder in targets_out:
            save_mapper(mapper, folder, probe=probe, clip_source=config.clip, generator_source=config.generator)
            write_card(folder, title="CLIP text mapper",
                       task="text-conditioned StyleGAN2 latent edit (w -> w + M(w, t))",
                       architecture=f"per-group FiLM MLPs ({config.num_layers} layers, groups {list(mapper.mappers)}), "
                                    f"{n_params / 1e6:.2f}M parameters, text embedding {mapper.text_dim}-d",
                       source=f"training run {config.out_dir} on generator {config.generator} with CLIP {config.clip}",
                       command=command, config=config_to_dict(config), figures=figures,
                       notes="StyleCLIP mapper (Patashnik et al. 2021) conditioned on the CLIP text embedding as in "
                             "CLIPInverter (Baykal et al. 2023). Trained with the evaluator's cross-entropy on the "
                             f"asked values (weight {config.target_weight}) beside the CLIP loss. Figures: held-out "
                             "inverted renders (or samples without an encoder), success = the evaluator reads every "
                             "asked value. Use it only with this generator and this CLIP.")
        run.set_status("finished", step=step, total=config.steps, figures=figures)
        return targets_out[-1]
    except BaseException as exc:
        run.set_status("failed", step=step, total=config.steps, error=f"{type(exc).__name__}: {exc}")
        raise


def main(argv: list[str] | None = None) -> Path:
    return train(parse_config(ClipMapperTrainConfig, argv))


if __name__ == "__main__":
    main()
