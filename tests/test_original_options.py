"""Two options of the original release that vimpac now builds: the BatchNorm after the projection head's last
Linear (`nce_bn_after_proj`, the original's `--nce-bn-after-proj`) and the original's pre-LN block
(`pre_ln_original`, its `--pre-activation`), whose attention blocks add the residual to the normalised input.

Each is checked against hand-written PyTorch that follows the formulas of docs/reference.md §4.5 and §4.6, and
`vimpac convert-original` is checked on synthetic original-style checkpoints (key names and shapes of the
original's state dicts, random values) against an independent functional forward of the original model written
from those keys. The tests build every checkpoint they convert themselves.
"""

from __future__ import annotations

import argparse
import json
import math
import pickle
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import vimpac
from tests.helpers import naive_attention
from vimpac.config import VimpacConfig, add_model_arguments, config_from_args
from vimpac.errors import UsageError
from vimpac.interpolate import check_resizable, model_differences
from vimpac.modeling import ContrastiveHead, VimpacForPretraining, VimpacLayer
from vimpac.original import convert_state
from vimpac.sync_batchnorm import DistributedBatchNorm1d


def tiny_config(**overrides) -> VimpacConfig:
    fields = dict(vocab_size=20, hidden_size=24, heads=2, layers=2, clip_len=3, grid=(3, 4), nce_proj_hid_dim=12)
    return VimpacConfig(**(fields | overrides))


# ------------------------------------------------------------------------------------------ configuration


def test_optional_fields_are_omitted_at_their_defaults_and_round_trip(tmp_path):
    plain = VimpacConfig()
    data = plain.to_dict()
    assert "nce_bn_after_proj" not in data and "pre_ln_original" not in data
    # an existing config.json (written before the fields existed) loads unchanged and is written back byte-identical
    old_json = plain.to_json()
    assert VimpacConfig.from_json(old_json) == plain and VimpacConfig.from_json(old_json).to_json() == old_json
    for fields in (dict(nce_bn_after_proj=True), dict(pre_ln=True, pre_ln_original=True)):
        config = VimpacConfig(**fields)
        data = config.to_dict()
        assert all(data[k] is True for k in fields)
        assert VimpacConfig.from_dict(data) == config
        config.save(tmp_path / "config.json")
        assert VimpacConfig.load(tmp_path / "config.json") == config
    with pytest.raises(UsageError, match=r"pre_ln_original .* needs pre_ln=True"):
        VimpacConfig(pre_ln_original=True)


def test_flags_set_the_fields():
    parser = argparse.ArgumentParser()
    add_model_arguments(parser)
    assert config_from_args(parser.parse_args([])) == VimpacConfig()
    config = config_from_args(parser.parse_args(["--nce-bn-after-proj", "--pre-ln-original"]))
    assert config.nce_bn_after_proj and config.pre_ln and config.pre_ln_original
    config = config_from_args(parser.parse_args(["--pre-ln"]))
    assert config.pre_ln and not config.pre_ln_original


def test_model_differences_compare_the_keys_of_both_configs():
    plain, bn = VimpacConfig(), VimpacConfig(nce_bn_after_proj=True)
    assert model_differences(plain, bn) == model_differences(bn, plain) == ["nce_bn_after_proj"]
    original = VimpacConfig(pre_ln=True, pre_ln_original=True)
    assert model_differences(VimpacConfig(pre_ln=True), original) == ["pre_ln_original"]
    assert model_differences(plain, original) == ["pre_ln", "pre_ln_original"]
    for old, new in ((plain, bn), (bn, plain)):
        with pytest.raises(UsageError, match=r"differs in nce_bn_after_proj \(nce_bn_after_proj (False|True) →"):
            check_resizable(old, new)
    check_resizable(bn, VimpacConfig(nce_bn_after_proj=True, clip_len=10))  # only the shape differs
    # heads None means hidden // 64: a converted export says heads=2 for hid 128, the command line leaves it None
    small, given = VimpacConfig(hidden_size=128, heads=None), VimpacConfig(hidden_size=128, heads=2)
    assert model_differences(small, given) == model_differences(given, small) == []
    assert model_differences(small, VimpacConfig(hidden_size=128, heads=4)) == ["heads"]


