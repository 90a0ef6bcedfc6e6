"""VimpacConfig, the model and its heads: paper parameter counts, every layout, CLS semantics, MLM gathering,
pre-LN structure, distributed BatchNorm on gloo, configuration errors and `vimpac model-info`."""

from __future__ import annotations

import argparse
import json
import math

import pytest
import torch
import torch.nn.functional as F

from tests.helpers import naive_attention, random_batch
from vimpac.config import VimpacConfig, parse_layout
from vimpac.errors import UsageError
from vimpac.modeling import (
    AttentionBlock,
    ClassifierHead,
    VimpacBackbone,
    VimpacForClassification,
    VimpacForPretraining,
    parameter_counts,
)
from vimpac.sync_batchnorm import DistributedBatchNorm1d

LAYOUTS = ["T,H|W", "T,H,W", "T|H|W", "H|W,T", "T", "T,H", "THW", "T,HW"]


def tiny_config(**overrides) -> VimpacConfig:
    fields = dict(
        vocab_size=20,
        hidden_size=48,
        heads=6,  # divisible by 2 and 3: every layout builds
        layers=2,
        clip_len=3,
        grid=(4, 5),
        nce_proj_hid_dim=32,
        nce_dim=16,
    )
    return VimpacConfig(**(fields | overrides))


# Parameter counts -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fields, expected",
    [
        (dict(layers=6, hidden_size=512), 29_442_048),  # small (Table 3)
        (dict(layers=24, hidden_size=1024, halve_att=True, halve_mlp=True), 210_106_368),  # large-half (Table 3)
        (dict(layers=12, hidden_size=768), 119_748_096),  # base (Table 3)
        (dict(layers=6, hidden_size=512, layout="efflayoutT,H,W"), 35_751_936),  # Table 13 axial, 35.8M
        (dict(layers=6, hidden_size=512, layout="TxHxW"), 23_132_160),  # Table 13 joint, 23.1M
    ],
)
def test_backbone_parameter_counts_match_paper(fields, expected):
    original = VimpacConfig(special_ids="original", **fields)
    assert original.embedding_rows == 8197
    counts = parameter_counts(original)
    assert counts["backbone"] == expected
    compact = parameter_counts(VimpacConfig(special_ids="compact", **fields))
    d = original.hidden_size
    print(f"{fields}: original {counts['backbone']:,}, compact {compact['backbone']:,}")
    assert compact["backbone"] == expected - 3 * d
    assert compact["mlm_head"] == counts["mlm_head"] - 3


def test_head_parameter_counts():
    config = VimpacConfig(special_ids="original", nce_proj_layers=3, nce_proj_hid_dim=4096, hidden_size=1024)
    counts = parameter_counts(config)
    d, hid = 1024, 4096
    assert counts["mlm_head"] == d * d + d + 2 * d + 8197  # dense, LN, output bias; decoder tied
    assert counts["contrastive_head"] == (d * hid + hid + 2 * hid) + (hid * hid + hid + 2 * hid) + hid * 256
    assert counts["total"] == counts["backbone"] + counts["mlm_head"] + counts["contrastive_head"]


def test_model_info_command_json(capsys):
    from vimpac.commands import model_info

    parser = argparse.ArgumentParser()
    model_info.register(parser.add_subparsers())
    flags = "--layers 6 --hid-dim 512 --model efflayoutT,H|W --special-ids original --json"
    args = parser.parse_args(["model-info", *flags.split(" ")])
    assert args.func(args) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["parameters"]["backbone"] == 29_442_048
    assert report["parameters"]["contrastive_head"] == 512 * 2048 + 2048 + 2 * 2048 + 2048 * 256
    assert report["config"]["layout"] == "T,H|W"


# Every layout: shapes and gradient flow --------------------------------------------------------------------


