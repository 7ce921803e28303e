"""distill_tiny_vae: a tiny CPU run learns the source's latents, saves a loadable AutoencoderTiny that a
portrait pipeline takes as its autoencoder, resumes, and refuses bad sources before making a run."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("diffusers")

from pipelines.training.distill_tiny_vae import main  # noqa: E402

TINY = ["--num_images", "8", "--val_images", "2", "--workers", "1", "--channels", "8", "--batch_size", "4",
        "--log_every", "1", "--sample_every", "3", "--checkpoint_every", "3", "--device", "cpu",
        "--mixed_precision", "no"]


def source_vae(folder, *, sample_size: int = 64, levels: int = 3):
    """A random AutoencoderKL (f = 2**(levels-1)) with a non-trivial latent scale and shift, saved to ``folder``."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(8,) + (16,) * (levels - 1),
                        down_block_types=("DownEncoderBlock2D",) * levels,
                        up_block_types=("UpDecoderBlock2D",) * levels, latent_channels=4, norm_num_groups=8,
                        sample_size=sample_size, scaling_factor=1.3, shift_factor=0.1)
    vae.save_pretrained(folder)
    return folder


@pytest.mark.slow
def test_tiny_run_learns_the_source_latents_saves_and_resumes(tmp_path):
    from diffusers import AutoencoderTiny

    source = source_vae(tmp_path / "kl")
    out = str(tmp_path / "run")
    common = TINY + ["--source", str(source), "--out_dir", out, "--bank_cache", str(tmp_path / "cache"),
                     "--lr", "1e-2", "--warmup_steps", "1"]
    folder = main(common + ["--total_steps", "30"])
    tiny = AutoencoderTiny.from_pretrained(folder)
    assert tiny.config.latent_channels == 4 and tiny.config.scaling_factor == 1.0
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        z = tiny.encode(x).latents
        assert z.shape == (2, 4, 16, 16)                       # the source's 64 px -> 16x16x4
        assert tiny.decode(z).sample.shape == (2, 3, 64, 64)
    card = json.loads((folder / "card.json").read_text())
    for key in ("val_psnr_db", "source_psnr_db", "agreement_psnr_db", "encoder_rmse", "decode_ms_batch8",
                "source_decode_ms_batch8"):
        assert key in card["figures"], key
    assert "distill_tiny_vae" in card["command"] and str(source) in card["source"]

    # the encoder is pulled towards the source's scaled posterior mean
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    mse = [r["encoder_mse"] for r in rows if "encoder_mse" in r]
    assert len(mse) == 30 and sum(mse[-5:]) < 0.5 * sum(mse[:5])

    # refuses to overwrite a run without --resume, continues one with it
    with pytest.raises(FileExistsError):
        main(common + ["--total_steps", "32"])
    main(common + ["--total_steps", "32", "--resume", "true"])
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r][-3:] == [30, 31, 32]


def test_bad_sources_and_shapes_fail_before_a_run_folder_is_made(tmp_path):
    from diffusers import AutoencoderTiny

    out = tmp_path / "run"
    with pytest.raises(FileNotFoundError, match="neither a text-to-image pipeline folder"):
        main(TINY + ["--source", str(tmp_path / "missing"), "--out_dir", str(out)])
    AutoencoderTiny(encoder_block_out_channels=(8, 8), decoder_block_out_channels=(8, 8),
                    num_encoder_blocks=(1, 1), num_decoder_blocks=(1, 1)).save_pretrained(tmp_path / "tiny")
    with pytest.raises(ValueError, match="not an AutoencoderKL"):
        main(TINY + ["--source", str(tmp_path / "tiny"), "--out_dir", str(out)])
    source = source_vae(tmp_path / "kl")
    with pytest.raises(ValueError, match="decoder_blocks must give 3 block counts"):
        main(TINY + ["--source", str(source), "--out_dir", str(out), "--decoder_blocks", "2,1"])
    assert not out.exists()
