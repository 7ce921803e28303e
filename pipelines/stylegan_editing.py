"""Latent editing for StyleGAN2: SeFa and InterFaceGAN directions, multi-modal truncation,
generative self-filtering, and pasting an edited face back into its photo.

- :func:`sefa_directions`: closed-form factorisation (Shen & Zhou 2021, "Closed-Form Factorization
  of Latent Semantics in GANs"): the eigenvectors of ``A^T A``, A the stacked style-affine weights
  of the chosen layers, are the directions that change those layers' styles most.
- :func:`fit_interfacegan_directions`: InterFaceGAN (Shen et al. 2020, "Interpreting the Latent
  Space of GANs for Semantic Face Editing"): sample w, label each image with the evaluator, fit a
  linear classifier per attribute value (one-vs-rest); the unit normal of its boundary is the
  edit direction. :func:`condition_direction` projects out other attributes' normals
  (conditional manipulation, their Sec. 2.2).
- :func:`cluster_modes` / :class:`MultiModalTruncation` and :func:`self_filter_scores`: the two
  halves of Self-Distilled StyleGAN (Mokady et al. 2022, "Self-Distilled StyleGAN: Towards
  Generation from Internet Photos"): perceptual clustering of generated images into modes, with
  truncation towards the nearest mode instead of the global mean; and generative filtering, which
  drops the training images the generator reconstructs worst.
- :func:`paste_back`: the edited aligned crop back into the original photo, through the
  alignment transform of :mod:`pipelines.face_alignment`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image, ImageFilter

from models.stylegan2 import Generator
from pipelines.stylegan_inversion import (EvaluatorPerceptualLoss, _device_of, _frozen, _randn, invert,
                                          reconstruction_error, synthesize)

__all__ = [
    "Direction",
    "MultiModalTruncation",
    "SelfFilterScores",
    "apply_edit",
    "cluster_modes",
    "condition_direction",
    "edit_across_boundary",
    "fit_directions_from_labels",
    "fit_interfacegan_directions",
    "global_truncate",
    "load_directions",
    "paste_back",
    "sample_labelled_latents",
    "sample_w",
    "save_directions",
    "sefa_directions",
    "sefa_labels",
    "select_outliers",
    "self_filter_scores",
    "style_layers",
    "write_exclude_list",
]


# ---------------------------------------------------------------------------------------------
# Directions
# ---------------------------------------------------------------------------------------------


@dataclass
class Direction:
    """A unit direction in W with what the sliders need to use it."""

    name: str                              # 'glasses=yes', 'expression=smile', 'sefa_0'
    vector: torch.Tensor                   # [w_dim], unit norm
    scale: float = 1.0                     # std of w . vector over samples: strength 1 = one std
    offset: float = 0.0                    # boundary: w . vector + offset = 0 (InterFaceGAN)
    layers: list[int] | None = None        # ws the edit applies to by default; None = all
    kind: str = "interfacegan"             # 'interfacegan' | 'sefa' | 'custom'
    accuracy: float | None = None          # held-out accuracy of the linear classifier
    num_positive: int = 0                  # labelled samples with the value
    num_samples: int = 0                   # labelled samples used
    conditioned_on: list[str] = field(default_factory=list)  # directions projected out

    def distance(self, w: torch.Tensor) -> torch.Tensor:
        """Signed distance to the boundary, in units of ``scale``: ``[B]`` for ``[B, w_dim]`` (or
        the mean over this direction's layers of ``[B, num_ws, w_dim]``)."""
        if w.ndim == 3:
            w = w[:, self.layers].mean(1) if self.layers is not None else w.mean(1)
        return (w @ self.vector.to(w) + self.offset) / self.scale


def save_directions(directions: Mapping[str, Direction], folder: str | os.PathLike[str]) -> Path:
    """Write ``directions.safetensors`` (the vectors) + ``directions.json`` (everything else)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {key: d.vector.detach().to("cpu", torch.float32).contiguous() for key, d in directions.items()}
    meta = {key: {k: v for k, v in asdict(d).items() if k != "vector"} for key, d in directions.items()}
    save_file(tensors, str(folder / "directions.safetensors"), metadata={"format": "pt"})
    (folder / "directions.json").write_text(json.dumps(meta, indent=1) + "\n")
    return folder


def load_directions(folder: str | os.PathLike[str], *, device: str | torch.device = "cpu") -> dict[str, Direction]:
    """Read directions written by :func:`save_directions`."""
    from safetensors.torch import load_file

    folder = Path(folder)
    if not (folder / "directions.json").is_file() or not (folder / "directions.safetensors").is_file():
        raise FileNotFoundError(f"{folder} holds no directions.json + directions.safetensors")
    meta = json.loads((folder / "directions.json").read_text())
    tensors = load_file(str(folder / "directions.safetensors"), device=str(device))
    return {key: Direction(vector=tensors[key], **fields) for key, fields in meta.items()}


def style_layers(G: Generator, *, include_torgb: bool = False) -> list[tuple[int, str, torch.nn.Module]]:
    """``(w index, module name, style affine)`` for every synthesis layer, in order.

    Mirrors ``SynthesisNetwork.forward``: a block's convolutions read consecutive ws; its toRGB
    reads the w after them (shared with the next block's first convolution).
    """
    out = []
    w_idx = 0
    for res in G.synthesis.block_resolutions:
        block = getattr(G.synthesis, f"b{res}")
        convs = ["conv1"] if block.in_channels == 0 else ["conv0", "conv1"]
        for i, name in enumerate(convs):
            out.append((w_idx + i, f"b{res}.{name}", getattr(block, name).affine))
        if include_torgb and hasattr(block, "torgb"):
            out.append((w_idx + block.num_conv, f"b{res}.torgb", block.torgb.affine))
        w_idx += block.num_conv
    return out


@torch.no_grad()
def sefa_directions(G: Generator, layers: range | Sequence[int] | None = None, *,
                    include_torgb: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """SeFa (Shen & Zhou 2021): eigenvectors of ``A^T A``, A = the style-affine weights of the
    synthesis layers that read ws ``layers`` (None = all), each output row normalised to unit
    length as in the paper's code.

    Returns ``(directions [w_dim, w_dim], eigenvalues [w_dim])``: rows are unit, orthonormal
    directions sorted by decreasing eigenvalue (the first changes the chosen layers most).
    """
    chosen = set(range(G.num_ws)) if layers is None else {int(i) for i in layers}
    bad = [i for i in chosen if not 0 <= i < G.num_ws]
    if bad or not chosen:
        raise ValueError(f"layers must be a non-empty subset of range({G.num_ws}), got {sorted(chosen)}")
    weights = [affine.weight.float() * affine.weight_gain for w_idx, _, affine in style_layers(G, include_torgb=include_torgb)
               if w_idx in chosen]
    if not weights:
        raise ValueError(f"no style layer reads ws {sorted(chosen)}")
    A = torch.cat(weights, dim=0)                            # [sum C, w_dim]
    A = A / A.norm(dim=1, keepdim=True).clamp_min(1e-12)      # each style channel's weight unit-norm
    eigenvalues, eigenvectors = torch.linalg.eigh((A.T @ A).double())  # ascending
    order = torch.argsort(eigenvalues, descending=True)
    return eigenvectors[:, order].T.float().contiguous(), eigenvalues[order].float()


def sefa_labels(eigenvalues: torch.Tensor) -> list[str]:
    """Slider labels: ``'SeFa 1 (λ = 12.3)'``, in the order of the directions."""
    return [f"SeFa {i + 1} (λ = {float(v):.3g})" for i, v in enumerate(eigenvalues)]


def _with_offset(w: torch.Tensor, step: torch.Tensor, layers: Sequence[int] | None) -> torch.Tensor:
    """``w + step`` on ``layers`` of ``w [B, num_ws, w_dim]`` (``step`` is ``[B, w_dim]``)."""
    out = w.clone()
    if out.ndim == 2:
        if layers is not None:
            raise ValueError("layers need a w_plus [B, num_ws, w_dim], got [B, w_dim]")
        return out + step
    idx = list(range(out.shape[1])) if layers is None else [int(i) for i in layers]
    if any(not 0 <= i < out.shape[1] for i in idx):
        raise ValueError(f"layers must lie in range({out.shape[1]}), got {idx}")
    out[:, idx] += step[:, None]
    return out


def apply_edit(w_plus: torch.Tensor, direction: Direction | torch.Tensor, strength: float | torch.Tensor,
               layers: range | Sequence[int] | None = None) -> torch.Tensor:
    """``w_plus + strength * scale * direction`` on ``layers``.

    ``w_plus``: ``[B, num_ws, w_dim]`` (or ``[B, w_dim]`` without layers). ``direction``: a
    :class:`Direction` (strength in its ``scale``, i.e. standard deviations of the samples; its
    ``layers`` are the default) or a raw ``[w_dim]`` tensor (strength in W units).
    ``strength``: a float or ``[B]``. Returns a new tensor.
    """
    if isinstance(direction, Direction):
        vector = direction.vector * direction.scale
        layers = direction.layers if layers is None else layers
    else:
        vector = direction
    vector = vector.to(w_plus)
    if vector.shape != (w_plus.shape[-1],):
        raise ValueError(f"direction must be [{w_plus.shape[-1]}], got {tuple(vector.shape)}")
    s = torch.as_tensor(strength, dtype=w_plus.dtype, device=w_plus.device).reshape(-1, 1)
    return _with_offset(w_plus, s * vector, layers)


def edit_across_boundary(w_plus: torch.Tensor, direction: Direction, distance: float = 1.0,
                         layers: range | Sequence[int] | None = None, *, only_forward: bool = True) -> torch.Tensor:
    """Move each latent along ``direction`` until its signed boundary distance is ``distance``
    (in ``scale`` units): the smallest InterFaceGAN edit that makes the attribute appear.
    With ``only_forward``, latents already past that distance stay where they are."""
    layers = direction.layers if layers is None else layers
    probe = Direction(**{**asdict(direction), "vector": direction.vector, "layers": list(layers) if layers is not None else None})
    need = distance - probe.distance(w_plus)              # [B] in scale units
    if only_forward:
        need = need.clamp_min(0)
    return apply_edit(w_plus, direction, need, layers)


def condition_direction(direction: Direction, others: Sequence[Direction]) -> Direction:
    """Conditional manipulation (InterFaceGAN Sec. 2.2): remove from ``direction`` its components
    along ``others`` (Gram-Schmidt on their span), renormalise."""
    basis: list[torch.Tensor] = []
    for other in others:
        v = other.vector.double()
        for b in basis:
            v = v - (v @ b) * b
        if v.norm() > 1e-6:
            basis.append(v / v.norm())
    n = direction.vector.double()
    for b in basis:
        n = n - (n @ b) * b
    if n.norm() < 1e-6:
        raise ValueError(f"{direction.name} lies in the span of {[o.name for o in others]}; nothing is left")
    n = (n / n.norm()).to(direction.vector.dtype)
    # offset and scale are copied; fit_directions_from_labels re-measures them along the new normal.
    return Direction(**{**asdict(direction), "vector": n,
                        "conditioned_on": list(direction.conditioned_on) + [o.name for o in others]})


# ---------------------------------------------------------------------------------------------
# Sampling and labelling
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def sample_w(G: Generator, num_samples: int, *, truncation_psi: float = 1.0,
             generator: torch.Generator | None = None, batch_size: int = 1024) -> torch.Tensor:
    """``num_samples`` mapped latents ``[N, w_dim]`` (truncated towards ``G.mapping.w_avg``)."""
    device = _device_of(G)
    out = []
    for start in range(0, num_samples, batch_size):
        n = min(batch_size, num_samples - start)
        z = _randn([n, G.z_dim], generator, device)
        c = torch.zeros([n, G.c_dim], device=device)
        out.append(G.mapping(z, c, truncation_psi=truncation_psi, skip_w_avg_update=True)[:, 0].float())
    return torch.cat(out)


@torch.no_grad()
def _render(G: Generator, w: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Images ``[N, C, R, R]`` (on the CPU) for ``w [N, w_dim]`` with const noise."""
    out = []
    for chunk in w.split(batch_size):
        ws = chunk.to(_device_of(G))[:, None].expand(-1, G.num_ws, -1)
        out.append(G.synthesis(ws, noise_mode="const").float().cpu())
    return torch.cat(out)


@torch.no_grad()
def sample_labelled_latents(
    G: Generator, evaluator: Any, *, num_samples: int = 2000, truncation_psi: float = 0.7,
    generator: torch.Generator | None = None, batch_size: int = 64,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Sample w, render, and read the images with ``evaluator.run``: returns ``(w [N, w_dim],
    {attribute: [N] value index, 'outlier_score': [N], ...})``."""
    with _frozen(G):
        w = sample_w(G, num_samples, truncation_psi=truncation_psi, generator=generator)
        labels: dict[str, list[torch.Tensor]] = {}
        for chunk in w.split(batch_size):
            res = evaluator.run(_render(G, chunk, batch_size))
            for key, value in res.items():
                if key != "features":
                    labels.setdefault(key, []).append(torch.as_tensor(value).cpu())
    return w.cpu(), {k: torch.cat(v) for k, v in labels.items()}


def _fit_linear(x: np.ndarray, y: np.ndarray, classifier: str, seed: int) -> tuple[np.ndarray, float]:
    """Fit a linear classifier on standardised x; returns ``(coef, intercept)`` in x's own units."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.svm import LinearSVC

    mean, std = x.mean(0), x.std(0) + 1e-8
    xs = (x - mean) / std
    if classifier == "svm":
        model = LinearSVC(C=1.0, class_weight="balanced", max_iter=5000, random_state=seed)
    else:
        model = LogisticRegression(C=1.0, class_weight="balanced", max_iter=2000)
    model.fit(xs, y)
    coef = model.coef_[0] / std
    return coef, float(model.intercept_[0] - coef @ mean)


def _boundary_offset(projection: np.ndarray, y: np.ndarray) -> float:
    """Offset ``b`` of the 1-D boundary ``p + b = 0`` that best separates ``y`` along ``projection``
    (balanced logistic regression on the projection)."""
    from sklearn.linear_model import LogisticRegression

    p = projection.reshape(-1, 1)
    mean, std = p.mean(), p.std() + 1e-8
    model = LogisticRegression(class_weight="balanced").fit((p - mean) / std, y)
    a, b = float(model.coef_[0, 0]), float(model.intercept_[0])
    return -(mean - b * std / a) if abs(a) > 1e-12 else -mean


def fit_directions_from_labels(
    w: torch.Tensor,  # [N, w_dim]
    labels: Mapping[str, torch.Tensor],  # attribute -> [N] value index (-1 = unlabelled)
    *,
    attribute_values: Mapping[str, Sequence[str]] | None = None,  # names of the values; None = ATTRIBUTES
    attributes: Sequence[str] | None = None,  # 'glasses' or 'glasses=yes'; None = every labelled attribute
    classifier: Literal["svm", "logistic"] = "svm",
    conditioned_on: Mapping[str, Sequence[str]] | None = None,  # {'expression=smile': ['glasses=yes']}
    min_samples: int = 20,  # skip values with fewer positives (or negatives)
    val_fraction: float = 0.2,  # held out to measure each classifier's accuracy
    keep: torch.Tensor | None = None,  # [N] bool, samples to use
    seed: int = 0,
) -> dict[str, Direction]:
    """One-vs-rest linear boundaries in W, one per attribute value (InterFaceGAN).

    ``conditioned_on`` projects the listed directions out of a direction (conditional
    manipulation); its boundary offset, spread and accuracy are then re-measured along the new
    normal. Keys named only in ``conditioned_on`` are fitted too but not returned.
    """
    if classifier not in ("svm", "logistic"):
        raise ValueError(f"classifier must be 'svm' or 'logistic', got {classifier!r}")
    if attribute_values is None:
        from pipelines.data.portrait_world import ATTRIBUTES as attribute_values
    x_all = w.detach().double().cpu().numpy()
    keep_np = np.ones(len(x_all), bool) if keep is None else keep.cpu().numpy().astype(bool)
    conditioned_on = dict(conditioned_on or {})
    wanted = None if attributes is None else set(attributes) | {k for ks in conditioned_on.values() for k in ks}
    rng = np.random.default_rng(seed)
    out: dict[str, Direction] = {}
    data: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}  # key -> (x, y, validation index)
    # 1. One classifier per attribute value.
    for name, idx in labels.items():
        if name in ("outlier_score", "features"):
            continue
        values = list(attribute_values.get(name, []))
        y_all = torch.as_tensor(idx).cpu().numpy()
        for v in np.unique(y_all[y_all >= 0]):
            value = values[int(v)] if int(v) < len(values) else str(int(v))
            key = f"{name}={value}"
            if wanted is not None and name not in wanted and key not in wanted:
                continue
            mask = keep_np & (y_all >= 0)
            x, y = x_all[mask], (y_all[mask] == v).astype(int)
            if min(y.sum(), len(y) - y.sum()) < min_samples:
                continue
            order = rng.permutation(len(y))
            n_val = int(len(y) * val_fraction)
            val, train = order[:n_val], order[n_val:]
            coef, intercept = _fit_linear(x[train], y[train], classifier, seed)
            acc = float(((x[val] @ coef + intercept > 0).astype(int) == y[val]).mean()) if n_val else None
            norm = np.linalg.norm(coef)
            proj = x @ (coef / norm)
            out[key] = Direction(name=key, vector=torch.from_numpy(coef / norm).float(),
                                 scale=float(proj.std() + 1e-8), offset=intercept / norm, kind="interfacegan",
                                 accuracy=acc, num_positive=int(y.sum()), num_samples=len(y))
            data[key] = (x, y, val)
    # 2. Conditional manipulation: project out, then re-measure the boundary along the new normal.
    for key, others in conditioned_on.items():
        missing = [k for k in [key, *others] if k not in out]
        if missing:
            raise ValueError(f"cannot condition {key!r}: no direction was fitted for {missing} "
                             "(too few labelled samples? sample more)")
        d = condition_direction(out[key], [out[k] for k in others])
        x, y, val = data[key]
        proj = x @ d.vector.double().numpy()
        d.offset = _boundary_offset(proj, y)
        d.scale = float(proj.std() + 1e-8)
        d.accuracy = float(((proj[val] + d.offset > 0).astype(int) == y[val]).mean()) if len(val) else None
        out[key] = d
    if attributes is not None:
        out = {k: d for k, d in out.items() if k in attributes or k.split("=")[0] in attributes}
    return out


def fit_interfacegan_directions(
    G: Generator,
    evaluator: Any,  # pipelines.evaluation.Evaluator (or anything with .run(images) -> {attr: [N]})
    *,
    num_samples: int = 2000,
    attributes: Sequence[str] | None = None,  # 'glasses', 'expression=smile', ...; None = all
    truncation_psi: float = 0.7,
    generator: torch.Generator | None = None,
    classifier: Literal["svm", "logistic"] = "svm",
    conditioned_on: Mapping[str, Sequence[str]] | None = None,  # {'expression=smile': ['glasses=yes']}
    max_outlier_score: float = 0.5,  # samples the evaluator calls outliers are not used
    min_samples: int = 20,
    batch_size: int = 64,
    attribute_values: Mapping[str, Sequence[str]] | None = None,
) -> dict[str, Direction]:
    """InterFaceGAN directions for named attribute values, labelled by the evaluator.

    Returns ``{'glasses=yes': Direction, ...}``: unit normals in W of one-vs-rest linear SVM (or
    logistic-regression) boundaries, with the boundary offset, the spread of the samples along
    the normal (``scale``) and held-out accuracy. ``conditioned_on`` projects other directions out
    (fitted together; their keys must be among the fitted ones).
    """
    # 1. Sample and label.
    seed = int(torch.randint(0, 2**31 - 1, (), generator=generator)) if generator is not None else 0
    w, labels = sample_labelled_latents(G, evaluator, num_samples=num_samples, truncation_psi=truncation_psi,
                                        generator=generator, batch_size=batch_size)
    keep = labels["outlier_score"] <= max_outlier_score if "outlier_score" in labels else None
    # 2. Fit every value asked for (and those to condition on), then condition.
    return fit_directions_from_labels(w, labels, attribute_values=attribute_values, attributes=attributes,
                                      classifier=classifier, conditioned_on=conditioned_on,
                                      min_samples=min_samples, keep=keep, seed=seed)


# ---------------------------------------------------------------------------------------------
# Multi-modal truncation (Self-Distilled StyleGAN)
# ---------------------------------------------------------------------------------------------


def global_truncate(w: torch.Tensor, w_avg: torch.Tensor, psi: float) -> torch.Tensor:
    """The usual truncation trick: ``w_avg + psi * (w - w_avg)`` (any ``[..., w_dim]``)."""
    return w_avg.to(w) + psi * (w - w_avg.to(w))


@dataclass
class MultiModalTruncation:
    """Cluster centres in W for truncation towards the nearest mode (Mokady et al. 2022).

    Centres are the mean w of each perceptual cluster. ``truncate`` picks the nearest centre by
    Euclidean distance **in W** (cheap, no rendering); when the evaluator features of the w's
    images are passed, the nearest centre **in feature space** is used instead (the clusters were
    formed there).
    """

    centres: torch.Tensor          # [k, w_dim] mean w of each cluster
    feature_centres: torch.Tensor  # [k, D] k-means centres in evaluator feature space
    sizes: torch.Tensor            # [k] samples per cluster
    w_avg: torch.Tensor            # [w_dim] mean of all samples

    @property
    def k(self) -> int:
        return int(self.centres.shape[0])

    def nearest(self, w: torch.Tensor, features: torch.Tensor | None = None) -> torch.Tensor:
        """Index ``[B]`` of the nearest centre to ``w [B, w_dim]`` / ``[B, num_ws, w_dim]`` (mean over
        layers), or to ``features [B, D]`` in feature space when given."""
        if features is not None:
            return torch.cdist(features.float(), self.feature_centres.to(features.device).float()).argmin(1)
        w_flat = w.mean(1) if w.ndim == 3 else w
        return torch.cdist(w_flat.float(), self.centres.to(w_flat.device).float()).argmin(1)

    def truncate(self, w: torch.Tensor, psi: float, *, features: torch.Tensor | None = None,
                 cutoff: int | None = None) -> torch.Tensor:
        """``c + psi * (w - c)`` with ``c`` the nearest centre; on the first ``cutoff`` ws only
        (None = all) for ``[B, num_ws, w_dim]``. psi = 1 is the identity, psi = 0 the centre."""
        c = self.centres.to(w)[self.nearest(w, features)]     # [B, w_dim]
        if w.ndim == 2:
            return c + psi * (w - c)
        c = c[:, None]
        out = c + psi * (w - c)
        if cutoff is not None:
            out = torch.cat([out[:, :cutoff], w[:, cutoff:]], dim=1)
        return out

    def save(self, folder: str | os.PathLike[str]) -> Path:
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_file({k: getattr(self, k).detach().cpu().contiguous() for k in ("centres", "feature_centres", "sizes", "w_avg")},
                  str(folder / "modes.safetensors"), metadata={"format": "pt", "kind": "multimodal-truncation"})
        (folder / "modes.json").write_text(json.dumps({"k": self.k, "method": "k-means on evaluator features; "
                                                       "centres = mean w per cluster"}, indent=1) + "\n")
        return folder

    @classmethod
    def load(cls, folder: str | os.PathLike[str]) -> "MultiModalTruncation":
        from safetensors.torch import load_file

        file = Path(folder) / "modes.safetensors"
        if not file.is_file():
            raise FileNotFoundError(f"{folder} holds no modes.safetensors")
        t = load_file(str(file))
        return cls(t["centres"], t["feature_centres"], t["sizes"], t["w_avg"])


@torch.no_grad()
def cluster_modes(G: Generator, evaluator: Any, *, num_samples: int = 2000, k: int = 16,
                  generator: torch.Generator | None = None, truncation_psi: float = 1.0,
                  batch_size: int = 64, n_init: int = 4) -> MultiModalTruncation:
    """Perceptual clustering (Mokady et al. 2022): sample w, render, k-means on the evaluator's
    features of the images, and take the mean w of each cluster as a truncation centre."""
    from sklearn.cluster import KMeans

    if not 1 <= k <= num_samples:
        raise ValueError(f"k must be in [1, num_samples], got k={k}, num_samples={num_samples}")
    with _frozen(G):
        w = sample_w(G, num_samples, truncation_psi=truncation_psi, generator=generator)
        feats = torch.cat([torch.as_tensor(evaluator.run(_render(G, chunk, batch_size))["features"]).float()
                           for chunk in w.split(batch_size)])
    seed = int(torch.randint(0, 2**31 - 1, (), generator=generator)) if generator is not None else 0
    km = KMeans(n_clusters=k, n_init=n_init, random_state=seed).fit(feats.double().numpy())
    assign = torch.from_numpy(km.labels_).long()
    w = w.cpu()
    centres = torch.stack([w[assign == j].mean(0) if (assign == j).any() else w.mean(0) for j in range(k)])
    return MultiModalTruncation(centres=centres, feature_centres=torch.from_numpy(km.cluster_centers_).float(),
                                sizes=torch.bincount(assign, minlength=k), w_avg=w.mean(0))


# ---------------------------------------------------------------------------------------------
# Generative self-filtering (Self-Distilled StyleGAN)
# ---------------------------------------------------------------------------------------------


@dataclass
class SelfFilterScores:
    """Per-image outlier scores: higher = more likely an outlier."""

    scores: torch.Tensor                       # [N] the combination of the robust z-scores below
    reconstruction_error: torch.Tensor         # [N] pixel MSE (+ feature distance) of the reconstruction
    outlier_score: torch.Tensor | None = None  # [N] the evaluator's outlier probability
    latent_distance: torch.Tensor | None = None  # [N] Mahalanobis distance of the inverted w from G's W distribution

    @property
    def generator_scores(self) -> torch.Tensor:
        """The generator's own verdict: reconstruction (+ latent distance), without the evaluator's head."""
        out = _robust_z(self.reconstruction_error)
        return out + _robust_z(self.latent_distance) if self.latent_distance is not None else out


def _robust_z(x: torch.Tensor, limit: float = 10.0) -> torch.Tensor:
    """(x - median) / (1.4826 * MAD), clipped to +-``limit`` so that neither score of a combination
    can drown the other (the MAD is floored at 1e-3 of the range for near-constant scores)."""
    med = x.median()
    mad = (x - med).abs().median() * 1.4826
    return ((x - med) / torch.maximum(mad, 1e-3 * (x.max() - x.min()) + 1e-12)).clamp(-limit, limit)


@torch.no_grad()
def _w_distribution(G: Generator, num_samples: int = 20000, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean ``[w_dim]`` and inverse covariance ``[w_dim, w_dim]`` of G's mapped latents."""
    w = sample_w(G, num_samples, generator=torch.Generator(device=_device_of(G)).manual_seed(seed)).double().cpu()
    cov = torch.cov(w.T) + 1e-4 * torch.eye(w.shape[1], dtype=torch.float64)
    return w.mean(0), torch.linalg.inv(cov)


def self_filter_scores(
    G: Generator,
    images: torch.Tensor,  # [N, C, R, R] the training images in [-1, 1]
    *,
    steps: int = 50,  # W-optimisation steps per image when no encoder is given
    encoder: torch.nn.Module | None = None,  # e4e encoder: one forward pass instead of optimisation
    evaluator: Any = None,  # its outlier score joins the combination (and its features, see feature_weight)
    outlier_weight: float = 1.0,  # weight of the evaluator's outlier score in the combination
    feature_weight: float = 0.0,  # weight of the evaluator-feature distance within the reconstruction error
    latent_weight: float = 1.0,  # weight of the inverted w's Mahalanobis distance from G's W distribution
    batch_size: int = 64,
    lr: float = 0.1,
    generator: torch.Generator | None = None,
    callback: Callable[[int, int, Any], None] | None = None,
) -> SelfFilterScores:
    """Generative self-filtering (Mokady et al. 2022): a generator trained on the raw data fits the
    bulk of it and reconstructs rare, unrelated images (outliers) badly. Each image is inverted
    (``encoder`` if given, else ``steps`` of W optimisation) and scored by its pixel reconstruction
    error and by how unlikely its latent is under G's own W distribution (Mahalanobis distance);
    with an evaluator, its outlier probability joins them (all as robust z-scores).

    The evaluator-feature distance is off by default (``feature_weight=0``): measured on the
    portrait world with Twemoji outliers, it ranks outliers as *closer* to their reconstructions
    than portraits (AUC 0.16), as both an emoji and its reconstruction read as "outlier"."""
    if images.ndim != 4 or images.shape[1:] != (G.img_channels, G.img_resolution, G.img_resolution):
        raise ValueError(f"images must be [N, {G.img_channels}, {G.img_resolution}, {G.img_resolution}], "
                         f"got {tuple(images.shape)}")
    if encoder is None and steps < 1:
        raise ValueError(f"steps must be >= 1 without an encoder, got {steps}")
    device = _device_of(G)
    perceptual = EvaluatorPerceptualLoss(evaluator) if evaluator is not None and feature_weight > 0 else None
    w_mean, w_inv = _w_distribution(G) if latent_weight > 0 else (None, None)
    errors, outlier, distances = [], [], []
    n = images.shape[0]
    for start in range(0, n, batch_size):
        x = images[start:start + batch_size].to(device, torch.float32)
        # 1. Reconstruct.
        if encoder is not None:
            with torch.no_grad(), _frozen(G):
                w_plus = encoder(x.to(_device_of(encoder))).to(device, torch.float32)
                recon = synthesize(G, w_plus)
        else:
            result = invert(G, x, method="w", steps=steps, lr=lr, evaluator=evaluator if perceptual else None,
                            feature_weight=feature_weight, optimize_noise=False, w_avg_samples=2000,
                            generator=generator)
            recon, w_plus = result.images, result.w_plus
        # 2. Distances (pixels (+ evaluator features), latent) and the evaluator's verdict.
        with torch.no_grad():
            err = reconstruction_error(recon, x)
            if perceptual is not None:
                err = err + feature_weight * perceptual(recon, x).to(err.device)
            errors.append(err.cpu())
            if w_inv is not None:
                d = w_plus.detach().mean(1).double().cpu() - w_mean
                distances.append((d @ w_inv * d).sum(1).float())
            if evaluator is not None and outlier_weight > 0:
                outlier.append(torch.as_tensor(evaluator.run(x)["outlier_score"]).float().cpu())
        if callback is not None:
            callback(min(start + batch_size, n), n, None)
    err = torch.cat(errors)
    out = torch.cat(outlier) if outlier else None
    dist = torch.cat(distances) if distances else None
    scores = _robust_z(err)
    if dist is not None:
        scores = scores + latent_weight * _robust_z(dist)
    if out is not None:
        scores = scores + outlier_weight * _robust_z(out)
    return SelfFilterScores(scores=scores, reconstruction_error=err, outlier_score=out, latent_distance=dist)


def select_outliers(scores: torch.Tensor | SelfFilterScores, rate: float) -> torch.Tensor:
    """Indices (long, highest score first) of the ``round(rate * N)`` highest-scoring images."""
    s = scores.scores if isinstance(scores, SelfFilterScores) else torch.as_tensor(scores)
    if not 0 <= rate <= 1:
        raise ValueError(f"rate must be in [0, 1], got {rate}")
    count = int(round(rate * s.numel()))
    return torch.argsort(s, descending=True)[:count]


def write_exclude_list(indices: torch.Tensor | Sequence[int], path: str | os.PathLike[str]) -> Path:
    """Write dropped image indices as the JSON list that ``train_stylegan2 --exclude_file`` reads
    (the retraining half of self-filtering)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(sorted(int(i) for i in indices)) + "\n")
    return path


# ---------------------------------------------------------------------------------------------
# Paste back
# ---------------------------------------------------------------------------------------------


def _feather_mask(size: int, feather: float) -> Image.Image:
    """An 'L' mask: 255 inside, ramping linearly to 0 over ``feather * size`` pixels at the edges."""
    ramp = max(1e-6, feather * size)
    c = np.arange(size) + 0.5
    edge = np.minimum(c, size - c) / ramp                      # distance to the nearest edge
    m = np.clip(np.minimum(edge[:, None], edge[None, :]), 0, 1)
    return Image.fromarray((m * 255).round().astype(np.uint8), "L")


def paste_back(original_photo: Image.Image, aligned_crop: Image.Image, edited_crop: Image.Image,
               transform: Any, *, feather: float = 0.08, blend: Literal["feather", "difference"] = "feather") -> Image.Image:
    """Paste ``edited_crop`` back into ``original_photo`` where ``aligned_crop`` was taken from.

    ``transform`` is ``AlignedFace.transform`` (3x3, crop -> photo coordinates of an
    ``aligned_crop``-sized crop) or the :class:`~pipelines.face_alignment.AlignedFace` itself. The
    edited crop (any size, e.g. the generator's) is scaled to the aligned crop, warped into the
    photo and blended with a mask feathered over ``feather`` of the side. ``blend='difference'``
    also keeps the photo's own pixels where the edit left the aligned crop unchanged.
    """
    from pipelines.face_alignment import to_rgb

    matrix = np.asarray(getattr(transform, "transform", transform), dtype=np.float64)
    if matrix.shape != (3, 3):
        raise ValueError(f"transform must be a 3x3 matrix (AlignedFace.transform), got {matrix.shape}")
    if aligned_crop.size[0] != aligned_crop.size[1]:
        raise ValueError(f"aligned_crop must be square, got {aligned_crop.size}")
    if blend not in ("feather", "difference"):
        raise ValueError(f"blend must be 'feather' or 'difference', got {blend!r}")
    photo = to_rgb(original_photo)
    size = aligned_crop.size[0]
    edited = to_rgb(edited_crop)
    if edited.size != (size, size):
        edited = edited.resize((size, size), Image.LANCZOS)
    mask = _feather_mask(size, feather)
    if blend == "difference":
        diff = np.abs(np.asarray(edited, np.float32) - np.asarray(to_rgb(aligned_crop), np.float32)).max(-1)
        soft = Image.fromarray(np.clip(diff * 8, 0, 255).astype(np.uint8), "L")
        soft = soft.filter(ImageFilter.MaxFilter(3)).filter(ImageFilter.GaussianBlur(max(1.0, size / 64)))
        mask = Image.fromarray((np.asarray(mask, np.float32) * np.asarray(soft, np.float32) / 255).astype(np.uint8), "L")
    # Pillow's AFFINE maps output (photo) coordinates to input (crop) coordinates.
    coeffs = tuple(float(v) for v in np.linalg.inv(matrix)[:2].reshape(-1))
    warped = edited.transform(photo.size, Image.AFFINE, coeffs, resample=Image.BICUBIC)
    warped_mask = mask.transform(photo.size, Image.AFFINE, coeffs, resample=Image.BILINEAR)
    return Image.composite(warped, photo, warped_mask)
