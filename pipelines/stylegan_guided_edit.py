"""Attribute edits guided by a latent classifier: per-image, nonlinear paths in W+.

InterFaceGAN (:mod:`pipelines.stylegan_editing`) moves every latent along one straight line per
attribute value. In a small generator's W space those lines are entangled: on the embedded
generator, the distance that makes glasses appear also flips skin tone or expression in a fifth of
the images, and a random step of the same length changes almost as much. Here each edit is its
own short optimisation instead, in the manner of latent-classifier editing (Yao et al. 2021, "A
Latent Transformer for Disentangled Face Editing in Images and Videos", whose classification and
attribute-preservation losses these are, applied per image rather than learned as a mapping):

- :class:`LatentAttributeClassifier`: an MLP (or an ensemble of MLPs, their log-probabilities
  averaged) on W+ with one softmax head per attribute, trained on the generator's own latents
  labelled by the evaluator from their images (encoder inversions of training renders, and
  sampled, partly style-mixed latents), with a prototype per value (the class mean);
- :func:`guided_edit`: Adam on an offset ``delta`` of ``w_plus`` that raises the target value's
  probability until it passes ``threshold``, while a KL term holds every other attribute's
  predicted distribution where it was and an L2 term keeps the step short. Only latents below the
  threshold are pushed; the KL term keeps acting on all of them. The first start is half way to the
  target's prototype (its class mean), and latents it leaves short get a second start at the
  prototype;
- :func:`mine_edit_latents`: the classifier's own edits, rendered and relabelled, become training
  data for the next round (where the classifier was fooled, the label now says so); with
  :func:`mining_weights`, each round spends more of its edits on the target values whose edits the
  rendered images contradicted most often so far (hard mining).

No image is rendered inside the edit loop: an edit costs a few hundred MLP passes.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "GuidedEdit",
    "LatentAttributeClassifier",
    "fit_latent_classifier",
    "guided_edit",
    "label_latents",
    "MinedEdits",
    "mine_edit_latents",
    "mining_weights",
    "parse_target",
    "sample_training_latents",
]


class LatentAttributeClassifier(nn.Module):
    """Attribute logits from a W+ latent ``[B, num_ws, w_dim]`` (a ``[B, w_dim]`` w is broadcast)."""

    def __init__(self, num_ws: int, w_dim: int, attributes: Mapping[str, Sequence[str]], *,
                 hidden: int = 512, dropout: float = 0.1, members: int = 1) -> None:
        super().__init__()
        if num_ws < 1 or w_dim < 1 or hidden < 1 or members < 1:
            raise ValueError(f"num_ws, w_dim, hidden and members must be positive, got {num_ws}, {w_dim}, {hidden}, "
                             f"{members}")
        if not attributes or any(len(v) < 2 for v in attributes.values()):
            raise ValueError("attributes must map each name to at least two values")
        self.num_ws, self.w_dim, self.hidden, self.dropout = int(num_ws), int(w_dim), int(hidden), float(dropout)
        self.members = int(members)
        self.attributes: dict[str, list[str]] = {k: list(v) for k, v in attributes.items()}
        self.register_buffer("w_mean", torch.zeros(num_ws, w_dim))
        self.register_buffer("w_std", torch.ones(num_ws, w_dim))
        # Per value: mean latent of the samples read as that value, minus the mean of all (zeros
        # until fit_prototypes); the second start of a guided edit that the first did not finish.
        self.register_buffer("prototypes", torch.zeros(sum(len(v) for v in self.attributes.values()), num_ws, w_dim))
        # An ensemble of ``members`` MLPs (each trained with its own seed) is harder for an edit to
        # fool than one: their log-probabilities are averaged.
        self.nets = nn.ModuleList(nn.Sequential(
            nn.Flatten(), nn.Linear(num_ws * w_dim, hidden), nn.LeakyReLU(0.2), nn.Dropout(dropout),
            nn.Linear(hidden, hidden), nn.LeakyReLU(0.2),
            nn.Linear(hidden, sum(len(v) for v in self.attributes.values()))) for _ in range(self.members))

    @property
    def sizes(self) -> list[int]:
        return [len(v) for v in self.attributes.values()]

    def forward(self, w_plus: torch.Tensor) -> dict[str, torch.Tensor]:
        if w_plus.ndim == 2:
            w_plus = w_plus[:, None].expand(-1, self.num_ws, -1)
        if w_plus.ndim != 3 or w_plus.shape[1:] != (self.num_ws, self.w_dim):
            raise ValueError(f"w_plus must be [B, {self.num_ws}, {self.w_dim}], got {tuple(w_plus.shape)}")
        x = (w_plus - self.w_mean) / self.w_std
        if self.members == 1:
            return dict(zip(self.attributes, self.nets[0](x).split(self.sizes, dim=1)))
        outs = [net(x).split(self.sizes, dim=1) for net in self.nets]
        return {name: torch.stack([F.log_softmax(o[j], 1) for o in outs]).mean(0)
                for j, name in enumerate(self.attributes)}

    @property
    def has_prototypes(self) -> bool:
        return bool(self.prototypes.abs().sum() > 0)

    def prototype(self, attribute: str, value: str) -> torch.Tensor:
        """``[num_ws, w_dim]``: mean latent of the value minus the mean of all samples."""
        names = list(self.attributes)
        offset = sum(len(self.attributes[a]) for a in names[:names.index(attribute)])
        return self.prototypes[offset + self.attributes[attribute].index(value)]

    @torch.no_grad()
    def fit_prototypes(self, w_plus: torch.Tensor, min_count: int = 20) -> dict[str, int]:
        """Set each value's prototype from ``w_plus [N, num_ws, w_dim]`` (sampled latents) as this
        classifier reads them; values read fewer than ``min_count`` times keep a zero prototype.
        Returns the count per value."""
        logits = {k: torch.cat([self(chunk.to(self.w_mean.device))[k].cpu() for chunk in w_plus.split(1024)])
                  for k in self.attributes}
        mean = w_plus.mean(0)
        counts, rows = {}, []
        for attr, values in self.attributes.items():
            pred = logits[attr].argmax(1)
            for i, value in enumerate(values):
                chosen = pred == i
                counts[f"{attr}={value}"] = int(chosen.sum())
                rows.append(w_plus[chosen].mean(0) - mean if chosen.sum() >= min_count else torch.zeros_like(mean))
        self.prototypes.copy_(torch.stack(rows).to(self.prototypes))
        return counts

    @torch.no_grad()
    def predict(self, w_plus: torch.Tensor) -> list[dict[str, str]]:
        """The value each latent's image is predicted to show, by name."""
        logits = self(w_plus)
        return [{k: self.attributes[k][int(v[i].argmax())] for k, v in logits.items()} for i in range(w_plus.shape[0])]

    # -- files --------------------------------------------------------------------------------
    def save_pretrained(self, folder: str | os.PathLike[str], *, fp16: bool = True,
                        extra: Mapping[str, Any] | None = None) -> Path:
        """``model.safetensors`` (fp16 weights, fp32 normalisation) + ``config.json``."""
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        state = {}
        for k, v in self.state_dict().items():
            keep32 = k in ("w_mean", "w_std", "prototypes") or not fp16
            state[k] = v.detach().to("cpu", torch.float32 if keep32 else torch.float16).contiguous()
        save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
        config = {"architecture": "latent-attribute-classifier",
                  "init_kwargs": {"num_ws": self.num_ws, "w_dim": self.w_dim, "attributes": self.attributes,
                                  "hidden": self.hidden, "dropout": self.dropout, "members": self.members},
                  **dict(extra or {})}
        (folder / "config.json").write_text(json.dumps(config, indent=1) + "\n")
        return folder

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike[str], *, device: str | torch.device = "cpu") -> "LatentAttributeClassifier":
        from safetensors.torch import load_file

        folder = Path(folder)
        config_file, weights = folder / "config.json", folder / "model.safetensors"
        if not config_file.is_file() or not weights.is_file():
            raise FileNotFoundError(f"{folder} holds no latent classifier (config.json + model.safetensors)")
        config = json.loads(config_file.read_text())
        if config.get("architecture") != "latent-attribute-classifier":
            raise ValueError(f"{folder} is not a latent attribute classifier (architecture "
                             f"{config.get('architecture')!r})")
        model = cls(**config["init_kwargs"])
        try:
            state = {k: v.float() for k, v in load_file(str(weights)).items()}
        except Exception as exc:  # truncated or corrupted file
            raise ValueError(f"cannot read {weights}: {exc}") from exc
        state.setdefault("prototypes", model.prototypes)  # a classifier saved before prototypes existed
        state = {("nets.0." + k[4:] if k.startswith("net.") else k): v for k, v in state.items()}  # single-MLP files
        model.load_state_dict(state, strict=True)
        return model.to(device).eval().requires_grad_(False)


