"""Masked-token CE and cross-rank InfoNCE against naive references, including a real 2-process gloo gradient check."""

import math
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from vimpac.losses import gather_with_grad, info_nce, masked_token_loss
from vimpac.masking import IGNORE_INDEX


def test_masked_loss_equals_full_logits_ce_over_masked_positions():
    g = torch.Generator().manual_seed(1)
    rows = 37
    logits_full = torch.randn(2, 3, 4, 4, rows, generator=g)
    labels = torch.randint(0, rows, (2, 3, 4, 4), generator=g)
    labels[torch.rand(labels.shape, generator=g) > 0.3] = IGNORE_INDEX
    # The reference: logits everywhere, CE with ignore_index (what the original computed at every position).
    reference = F.cross_entropy(logits_full.reshape(-1, rows), labels.reshape(-1), ignore_index=IGNORE_INDEX)
    selected = labels != IGNORE_INDEX
    ref_acc = (logits_full.argmax(-1)[selected] == labels[selected]).float().mean()

    at_masked, targets = logits_full[selected], labels[selected]
    out = masked_token_loss(at_masked, targets)
    torch.testing.assert_close(out.loss, reference)
    assert out.num_masked.item() == selected.sum().item()
    torch.testing.assert_close(out.accuracy, ref_acc)
    # bf16 logits are upcast: the result matches the fp32 loss of the rounded logits.
    out_bf16 = masked_token_loss(at_masked.bfloat16(), targets)
    assert out_bf16.loss.dtype == torch.float32
    torch.testing.assert_close(out_bf16.loss, F.cross_entropy(at_masked.bfloat16().float(), targets))


def test_masked_loss_without_masked_positions_is_zero_not_nan():
    logits = torch.randn(0, 11, requires_grad=True)
    out = masked_token_loss(logits, torch.zeros(0, dtype=torch.int64))
    assert out.loss.item() == 0.0 and out.num_masked.item() == 0 and out.accuracy.item() == 0.0
    out.loss.backward()
    assert logits.grad is not None and logits.grad.shape == (0, 11)


def naive_info_nce(z1, z2, tau):
    """Per-anchor loops in float64 over the global batch: returns (mean loss_a + mean loss_b) * tau, accuracy."""
    z1 = [[float(x) for x in row / row.norm()] for row in z1.double()]
    z2 = [[float(x) for x in row / row.norm()] for row in z2.double()]
    n = len(z1)

    def dot(a, b):
        return sum(x * y for x, y in zip(a, b))

    total, correct = [0.0, 0.0], 0
    for direction, (anchors, others) in enumerate([(z1, z2), (z2, z1)]):
        for i in range(n):
            positive = dot(anchors[i], others[i]) / tau
            negatives = [dot(anchors[i], others[j]) / tau for j in range(n) if j != i]
            negatives += [dot(anchors[i], anchors[j]) / tau for j in range(n) if j != i]
            logsumexp = math.log(sum(math.exp(s) for s in [positive, *negatives]))
            total[direction] += (logsumexp - positive) / n
            correct += positive > max(negatives, default=-math.inf)
    return (total[0] + total[1]) * tau, correct / (2 * n)


@pytest.mark.parametrize("batch, dim, tau", [(6, 8, 0.2), (5, 16, 0.07), (1, 4, 0.5)])
def test_info_nce_matches_naive_loops(batch, dim, tau):
    g = torch.Generator().manual_seed(batch)
    z1 = torch.randn(batch, dim, generator=g) * 3  # not normalised: info_nce normalises
    z2 = z1 + 0.8 * torch.randn(batch, dim, generator=g)
    out = info_nce(z1, z2, temperature=tau)
    loss, acc = naive_info_nce(z1, z2, tau)
    assert out.loss.item() == pytest.approx(loss, rel=1e-5, abs=1e-6)
    assert out.accuracy.item() == pytest.approx(acc)


