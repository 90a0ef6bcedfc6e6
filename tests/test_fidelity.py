"""The tokenizer-fidelity measure (vimpac.tokenization.fidelity) against hand-made tokenizers whose answers are
known, the synthesizer's subject pictures against its own frames, and a short real VQ-VAE training that must keep
the objects clearly better than a flat picture does."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from vimpac.tokenization.fidelity import corpus_config, heldout_videos, measure_subject_fidelity, synth_holdout
from vimpac.tokenization.synth import SynthConfig, generate, render_frame, render_subjects
from vimpac.tokenization.tokenizer import load_tokenizer
from vimpac.tokenization.train_vqvae import TrainSettings, train_from_videos
from vimpac.tokenization.vqvae import VQVAEConfig

CLASSES = ("right", "left", "grow", "shrink")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    out = tmp_path_factory.mktemp("fidelity") / "corpus"
    cfg = SynthConfig(
        out=out,
        seed=3,
        classes=CLASSES,
        train_per_class=6,
        val_per_class=2,
        unlabeled=0,
        size=(64, 80),
        calm=True,
        object_scale=1.5,
        smooth_background=True,
        clip_seconds=(1.0, 1.5),
        workers=1,
    )
    generate(cfg, progress=False)
    return out


class Lossless:
    """Decodes exactly what it was given."""

    def encode(self, frames: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(frames)

    def decode(self, codes: torch.Tensor) -> np.ndarray:
        return codes.numpy()


class Flat(Lossless):
    """Decodes every frame as its own mean colour: the baseline the measure compares against."""

    def decode(self, codes: torch.Tensor) -> np.ndarray:
        x = codes.double().numpy()
        return np.broadcast_to(x.mean(axis=(1, 2), keepdims=True), x.shape)


def test_subject_pictures_compose_the_frame(corpus):
    """scenery·(1 − coverage) + colour·coverage is the rendered frame wherever a subject is in front."""
    video = heldout_videos(corpus)[0]
    for t in (0.0, video.scene.t_last / 2, video.scene.t_last):
        coverage, colour, scenery = render_subjects(video.scene, t)
        frame = render_frame(video.scene, t).astype(np.float32)
        composed = scenery * (1 - coverage[..., None]) + colour * coverage[..., None]
        assert coverage.max() > 0.99, "a calm clip always shows its object"
        # Inside and outside the objects the pictures are exact (up to the frame's uint8 rounding); along the
        # anti-aliased edges compositing order makes the blend differ slightly.
        solid = (coverage < 0.01) | (coverage > 0.99)
        np.testing.assert_allclose(composed[solid], frame[solid], atol=0.6)
        assert np.abs(composed - frame).mean() < 0.3


def test_lossless_and_flat_tokenizers_bracket_the_measure(corpus):
    exact = measure_subject_fidelity(Lossless(), corpus, 64, 4.0)
    flat = measure_subject_fidelity(Flat(), corpus, 64, 4.0)
    assert exact.videos == flat.videos == len(CLASSES) * 2 and exact.frames == flat.frames > 0
    assert exact.subject_pixels == flat.subject_pixels > 0
    assert exact.psnr == exact.subject_psnr > 140  # the MSE floor (1e-10)
    assert exact.subject_kept > 0.95  # codec blur at the edges aside, every object pixel shows the object
    assert math.isclose(flat.psnr, flat.flat_psnr) and math.isclose(flat.subject_psnr, flat.flat_subject_psnr)
    assert abs(flat.subject_gain) < 1e-9
    assert flat.subject_kept < 0.05  # the mean colour is the background's, not the object's
    assert flat.subject_psnr < flat.psnr  # the object is what the flat picture misses most


def test_holdout_is_the_validation_split(corpus):
    holdout = synth_holdout(corpus / "videos")
    assert holdout is not None and holdout.corpus == corpus
    ext = corpus_config(corpus).ext
    assert sorted(p.name for p in holdout.files) == sorted(f"{v.id}.{ext}" for v in heldout_videos(corpus))
    assert all(p.is_file() for p in holdout.files) and len(holdout.files) == len(CLASSES) * 2
    assert synth_holdout(corpus.parent) is None


# A short training (600 steps, 15 s on 2 cores; +4.5 dB when written) already keeps the objects this far above a
# flat picture; the demo's tokenizer (1200 steps, more and larger frames) reaches +8 dB and more.
MARGIN_DB = 3.0


def test_trained_tokenizer_keeps_the_objects(corpus, tmp_path):
    holdout = synth_holdout(corpus)
    settings = TrainSettings(model=VQVAEConfig(vocab_size=128), steps=600, frame_size=64, crop_size=32, fps=4.0)
    train_from_videos(corpus, tmp_path / "tok", settings, log=lambda _: None, exclude=holdout.files)
    fidelity = measure_subject_fidelity(load_tokenizer(tmp_path / "tok"), corpus, 64, 4.0, holdout.videos)
    assert fidelity.subject_gain > MARGIN_DB, fidelity.summary()
    assert fidelity.subject_kept > 0.4, fidelity.summary()