# ---------------------------------------------------------------------------------------------
# Training data
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def label_latents(G: Any, evaluator: Any, w_plus: torch.Tensor, attributes: Sequence[str], *,
                  batch_size: int = 200) -> tuple[torch.Tensor, torch.Tensor]:
    """Render ``w_plus`` (const noise) and read each image: ``(labels [N, A] long, outlier [N])``."""
    from pipelines.stylegan_inversion import synthesize

    labels, outlier = [], []
    device = next(G.parameters()).device
    for chunk in w_plus.split(batch_size):
        res = evaluator.run(synthesize(G, chunk.to(device)))
        labels.append(torch.stack([torch.as_tensor(res[a]).long().cpu() for a in attributes], 1))
        outlier.append(torch.as_tensor(res["outlier_score"]).float().cpu())
    return torch.cat(labels), torch.cat(outlier)


@torch.no_grad()
def sample_training_latents(G: Any, num_samples: int, *, mixing: float = 0.5,
                            generator: torch.Generator | None = None) -> torch.Tensor:
    """``[N, num_ws, w_dim]`` sampled latents; a ``mixing`` share of them style-mixed at a random
    layer (as in StyleGAN training), so that the classifier sees W+ latents that vary by layer."""
    from pipelines.stylegan_editing import sample_w

    if num_samples < 1:
        raise ValueError(f"num_samples must be positive, got {num_samples}")
    w1 = sample_w(G, num_samples, generator=generator).cpu()
    w2 = sample_w(G, num_samples, generator=generator).cpu()
    cut = torch.randint(1, G.num_ws, (num_samples,), generator=generator)
    mixed = torch.rand(num_samples, generator=generator) < mixing
    layer = torch.arange(G.num_ws)[None, :, None]
    second = mixed[:, None, None] & (layer >= cut[:, None, None])
    return torch.where(second, w2[:, None], w1[:, None]).contiguous()


