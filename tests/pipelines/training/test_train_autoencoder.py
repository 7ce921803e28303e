"""train_autoencoder: a tiny CPU run trains, reports PSNR, stores the latent scale, resumes."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("diffusers")

from pipelines.training.train_autoencoder import main, sobel_edges  # noqa: E402

TINY = ["--num_images", "8", "--val_images", "2", "--workers", "1", "--block_out_channels", "8,16,16",
        "--norm_num_groups", "8", "--batch_size", "4", "--log_every", "2", "--sample_every", "3",
        "--checkpoint_every", "3", "--stats_images", "8", "--device", "cpu"]


def test_sobel_edges_find_a_vertical_edge():
    x = torch.zeros(1, 1, 8, 8)
    x[..., 4:] = 1.0
    e = sobel_edges(x)
    assert e.shape == (1, 2, 8, 8)
    assert e[0, 0, :, 3:5].abs().min() > 0 and e[0, 1].abs().max() == 0


@pytest.mark.slow
def test_tiny_run_saves_a_loadable_vae_and_resumes(tmp_path):
    from diffusers import AutoencoderKL

    out = str(tmp_path / "vae_run")
    common = TINY + ["--out_dir", out, "--bank_cache", str(tmp_path / "cache")]
    folder = main(common + ["--total_steps", "3"])
    vae = AutoencoderKL.from_pretrained(folder)
    assert vae.config.block_out_channels == [8, 16, 16]
    assert vae.config.scaling_factor != 0.18215 and vae.config.shift_factor is not None
    card = json.loads((folder / "card.json").read_text())
    assert "val_psnr_db" in card["figures"]
    latents = vae.encode(torch.zeros(1, 3, 64, 64)).latent_dist.mean
    assert latents.shape == (1, 4, 16, 16)                 # 64 px -> 16x16x4 (f = 4)

    # refuses to overwrite a run without --resume, continues one with it
    with pytest.raises(FileExistsError):
        main(common + ["--total_steps", "5"])
    main(common + ["--total_steps", "5", "--resume", "true"])
    rows = [json.loads(line) for line in (tmp_path / "vae_run" / "metrics.jsonl").read_text().splitlines()]
    train_steps = [r["step"] for r in rows if "loss" in r]
    assert train_steps == [2, 3, 4, 5]
    status = json.loads((tmp_path / "vae_run" / "status.json").read_text())
    assert status["state"] == "finished" and status["step"] == 5


@pytest.mark.slow
def test_decoder_only_fine_tune_keeps_the_encoder_and_its_factors(tmp_path):
    from diffusers import AutoencoderKL

    cache = ["--bank_cache", str(tmp_path / "cache")]
    source = main(TINY + cache + ["--out_dir", str(tmp_path / "a"), "--total_steps", "3"])
    tuned = main(TINY + cache + ["--out_dir", str(tmp_path / "b"), "--total_steps", "3", "--lr", "1e-2",
                                 "--decoder_from", str(source)])
    a, b = AutoencoderKL.from_pretrained(source), AutoencoderKL.from_pretrained(tuned)
    sa, sb = a.state_dict(), b.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa if k.startswith(("encoder.", "quant_conv.")))
    assert any(not torch.equal(sa[k], sb[k]) for k in sa if k.startswith("decoder."))
    assert (b.config.scaling_factor, b.config.shift_factor) == (a.config.scaling_factor, a.config.shift_factor)
    with pytest.raises(ValueError, match="does not match this config"):
        main(TINY[:6] + ["--block_out_channels", "8,16"] + TINY[8:] + cache
             + ["--out_dir", str(tmp_path / "c"), "--total_steps", "1", "--decoder_from", str(source)])


@pytest.mark.slow
def test_eye_weight_reweights_the_reconstruction_loss(tmp_path):
    cache = tmp_path / "cache"
    l1 = {}
    for weight in ("0", "40"):
        out = tmp_path / f"vae_{weight}"
        main(TINY + ["--out_dir", str(out), "--bank_cache", str(cache), "--total_steps", "2", "--eye_weight", weight])
        l1[weight] = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])["l1"]
    assert l1["0"] != pytest.approx(l1["40"], rel=1e-4)               # same seed and batch, other weights
    assert list(cache.glob("eyes_*.npz"))
    with pytest.raises(ValueError, match="eye_weight must be >= 0"):
        main(TINY + ["--out_dir", str(tmp_path / "bad"), "--eye_weight", "-0.5"])
    assert not (tmp_path / "bad").exists()                              # refused before any run folder
