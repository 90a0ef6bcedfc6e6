"""CUDA checks, run on the lent GPU machine (skipped without CUDA): the model under fp16 autocast, the tokenizer
on the GPU against the CPU, and the step metrics' all_reduce under NCCL."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.helpers import one_rank_process_group
from tests.tokenizers import tiny_vqvae_dir
from vimpac.config import VimpacConfig
from vimpac.losses import info_nce, masked_token_loss
from vimpac.masking import mask_batch
from vimpac.metrics import StepAccumulator
from vimpac.modeling import VimpacForPretraining
from vimpac.tokenization.tokenizer import load_tokenizer
from vimpac.tokenization.vqvae import frames_to_input

pytestmark = pytest.mark.gpu


def pretraining_loss(model: VimpacForPretraining, inputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    out = model(inputs, labels)
    half = inputs.shape[0] // 2
    mlm = masked_token_loss(out["mlm_logits"].float(), out["mlm_labels"]).loss
    return mlm + info_nce(out["nce"][:half].float(), out["nce"][half:].float()).loss


@pytest.mark.parametrize("layout", ["T,H|W", "T,H,W", "T,HW"])
def test_model_fp16_autocast_matches_fp32(layout):
    config = VimpacConfig(
        vocab_size=256,
        hidden_size=128,
        layers=2,
        layout=layout,
        clip_len=5,
        grid=(16, 16),
        dropout=0.0,
        nce_proj_hid_dim=256,
    )
    torch.manual_seed(0)
    model = VimpacForPretraining(config).cuda()
    rng = np.random.default_rng(0)
    codes = rng.integers(0, 256, size=(8, 5, 16, 16))
    inputs, labels = mask_batch(codes, 5, rng, config.pad_id, config.mask_id, config.vocab_size)
    inputs, labels = torch.as_tensor(inputs).cuda(), torch.as_tensor(labels).cuda()
    loss32 = pretraining_loss(model, inputs, labels)
    grads32 = torch.autograd.grad(loss32, list(model.parameters()), allow_unused=True)
    with torch.autocast("cuda", dtype=torch.float16):
        loss16 = pretraining_loss(model, inputs, labels)
    grads16 = torch.autograd.grad(loss16, list(model.parameters()), allow_unused=True)
    assert torch.isfinite(loss16) and abs(loss16.item() - loss32.item()) < 1e-2 * abs(loss32.item())
    g32 = torch.cat([g.flatten() for g in grads32 if g is not None])
    g16 = torch.cat([g.float().flatten() for g in grads16 if g is not None])
    # fp16 rounding of small gradients (CPU fp16 autocast gives 0.985 on this case)
    assert torch.nn.functional.cosine_similarity(g32, g16, dim=0) > 0.97


def test_vqvae_codes_on_gpu_match_cpu(tmp_path):
    """fp32 on both devices (no TF32): the encoder outputs agree to float rounding, so codes agree except at
    near-ties, and every GPU code is the exact nearest code of the GPU's own encoder output."""
    directory = tiny_vqvae_dir(tmp_path / "tok")
    frames = np.random.default_rng(1).integers(0, 256, size=(64, 64, 64, 3), dtype=np.uint8)
    cpu_tok, gpu_tok = load_tokenizer(directory), load_tokenizer(directory, device="cuda")
    cpu, gpu = cpu_tok.encode(frames), gpu_tok.encode(frames)
    assert gpu.device.type == "cpu" and gpu.dtype == torch.int64
    assert (cpu != gpu).float().mean() < 0.01
    x = frames_to_input(torch.as_tensor(frames))
    with torch.no_grad(), gpu_tok._exact_cuda():
        z_cpu = cpu_tok.model.encoder(x).permute(0, 2, 3, 1)
        z_gpu = gpu_tok.model.encoder(x.cuda()).permute(0, 2, 3, 1).cpu()
    assert (z_gpu - z_cpu).abs().max() <= 1e-5 * z_cpu.abs().max()
    book = cpu_tok.model.quantizer.codebook
    brute = torch.cdist(z_gpu.reshape(-1, book.shape[1]).double(), book.double()).argmin(1).view_as(gpu)
    assert (brute == gpu).float().mean() > 0.999


def test_step_metrics_all_reduce_under_nccl(tmp_path):
    """NCCL, the process group of GPU runs, moves CUDA tensors only: the trainer's per-step all_reduce of its metrics
    must happen on the engine's device (a CPU tensor there stopped every multi-GPU run at its first step)."""
    with one_rank_process_group("nccl", tmp_path):
        with pytest.raises(RuntimeError):
            torch.distributed.all_reduce(torch.zeros(2))  # what the metrics did before they took a device
        meter = StepAccumulator(torch.device("cuda"))
        meter.add("loss", torch.tensor(3.0, device="cuda"))
        meter.add("loss", 5.0)
        assert meter.reduce() == {"loss": 4.0}


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_kernels_run_on_their_tensors_gpu_not_the_current_one():
    """Triton launches on the current device; the kernels make their tensors' device current (kernels/launch.py)."""
    from vimpac.kernels import axial_attention, nearest_code
    from vimpac.kernels.axial_attention_reference import axial_attention_reference
    from vimpac.kernels.vq_reference import nearest_code_reference

    assert torch.cuda.current_device() == 0
    generator = torch.Generator().manual_seed(0)
    x, book = torch.randn(300, 64, generator=generator), torch.randn(512, 64, generator=generator)
    idx, _ = nearest_code(x.to("cuda:1"), book.to("cuda:1"))
    assert idx.device == torch.device("cuda:1") and torch.equal(idx.cpu(), nearest_code_reference(x, book)[0])
    q, k, v = (torch.randn(2, 5, 4, 4, 2, 32, generator=generator).to("cuda:1", torch.float16) for _ in range(3))
    cls = [torch.randn(2, 2, 32, generator=generator).to("cuda:1", torch.float16) for _ in range(3)]
    out, cls_out = axial_attention(q, k, v, *cls, "T")
    ref, ref_cls = axial_attention_reference(q.float(), k.float(), v.float(), *(c.float() for c in cls), "T")
    torch.testing.assert_close(out.float(), ref, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(cls_out.float(), ref_cls, rtol=2e-2, atol=2e-2)