def fit_latent_classifier(w_plus: torch.Tensor, labels: torch.Tensor, attributes: Mapping[str, Sequence[str]], *,
                          epochs: int = 30, batch_size: int = 256, lr: float = 1e-3, weight_decay: float = 1e-2,
                          hidden: int = 512, val_fraction: float = 0.1, seed: int = 0, members: int = 1,
                          keep: torch.Tensor | None = None) -> tuple[LatentAttributeClassifier, dict[str, float]]:
    """Train a :class:`LatentAttributeClassifier` on ``(w_plus [N, num_ws, w_dim], labels [N, A])``;
    returns it (eval mode, frozen) and its held-out accuracy per attribute."""
    if w_plus.ndim != 3 or labels.shape != (w_plus.shape[0], len(attributes)):
        raise ValueError(f"need w_plus [N, num_ws, w_dim] and labels [N, {len(attributes)}], got "
                         f"{tuple(w_plus.shape)} and {tuple(labels.shape)}")
    if epochs < 1 or batch_size < 1 or lr <= 0:
        raise ValueError(f"epochs and batch_size must be positive and lr > 0, got {epochs}, {batch_size}, {lr}")
    if keep is not None:
        w_plus, labels = w_plus[keep], labels[keep]
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    n = w_plus.shape[0]
    order = torch.randperm(n, generator=gen)
    n_val = int(n * val_fraction)
    val, train = order[:n_val], order[n_val:]
    model = LatentAttributeClassifier(w_plus.shape[1], w_plus.shape[2], attributes, hidden=hidden, members=members)
    model.w_mean.copy_(w_plus[train].mean(0))
    model.w_std.copy_(w_plus[train].std(0) + 1e-6)
    x = (w_plus - model.w_mean) / model.w_std
    model.train()
    for i, net in enumerate(model.nets):  # members differ by their initialisation and batch order
        member_gen = gen if i == 0 else torch.Generator().manual_seed(seed + 1000 * i)
        opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=weight_decay)
        for _ in range(epochs):
            for idx in train[torch.randperm(len(train), generator=member_gen)].split(batch_size):
                logits = net(x[idx]).split(model.sizes, dim=1)
                loss = sum(F.cross_entropy(l, labels[idx, j]) for j, l in enumerate(logits))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
    model.eval().requires_grad_(False)
    accuracy: dict[str, float] = {}
    if n_val:
        with torch.no_grad():
            logits = model(w_plus[val])
        accuracy = {k: float((l.argmax(1) == labels[val, j]).float().mean()) for j, (k, l) in enumerate(logits.items())}
    return model, accuracy