def test_info_nce_uses_the_given_features_when_not_normalising():
    g = torch.Generator().manual_seed(3)
    z1, z2 = F.normalize(torch.randn(4, 8, generator=g), dim=1), F.normalize(torch.randn(4, 8, generator=g), dim=1)
    torch.testing.assert_close(info_nce(z1, z2, normalize=False).loss, info_nce(z1, z2).loss)
    assert info_nce(z1 * 2, z2, normalize=False).loss != info_nce(z1, z2).loss


def test_gather_is_identity_without_process_group():
    x = torch.randn(3, 4)
    assert gather_with_grad(x) is x


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


WORLD, LOCAL_B, IN_DIM, OUT_DIM = 2, 3, 5, 4


def shared_problem():
    """Inputs of all ranks' videos (global batch) and the common initial weights of a linear projection."""
    g = torch.Generator().manual_seed(11)
    x1 = torch.randn(WORLD * LOCAL_B, IN_DIM, generator=g, dtype=torch.float64)
    x2 = x1 + 0.5 * torch.randn(WORLD * LOCAL_B, IN_DIM, generator=g, dtype=torch.float64)
    weight = torch.randn(OUT_DIM, IN_DIM, generator=g, dtype=torch.float64)
    return x1, x2, weight


def rank_worker(rank, port, results):
    """What the trainer does on each rank: local loss over local anchors, backward, gradients averaged over ranks
    (DeepSpeed/DDP all-reduce mean)."""
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        x1, x2, weight = shared_problem()
        weight = weight.clone().requires_grad_(True)
        local = slice(rank * LOCAL_B, (rank + 1) * LOCAL_B)
        z1 = x1[local] @ weight.T
        z2 = x2[local] @ weight.T
        z1.retain_grad()
        out = info_nce(z1, z2, temperature=0.2)
        out.loss.backward()
        grad_w = weight.grad.clone()
        dist.all_reduce(grad_w)
        grad_w /= WORLD
        losses = [torch.zeros((), dtype=torch.float64) for _ in range(WORLD)]
        dist.all_gather(losses, out.loss.detach())
        results[rank] = {
            "loss": out.loss.item(),
            "mean_loss": torch.stack(losses).mean().item(),
            "accuracy": out.accuracy.item(),
            "grad_w": grad_w,
            "grad_z1": z1.grad.clone(),
        }
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(120)
def test_two_rank_gradient_equals_single_process_gradient():
    """2 gloo processes, each with half the videos; rank-averaged gradients must equal the gradient of the
    single-process loss over the whole batch (mean over all anchors)."""
    manager = mp.get_context("spawn").Manager()
    results = manager.dict()
    mp.spawn(rank_worker, args=(free_port(), results), nprocs=WORLD, join=True)

    x1, x2, weight = shared_problem()
    weight = weight.clone().requires_grad_(True)
    z1, z2 = x1 @ weight.T, x2 @ weight.T
    z1.retain_grad()
    single = info_nce(z1, z2, temperature=0.2)
    single.loss.backward()
    naive_loss, naive_acc = naive_info_nce(x1 @ weight.detach().T, x2 @ weight.detach().T, 0.2)
    assert single.loss.item() == pytest.approx(naive_loss, rel=1e-10)

    per_rank = [results[r] for r in range(WORLD)]
    for r in per_rank:
        assert r["mean_loss"] == pytest.approx(single.loss.item(), rel=1e-12)
        torch.testing.assert_close(r["grad_w"], weight.grad, rtol=1e-10, atol=1e-12)
        assert sum(r["accuracy"] for r in per_rank) / WORLD == pytest.approx(naive_acc)
    # Feature gradients: rank r's local slice, scaled by the 1/world of the gradient average, is the slice of the
    # single-process gradient (the all-gather's backward summed every rank's loss into it).
    for rank, r in enumerate(per_rank):
        local = slice(rank * LOCAL_B, (rank + 1) * LOCAL_B)
        torch.testing.assert_close(r["grad_z1"] / WORLD, z1.grad[local], rtol=1e-10, atol=1e-12)