@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_layout_shapes_and_gradients(layout):
    torch.manual_seed(0)
    config = tiny_config(layout=layout)
    model = VimpacForPretraining(config).train()
    tokens, labels = random_batch(config)
    out = model(tokens, labels)
    m = int((labels != -100).sum())
    assert out["cls"].shape == (3, config.hidden_size)
    assert out["nce"].shape == (3, config.nce_dim)
    assert out["mlm_logits"].shape == (m, config.embedding_rows)
    assert out["mlm_labels"].shape == (m,)
    loss = F.cross_entropy(out["mlm_logits"], out["mlm_labels"]) + out["nce"].pow(2).mean()
    loss.backward()
    for name, param in model.named_parameters():
        assert param.grad is not None, f"{layout}: no gradient reaches {name}"
        assert param.grad.abs().sum() > 0, f"{layout}: zero gradient for {name}"


@pytest.mark.parametrize(
    "overrides",
    [
        dict(pre_ln=True),
        dict(halve_att=True, halve_mlp=True),
        dict(pos_emb="temporal_separation"),
        dict(pos_emb="full", special_ids="original"),
    ],
)
def test_variants_shapes_and_gradients(overrides):
    torch.manual_seed(1)
    config = tiny_config(**overrides)
    model = VimpacForPretraining(config, nce=False)
    tokens, labels = random_batch(config)
    out = model(tokens, labels)
    assert "nce" not in out and model.nce_head is None
    F.cross_entropy(out["mlm_logits"], out["mlm_labels"]).backward()
    for name, param in model.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name


# Attention block against an independent per-line loop ----------------------------------------------------