# ---------------------------------------------------------------------------------------------
# Editing
# ---------------------------------------------------------------------------------------------


def parse_target(target: str | tuple[str, str], attributes: Mapping[str, Sequence[str]]) -> tuple[str, str]:
    """``'glasses=yes'`` or ``('glasses', 'yes')`` -> ``('glasses', 'yes')``, checked against ``attributes``."""
    attr, sep, value = target.partition("=") if isinstance(target, str) else (target[0], "=", target[1])
    attr, value = attr.strip(), value.strip()
    if not sep or attr not in attributes:
        raise ValueError(f"a guided edit names 'attribute=value' with an attribute among {sorted(attributes)}, "
                         f"got {target!r}")
    if value not in attributes[attr]:
        raise ValueError(f"{attr} has no value {value!r}; choose one of {list(attributes[attr])}")
    return attr, value


@dataclass
class GuidedEdit:
    w_plus: torch.Tensor       # [B, num_ws, w_dim] the edited latents
    probability: torch.Tensor  # [B] the classifier's probability of the target value after the edit
    reached: torch.Tensor      # [B] bool: probability >= threshold
    step_norm: torch.Tensor    # [B] L2 norm of the offset


def guided_edit(classifier: LatentAttributeClassifier, w_plus: torch.Tensor,
                targets: str | Sequence[str | tuple[str, str]], *,
                threshold: float = 0.9995, steps: int = 300, lr: float = 0.05, keep_weight: float = 1.0,
                l2: float = 1e-4, layers: Sequence[int] | range | None = None, growth: float = 1.03,
                start: float = 0.5, restart: float = 1.0) -> GuidedEdit:
    """Edit ``w_plus [B, num_ws, w_dim]`` until the classifier gives every target value at least
    ``threshold``, keeping the other attributes' predictions (KL, weight ``keep_weight``) and the
    step short (``l2``). ``targets``: one ``'attribute=value'`` or several (one value per
    attribute). ``layers``: the ws that may move (None = all).

    The push on a latent grows by ``growth`` every step it is still below the threshold (a penalty
    method for the constraint p >= threshold), so that the terms that keep the rest in place do not
    hold a hard edit back for good.

    When the classifier has prototypes (:meth:`LatentAttributeClassifier.fit_prototypes`, the class
    means), the first start is the latent moved ``start`` times the targets' prototypes, not the
    latent itself: the classifier's steepest ascent from the source finds latents it reads as the
    target more often than the rendered image shows it (a fooled classifier), while a start part of
    the way to the class mean lands among latents it was trained on. Latents still below the
    threshold at the end get a second start, from ``restart`` times the prototypes. On the embedded
    generator's tuning renders (seed 9 100 000, 9 edits, the evaluator reading the images), from the
    source alone with threshold 0.995 and 200 steps: success 0.905, preservation 0.935; with these
    defaults: 0.939 and 0.925. ``step_norm`` is measured from the source latent."""
    if isinstance(targets, str):
        targets = [targets]
    parsed = [parse_target(t, classifier.attributes) for t in targets]
    if not parsed:
        raise ValueError("name at least one target value")
    names = [a for a, _ in parsed]
    if len(set(names)) != len(names):
        raise ValueError(f"one value per attribute, got {[f'{a}={v}' for a, v in parsed]}")
    if not 0 < threshold < 1 or steps < 0 or lr <= 0 or keep_weight < 0 or l2 < 0 or growth < 1:
        raise ValueError("need 0 < threshold < 1, steps >= 0, lr > 0, keep_weight >= 0, l2 >= 0 and growth >= 1")
    if restart < 0 or start < 0:
        raise ValueError(f"start and restart must not be negative, got {start} and {restart}")
    w0 = (w_plus[:, None].expand(-1, classifier.num_ws, -1) if w_plus.ndim == 2 else w_plus).detach().float()
    w0 = w0.to(classifier.w_mean.device)
    mask = torch.zeros(1, classifier.num_ws, 1, device=w0.device)
    idx = list(range(classifier.num_ws)) if layers is None else [int(i) for i in layers]
    if not idx or any(not 0 <= i < classifier.num_ws for i in idx):
        raise ValueError(f"layers must be a non-empty subset of range({classifier.num_ws}), got {idx}")
    mask[:, idx] = 1.0
    value_idx = {a: classifier.attributes[a].index(v) for a, v in parsed}
    settings = dict(threshold=threshold, steps=int(steps), lr=lr, keep_weight=keep_weight, l2=l2, growth=growth)
    shift = sum(classifier.prototype(a, v) for a, v in parsed) * mask[0] if classifier.has_prototypes else None
    first = w0
    if shift is not None and start > 0:
        with torch.no_grad():  # a latent that already reads as the targets stays where it is
            there = _target_probs(classifier(w0), value_idx).min(1).values
        first = torch.where((there >= threshold)[:, None, None], w0, w0 + start * shift)
    out, p = _optimise(classifier, first, mask, value_idx, **settings)
    if restart > 0 and shift is not None and not bool((p >= threshold).all()):
        # Second start for the latents the first did not finish: from the latent moved further towards
        # the targets' prototypes, where the classifier's slope leads elsewhere.
        todo = (p < threshold).nonzero().flatten()
        out2, p2 = _optimise(classifier, w0[todo] + restart * shift, mask, value_idx, **settings)
        out, p = out.clone(), p.clone()
        out[todo], p[todo] = out2, p2
    step = out - w0
    return GuidedEdit(w_plus=out, probability=p, reached=p >= threshold, step_norm=step.flatten(1).norm(dim=1))


