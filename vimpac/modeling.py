"""The VIMPAC model: token + positional embeddings, layout blocks of axial attention with CLS, MLP, and heads.

Built from a VimpacConfig alone (docs/design.md §6). The hidden state is one tensor [B, 1 + T·h·w, D] with the CLS
stream at position 0, so every Linear, LayerNorm and dropout treats CLS exactly like a token (docs/reference.md
§4.3–4.4) in a single matmul. Only the attention tells them apart: it goes through `vimpac.kernels.axial_attention` for
the axial patterns T, H, W and `joint_attention` (SDPA) for joint patterns such as HW or THW.

Parameter counts (paper Table 3; docs/reference.md §4.7) with special_ids="original" (8197 embedding rows), T=5, 16×16,
hw_separation, excluding heads: small (6 × 512) 29,442,048; base (12 × 768) 119,748,096; large-half (24 × 1024,
halve_att, halve_mlp) 210,106,368; T,H,W small 35,751,936; joint THW small 23,132,160. The "compact"
special ids drop the 3 unused rows: the backbone has 3·D fewer parameters (small 29,440,512; large-half
210,103,296) and the MLM head's output bias 3 fewer. Divided "T,HW" has the same count as "T,H|W" here
(29,442,048 for small), not the paper's unexplained 27.1M.

`layers` is an nn.ModuleList of self-contained VimpacLayer blocks, `layer(x, key_padding_mask) -> x`, so a
trainer can wrap each one for activation checkpointing.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from vimpac.config import VimpacConfig
from vimpac.kernels import axial_attention
from vimpac.kernels.axial_attention_reference import joint_attention
from vimpac.sync_batchnorm import DistributedBatchNorm1d

IGNORE_INDEX = -100


class PositionalEmbedding(nn.Module):
    """Learned positions for CLS and the T·h·w tokens; forward() → [1 + T·h·w, D], CLS first (docs/reference.md §4.2).

    hw_separation: P_T[t] + P_H[i] + P_W[j] (tables std 0.02/√3); temporal_separation: P_T[t] + P_S[i·w + j]
    (std 0.02/√2); full: one (1 + T·h·w, D) table (std 0.02). CLS has its own vector (std 0.02) in every kind.
    """

    def __init__(self, config: VimpacConfig) -> None:
        super().__init__()
        self.kind = config.pos_emb
        self.shape = config.shape
        self.std = config.initializer_range
        t, h, w = config.shape
        d = config.hidden_size
        if self.kind == "full":
            self.table = nn.Parameter(torch.empty(1 + t * h * w, d))
            return
        self.cls = nn.Parameter(torch.empty(1, d))
        self.temporal = nn.Parameter(torch.empty(t, d))
        if self.kind == "temporal_separation":
            self.spatial = nn.Parameter(torch.empty(h * w, d))
        else:
            self.height = nn.Parameter(torch.empty(h, d))
            self.width = nn.Parameter(torch.empty(w, d))

    def reset_parameters(self) -> None:
        if self.kind == "full":
            nn.init.normal_(self.table, std=self.std)
            return
        nn.init.normal_(self.cls, std=self.std)
        if self.kind == "temporal_separation":
            factors = [self.temporal, self.spatial]
        else:
            factors = [self.temporal, self.height, self.width]
        # The summed position then has std 0.02, like one full table.
        for table in factors:
            nn.init.normal_(table, std=self.std / math.sqrt(len(factors)))

    def forward(self) -> torch.Tensor:
        if self.kind == "full":
            return self.table
        t, h, w = self.shape
        if self.kind == "temporal_separation":
            tokens = self.temporal[:, None, :] + self.spatial[None, :, :]
        else:
            tokens = self.temporal[:, None, None, :] + self.height[None, :, None, :] + self.width[None, None, :, :]
        return torch.cat([self.cls, tokens.reshape(t * h * w, -1)], dim=0)


class AttentionBlock(nn.Module):
    """One `,`-separated layout block: its `|` patterns run in parallel on one fused QKV projection.

    Pattern i takes heads [i·heads/P, (i+1)·heads/P) of Q, K, V (so attention_width/P channels); the outputs are
    concatenated, projected back to D, dropped out and added to the input. Post-LN: LN(x + drop(W·att(x)));
    pre-LN: x + drop(W·att(LN(x))); the original's pre-LN (pre_ln_original): LN(x) + drop(W·att(LN(x))), the
    residual taken after the norm (docs/reference.md §4.5). x: [B, 1 + T·h·w, D] (CLS first) → same shape.
    """

    def __init__(self, config: VimpacConfig, patterns: tuple[str, ...]) -> None:
        super().__init__()
        self.patterns = patterns
        self.shape = config.shape
        self.heads = config.num_heads
        self.head_dim = config.head_dim
        self.pre_ln = config.pre_ln
        self.residual_after_norm = config.pre_ln_original
        self.attention_dropout = config.dropout
        width = config.attention_width
        self.qkv = nn.Linear(config.hidden_size, 3 * width)
        self.out = nn.Linear(width, config.hidden_size)
        self.dropout = nn.Dropout(config.dropout)
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def attend(self, x: torch.Tensor, key_padding_mask: torch.Tensor | None) -> torch.Tensor:
        """Multi-pattern attention without the output projection: [B, 1 + N, D] → [B, 1 + N, attention_width]."""
        batch = x.shape[0]
        t, h, w = self.shape
        qkv = self.qkv(x)  # [B, 1 + N, (q|k|v) · heads · d]
        dropout_p = self.attention_dropout if self.training else 0.0
        patterns = len(self.patterns)
        per = self.heads // patterns
        # Views only, cut by split and unbind: [B, T, h, w, per, d] per token piece, [B, per, d] per CLS piece.
        # Their backward is one cat (rows) and one stack (pieces), where indexing (qkv[:, 0], [..., 0, hs, :]) made
        # every piece's backward allocate and zero-fill a gradient of qkv's full size, then sum them (a third of
        # this block's CPU time at the demo's size). The view comes before the unbind so that the backward
        # stacks the attention's strided gradients in one pass instead of first copying each to a contiguous one.
        # Piece s·P + i is q (s=0), k (1) or v (2) of pattern i, i.e. heads [i·per, (i+1)·per).
        cls_rows, token_rows = qkv.split([1, t * h * w], dim=1)
        cls_pieces = cls_rows.view(batch, 3 * patterns, per, self.head_dim).unbind(1)
        token_pieces = token_rows.view(batch, t, h, w, 3 * patterns, per, self.head_dim).unbind(4)
        outs, cls_outs = [], []
        for i, pattern in enumerate(self.patterns):
            picks = (i, patterns + i, 2 * patterns + i)
            args = tuple(token_pieces[j] for j in picks) + tuple(cls_pieces[j] for j in picks)
            attention = axial_attention if len(pattern) == 1 else joint_attention
            out, cls_out = attention(*args, pattern, key_padding_mask=key_padding_mask, dropout_p=dropout_p)
            outs.append(out)
            cls_outs.append(cls_out)
        # One pattern: no cat of a single tensor (a copy); reshape gathers the strided view in one copy either way.
        token_out = (outs[0] if patterns == 1 else torch.cat(outs, dim=-2)).reshape(batch, t * h * w, -1)
        cls_out = (cls_outs[0] if patterns == 1 else torch.cat(cls_outs, dim=-2)).reshape(batch, 1, -1)
        return torch.cat([cls_out, token_out], dim=1)

    def forward(self, x: torch.Tensor, key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        inner = self.norm(x) if self.pre_ln else x
        y = self.dropout(self.out(self.attend(inner, key_padding_mask)))
        if not self.pre_ln:
            return self.norm(x + y)
        return (inner if self.residual_after_norm else x) + y


class MLPBlock(nn.Module):
    """Linear(D → mlp) → exact GELU → Linear(mlp → D) → dropout, residual, post- or pre-LN (docs/reference.md §4.3)."""

    def __init__(self, config: VimpacConfig) -> None:
        super().__init__()
        self.pre_ln = config.pre_ln
        self.fc = nn.Linear(config.hidden_size, config.mlp_width)
        self.act = nn.GELU()
        self.proj = nn.Linear(config.mlp_width, config.hidden_size)
        self.dropout = nn.Dropout(config.dropout)
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        inner = self.norm(x) if self.pre_ln else x
        y = self.dropout(self.proj(self.act(self.fc(inner))))
        return x + y if self.pre_ln else self.norm(x + y)


class VimpacLayer(nn.Module):
    """One transformer layer: the layout's attention blocks in sequence, then the MLP. [B, 1+N, D] → same."""

    def __init__(self, config: VimpacConfig) -> None:
        super().__init__()
        self.attention = nn.ModuleList(AttentionBlock(config, patterns) for patterns in config.blocks)
        self.mlp = MLPBlock(config)

    def forward(self, x: torch.Tensor, key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        for block in self.attention:
            x = block(x, key_padding_mask)
        return self.mlp(x)


class VimpacBackbone(nn.Module):
    """Embeddings + layers: forward(tokens [B, T, h, w] int64) → (cls [B, D], hiddens [B, T, h, w, D]).

    Input: post-LN h0 = dropout(LN(E[x] + pos)), CLS = dropout(LN(cls + pos_cls)) with the same LN; pre-LN (both
    kinds) drops that LN and adds a final one instead (docs/reference.md §4.5, §8.4). PAD tokens are never attended
    to as keys; when a batch has no PAD at all the mask is skipped (no padding work in the kernel). MASK tokens are
    attended to normally.
    """

    def __init__(self, config: VimpacConfig) -> None:
        super().__init__()
        config.validate()
        self.config = config
        d = config.hidden_size
        self.token_embedding = nn.Embedding(config.embedding_rows, d)
        self.cls = nn.Parameter(torch.empty(d))
        self.positional_embedding = PositionalEmbedding(config)
        self.input_norm = nn.Identity() if config.pre_ln else nn.LayerNorm(d, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.dropout)
        self.layers = nn.ModuleList(VimpacLayer(config) for _ in range(config.layers))
        self.final_norm = nn.LayerNorm(d, eps=config.layer_norm_eps) if config.pre_ln else nn.Identity()
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """N(0, 0.02) Linear/Embedding weights, zero biases, unit LN (docs/reference.md §4.8); pre-LN scales residual
        outputs."""
        std = self.config.initializer_range
        for module in self.modules():
            if isinstance(module, nn.Linear | nn.Embedding):
                nn.init.normal_(module.weight, std=std)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
            if isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        nn.init.normal_(self.cls, std=std)
        self.positional_embedding.reset_parameters()
        if self.config.pre_ln:
            # GPT-2 style: each residual branch's output projection shrinks by √(number of residual branches).
            branches = self.config.layers * (len(self.config.blocks) + 1)
            for layer in self.layers:
                for proj in [block.out for block in layer.attention] + [layer.mlp.proj]:
                    nn.init.normal_(proj.weight, std=std / math.sqrt(branches))

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [B, T, h, w] → input hidden state [B, 1 + T·h·w, D] (CLS first)."""
        batch = tokens.shape[0]
        x = self.token_embedding(tokens.flatten(1))
        x = torch.cat([self.cls.expand(batch, 1, -1), x], dim=1) + self.positional_embedding()
        return self.dropout(self.input_norm(x))

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if tokens.dim() != 4 or tuple(tokens.shape[1:]) != self.config.shape:
            raise ValueError(
                f"tokens must be [B, T, h, w] with (T, h, w) = {self.config.shape} (clip_len, grid); "
                f"got {tuple(tokens.shape)}"
            )
        pad = tokens == self.config.pad_id
        # Without PAD, dropping the mask lets SDPA take its fastest path; under torch.compile the check would be a
        # host sync and a graph break, so the (all-False) mask is kept there.
        key_padding_mask = pad if torch.compiler.is_compiling() or bool(pad.any()) else None
        x = self.embed(tokens)
        for layer in self.layers:
            x = layer(x, key_padding_mask)
        x = self.final_norm(x)
        return x[:, 0], x[:, 1:].unflatten(1, self.config.shape)


class MLMHead(nn.Module):
    """BERT token head tied to the input embedding: logits = LN(GELU(W·h + b)) · Eᵀ + b_out (docs/reference.md §4.6).

    forward(hidden [M, D], embedding_weight [rows, D]) → logits [M, rows]. Call it on the masked positions only:
    the original computed all 8197 logits at every position (docs/reference.md §8.7).
    """

    def __init__(self, config: VimpacConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.act = nn.GELU()
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.bias = nn.Parameter(torch.zeros(config.embedding_rows))
        nn.init.normal_(self.dense.weight, std=config.initializer_range)
        nn.init.zeros_(self.dense.bias)

    def forward(self, hidden: torch.Tensor, embedding_weight: torch.Tensor) -> torch.Tensor:
        return F.linear(self.norm(self.act(self.dense(hidden))), embedding_weight, self.bias)


class ContrastiveHead(nn.Module):
    """Projection for InfoNCE: (Linear → sync BN → ReLU) × (nce_proj_layers − 1), then Linear → nce_dim, no bias,
    and with nce_bn_after_proj a last sync BN (affine, like the hidden ones) on that output (SimCLR's, the original's
    --nce-bn-after-proj). `net` indices: hidden layer i at 3i, 3i+1, 3i+2; the last Linear at 3(L−1), its BN at
    3(L−1)+1 (L = nce_proj_layers).

    cls [B, D] → z [B, nce_dim] (not normalised; the loss normalises). BN statistics span all ranks (gloo too).
    """

    def __init__(self, config: VimpacConfig) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = config.hidden_size
        for _ in range(config.nce_proj_layers - 1):
            layers += [nn.Linear(width, config.nce_proj_hid_dim), DistributedBatchNorm1d(config.nce_proj_hid_dim)]
            layers.append(nn.ReLU())
            width = config.nce_proj_hid_dim
        layers.append(nn.Linear(width, config.nce_dim, bias=False))
        if config.nce_bn_after_proj:
            layers.append(DistributedBatchNorm1d(config.nce_dim))
        self.net = nn.Sequential(*layers)
        for module in self.net:
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=config.initializer_range)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def forward(self, cls: torch.Tensor) -> torch.Tensor:
        return self.net(cls)


class ClassifierHead(nn.Module):
    """Fine-tuning head: dropout then a zero-initialised Linear(D → classes) on CLS. [B, D] → [B, classes]."""

    def __init__(self, hidden_size: int, num_classes: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(hidden_size, num_classes)
        nn.init.zeros_(self.fc.weight)
        nn.init.zeros_(self.fc.bias)

    def forward(self, cls: torch.Tensor) -> torch.Tensor:
        return self.fc(self.dropout(cls))


class VimpacForPretraining(nn.Module):
    """Backbone + tied MLM head + contrastive head (either head can be left out: mlm=False / nce=False).

    forward(tokens [B, T, h, w] int64 (MASK/PAD already inserted), mlm_labels [B, T, h, w] int64 with -100 where
    nothing is predicted) → dict:
      "cls" [B, D]; "nce" [B, nce_dim] (if nce);
      "mlm_logits" [M, rows], "mlm_labels" [M], "mlm_positions" [M] (flat index b·T·h·w + token index) for the M
      predicted positions (if mlm and mlm_labels is given). M may be 0; the loss must handle that.
    """

    def __init__(self, config: VimpacConfig, mlm: bool = True, nce: bool = True) -> None:
        super().__init__()
        self.config = config
        self.backbone = VimpacBackbone(config)
        self.mlm_head = MLMHead(config) if mlm else None
        self.nce_head = ContrastiveHead(config) if nce else None

    def forward(self, tokens: torch.Tensor, mlm_labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        cls, hiddens = self.backbone(tokens)
        result = {"cls": cls}
        if self.mlm_head is not None and mlm_labels is not None:
            if mlm_labels.shape != tokens.shape:
                raise ValueError(f"mlm_labels must match tokens {tuple(tokens.shape)}; got {tuple(mlm_labels.shape)}")
            labels = mlm_labels.flatten(1)
            sample, index = (labels != IGNORE_INDEX).nonzero(as_tuple=True)
            # Gather before the head: logits only at the M predicted positions, never [B·N, rows].
            selected = hiddens.flatten(1, 3)[sample, index]
            result["mlm_logits"] = self.mlm_head(selected, self.backbone.token_embedding.weight)
            result["mlm_labels"] = labels[sample, index]
            result["mlm_positions"] = sample * labels.shape[1] + index
        if self.nce_head is not None:
            result["nce"] = self.nce_head(cls)
        return result


class VimpacForClassification(nn.Module):
    """Backbone + ClassifierHead for fine-tuning: forward(tokens [B, T, h, w]) → logits [B, num_classes]."""

    def __init__(self, config: VimpacConfig, num_classes: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.config = config
        self.backbone = VimpacBackbone(config)
        self.classifier = ClassifierHead(config.hidden_size, num_classes, dropout)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        cls, _ = self.backbone(tokens)
        return self.classifier(cls)


def count_parameters(module: nn.Module | None) -> int:
    """Number of distinct parameters (a tied tensor counts once)."""
    return 0 if module is None else sum(p.numel() for p in module.parameters())


def parameter_counts(config: VimpacConfig) -> dict[str, int]:
    """Parameter counts per part, computed on the meta device (no memory, no init time).

    Keys: token_embedding, positional_embedding, cls, norms (input/final LN), layers, backbone (their sum; paper
    Table 3's "Params"), mlm_head (tied embedding not counted again), contrastive_head, total.
    """
    with torch.device("meta"):
        model = VimpacForPretraining(config)
    backbone = model.backbone
    counts = {
        "token_embedding": count_parameters(backbone.token_embedding),
        "positional_embedding": count_parameters(backbone.positional_embedding),
        "cls": backbone.cls.numel(),
        "norms": count_parameters(backbone.input_norm) + count_parameters(backbone.final_norm),
        "layers": count_parameters(backbone.layers),
        "backbone": count_parameters(backbone),
        "mlm_head": count_parameters(model.mlm_head),
        "contrastive_head": count_parameters(model.nce_head),
    }
    counts["total"] = counts["backbone"] + counts["mlm_head"] + counts["contrastive_head"]
    return counts
