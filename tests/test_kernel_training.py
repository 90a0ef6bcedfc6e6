"""The model trains the same with the Triton kernels (here under the interpreter) as with the PyTorch reference:
same losses over a few AdamW steps and the same gradients, for the paper's T,H|W layout with PAD frames."""

import pytest
import torch
import torch.nn.functional as F

from tests.helpers import random_batch
from vimpac.config import VimpacConfig
from vimpac.modeling import VimpacForPretraining

pytestmark = pytest.mark.skipif(
    torch.cuda.is_available(), reason="runs the kernels on CPU tensors under TRITON_INTERPRET (set without CUDA)"
)


def train(monkeypatch, backend: str, steps: int = 3) -> tuple[list[float], dict[str, torch.Tensor]]:
    """Losses of `steps` AdamW steps and the gradients of the first one, with VIMPAC_KERNELS=backend."""
    monkeypatch.setenv("VIMPAC_KERNELS", backend)
    torch.manual_seed(0)
    config = VimpacConfig(
        vocab_size=20, hidden_size=64, heads=2, layers=2, clip_len=3, grid=(4, 5), nce_proj_hid_dim=32, nce_dim=16
    )
    config = VimpacConfig.from_dict({**config.to_dict(), "dropout": 0.0})
    model = VimpacForPretraining(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses, first_grads = [], None
    for step in range(steps):
        tokens, labels = random_batch(config, batch=4, seed=step)
        out = model(tokens, labels)
        # Every output path: the masked-token head, and the contrastive head on top of the averaged CLS.
        loss = F.cross_entropy(out["mlm_logits"], out["mlm_labels"]) + out["nce"].square().mean()
        optimizer.zero_grad()
        loss.backward()
        if first_grads is None:
            first_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        optimizer.step()
        losses.append(float(loss))
    return losses, first_grads


def test_triton_kernels_train_like_the_reference(monkeypatch):
    reference_losses, reference_grads = train(monkeypatch, "reference")
    triton_losses, triton_grads = train(monkeypatch, "triton")
    assert triton_losses == pytest.approx(reference_losses, rel=1e-4)
    assert triton_grads.keys() == reference_grads.keys()
    for name, grad in reference_grads.items():
        torch.testing.assert_close(triton_grads[name], grad, rtol=1e-3, atol=1e-5, msg=name)