def _target_probs(logits: Mapping[str, torch.Tensor], value_idx: Mapping[str, int]) -> torch.Tensor:
    """Each target value's probability [B, T]."""
    return torch.stack([F.softmax(logits[a], 1)[:, i] for a, i in value_idx.items()], 1)


def _optimise(classifier: LatentAttributeClassifier, w0: torch.Tensor, mask: torch.Tensor, value_idx: dict[str, int], *,
              threshold: float, steps: int, lr: float, keep_weight: float, l2: float,
              growth: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One start of :func:`guided_edit` from ``w0``: ``(edited latents, lowest target probability)``."""
    with torch.no_grad():
        before = {k: F.softmax(l, 1) for k, l in classifier(w0).items()}
    delta = torch.zeros_like(w0, requires_grad=True)
    opt = torch.optim.Adam([delta], lr=lr)
    weight = torch.ones(w0.shape[0], device=w0.device)  # the push on each latent

    with torch.enable_grad():
        for _ in range(steps):
            logits = classifier(w0 + delta * mask)
            p = _target_probs(logits, value_idx)
            if bool((p >= threshold).all()):
                break
            below = (p < threshold).float()
            push = weight * (-(p + 1e-8).log() * below).sum(1)
            weight = weight * torch.where(below.any(1).bool(), growth, 1.0)
            keep = sum(F.kl_div(F.log_softmax(l, 1), before[k], reduction="none").sum(1)
                       for k, l in logits.items() if k not in value_idx)
            loss = (push + keep_weight * keep + l2 * (delta * mask).pow(2).sum((1, 2))).sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    with torch.no_grad():
        out = w0 + delta.detach() * mask
        return out, _target_probs(classifier(out), value_idx).min(1).values


class MinedEdits(NamedTuple):
    """Edited latents with their evaluator labels, and how often each target value was reached."""

    w_plus: torch.Tensor               # [N, num_ws, w_dim]
    labels: torch.Tensor               # [N, attributes]
    outlier: torch.Tensor              # [N]
    reached: dict[str, tuple[int, int]]  # "attr=value" -> (edits whose image shows it, edits)


def target_keys(classifier: LatentAttributeClassifier) -> list[str]:
    """Every ``attr=value`` the classifier can edit towards."""
    return [f"{a}={v}" for a, values in classifier.attributes.items() for v in values]


def mining_weights(reached: Mapping[str, tuple[int, int]], keys: Sequence[str], floor: float = 0.05) -> dict[str, float]:
    """Sampling weight of each target for the next mining round: the posterior mean miss rate of
    its edits so far (Beta(1, 1) prior, so an untried target weighs 0.5), at least ``floor``."""
    weights = {}
    for key in keys:
        hit, n = reached.get(key, (0, 0))
        weights[key] = max(floor, (n - hit + 1) / (n + 2))
    return weights


def mine_edit_latents(classifier: LatentAttributeClassifier, G: Any, evaluator: Any, pool: torch.Tensor,
                      num_samples: int, *, chunk: int = 200, generator: torch.Generator | None = None,
                      target_weights: Mapping[str, float] | None = None, **edit_kwargs: Any) -> MinedEdits:
    """Edit ``num_samples`` latents drawn from ``pool`` towards target values (one per chunk), render
    and relabel them, to add to the training set. Targets are drawn uniformly over attributes and
    then values, or, with ``target_weights`` ("attr=value" -> weight, e.g. :func:`mining_weights`),
    in proportion to those weights: hard mining, more edits where the classifier is fooled more."""
    names = list(classifier.attributes)
    keys = target_keys(classifier)
    if target_weights is not None:
        unknown = set(target_weights) - set(keys)
        if unknown:
            raise ValueError(f"target_weights names values the classifier does not know: {sorted(unknown)}")
        probs = torch.tensor([float(target_weights.get(k, 0.0)) for k in keys], dtype=torch.float64)
        if not torch.isfinite(probs).all() or (probs < 0).any() or probs.sum() <= 0:
            raise ValueError("target_weights must be non-negative, finite and not all zero")
    pick = torch.randperm(pool.shape[0], generator=generator)[:num_samples]
    ws, ls, os_ = [], [], []
    reached: dict[str, list[int]] = {}
    for part in pick.split(chunk):
        if target_weights is None:
            a = names[int(torch.randint(0, len(names), (), generator=generator))]
            v = classifier.attributes[a][int(torch.randint(0, len(classifier.attributes[a]), (), generator=generator))]
            key = f"{a}={v}"
        else:
            key = keys[int(torch.multinomial(probs, 1, generator=generator))]
            a, v = key.split("=", 1)
        w = guided_edit(classifier, pool[part], key, **edit_kwargs).w_plus.cpu()
        labels, outlier = label_latents(G, evaluator, w, names, batch_size=chunk)
        hits = int((labels[:, names.index(a)] == list(classifier.attributes[a]).index(v)).sum())
        tally = reached.setdefault(key, [0, 0])
        tally[0] += hits
        tally[1] += len(part)
        ws.append(w)
        ls.append(labels)
        os_.append(outlier)
    return MinedEdits(torch.cat(ws), torch.cat(ls), torch.cat(os_), {k: (h, n) for k, (h, n) in reached.items()})


def accuracy_table(accuracy: Mapping[str, float]) -> str:
    return ", ".join(f"{k} {v:.3f}" for k, v in accuracy.items()) + f" (mean {np.mean(list(accuracy.values())):.3f})"
