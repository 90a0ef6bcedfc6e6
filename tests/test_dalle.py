"""The DALL-E tokenizer: our encoder against OpenAI's `dall_e` package, conversion of encoder.pkl, its safety.

The reference tests build the `dall_e` package's Encoder with random weights, save it exactly like the official
encoder.pkl (a whole pickled module), convert it with `dall_e` made unimportable, and compare codes. They skip
when the package is missing (install: pip install --no-deps DALL-E attrs requests).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from vimpac.commands import convert_dalle
from vimpac.errors import UsageError
from vimpac.tokenization.dalle import (
    DalleConfig,
    DalleEncoder,
    official_names,
    parameter_shapes,
    save_dalle,
)
from vimpac.tokenization.tokenizer import WEIGHTS_FILE, load_tokenizer

SMALL = DalleConfig(n_hid=64, vocab_size=512)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vimpac")
    convert_dalle.register(parser.add_subparsers())
    return parser


def convert(src, out, *extra) -> int:
    args = _parser().parse_args(["convert-dalle", str(src), str(out), *extra])
    return args.func(args)


def block_frames(n: int, size: int = 64, seed: int = 0) -> np.ndarray:
    """uint8 [n, size, size, 3]: random 8×8 colour blocks plus pixel noise (uniform noise alone gives one code)."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, (n, size // 8, size // 8, 3))
    frames = blocks.repeat(8, axis=1).repeat(8, axis=2) + rng.integers(-20, 21, (n, size, size, 3))
    return frames.clip(0, 255).astype(np.uint8)


