"""The Triton argmax-of-scores / nearest-code kernel against fp64 brute force (interpreter on CPU, CUDA on GPU)."""

import time

import pytest
import torch

from vimpac.kernels import vq_triton
from vimpac.kernels.vq_reference import argmax_scores_reference
from vimpac.kernels.vq_triton import _INTERPRET, _launch, argmax_scores_triton, nearest_code_triton, rounding_bound

# The interpreter (triton 3.6) turns a runtime loop bound into an int through a 1-element array, which numpy
# deprecates; harmless noise from Triton, not from this kernel.
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def brute_scores(x, weight, bias=None):
    """[N, K] fp64 scores of the inputs' exact values (half inputs: their rounded values)."""
    s = x.double() @ weight.double().T
    return s if bias is None else s + bias.double()


def assert_exact_argmax(x, weight, bias, idx, score):
    """idx is the fp64 argmax except on true ties (fp64 top-2 margin < 1e-9 relative), where it must pick one of
    the tied codes; score is the chosen code's score up to fp32 accumulation."""
    s = brute_scores(x, weight, bias).cpu()
    idx, score = idx.cpu(), score.cpu()
    assert idx.dtype == torch.int64 and score.dtype == torch.float32
    assert idx.shape == score.shape == (x.shape[0],)
    if x.shape[0] == 0:
        return
    scale = (x.double().norm(dim=1) * weight.double().norm(dim=1).max()).cpu()
    if bias is not None:
        scale += bias.double().abs().max().cpu()
    scale = scale.clamp_min(1e-30)
    top = s.max(dim=1).values
    second = s.topk(2, dim=1).values[:, 1] if s.shape[1] > 1 else torch.full_like(top, -torch.inf)
    tie = (top - second) < 1e-9 * scale
    assert torch.equal(idx[~tie], s.argmax(1)[~tie])
    chosen = s.gather(1, idx[:, None]).squeeze(1)
    assert torch.all(chosen[tie] >= top[tie] - 1e-9 * scale[tie])
    assert torch.all((score.double() - chosen).abs() <= 1e-5 * (chosen.abs() + scale))


def assert_raw_kernel_ok(x, weight, bias):
    """The kernel alone (no rescoring): best and second within the rounding bound of the fp64 top two, and the
    exact argmax wherever the fp64 margin exceeds twice the bound. Rescoring would hide a wrong raw result."""
    bias32 = None if bias is None else bias.float()
    idx, best, second = (t.cpu().double() for t in _launch(x, weight, bias32))
    err = rounding_bound(x, weight, bias32).cpu().double()
    s = brute_scores(x, weight, bias).cpu()
    top2 = s.topk(min(2, s.shape[1]), dim=1).values
    assert torch.all((best - top2[:, 0]).abs() <= err)
    if s.shape[1] == 1:
        assert torch.all(second == -torch.inf)
        return
    assert torch.all((second - top2[:, 1]).abs() <= err)
    clear = (top2[:, 0] - top2[:, 1]) > 2 * err
    assert torch.equal(idx[clear].long(), s.argmax(1)[clear])


class CountRescored:
    """Stands in for argmax_scores_reference inside vq_triton and counts the rows it is asked to rescore."""

    def __init__(self):
        self.rows = 0

    def __call__(self, x, weight, bias=None):
        self.rows += x.shape[0]
        return argmax_scores_reference(x, weight, bias)


@pytest.fixture
def rescored(monkeypatch):
    counter = CountRescored()
    monkeypatch.setattr(vq_triton, "argmax_scores_reference", counter)
    return counter


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize(("n", "k", "d"), [(37, 70, 20), (20, 9, 1), (33, 1, 7), (0, 5, 4), (40, 40, 40)])
def test_argmax_scores_matches_fp64(dtype, with_bias, n, k, d):
    g = torch.Generator().manual_seed(1000 * n + 10 * k + d)
    x = torch.randn(n, d, generator=g).to(dtype).to(DEVICE)
    w = torch.randn(k, d, generator=g).to(dtype).to(DEVICE)
    b = torch.randn(k, generator=g).to(DEVICE) if with_bias else None
    idx, score = argmax_scores_triton(x, w, b)
    assert idx.device == x.device
    assert_exact_argmax(x, w, b, idx, score)
    if n > 0:
        assert_raw_kernel_ok(x, w, b)