# ----------------------------------------------------------------------------- BatchNorm after the projection


def reference_projection(head: ContrastiveHead, cls: torch.Tensor, train: bool) -> torch.Tensor:
    """Linear → BN → ReLU per hidden layer, then Linear (no bias) → BN, from the head's tensors (F.batch_norm
    updates copies of the running statistics in training mode, as BatchNorm1d does)."""
    modules = list(head.net)
    linears = [m for m in modules if isinstance(m, torch.nn.Linear)]
    norms = [m for m in modules if isinstance(m, DistributedBatchNorm1d)]
    assert len(norms) == len(linears)  # one BN per hidden layer plus the one after the projection
    x = cls
    for i, (linear, bn) in enumerate(zip(linears, norms)):
        x = F.linear(x, linear.weight, linear.bias)
        x = F.batch_norm(
            x, bn.reference_mean, bn.reference_var, bn.weight, bn.bias, training=train, momentum=0.1, eps=1e-5
        )
        if i < len(linears) - 1:
            x = torch.relu(x)
    return x


@pytest.mark.parametrize("layers", [1, 2, 3])
def test_bn_after_projection_matches_hand_written_reference_in_train_and_eval(layers):
    torch.manual_seed(layers)
    config = tiny_config(nce_proj_layers=layers, nce_bn_after_proj=True, nce_dim=8)
    head = ContrastiveHead(config)  # float32: the BatchNorm computes in float32 whatever the input dtype
    assert isinstance(head.net[-1], DistributedBatchNorm1d) and head.net[-1].num_features == 8
    assert isinstance(head.net[-2], torch.nn.Linear) and head.net[-2].bias is None
    assert isinstance(head.net[3 * (layers - 1) + 1], DistributedBatchNorm1d)  # the index the converter fills
    with torch.no_grad():
        for module in head.net:
            if isinstance(module, DistributedBatchNorm1d):
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_()
                module.running_mean.normal_()
                module.running_var.uniform_(0.5, 1.5)
    norms = [m for m in head.net if isinstance(m, DistributedBatchNorm1d)]
    for train in (True, False):
        for bn in norms:
            bn.reference_mean, bn.reference_var = bn.running_mean.clone(), bn.running_var.clone()
        cls = torch.randn(7, config.hidden_size) * 2 + 0.5
        head.train(train)
        got = head(cls)
        want = reference_projection(head, cls, train)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
        for bn in norms:  # training updated the running statistics as BatchNorm1d does; eval left them alone
            torch.testing.assert_close(bn.running_mean, bn.reference_mean, atol=1e-6, rtol=0)
            torch.testing.assert_close(bn.running_var, bn.reference_var, atol=1e-6, rtol=1e-6)
        if train:  # the output BN standardises each channel over the batch (before its affine transform)
            z = (got - head.net[-1].bias) / head.net[-1].weight
            torch.testing.assert_close(z.mean(0), torch.zeros(8), atol=1e-5, rtol=0)


def test_without_the_option_the_head_ends_with_its_linear():
    head = ContrastiveHead(tiny_config())
    assert isinstance(head.net[-1], torch.nn.Linear) and len(head.net) == 4
    model = VimpacForPretraining(tiny_config(nce_bn_after_proj=True), mlm=False)
    assert "nce_head.net.4.running_var" in model.state_dict()


# -------------------------------------------------------------------------------- the original's pre-LN block