def naive_block(block: AttentionBlock, x: torch.Tensor, pad: torch.Tensor | None, pre_ln: bool) -> torch.Tensor:
    """The block from its definition: pattern i uses channel slice i (width/P) of Q, K and V; per-line attention
    with CLS (naive loop); concat; output projection; residual; LN (post) or LN inside (pre)."""
    batch = x.shape[0]
    t, h, w = block.shape
    inner = block.norm(x) if pre_ln else x
    qkv = inner @ block.qkv.weight.T + block.qkv.bias
    width = qkv.shape[-1] // 3
    q, k, v = qkv[..., :width], qkv[..., width : 2 * width], qkv[..., 2 * width :]
    patterns = block.patterns
    part = width // len(patterns)
    heads = block.heads // len(patterns)
    token_parts, cls_parts = [], []
    for i, axes in enumerate(patterns):
        channels = slice(i * part, (i + 1) * part)

        def grid(z, channels=channels):
            return z[:, 1:, channels].reshape(batch, t, h, w, heads, part // heads)

        def cls(z, channels=channels):
            return z[:, 0, channels].reshape(batch, heads, part // heads)

        out, cls_out = naive_attention(grid(q), grid(k), grid(v), cls(q), cls(k), cls(v), axes, pad=pad)
        token_parts.append(out.reshape(batch, t * h * w, part))
        cls_parts.append(cls_out.reshape(batch, 1, part))
    att = torch.cat([torch.cat(cls_parts, dim=-1), torch.cat(token_parts, dim=-1)], dim=1)
    y = att @ block.out.weight.T + block.out.bias
    return x + y if pre_ln else block.norm(x + y)


@pytest.mark.parametrize("layout", ["T", "H|W", "T|H|W", "HW", "THW"])
@pytest.mark.parametrize("pre_ln", [False, True])
def test_attention_block_matches_naive_per_line(layout, pre_ln):
    torch.manual_seed(2)
    config = tiny_config(layout=layout, pre_ln=pre_ln, grid=(3, 4), hidden_size=24)
    block = AttentionBlock(config, parse_layout(layout)[0]).double().eval()
    for param in block.parameters():
        torch.nn.init.normal_(param, std=0.3)
    x = torch.randn(2, 1 + math.prod(config.shape), config.hidden_size, dtype=torch.float64)
    pad = torch.rand(2, *config.shape) < 0.3
    got = block(x, pad)
    want = naive_block(block, x, pad, pre_ln)
    torch.testing.assert_close(got, want, atol=1e-10, rtol=0)


def naive_attend(block: AttentionBlock, x: torch.Tensor, pad: torch.Tensor | None) -> torch.Tensor:
    """The block's attention before the output projection, from its definition (as naive_block, which indexes
    channel slices): [B, 1 + N, attention_width]."""
    batch = x.shape[0]
    t, h, w = block.shape
    qkv = x @ block.qkv.weight.T + block.qkv.bias
    width = qkv.shape[-1] // 3
    q, k, v = qkv[..., :width], qkv[..., width : 2 * width], qkv[..., 2 * width :]
    part = width // len(block.patterns)
    heads = block.heads // len(block.patterns)
    token_parts, cls_parts = [], []
    for i, axes in enumerate(block.patterns):
        channels = slice(i * part, (i + 1) * part)
        grid = [z[:, 1:, channels].reshape(batch, t, h, w, heads, part // heads) for z in (q, k, v)]
        cls = [z[:, 0, channels].reshape(batch, heads, part // heads) for z in (q, k, v)]
        out, cls_out = naive_attention(*grid, *cls, axes, pad=pad)
        token_parts.append(out.reshape(batch, t * h * w, part))
        cls_parts.append(cls_out.reshape(batch, 1, part))
    return torch.cat([torch.cat(cls_parts, dim=-1), torch.cat(token_parts, dim=-1)], dim=1)


@pytest.mark.parametrize("layout", ["T", "H|W", "T|H|W", "HW"])
def test_attention_block_gradients_match_naive_per_line(layout):
    """The QKV pieces are cut by split/unbind (whose backward is one cat/stack, not indexing's zero-filled
    full-size gradients): input and QKV-weight gradients still equal the naive loop's."""
    torch.manual_seed(3)
    config = tiny_config(layout=layout, grid=(3, 4), hidden_size=24, dropout=0.0)
    block = AttentionBlock(config, parse_layout(layout)[0]).double().train()
    for param in block.parameters():
        torch.nn.init.normal_(param, std=0.3)
    x = torch.randn(2, 1 + math.prod(config.shape), config.hidden_size, dtype=torch.float64, requires_grad=True)
    pad = torch.rand(2, *config.shape) < 0.3
    g = torch.randn(2, 1 + math.prod(config.shape), config.attention_width, dtype=torch.float64)
    leaves = [x, block.qkv.weight, block.qkv.bias]
    got = torch.autograd.grad((block.attend(x, pad) * g).sum(), leaves)
    want = torch.autograd.grad((naive_attend(block, x, pad) * g).sum(), leaves)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=0)


def test_pre_ln_residual_adds_the_raw_stream():
    """With zeroed output projections every pre-LN block is the identity (the original added LN(x), docs/reference.md
    §4.5)."""
    config = tiny_config(pre_ln=True, dropout=0.0)
    backbone = VimpacBackbone(config).eval()
    for layer in backbone.layers:
        for block in [*layer.attention, layer.mlp]:
            proj = block.out if hasattr(block, "out") else block.proj
            torch.nn.init.zeros_(proj.weight)
            torch.nn.init.zeros_(proj.bias)
    x = torch.randn(2, 1 + math.prod(config.shape), config.hidden_size)
    for layer in backbone.layers:
        torch.testing.assert_close(layer(x), x, atol=0, rtol=0)


# Embeddings and padding ---------------------------------------------------------------------------------------


def test_hw_separation_positions_are_factor_sums():
    config = tiny_config()
    pos = VimpacBackbone(config).positional_embedding
    table = pos()
    t, h, w = config.shape
    assert table.shape == (1 + t * h * w, config.hidden_size)
    torch.testing.assert_close(table[0], pos.cls[0])
    index = 1 + (2 * h + 1) * w + 3  # token (t=2, i=1, j=3)
    torch.testing.assert_close(table[index], pos.temporal[2] + pos.height[1] + pos.width[3])


def test_pad_tokens_are_invisible_to_other_tokens_and_cls():
    """Changing the PAD row of the embedding changes nothing outside PAD positions (PAD keys are masked)."""
    config = tiny_config(dropout=0.0)
    backbone = VimpacBackbone(config).eval()
    tokens, _ = random_batch(config)
    pad = tokens == config.pad_id
    cls_a, hid_a = backbone(tokens)
    with torch.no_grad():
        backbone.token_embedding.weight[config.pad_id].normal_(std=5.0)
    cls_b, hid_b = backbone(tokens)
    torch.testing.assert_close(cls_a, cls_b, atol=1e-5, rtol=0)
    torch.testing.assert_close(hid_a[~pad], hid_b[~pad], atol=1e-5, rtol=0)
    assert not torch.allclose(hid_a[pad], hid_b[pad])


# Heads ---------------------------------------------------------------------------------------------------


def test_mlm_logits_only_at_masked_positions_equal_full_logits_loss():
    torch.manual_seed(3)
    config = tiny_config()
    model = VimpacForPretraining(config).eval()
    tokens, labels = random_batch(config, seed=4)
    out = model(tokens, labels)
    _, hiddens = model.backbone(tokens)
    full = model.mlm_head(hiddens.reshape(-1, config.hidden_size), model.backbone.token_embedding.weight)
    assert full.shape == (tokens.numel(), config.embedding_rows)
    full_loss = F.cross_entropy(full, labels.reshape(-1), ignore_index=-100)
    masked_loss = F.cross_entropy(out["mlm_logits"], out["mlm_labels"])
    torch.testing.assert_close(masked_loss, full_loss, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(out["mlm_logits"], full[out["mlm_positions"]], atol=1e-5, rtol=0)
    torch.testing.assert_close(out["mlm_labels"], labels.reshape(-1)[out["mlm_positions"]])


def test_mlm_decoder_is_tied_to_the_embedding():
    config = tiny_config()
    model = VimpacForPretraining(config).eval()
    hidden = torch.randn(4, config.hidden_size)
    before = model.mlm_head(hidden, model.backbone.token_embedding.weight)
    with torch.no_grad():
        model.backbone.token_embedding.weight[5] += 1.0
    after = model.mlm_head(hidden, model.backbone.token_embedding.weight)
    changed = (after - before).abs().amax(dim=0) > 0
    assert changed.tolist() == [i == 5 for i in range(config.embedding_rows)]


def test_classifier_head_starts_at_zero_and_learns():
    config = tiny_config()
    model = VimpacForClassification(config, num_classes=7, dropout=0.5)
    assert isinstance(model.classifier, ClassifierHead)
    tokens, _ = random_batch(config)
    logits = model(tokens)
    assert logits.shape == (3, 7) and torch.count_nonzero(logits) == 0
    F.cross_entropy(logits, torch.tensor([0, 1, 2])).backward()
    assert model.classifier.fc.weight.grad.abs().sum() > 0


def _sync_bn_worker(rank: int, init_file: str, x_all: torch.Tensor, g_all: torch.Tensor, queue) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    torch.manual_seed(0)
    bn = DistributedBatchNorm1d(x_all.shape[1])
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-1, 1)
    sizes = [3, 5]  # unequal local batches
    start = sum(sizes[:rank])
    x = x_all[start : start + sizes[rank]].clone().requires_grad_()
    y = bn(x)
    (y * g_all[start : start + sizes[rank]]).sum().backward()
    # numpy: sent by value (torch tensors would go through shared memory that dies with this process)
    results = (y.detach(), x.grad, bn.weight.grad, bn.running_mean, bn.running_var)
    queue.put((rank, *(t.numpy() for t in results)))
    dist.destroy_process_group()


@pytest.mark.timeout(120)
def test_distributed_batchnorm_on_gloo_equals_global_batch(tmp_path):
    mp = torch.multiprocessing.get_context("spawn")
    queue = mp.Queue()
    x_all = torch.randn(8, 6) * 3 + 1
    g_all = torch.randn(8, 6)
    procs = [
        mp.Process(target=_sync_bn_worker, args=(r, str(tmp_path / "init"), x_all, g_all, queue)) for r in range(2)
    ]
    for p in procs:
        p.start()
    results = {}
    for _ in procs:
        rank, *arrays = queue.get(timeout=100)
        results[rank] = [torch.from_numpy(a) for a in arrays]
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0

    torch.manual_seed(0)
    reference = torch.nn.BatchNorm1d(6)
    with torch.no_grad():
        reference.weight.uniform_(0.5, 1.5)
        reference.bias.uniform_(-1, 1)
    x = x_all.clone().requires_grad_()
    y = reference(x)
    (y * g_all).sum().backward()
    y_dist = torch.cat([results[0][0], results[1][0]])
    grad_dist = torch.cat([results[0][1], results[1][1]])
    torch.testing.assert_close(y_dist, y.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grad_dist, x.grad, atol=1e-5, rtol=1e-5)
    # Each rank's weight gradient is its local share; their sum (what DDP all-reduces) is the global one.
    torch.testing.assert_close(results[0][2] + results[1][2], reference.weight.grad, atol=1e-5, rtol=1e-5)
    for rank in (0, 1):
        torch.testing.assert_close(results[rank][3], reference.running_mean, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(results[rank][4], reference.running_var, atol=1e-6, rtol=1e-5)


def test_distributed_batchnorm_without_process_group_is_batchnorm():
    bn, reference = DistributedBatchNorm1d(5), torch.nn.BatchNorm1d(5)
    x = torch.randn(7, 5)
    torch.testing.assert_close(bn(x), reference(x))
    torch.testing.assert_close(bn.running_var, reference.running_var)


# Configuration ------------------------------------------------------------------------------------------


def test_special_id_layouts():
    original, compact = VimpacConfig(), VimpacConfig(special_ids="compact")
    assert (compact.pad_id, compact.mask_id, compact.embedding_rows) == (8192, 8193, 8194)
    assert (original.pad_id, original.mask_id, original.embedding_rows) == (8193, 8196, 8197)
    # config.json names the layout, so a model saved while compact was the default stays compact
    assert compact.to_dict()["special_ids"] == "compact" and original.to_dict()["special_ids"] == "original"
    assert VimpacConfig.from_dict(compact.to_dict()).embedding_rows == 8194


def test_config_json_round_trip_and_layout_forms(tmp_path):
    config = VimpacConfig.from_frame_size(256, layout="efflayoutT,HxW", heads=4, halve_att=True, clip_len=10)
    assert config.grid == (32, 32) and config.layout == "T,HW" and config.blocks == (("T",), ("HW",))
    assert VimpacConfig.from_json(config.to_json()) == config
    config.save(tmp_path / "config.json")
    assert VimpacConfig.load(tmp_path / "config.json") == config
    assert parse_layout("H|W,T") == (("H", "W"), ("T",))
    assert parse_layout("WH") == (("HW",),)
    assert (config.num_heads, config.head_dim, VimpacConfig().num_heads) == (4, 64, 8)


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(layout="T,X"), "unknown axis X"),
        (dict(layout="bert"), "unknown axis"),
        (dict(layout="T,,H"), "empty"),
        (dict(layout="T,H|H"), "repeats a pattern"),
        (dict(layout="T|H|W"), r"8 heads is not divisible by 3"),
        (dict(hidden_size=512, heads=6), r"attention width 512 is not divisible by 6 heads"),
        (dict(hidden_size=32), "0 heads"),
        (dict(pos_emb="default"), "'full'"),
        (dict(special_ids="bert"), "special_ids"),
        (dict(dropout=1.0), "dropout"),
    ],
)
def test_clear_configuration_errors(fields, message):
    with pytest.raises(UsageError, match=message):
        VimpacConfig(**fields)


def test_frame_size_must_be_a_multiple_of_8():
    with pytest.raises(UsageError, match="frame size 100 is not a positive multiple of 8"):
        VimpacConfig.from_frame_size(100)
    assert VimpacConfig.from_frame_size(128).grid == (16, 16)


def test_unknown_config_key_and_wrong_token_shape():
    with pytest.raises(UsageError, match="unknown model config keys hidden"):
        VimpacConfig.from_dict({"hidden": 3})
    config = tiny_config()
    with pytest.raises(ValueError, match=r"\(3, 4, 5\)"):
        VimpacBackbone(config)(torch.zeros(2, 3, 5, 4, dtype=torch.long))