def test_exact_ties_pick_the_lowest_index_within_and_across_tiles(rescored):
    g = torch.Generator().manual_seed(5)
    # Small integers: every score is exact in fp32 and fp16, so these ties are real ties.
    w = torch.randint(-3, 4, (70, 16), generator=g).float()
    w[0, 15] = w[1, 14] = 100.0  # codes 0 and 1 win for rows 0 and 1 ...
    w[2], w[33], w[69] = w[0], w[1], w[1]  # ... tied by code 2 (same 32-wide tile) and 33, 69 (later tiles)
    w[40], w[50] = w[50].clone(), w[40].clone()
    x = torch.randint(-3, 4, (30, 16), generator=g).float()
    x[0], x[1] = torch.eye(16)[15], torch.eye(16)[14]
    s = brute_scores(x, w)
    for dtype in (torch.float32, torch.float16):
        xd, wd = x.to(dtype).to(DEVICE), w.to(dtype).to(DEVICE)
        raw_idx, raw_best, raw_second = (t.cpu() for t in _launch(xd, wd, None))
        assert torch.equal(raw_idx, s.argmax(1))  # the kernel alone follows torch.argmax's lowest-index rule
        assert raw_idx[:2].tolist() == [0, 1]
        assert raw_best[:2].tolist() == raw_second[:2].tolist() == [100.0, 100.0]  # margin 0 is seen
        idx, score = argmax_scores_triton(xd, wd)
        assert torch.equal(idx.cpu(), s.argmax(1))
        assert torch.equal(score.cpu().double(), s.max(1).values)
    assert rescored.rows >= 4  # rows 0 and 1 at least, for each dtype


def test_ties_with_bias_match_torch_argmax():
    w = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    b = torch.tensor([0.0, 0.0, 0.0, 0.0, -1.0])
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [0.0, 0.0]])
    idx, score = argmax_scores_triton(x.to(DEVICE), w.to(DEVICE), b.to(DEVICE))
    assert torch.equal(idx.cpu(), torch.tensor([0, 1, 0, 0]))
    assert torch.equal(score.cpu(), torch.tensor([1.0, 1.0, 1.0, 0.0]))
    dup = torch.randn(6, 3).repeat(2, 1)
    nidx, dist = nearest_code_triton(dup[3:9].to(DEVICE) + 0.0, dup.to(DEVICE))
    assert torch.equal(nidx.cpu(), torch.tensor([3, 4, 5, 0, 1, 2]))
    assert torch.equal(dist.cpu(), torch.zeros(6))


@pytest.mark.parametrize("dtype", DTYPES)
def test_near_ties_are_rescored(dtype, rescored):
    # Code 0 scores 2²⁵ + 1 − 2²⁵ = 1, code 1 scores 0.5: all values exact in fp16 and bf16. With the 16-wide D
    # chunks of the interpreter, the first chunk sums 2²⁵ + 1 to 2²⁵ in fp32 and the second cancels it: the kernel
    # sees 0 < 0.5 and picks code 1. The margin 0.5 is far inside the rounding bound, so the row is rescored.
    d = 32
    w = torch.zeros(3, d)
    w[0, 0], w[0, 1], w[0, 16] = 8192.0, 1.0, -8192.0
    w[1, 1] = 0.5
    w[2, 2] = -1.0
    x = torch.zeros(4, d)
    x[:, 0], x[:, 1], x[:, 16] = 4096.0, 1.0, 4096.0
    x[2:, 1] = -1.0  # here code 0 scores −1, code 1 −0.5, code 2 0: still a near-tie for code 0 vs 1, clear winner 2
    x[3, 2] = -3.0  # code 2 scores 3
    xd, wd = x.to(dtype).to(DEVICE), w.to(dtype).to(DEVICE)
    raw_idx, _, _ = _launch(xd, wd, None)
    if _INTERPRET:
        assert raw_idx[0].item() == 1  # the kernel alone gets it wrong...
    idx, score = argmax_scores_triton(xd, wd)
    assert idx.cpu().tolist() == [0, 0, 2, 2]  # ...and rescoring fixes it
    assert score.cpu().tolist() == [1.0, 1.0, 0.0, 3.0]
    assert rescored.rows == 4  # the bound (~1e3 here) flags every row: all scores cancel huge products