def _without_dall_e(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make every `import dall_e…` fail, as on a machine without the package."""
    for name in [m for m in sys.modules if m == "dall_e" or m.startswith("dall_e.")] or ["dall_e"]:
        monkeypatch.setitem(sys.modules, name, None)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """(dall_e Encoder with random non-degenerate weights, its encoder.pkl, our converted directory)."""
    dall_e_encoder = pytest.importorskip("dall_e.encoder")
    torch.manual_seed(0)
    model = dall_e_encoder.Encoder().eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".b"):
                p.normal_(std=0.02, generator=gen)  # the package initialises biases to 0: make them count
            elif "res_path" in name:
                p.mul_(4.0)  # stronger residual paths: otherwise nearly every cell picks the same few codes
    tmp = tmp_path_factory.mktemp("dalle")
    pkl, out = tmp / "encoder.pkl", tmp / "tok"
    torch.save(model, pkl)  # a whole pickled module, like OpenAI's file
    with pytest.MonkeyPatch.context() as mp:
        _without_dall_e(mp)
        with pytest.raises(ImportError):
            import dall_e  # noqa: F401
        assert convert(pkl, out) == 0
    return model, pkl, out


def _reference_logits(model, frames: np.ndarray) -> torch.Tensor:
    from dall_e.utils import map_pixels

    x = map_pixels(torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 255)
    with torch.no_grad():
        return model(x.to(next(model.parameters()).device)).float()  # [N, 8192, h, w]


def test_official_names_are_exactly_the_reference_parameters(reference):
    model, _, _ = reference
    theirs = {name: tuple(p.shape) for name, p in model.state_dict().items()}
    names, shapes = official_names(), parameter_shapes()
    assert sorted(names.values()) == sorted(theirs)
    for ours, their_name in names.items():
        assert shapes[ours] == theirs[their_name][: len(shapes[ours])]
    assert shapes["head.weight"] == (8192, 2048) and theirs["blocks.output.conv.w"] == (8192, 2048, 1, 1)


def test_converted_weights_equal_reference(reference):
    model, _, out = reference
    ours = load_file(str(out / WEIGHTS_FILE))
    theirs = model.state_dict()
    for our_name, their_name in official_names().items():
        assert torch.equal(ours[our_name], theirs[their_name].reshape(ours[our_name].shape)), our_name


def test_codes_match_reference(reference, capsys):
    model, _, out = reference
    frames = block_frames(3, seed=3)  # not a whole CPU batch, so padding is exercised too
    tokenizer = load_tokenizer(out)
    assert (tokenizer.name, tokenizer.vocab_size, tokenizer.downsample) == ("dalle", 8192, 8)
    codes = tokenizer.encode(frames)
    assert codes.dtype == torch.int64 and codes.shape == (3, 8, 8)

    logits = _reference_logits(model, frames)
    expected = logits.argmax(dim=1)
    assert expected.unique().numel() >= 16, "degenerate reference: too few distinct codes to compare"
    # The last layer is a matmul here and a conv there (different fp32 rounding): a code may differ only
    # where the reference's two best logits tie to within rounding.
    chosen = logits.gather(1, codes[:, None]).squeeze(1)
    assert (chosen >= logits.max(dim=1).values - 1e-4).all()
    assert (codes == expected).float().mean() >= 0.99


@pytest.mark.gpu
def test_cuda_codes_match_cpu_and_reference_precision(reference):
    model, _, out = reference
    frames = block_frames(40, seed=4)  # more than one CUDA batch (32)
    cpu_codes = load_tokenizer(out).encode(frames[:4])
    fp32, fp16 = load_tokenizer(out, "cuda"), load_tokenizer(out, "cuda", fp16=True)
    for tokenizer in (fp32, fp16):
        codes = tokenizer.encode(frames)
        split = torch.cat([tokenizer.encode(frames[:3]), tokenizer.encode(frames[3:])])
        assert torch.equal(codes, split), "codes depend on batch composition"
    # fp32 without TF32 is fp32 on both devices: only near-ties may differ.
    logits = _reference_logits(model, frames[:4])
    codes = fp32.encode(frames[:4])
    chosen = logits.gather(1, codes[:, None]).squeeze(1)
    assert (chosen >= logits.max(dim=1).values - 1e-3).all()
    assert (codes == cpu_codes).float().mean() >= 0.99
    # fp16 reproduces the package on CUDA (half convs; its last conv may run in TF32, ours in fp32).
    cuda_model = model.to("cuda")
    try:
        logits = _reference_logits(cuda_model, frames).cpu()
    finally:
        model.to("cpu")
    codes = fp16.encode(frames)
    chosen = logits.gather(1, codes[:, None]).squeeze(1)
    assert (chosen >= logits.max(dim=1).values - 0.05).all()
    assert (codes == logits.argmax(dim=1)).float().mean() >= 0.98


def test_state_dict_and_legacy_format_convert_to_the_same_tokenizer(reference, tmp_path, monkeypatch):
    model, _, out = reference
    fingerprint = load_tokenizer(out).fingerprint
    torch.save(model.state_dict(), tmp_path / "state.pt")
    torch.save(model, tmp_path / "legacy.pkl", _use_new_zipfile_serialization=False)
    _without_dall_e(monkeypatch)
    for name in ("state.pt", "legacy.pkl"):
        assert convert(tmp_path / name, tmp_path / name.replace(".", "_")) == 0
        assert load_tokenizer(tmp_path / name.replace(".", "_")).fingerprint == fingerprint


def test_decoder_pkl_is_rejected_with_a_hint(tmp_path, monkeypatch):
    dall_e_decoder = pytest.importorskip("dall_e.decoder")
    torch.save(dall_e_decoder.Decoder(n_init=8, n_hid=64, vocab_size=512), tmp_path / "decoder.pkl")
    _without_dall_e(monkeypatch)
    with pytest.raises(
        UsageError, match=r"\(dall_e\.decoder\.Decoder\).*wrong shape: blocks\.input\.w.*convert encoder\.pkl"
    ):
        convert(tmp_path / "decoder.pkl", tmp_path / "tok")
    assert not (tmp_path / "tok" / WEIGHTS_FILE).exists()


def test_unreadable_inputs_are_usage_errors(tmp_path):
    with pytest.raises(UsageError, match="no such file"):
        convert(tmp_path / "encoder.pkl", tmp_path / "tok")
    (tmp_path / "random.pkl").write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(UsageError, match="could not be read as a PyTorch checkpoint"):
        convert(tmp_path / "random.pkl", tmp_path / "tok")
    torch.save([torch.zeros(3)], tmp_path / "list.pt")
    with pytest.raises(UsageError, match="holds a list"):
        convert(tmp_path / "list.pt", tmp_path / "tok")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("x")
    with pytest.raises(UsageError, match=r"not empty.*--force"):
        convert(tmp_path / "list.pt", tmp_path / "busy")


class _RunsShell:
    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


@pytest.mark.parametrize("payload", ["whole", "nested"])
def test_unpickler_refuses_arbitrary_globals(tmp_path, payload):
    marker = tmp_path / "pwned"
    evil = _RunsShell(f"touch {marker}")
    torch.save(evil if payload == "whole" else {"blocks.input.w": evil}, tmp_path / "evil.pkl")
    with pytest.raises(UsageError, match=r"refusing to load global (posix|os)\.system"):
        convert(tmp_path / "evil.pkl", tmp_path / "tok")
    assert not marker.exists()


def test_parameter_check_names_missing_unexpected_and_misshapen():
    names, shapes = official_names(), parameter_shapes()
    tensors = {theirs: torch.empty(shapes[ours], device="meta") for ours, theirs in names.items()}
    tensors["blocks.output.conv.w"] = torch.empty((8192, 2048, 1, 1), device="meta")
    assert convert_dalle.to_vimpac_state(dict(tensors), "f", "x")["head.weight"].shape == (8192, 2048)
    del tensors["blocks.group_2.block_1.id_path.w"]
    tensors["blocks.extra.w"] = torch.empty(3, device="meta")
    tensors["blocks.input.w"] = torch.empty((256, 3, 5, 5), device="meta")
    with pytest.raises(UsageError) as err:
        convert_dalle.to_vimpac_state(tensors, "f", "x")
    message = str(err.value)
    assert "missing 1: blocks.group_2.block_1.id_path.w" in message
    assert "unexpected 1: blocks.extra.w" in message
    assert "blocks.input.w (256, 3, 5, 5) (expected (256, 3, 7, 7))" in message


def test_help_says_where_to_get_the_file_and_that_nothing_is_downloaded(capsys):
    with pytest.raises(SystemExit):
        _parser().parse_args(["convert-dalle", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "https://cdn.openai.com/dall-e/encoder.pkl" in text
    assert "vimpac never downloads" in text and "only step that unpickles" in text


# --- our module alone (small random config: no dall_e, no 200 MB of weights) ---


@pytest.fixture(scope="module")
def small_dir(tmp_path_factory):
    torch.manual_seed(0)
    model = DalleEncoder(SMALL)
    out = tmp_path_factory.mktemp("small") / "tok"
    save_dalle(out, model.state_dict(), SMALL)
    return out


def test_fp16_weights_load_as_fp32_and_broken_ones_are_usage_errors(small_dir, tmp_path):
    half = tmp_path / "half"
    shutil.copytree(small_dir, half)
    state = load_file(str(half / "model.safetensors"))
    save_file({k: v.half() for k, v in state.items()}, str(half / "model.safetensors"))
    frames = block_frames(2, size=32, seed=2)
    assert load_tokenizer(half).encoder.head.weight.dtype == torch.float32
    assert load_tokenizer(half).encode(frames).shape == (2, 4, 4)
    (half / "model.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(UsageError, match=r"weights do not match config.json, or cannot be read .*convert-dalle"):
        load_tokenizer(half)


def test_encode_is_argmax_of_full_logits_on_mapped_pixels(small_dir):
    tokenizer = load_tokenizer(small_dir)
    frames = block_frames(3, size=32, seed=1)
    codes = tokenizer.encode(frames)

    model = tokenizer.encoder
    pixels = 0.8 * torch.from_numpy(frames).permute(0, 3, 1, 2).double() / 255 + 0.1
    assert float(pixels.min()) >= 0.1 and float(pixels.max()) <= 0.9
    with torch.no_grad():
        feats = model.features(pixels.float())  # [N, h, w, C]
        logits = feats @ model.head.weight.T + model.head.bias  # the [N, h, w, V] tensor the kernel avoids
    assert codes.shape == (3, 4, 4) and codes.unique().numel() > 1
    top2 = logits.topk(2, dim=-1).values
    decided = (top2[..., 0] - top2[..., 1]) > 1e-4
    assert torch.equal(codes[decided], logits.argmax(dim=-1)[decided])


def test_codes_do_not_depend_on_batching(small_dir):
    tokenizer = load_tokenizer(small_dir)
    frames = block_frames(11, size=32, seed=2)
    whole = tokenizer.encode(frames)
    parts = torch.cat([tokenizer.encode(frames[:1]), tokenizer.encode(frames[1:4]), tokenizer.encode(frames[4:])])
    assert torch.equal(whole, parts)
    assert torch.equal(tokenizer.encode(torch.from_numpy(frames[::-1].copy())), whole.flip(0))
    assert tokenizer.encode(frames[:0]).shape == (0, 4, 4)


def test_bad_frames_and_decode_are_refused(small_dir):
    tokenizer = load_tokenizer(small_dir)
    with pytest.raises(ValueError, match="uint8"):
        tokenizer.encode(np.zeros((1, 32, 32, 3), np.float32))
    with pytest.raises(ValueError, match="multiple"):
        tokenizer.encode(np.zeros((1, 36, 32, 3), np.uint8))
    with pytest.raises(UsageError, match="no decoder"):
        tokenizer.decode(np.zeros((1, 4, 4), np.int64))


def test_save_refuses_weights_of_another_architecture(tmp_path):
    state = DalleEncoder(SMALL).state_dict()
    with pytest.raises(ValueError, match=r"stem\.weight: shape"):
        save_dalle(tmp_path / "tok", state)  # full-size config expected
    del state["head.bias"]
    with pytest.raises(ValueError, match=r"head\.bias: missing"):
        save_dalle(tmp_path / "tok", state, SMALL)