def naive_attention_block(block, x: torch.Tensor, pad: torch.Tensor | None) -> torch.Tensor:
    """Attention of one layout block before its output projection, per line with explicit softmax: pattern i
    uses channel slice i of Q, K and V and 1/P of the heads. [B, 1 + N, D] → [B, 1 + N, attention width]."""
    batch = x.shape[0]
    t, h, w = block.shape
    qkv = F.linear(x, block.qkv.weight, block.qkv.bias)
    width = qkv.shape[-1] // 3
    part = width // len(block.patterns)
    heads = block.heads // len(block.patterns)
    tokens, cls = [], []
    for i, axes in enumerate(block.patterns):
        cut = [qkv[..., s * width + i * part : s * width + (i + 1) * part] for s in range(3)]
        grid = [z[:, 1:].reshape(batch, t, h, w, heads, part // heads) for z in cut]
        heads_cls = [z[:, 0].reshape(batch, heads, part // heads) for z in cut]
        out, cls_out = naive_attention(*grid, *heads_cls, axes, pad=pad)
        tokens.append(out.reshape(batch, t * h * w, part))
        cls.append(cls_out.reshape(batch, 1, part))
    return torch.cat([torch.cat(cls, dim=-1), torch.cat(tokens, dim=-1)], dim=1)


def original_pre_ln_layer(layer: VimpacLayer, x: torch.Tensor, pad: torch.Tensor | None) -> torch.Tensor:
    """One layer of the original's pre-activation, written out: every attention block j in turn computes
    y = LN_j(x); x = y + W_j·att_j(y) (the residual is the normalised y), then the MLP x + MLP(LN_mlp(x))."""
    eps = layer.mlp.norm.eps
    for block in layer.attention:
        y = F.layer_norm(x, x.shape[-1:], block.norm.weight, block.norm.bias, eps)
        x = y + F.linear(naive_attention_block(block, y, pad), block.out.weight, block.out.bias)
    mlp = layer.mlp
    y = F.layer_norm(x, x.shape[-1:], mlp.norm.weight, mlp.norm.bias, eps)
    return x + F.linear(F.gelu(F.linear(y, mlp.fc.weight, mlp.fc.bias)), mlp.proj.weight, mlp.proj.bias)


@pytest.mark.parametrize("layout", ["T,H|W", "T,H,W", "T|H|W"])
def test_original_pre_ln_layer_matches_its_formula(layout):
    torch.manual_seed(4)
    config = tiny_config(layout=layout, heads=6, pre_ln=True, pre_ln_original=True, dropout=0.0)
    layer = VimpacLayer(config).double().eval()
    for param in layer.parameters():
        torch.nn.init.normal_(param, std=0.3)
    x = torch.randn(2, 1 + math.prod(config.shape), config.hidden_size, dtype=torch.float64) * 3
    for pad in (None, torch.rand(2, *config.shape) < 0.3):
        torch.testing.assert_close(layer(x, pad), original_pre_ln_layer(layer, x, pad), atol=1e-10, rtol=0)
    # vimpac's own pre-LN (the raw stream as the residual) with the same weights computes something else
    correct = VimpacLayer(tiny_config(layout=layout, heads=6, pre_ln=True, dropout=0.0)).double().eval()
    correct.load_state_dict(layer.state_dict())
    assert (correct(x) - layer(x)).abs().max() > 0.1


def test_original_pre_ln_backbone_has_no_input_norm_and_a_final_one():
    model = VimpacForPretraining(tiny_config(pre_ln=True, pre_ln_original=True), mlm=False, nce=False)
    keys = model.state_dict()
    assert "backbone.final_norm.weight" in keys and not any(k.startswith("backbone.input_norm") for k in keys)


# ---------------------------------------------------------------------- conversion of original-style checkpoints

D, LAYERS, T, GRID, VOCAB = 128, 2, 3, 2, 16  # heads = D // 64 = 2, frame size 16 px
PAD = VOCAB + 1


def original_args(layout: str, pre_activation: bool, bn_after_proj: bool, proj_layers: int = 2) -> dict:
    return {
        "model": f"efflayout{layout}",
        "pos_emb": "hw_separation",
        "layers": LAYERS,
        "hid_dim": D,
        "frame_size": 8 * GRID,
        "clip_len": T,
        "vocab_size": VOCAB,
        "halve_att": False,
        "halve_mlp": False,
        "pre_activation": pre_activation,
        "dropout": 0.1,
        "nce_proj_layers": proj_layers,
        "nce_proj_hid_dim": 32,
        "nce_bn_after_proj": bn_after_proj,
        "mlm_weight": 0.0,  # original_state has no MLM head, as the original builds it at weight 0
    }


def original_state(args: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tensors under the original's pre-training key names (ModelWithHead without the MLM head)."""
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape, mean=0.0, std=0.2):
        return mean + std * torch.randn(*shape, generator=gen)

    state = {
        "backbone.cls_param": rand(D),
        "backbone.embedding.weight": rand(VOCAB + 5, D, std=1.0),
        "backbone.positional_embedding.cls_pos_embedding": rand(1, D),
        "backbone.positional_embedding.temporal_pos_embedding": rand(T, D),
        "backbone.positional_embedding.height_pos_embedding": rand(GRID, D),
        "backbone.positional_embedding.width_pos_embedding": rand(GRID, D),
    }
    pre = args["pre_activation"]
    norm_name = "ln_post" if pre else "ln_pre"
    state[f"backbone.{norm_name}.weight"], state[f"backbone.{norm_name}.bias"] = rand(D, mean=1.0), rand(D)
    output = "" if pre else "output."
    for i in range(LAYERS):
        layer = f"backbone.transformer.resblocks.{i}."
        for j, patterns in enumerate(args["model"][len("efflayout") :].split(",")):
            block = f"{layer}attention_blocks.{j}."
            width = D // len(patterns.split("|"))
            for k in range(len(patterns.split("|"))):
                for name in ("query", "key", "value"):
                    state[f"{block}attentions.{k}.attention.{name}.weight"] = rand(width, D, std=0.1)
                    state[f"{block}attentions.{k}.attention.{name}.bias"] = rand(width)
            state[f"{block}{output}dense.weight"], state[f"{block}{output}dense.bias"] = rand(D, D, std=0.1), rand(D)
            state[f"{block}{output}LayerNorm.weight"] = rand(D, mean=1.0)
            state[f"{block}{output}LayerNorm.bias"] = rand(D)
        state[f"{layer}mlp.c_fc.weight"], state[f"{layer}mlp.c_fc.bias"] = rand(4 * D, D, std=0.1), rand(4 * D)
        state[f"{layer}mlp.c_proj.weight"], state[f"{layer}mlp.c_proj.bias"] = rand(D, 4 * D, std=0.05), rand(D)
        state[f"{layer}ln.weight"], state[f"{layer}ln.bias"] = rand(D, mean=1.0), rand(D)
    widths = [D] + [args["nce_proj_hid_dim"]] * (args["nce_proj_layers"] - 1) + [256]
    for i in range(args["nce_proj_layers"]):
        last = i == args["nce_proj_layers"] - 1
        state[f"cls_head.mlp.linear_{i}.weight"] = rand(widths[i + 1], widths[i], std=0.1)
        if not last:
            state[f"cls_head.mlp.linear_{i}.bias"] = rand(widths[i + 1])
        if not last or args["nce_bn_after_proj"]:
            bn = f"cls_head.mlp.bn_{i}."
            state[bn + "weight"], state[bn + "bias"] = rand(widths[i + 1], mean=1.0), rand(widths[i + 1])
            state[bn + "running_mean"] = rand(widths[i + 1])
            state[bn + "running_var"] = 0.5 + torch.rand(widths[i + 1], generator=gen)
            state[bn + "num_batches_tracked"] = torch.tensor(12345)
    return state


def original_forward(state: dict, args: dict, tokens: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The original model in eval mode, from its state dict alone: (cls, hiddens [B, T, h, w, D], projection).

    Separate CLS and token streams as in the original; each layout block's patterns get their own query/key/value
    and 1/P of the D // 64 heads, CLS is prepended to every line and its outputs averaged (naive_attention)."""
    pre = args["pre_activation"]
    batch = tokens.shape[0]
    heads = D // 64

    def ln(x, name):
        return F.layer_norm(x, (D,), state[f"{name}.weight"], state[f"{name}.bias"], 1e-12)

    def linear(x, name):
        return F.linear(x, state[f"{name}.weight"], state.get(f"{name}.bias"))

    pos = "backbone.positional_embedding."
    x = state["backbone.embedding.weight"][tokens]
    x = x + state[pos + "temporal_pos_embedding"][:, None, None] + state[pos + "height_pos_embedding"][None, :, None]
    x = x + state[pos + "width_pos_embedding"][None, None, :]
    cls = (state["backbone.cls_param"] + state[pos + "cls_pos_embedding"][0]).expand(batch, D)
    if not pre:
        x, cls = ln(x, "backbone.ln_pre"), ln(cls, "backbone.ln_pre")
    pad = tokens == PAD
    pad = pad if bool(pad.any()) else None
    for i in range(LAYERS):
        layer = f"backbone.transformer.resblocks.{i}."
        for j, patterns in enumerate(args["model"][len("efflayout") :].split(",")):
            block = f"{layer}attention_blocks.{j}."
            if pre:  # the stream itself is replaced by its normalised value: the residual below adds to it
                x, cls = ln(x, block + "LayerNorm"), ln(cls, block + "LayerNorm")
            parts, cls_parts = [], []
            per = heads // len(patterns.split("|"))
            for k, axis in enumerate(patterns.split("|")):
                att = f"{block}attentions.{k}.attention."
                q, key, v = (linear(x, att + n).unflatten(-1, (per, -1)) for n in ("query", "key", "value"))
                cq, ck, cv = (linear(cls, att + n).unflatten(-1, (per, -1)) for n in ("query", "key", "value"))
                out, cls_out = naive_attention(q, key, v, cq, ck, cv, axis, pad=pad)
                parts.append(out.flatten(-2))
                cls_parts.append(cls_out.flatten(-2))
            dense = block + ("dense" if pre else "output.dense")
            y, cls_y = linear(torch.cat(parts, -1), dense), linear(torch.cat(cls_parts, -1), dense)
            if pre:
                x, cls = x + y, cls + cls_y
            else:
                x, cls = ln(x + y, block + "output.LayerNorm"), ln(cls + cls_y, block + "output.LayerNorm")

        def mlp(z, layer=layer):
            return linear(F.gelu(linear(z, layer + "mlp.c_fc")), layer + "mlp.c_proj")

        if pre:
            x, cls = x + mlp(ln(x, layer + "ln")), cls + mlp(ln(cls, layer + "ln"))
        else:
            x, cls = ln(x + mlp(x), layer + "ln"), ln(cls + mlp(cls), layer + "ln")
    if pre:
        x, cls = ln(x, "backbone.ln_post"), ln(cls, "backbone.ln_post")
    z = cls
    for i in range(args["nce_proj_layers"]):
        z = linear(z, f"cls_head.mlp.linear_{i}")
        bn = f"cls_head.mlp.bn_{i}."
        if bn + "weight" in state:
            z = F.batch_norm(
                z, state[bn + "running_mean"], state[bn + "running_var"], state[bn + "weight"], state[bn + "bias"]
            )
        if i < args["nce_proj_layers"] - 1:
            z = torch.relu(z)
    return cls, x, z


def write_checkpoint(folder: Path, state: dict, args: dict) -> Path:
    folder.mkdir(parents=True)
    torch.save(state, folder / "classifier.pt")
    (folder / "args.pickle").write_bytes(pickle.dumps(argparse.Namespace(**args), protocol=4))
    return folder


def clip_tokens(seed: int = 1) -> torch.Tensor:
    tokens = torch.randint(0, VOCAB, (2, T, GRID, GRID), generator=torch.Generator().manual_seed(seed))
    tokens[1, -1] = PAD  # the last frame of sample 1 is padding, as the original's loader pads
    tokens[0, 1, 0, 1] = VOCAB + 4  # MASK
    return tokens


@pytest.mark.parametrize(
    ("layout", "pre_activation", "bn_after_proj", "proj_layers"),
    [
        ("T,H|W", True, True, 2),
        ("T,H,W", True, False, 3),
        ("T,H|W", False, True, 1),
        ("H|W,T", False, False, 2),
    ],
)
def test_converted_original_style_checkpoint_reproduces_the_original_forward(
    tmp_path, layout, pre_activation, bn_after_proj, proj_layers
):
    from vimpac.cli import main

    args = original_args(layout, pre_activation, bn_after_proj, proj_layers)
    state = original_state(args)
    folder = write_checkpoint(tmp_path / "last", state, args)
    assert main(["convert-original", str(folder), "--out", str(tmp_path / "out")]) == 0
    saved = json.loads((tmp_path / "out" / "config.json").read_text())
    for key, value in (("pre_ln_original", pre_activation), ("nce_bn_after_proj", bn_after_proj)):
        assert saved.get(key, False) is value and (key in saved) is value  # omitted when off
    assert saved["pre_ln"] is pre_activation
    model = vimpac.load_model(tmp_path / "out")
    tokens = clip_tokens()
    with torch.no_grad():
        cls, hidden, projection = original_forward(state, args, tokens)
    torch.testing.assert_close(model.cls(tokens), cls, atol=2e-5, rtol=0)
    torch.testing.assert_close(model.hidden_states(tokens), hidden, atol=2e-5, rtol=0)
    torch.testing.assert_close(model.projection(tokens), projection, atol=2e-5, rtol=0)


def test_training_mode_projection_of_the_converted_head_normalises_the_batch():
    """The converted BN after the projection is a live BatchNorm: in training mode it uses batch statistics and
    updates the running ones it was given."""
    args = original_args("T,H|W", False, True)
    state = original_state(args)
    converted = convert_state(state, args)
    model = VimpacForPretraining(converted.config, mlm=False)
    model.load_state_dict(converted.state, strict=True)
    bn = model.nce_head.net[4]
    assert isinstance(bn, DistributedBatchNorm1d) and int(bn.num_batches_tracked) == 12345
    torch.testing.assert_close(bn.running_var, state["cls_head.mlp.bn_1.running_var"])
    model.train()
    z = model(clip_tokens())["nce"]
    torch.testing.assert_close(((z - bn.bias) / bn.weight).mean(0), torch.zeros(256), atol=1e-5, rtol=0)
    assert int(bn.num_batches_tracked) == 12346


@pytest.mark.parametrize(
    ("change", "drop", "message"),
    [
        ({"halve_att": True}, (), r"--pre-activation True, .*--halve-att"),
        ({"nce_bn_after_proj": False}, (), r"does not have .*cls_head\.mlp\.bn_1"),  # the weights hold bn_1
        ({}, ("cls_head.mlp.bn_1.weight",), r"lacks cls_head\.mlp\.bn_1\.weight"),
        ({"pre_activation": False}, (), r"lacks backbone\.ln_pre\.weight"),
    ],
)
def test_arguments_that_do_not_fit_the_weights_are_refused(change, drop, message):
    args = original_args("T,H|W", True, True)
    state = {k: v for k, v in original_state(args).items() if k not in drop}
    with pytest.raises(UsageError, match=message):
        convert_state(state, {**args, **change})


def test_a_head_missing_though_its_loss_was_on_is_refused():
    args = original_args("T,H|W", True, True)
    with pytest.raises(UsageError, match=r"lacks mlm_head\.\* \(--mlm-weight 1\.0\)"):
        convert_state(original_state(args), {**args, "mlm_weight": 1.0})  # a truncated file, or a lost cls_fc
    without_projection = {k: v for k, v in original_state(args).items() if not k.startswith("cls_head.")}
    with pytest.raises(UsageError, match=r"lacks cls_head\.\* \(--nce-weight 1\.0\)"):
        convert_state(without_projection, args)
    assert convert_state(without_projection, {**args, "nce_weight": 0, "nce_bn_after_proj": False}).heads == []


def test_an_integer_tensor_where_the_model_has_floats_is_refused():
    args = original_args("T,H|W", True, True)
    state = original_state(args)
    state["backbone.ln_post.weight"] = state["backbone.ln_post.weight"].long()
    with pytest.raises(UsageError, match=r"shapes or dtypes differ .*final_norm\.weight: \(128,\) torch\.int64"):
        convert_state(state, args)


def test_drop_projection_head_leaves_the_option_out():
    args = original_args("T,H|W", True, True)
    converted = convert_state(original_state(args), args, drop_projection_head=True)
    assert not converted.config.nce_bn_after_proj and converted.config.pre_ln_original
    assert converted.heads == []