def test_one_ulp_apart_codes_resolve_exactly(rescored):
    # Codes 2i and 2i+1 differ by one fp16 ulp in one feature: their scores differ by ~1e-3 of ~50, within the
    # bound, so those rows are rescored; the result is still the exact (fp64) argmax.
    g = torch.Generator().manual_seed(9)
    base = torch.randn(10, 24, generator=g).half()
    bumped = base.clone()
    bumped[:, 3] = torch.nextafter(bumped[:, 3], torch.full_like(bumped[:, 3], torch.inf))
    w = torch.stack([base, bumped], 1).reshape(20, 24)
    x = (base.float() * 2 + 0.01 * torch.randn(10, 24, generator=g)).half()
    idx, score = argmax_scores_triton(x.to(DEVICE), w.to(DEVICE))
    assert_exact_argmax(x, w, None, idx, score)
    assert rescored.rows > 0


def test_random_inputs_rarely_need_rescoring(rescored):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(256, 48, generator=g).half().to(DEVICE)
    w = torch.randn(96, 48, generator=g).half().to(DEVICE)
    idx, score = argmax_scores_triton(x, w)
    assert_exact_argmax(x, w, None, idx, score)
    assert rescored.rows < 0.1 * x.shape[0]


@pytest.mark.parametrize("dtype", DTYPES)
def test_nearest_code_matches_cdist(dtype):
    g = torch.Generator().manual_seed(4)
    x = torch.randn(45, 20, generator=g).to(dtype)
    codebook = torch.randn(70, 20, generator=g).to(dtype)
    idx, dist = nearest_code_triton(x.to(DEVICE), codebook.to(DEVICE))
    exact = torch.cdist(x.double(), codebook.double()).pow(2)
    assert idx.dtype == torch.int64 and dist.dtype == torch.float32
    assert torch.equal(idx.cpu(), exact.argmin(1))
    torch.testing.assert_close(dist.cpu().double(), exact.min(1).values, rtol=1e-5, atol=1e-6)


def test_nearest_code_far_from_the_origin_has_no_cancellation():
    g = torch.Generator().manual_seed(11)
    codebook = torch.randn(40, 16, generator=g) + 1000.0
    x = codebook[torch.arange(0, 40, 3)] + 1e-3
    idx, dist = nearest_code_triton(x.to(DEVICE), codebook.to(DEVICE))
    assert torch.equal(idx.cpu(), torch.arange(0, 40, 3))
    expected = ((x.double() - codebook.double()[idx.cpu()]) ** 2).sum(1)
    torch.testing.assert_close(dist.cpu().double(), expected, rtol=1e-3, atol=1e-9)


def test_strided_and_mixed_inputs():
    g = torch.Generator().manual_seed(6)
    big_x, big_w = torch.randn(37, 50, generator=g).to(DEVICE), torch.randn(70, 30, generator=g).to(DEVICE)
    x, w = big_x[:, 5:25], big_w[:, 3:23]  # row strides 50 and 30, nonzero offsets
    assert not x.is_contiguous() and not w.is_contiguous()
    idx, score = argmax_scores_triton(x, w)
    c_idx, c_score = argmax_scores_triton(x.contiguous(), w.contiguous())
    assert torch.equal(idx, c_idx) and torch.equal(score, c_score)
    assert_exact_argmax(x, w, None, idx, score)
    t_idx, _ = argmax_scores_triton(x.T.contiguous().T, w)  # feature stride ≠ 1: copied
    assert torch.equal(t_idx, idx)
    h_idx, h_score = argmax_scores_triton(x.half(), w)  # fp16 x with fp32 weight: computed in fp32
    assert_exact_argmax(x.half(), w, None, h_idx, h_score)
    d_idx, _ = argmax_scores_triton(x.double(), w)  # fp64 goes to the reference
    assert torch.equal(d_idx, idx)


