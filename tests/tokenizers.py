"""Small tokenizers for tests: real model classes at tiny widths, seeded, saved as tokenizer directories."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from vimpac.tokenization.vqvae import VQVAE, VQVAEConfig, frames_to_input, save_vqvae


def tiny_vqvae_dir(directory: Path, vocab_size: int = 64, seed: int = 0) -> Path:
    """An untrained VQ-VAE (widths 8/8/16, code dim 8) whose codebook is seeded from encoder outputs of random
    frames, so that different pictures get many different codes; cheap enough for extraction tests."""
    torch.manual_seed(seed)
    config = VQVAEConfig(vocab_size=vocab_size, code_dim=8, widths=(8, 8, 16), res_blocks=1)
    model = VQVAE(config)
    frames = torch.as_tensor(np.random.default_rng(seed).integers(0, 256, size=(8, 64, 64, 3), dtype=np.uint8))
    with torch.no_grad():
        z = model.encoder(frames_to_input(frames)).permute(0, 2, 3, 1).reshape(-1, config.code_dim)
        model.quantizer.restart_dead_codes(z)
    save_vqvae(model, directory, name="tiny-test-vqvae")
    return directory