def test_bytes_moved_by_hand():
    """x [100, 20] and codebook [50, 20] fp32, blocks (32, 16, ·): 4 programs, 4 codebook tiles."""
    counts = vq_triton.bytes_moved(100, 50, 20, torch.float32, (32, 16, 16))
    assert counts == {
        "x": 100 * 20 * 4 * 4,  # re-read for each of the 4 codebook tiles
        "codebook": 50 * 20 * 4 * 4,  # read by each of the 4 programs
        "bias": 4 * 50 * 4,
        "outputs": 16 * 100,  # idx int64, best and second fp32
        "total": 32000 + 16000 + 800 + 1600,
        "minimum": 8000 + 4000 + 200 + 800,  # x, codebook, bias once; idx once
    }
    # One program, one codebook tile: everything is read once; only best and second are over the minimum.
    half = vq_triton.bytes_moved(100, 50, 20, torch.float16, (128, 64, 32), bias=False)
    assert (half["x"], half["codebook"], half["bias"]) == (4000, 2000, 0)
    assert half["total"] - half["minimum"] == 8 * 100


def test_validation_no_grad_and_empty():
    x, w = torch.randn(5, 3, device=DEVICE), torch.randn(4, 3, device=DEVICE)
    with pytest.raises(ValueError, match="feature sizes"):
        argmax_scores_triton(x, torch.randn(4, 2, device=DEVICE))
    with pytest.raises(ValueError, match="bias"):
        argmax_scores_triton(x, w, torch.zeros(3, device=DEVICE))
    with pytest.raises(ValueError, match="K=0"):
        nearest_code_triton(x, torch.empty(0, 3, device=DEVICE))
    with pytest.raises(ValueError, match="is on"):
        argmax_scores_triton(x, w.to("meta"))
    xg, wg = x.clone().requires_grad_(), w.clone().requires_grad_()
    idx, score = argmax_scores_triton(xg, wg, torch.zeros(4, device=DEVICE, requires_grad=True))
    _, dist = nearest_code_triton(xg, wg)
    assert not score.requires_grad and not dist.requires_grad
    assert torch.equal(idx, (x @ w.T).argmax(1))
    empty_idx, empty_dist = nearest_code_triton(torch.empty(0, 3, device=DEVICE), w)
    assert empty_idx.shape == (0,) and empty_dist.shape == (0,) and empty_dist.dtype == torch.float32


def exact_argmax_chunked(x, w, rows=4096):
    """fp64 argmax and top-2 margin over [rows, K] blocks (the whole [N, K] fp64 matrix would be 17 GB)."""
    idx, margin = [], []
    wd = w.double()
    for r0 in range(0, x.shape[0], rows):
        top2 = (x[r0 : r0 + rows].double() @ wd.T).topk(2, dim=1)
        idx.append(top2.indices[:, 0])
        margin.append(top2.values[:, 0] - top2.values[:, 1])
    return torch.cat(idx), torch.cat(margin)


@pytest.mark.gpu
def test_real_size_fp16_on_gpu(rescored):
    g = torch.Generator(device="cuda").manual_seed(0)
    n, k, d = 262144, 8192, 256
    x = torch.randn(n, d, device="cuda", generator=g).half()
    w = torch.randn(k, d, device="cuda", generator=g).half()
    argmax_scores_triton(x, w)  # autotunes on (K, D, log2 N, dtypes); the timing below excludes it
    torch.cuda.synchronize()
    rescored.rows = 0
    t0 = time.perf_counter()
    idx, score = argmax_scores_triton(x, w)
    torch.cuda.synchronize()
    t_triton = time.perf_counter() - t0
    t0 = time.perf_counter()
    ref_idx, ref_score = argmax_scores_reference(x, w)
    torch.cuda.synchronize()
    t_ref = time.perf_counter() - t0
    print(f"triton {t_triton * 1e3:.1f} ms, reference {t_ref * 1e3:.1f} ms, rescored rows {rescored.rows} of {n}")

    exact_idx, margin = exact_argmax_chunked(x, w)
    scale = x.double().norm(dim=1) * w.double().norm(dim=1).max()
    clear = margin >= 1e-9 * scale
    assert torch.equal(idx[clear], exact_idx[clear])  # Triton is the exact argmax
    # The fp32 reference may round wrongly only on near-ties; elsewhere both agree.
    differ = idx != ref_idx
    assert differ.float().mean() < 1e-3
    assert torch.all(margin[differ] < 1e-4 * scale[differ])
    chosen = (x.double() * w.double()[idx]).sum(1)
    assert torch.all((score.double() - chosen).abs() <= 1e-5 * (chosen.abs() + scale))
    torch.testing.assert_close(score[~differ], ref_score[~differ], rtol=1e-4, atol=1e-3)
    assert rescored.rows < 0.1 * n
