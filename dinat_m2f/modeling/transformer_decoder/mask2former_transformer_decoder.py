"""Mask2Former's transformer decoder: masked cross-attention over a round-robin of 3 feature levels.

Per layer: masked cross-attention (queries attend only where the previous layer's mask prediction is >= 0.5),
self-attention, FFN. Predictions (class logits and masks) are made before the first layer and after each layer,
and all but the last feed deep supervision. Parameter names match the official implementation.
"""

from __future__ import annotations

import fvcore.nn.weight_init as weight_init
import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.layers import Conv2d
from detectron2.utils.registry import Registry
from torch import nn

from dinat_m2f.modeling.linear import Linear
from dinat_m2f.modeling.transformer_decoder.position_encoding import PositionEmbeddingSine

TRANSFORMER_DECODER_REGISTRY = Registry("TRANSFORMER_MODULE")
TRANSFORMER_DECODER_REGISTRY.__doc__ = """
Registry for transformer modules in MaskFormer: called with (cfg, in_channels, mask_classification).
"""


def build_transformer_decoder(cfg, in_channels: int, mask_classification: bool = True) -> nn.Module:
    """Build the transformer decoder named by ``cfg.MODEL.MASK_FORMER.TRANSFORMER_DECODER_NAME``."""
    name = cfg.MODEL.MASK_FORMER.TRANSFORMER_DECODER_NAME
    return TRANSFORMER_DECODER_REGISTRY.get(name)(cfg, in_channels, mask_classification)


def _with_pos_embed(tensor: torch.Tensor, pos: torch.Tensor | None) -> torch.Tensor:
    return tensor if pos is None else tensor + pos


def _xavier_init(module: nn.Module) -> None:
    for p in module.parameters():
        if p.dim() > 1:
            nn.init.xavier_uniform_(p)


class _AttentionLayer(nn.Module):
    """Multi-head attention, dropout, residual and LayerNorm: post-norm, or pre-norm with ``normalize_before``."""

    attn_name: str  # the attention's attribute, named as in Mask2Former's checkpoints

    def __init__(self, d_model: int, nhead: int, dropout: float = 0.0, normalize_before: bool = False):
        super().__init__()
        # Attention first: the parameter order (and so optimizer state and checkpoints) stays Mask2Former's.
        setattr(self, self.attn_name, nn.MultiheadAttention(d_model, nhead, dropout=dropout))
        self.norm = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)
        self.normalize_before = normalize_before
        _xavier_init(self)

    def _add_residual(self, tgt: torch.Tensor, tgt2: torch.Tensor) -> torch.Tensor:
        if self.normalize_before:
            return tgt + self.dropout(tgt2)
        return self.norm(tgt + self.dropout(tgt2))


class SelfAttentionLayer(_AttentionLayer):
    attn_name = "self_attn"

    def forward(
        self,
        tgt: torch.Tensor,
        tgt_mask: torch.Tensor | None = None,
        tgt_key_padding_mask: torch.Tensor | None = None,
        query_pos: torch.Tensor | None = None,
    ) -> torch.Tensor:
        value = self.norm(tgt) if self.normalize_before else tgt
        q = k = _with_pos_embed(value, query_pos)
        tgt2 = self.self_attn(
            q,
            k,
            value=value,
            attn_mask=tgt_mask,
            key_padding_mask=tgt_key_padding_mask,
            average_attn_weights=False,  # the weights are not read: no mean over heads
        )[0]
        return self._add_residual(tgt, tgt2)


class CrossAttentionLayer(_AttentionLayer):
    attn_name = "multihead_attn"

    def forward(
        self,
        tgt: torch.Tensor,
        memory: torch.Tensor,
        memory_mask: torch.Tensor | None = None,
        memory_key_padding_mask: torch.Tensor | None = None,
        pos: torch.Tensor | None = None,
        query_pos: torch.Tensor | None = None,
    ) -> torch.Tensor:
        query = self.norm(tgt) if self.normalize_before else tgt
        tgt2 = self.multihead_attn(
            query=_with_pos_embed(query, query_pos),
            key=_with_pos_embed(memory, pos),
            value=memory,
            attn_mask=memory_mask,
            key_padding_mask=memory_key_padding_mask,
            average_attn_weights=False,  # the weights are not read: no mean over heads
        )[0]
        return self._add_residual(tgt, tgt2)


class FFNLayer(nn.Module):
    def __init__(self, d_model: int, dim_feedforward: int = 2048, dropout: float = 0.0, normalize_before: bool = False):
        super().__init__()
        self.linear1 = Linear(d_model, dim_feedforward)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = Linear(dim_feedforward, d_model)
        self.norm = nn.LayerNorm(d_model)
        self.normalize_before = normalize_before
        _xavier_init(self)

    def forward(self, tgt: torch.Tensor) -> torch.Tensor:
        x = self.norm(tgt) if self.normalize_before else tgt
        # in place without autograd only: linear1's output is a fresh tensor (with autograd, an in-place op on it
        # may add a CopySlices node to the backward)
        h = self.linear1(x)
        tgt2 = self.linear2(self.dropout(F.relu(h, inplace=not h.requires_grad)))
        if self.normalize_before:
            return tgt + self.dropout(tgt2)
        return self.norm(tgt + self.dropout(tgt2))


class MLP(nn.Module):
    """A few fully connected layers with ReLU between them (the mask embedding head)."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int):
        super().__init__()
        dims_in = [input_dim] + [hidden_dim] * (num_layers - 1)
        dims_out = [hidden_dim] * (num_layers - 1) + [output_dim]
        self.layers = nn.ModuleList(Linear(n, k) for n, k in zip(dims_in, dims_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = F.relu(x, inplace=not x.requires_grad)  # the linear's fresh output; in place without autograd
        return x


@TRANSFORMER_DECODER_REGISTRY.register()
class MultiScaleMaskedTransformerDecoder(nn.Module):
    _version = 2

    @configurable
    def __init__(
        self,
        in_channels: int,
        mask_classification: bool = True,
        *,
        num_classes: int,
        hidden_dim: int,
        num_queries: int,
        nheads: int,
        dim_feedforward: int,
        dec_layers: int,
        pre_norm: bool,
        mask_dim: int,
        enforce_input_project: bool,
    ):
        """
        Args:
            in_channels: channels of the multi-scale features.
            mask_classification: predict class logits (always True for Mask2Former).
            num_classes: classes, without the no-object class.
            dec_layers: transformer layers (the config's DEC_LAYERS minus one: the first prediction has none).
        """
        super().__init__()
        if not mask_classification:
            raise ValueError("MultiScaleMaskedTransformerDecoder only supports mask classification")
        self.mask_classification = mask_classification
        self.pe_layer = PositionEmbeddingSine(hidden_dim // 2, normalize=True)
        self.num_heads = nheads
        self.num_layers = dec_layers
        self.transformer_self_attention_layers = nn.ModuleList()
        self.transformer_cross_attention_layers = nn.ModuleList()
        self.transformer_ffn_layers = nn.ModuleList()
        for _ in range(self.num_layers):
            self.transformer_self_attention_layers.append(
                SelfAttentionLayer(hidden_dim, nheads, dropout=0.0, normalize_before=pre_norm)
            )
            self.transformer_cross_attention_layers.append(
                CrossAttentionLayer(hidden_dim, nheads, dropout=0.0, normalize_before=pre_norm)
            )
            self.transformer_ffn_layers.append(
                FFNLayer(hidden_dim, dim_feedforward=dim_feedforward, dropout=0.0, normalize_before=pre_norm)
            )
        self.decoder_norm = nn.LayerNorm(hidden_dim)

        self.num_queries = num_queries
        self.query_feat = nn.Embedding(num_queries, hidden_dim)  # learnable query features
        self.query_embed = nn.Embedding(num_queries, hidden_dim)  # learnable query positional embedding

        self.num_feature_levels = 3  # always 3 scales: 1/32, 1/16, 1/8
        self.level_embed = nn.Embedding(self.num_feature_levels, hidden_dim)
        self.input_proj = nn.ModuleList()
        for _ in range(self.num_feature_levels):
            if in_channels != hidden_dim or enforce_input_project:
                self.input_proj.append(Conv2d(in_channels, hidden_dim, kernel_size=1))
                weight_init.c2_xavier_fill(self.input_proj[-1])
            else:
                self.input_proj.append(nn.Sequential())

        self.class_embed = Linear(hidden_dim, num_classes + 1)
        self.mask_embed = MLP(hidden_dim, hidden_dim, mask_dim, 3)

    @classmethod
    def from_config(cls, cfg, in_channels: int, mask_classification: bool) -> dict:
        if cfg.MODEL.MASK_FORMER.DEC_LAYERS < 1:
            raise ValueError(f"MODEL.MASK_FORMER.DEC_LAYERS must be >= 1, got {cfg.MODEL.MASK_FORMER.DEC_LAYERS}")
        return {
            "in_channels": in_channels,
            "mask_classification": mask_classification,
            "num_classes": cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES,
            "hidden_dim": cfg.MODEL.MASK_FORMER.HIDDEN_DIM,
            "num_queries": cfg.MODEL.MASK_FORMER.NUM_OBJECT_QUERIES,
            "nheads": cfg.MODEL.MASK_FORMER.NHEADS,
            "dim_feedforward": cfg.MODEL.MASK_FORMER.DIM_FEEDFORWARD,
            # the learnable queries make one prediction before any layer, so DEC_LAYERS - 1 layers
            "dec_layers": cfg.MODEL.MASK_FORMER.DEC_LAYERS - 1,
            "pre_norm": cfg.MODEL.MASK_FORMER.PRE_NORM,
            "enforce_input_project": cfg.MODEL.MASK_FORMER.ENFORCE_INPUT_PROJ,
            "mask_dim": cfg.MODEL.SEM_SEG_HEAD.MASK_DIM,
        }

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errs):
        # checkpoints of early versions called the query features "static_query"
        version = local_metadata.get("version", None)
        if version is None or version < 2:
            for k in list(state_dict.keys()):
                if k.startswith(prefix) and "static_query" in k:
                    state_dict[k.replace("static_query", "query_feat")] = state_dict.pop(k)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errs)

    def forward(
        self,
        x: list[torch.Tensor],
        mask_features: torch.Tensor,
        mask: torch.Tensor | None = None,
        *,
        aux_outputs: bool = True,
    ) -> dict:
        """Class logits and mask logits of the last layer, and with ``aux_outputs`` those of the learnable queries
        and of every layer but the last ("aux_outputs", for deep supervision). Without ``aux_outputs`` (inference)
        the intermediate predictions only make the next layer's attention mask (``predict_attn_mask``: the same
        mask, computed at the pixels its resize reads)."""
        if len(x) != self.num_feature_levels:
            raise ValueError(f"expected {self.num_feature_levels} multi-scale features, got {len(x)}")
        del mask  # padding masks do not affect the results (as in the official implementation)
        src, pos, size_list = [], [], []
        for i in range(self.num_feature_levels):
            size_list.append(x[i].shape[-2:])
            # [B, C, H, W] -> [HW, B, C] (sequence first, as nn.MultiheadAttention expects)
            pos.append(self.pe_layer(x[i], None).flatten(2).permute(2, 0, 1))
            level = self.input_proj[i](x[i]).flatten(2) + self.level_embed.weight[i][None, :, None]
            src.append(level.permute(2, 0, 1))

        bs = src[0].shape[1]
        query_embed = self.query_embed.weight.unsqueeze(1).repeat(1, bs, 1)
        output = self.query_feat.weight.unsqueeze(1).repeat(1, bs, 1)

        predictions_class, predictions_mask = [], []
        features_at_taps: dict[tuple[int, int], torch.Tensor] = {}  # mask features at each level's resize taps
        attn_mask = None  # made by each prediction for the layer after it
        for i in range(self.num_layers + 1):  # prediction i is made after i layers (0: the learnable queries)
            if i > 0:
                level_index = (i - 1) % self.num_feature_levels
                output = self.transformer_cross_attention_layers[i - 1](
                    output,
                    src[level_index],
                    memory_mask=self.heads_attn_mask(attn_mask),
                    pos=pos[level_index],
                    query_pos=query_embed,
                )
                output = self.transformer_self_attention_layers[i - 1](output, query_pos=query_embed)
                output = self.transformer_ffn_layers[i - 1](output)
            # the last prediction needs no attention mask: no layer follows it
            target_size = size_list[i % self.num_feature_levels] if i < self.num_layers else None
            if aux_outputs or i == self.num_layers:
                outputs_class, outputs_mask, attn_mask = self.forward_prediction_heads(
                    output, mask_features, target_size
                )
                predictions_class.append(outputs_class)
                predictions_mask.append(outputs_mask)
            else:
                size = tuple(target_size)
                if size not in features_at_taps:
                    features_at_taps[size] = features_at_resize_taps(mask_features, size)
                attn_mask = self.predict_attn_mask(output, features_at_taps[size], size)

        out = {"pred_logits": predictions_class[-1], "pred_masks": predictions_mask[-1]}
        if aux_outputs:
            out["aux_outputs"] = [
                {"pred_logits": c, "pred_masks": m} for c, m in zip(predictions_class[:-1], predictions_mask[:-1])
            ]
        return out

    def heads_attn_mask(self, attn_mask: torch.Tensor) -> torch.Tensor:
        """The cross-attention mask [B*heads, Q, h*w] (True = blocked) from the per-image one [B, Q, h*w]; for one
        image its rows [Q, h*w], which nn.MultiheadAttention broadcasts over the heads itself (the same additive
        mask, so the same results, without repeating the mask and converting it to floats once per head).

        A query whose mask blocks every position attends everywhere (no row of -inf in the softmax): a dense
        formulation without data-dependent indexing, so that the decoder exports to ONNX / torch.export. Decided
        once per image, then repeated for the heads (the official code repeats first; the rows are the same).
        """
        attn_mask = attn_mask & ~attn_mask.all(-1, keepdim=True)
        if attn_mask.shape[0] == 1:
            return attn_mask[0]
        return attn_mask.unsqueeze(1).repeat(1, self.num_heads, 1, 1).flatten(0, 1)

    def forward_prediction_heads(
        self, output: torch.Tensor, mask_features: torch.Tensor, attn_mask_target_size
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Class logits [B, Q, K+1], mask logits [B, Q, H/4, W/4] and the boolean attention mask [B, Q, h*w]
        (True = blocked, not yet repeated for the heads) for the next layer's level of size
        ``attn_mask_target_size`` (None: no mask)."""
        decoder_output = self.decoder_norm(output).transpose(0, 1)
        outputs_class = self.class_embed(decoder_output)
        mask_embed = self.mask_embed(decoder_output)
        if self.training:
            outputs_mask = training_mask_logits(mask_embed, mask_features)
        else:
            outputs_mask = torch.einsum("bqc,bchw->bqhw", mask_embed, mask_features)
        if attn_mask_target_size is None:
            return outputs_class, outputs_mask, None
        return outputs_class, outputs_mask, attn_mask_from_logits(outputs_mask, attn_mask_target_size)

    def predict_attn_mask(
        self, output: torch.Tensor, features_at_taps: torch.Tensor, attn_mask_target_size: tuple[int, int]
    ) -> torch.Tensor:
        """``forward_prediction_heads``' attention mask alone, bit for bit, from ``features_at_resize_taps``: the
        mask logits only at the pixels the resize reads, and pixels-major ([B, h, w, Q] memory, a channels_last
        view), which the CPU resize reads as is (a [B, Q, H, W] input it first copies to that layout). The product
        is the einsum's with the operands swapped and transposed, the same BLAS problem."""
        mask_embed = self.mask_embed(self.decoder_norm(output).transpose(0, 1))
        b, _, h, w = features_at_taps.shape
        logits = torch.bmm(features_at_taps.flatten(2).transpose(1, 2), mask_embed.transpose(1, 2))
        return attn_mask_from_logits(logits.view(b, h, w, -1).permute(0, 3, 1, 2), attn_mask_target_size)


class _MaskLogits(torch.autograd.Function):
    """``torch.einsum("bqc,bchw->bqhw", mask_embed, mask_features)`` as the einsum runs it (one bmm), with the bmm
    backward autograd would run, except that the gradient of the mask features leaves out the queries whose mask
    logits get no gradient. In training only the queries matched to a target reach the losses (a few of the 100:
    the rest of the incoming gradient is exact zeros), so in float32 on the CPU the [C, Q] x [Q, H*W] product
    shrinks to the matched queries: the same products summed in the same order, the zero terms left out (tests
    compare bit for bit, and tools/benchmark_mask2former.py --baseline compares a whole step's weights)."""

    @staticmethod
    def forward(ctx, mask_embed: torch.Tensor, mask_features: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(mask_embed, mask_features)
        b, _, h, w = mask_features.shape
        return torch.bmm(mask_embed, mask_features.flatten(2)).view(b, -1, h, w)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        mask_embed, mask_features = ctx.saved_tensors
        features, grad = mask_features.flatten(2), grad.flatten(2)
        grad_embed = grad_features = None
        if ctx.needs_input_grad[0]:
            grad_embed = torch.bmm(grad, features.transpose(1, 2))
        if ctx.needs_input_grad[1]:
            grad_features = _features_grad_of_queries_with_grad(mask_embed, grad).view_as(mask_features)
        return grad_embed, grad_features


def _features_grad_of_queries_with_grad(mask_embed: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """``bmm(mask_embed^T, grad)`` ([B, C, Q] x [B, Q, P]) over only the queries whose grad row is not all zeros."""
    if grad.device.type != "cpu" or grad.dtype not in (torch.float32, torch.float64):
        # a GPU would sync to find the queries, for a product it does fast anyway. In bfloat16 (AMP) the shorter
        # product did not keep the bits: a whole training step's weights differed from the einsum's (the bf16
        # GEMM kernels do not sum one term after another as float32's do)
        return torch.bmm(mask_embed.transpose(1, 2), grad)
    with_grad = grad.any(-1)  # [B, Q]: a row with a nonzero (NaN included), in one pass (ne(0).any took two)
    if bool(with_grad.all()):
        return torch.bmm(mask_embed.transpose(1, 2), grad)
    out = grad.new_empty(grad.shape[0], mask_embed.shape[2], grad.shape[2])
    for b in range(grad.shape[0]):
        queries = with_grad[b].nonzero().squeeze(1)
        if queries.numel() == 0:
            out[b].zero_()
        else:
            torch.mm(mask_embed[b, queries].t(), grad[b, queries], out=out[b])
    return out


def training_mask_logits(mask_embed: torch.Tensor, mask_features: torch.Tensor) -> torch.Tensor:
    """Mask logits [B, Q, H, W] = ``einsum("bqc,bchw->bqhw")`` of the mask embeddings [B, Q, C] and the mask
    features [B, C, H, W], in training: under autocast cast as autocast casts the einsum's inputs, then
    ``_MaskLogits``, whose backward skips the queries that reach no loss."""
    device_type = mask_features.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        mask_embed, mask_features = mask_embed.to(dtype), mask_features.to(dtype)
    with torch.autocast(device_type, enabled=False):
        return _MaskLogits.apply(mask_embed, mask_features)


def attn_mask_from_logits(mask_logits: torch.Tensor, size) -> torch.Tensor:
    """The boolean attention mask [B, Q, h*w] (True = blocked: mask probability < 0.5) of mask logits
    [B, Q, H, W] resized bilinearly to ``size`` (h, w)."""
    attn_mask = F.interpolate(mask_logits, size=size, mode="bilinear", align_corners=False)
    return (attn_mask.sigmoid() < 0.5).flatten(2).detach()


def resize_taps(in_size: int, out_size: int) -> torch.Tensor | None:
    """The input rows a bilinear resize (align_corners=False) from ``in_size`` to ``out_size`` reads, as a factor-2
    resize of the gathered rows reads them with the same weights; None when that is not so (all rows are needed).

    Shrinking by an even factor f samples output row i at f*i + f/2 - 1/2: rows f*i + f/2 - 1 and f*i + f/2, weight
    1/2 each. A factor-2 resize of those 2*out_size rows samples output i at 2*i + 1/2: the same rows and weights.
    (f = 2 reads every row; other factors weigh the rows differently.)
    """
    factor = in_size // out_size
    if in_size != factor * out_size or factor < 4 or factor % 2:
        return None
    first = torch.arange(out_size) * factor + (factor // 2 - 1)
    return torch.stack((first, first + 1), 1).flatten()


def features_at_resize_taps(mask_features: torch.Tensor, size) -> torch.Tensor:
    """``mask_features`` [B, C, H, W] at the rows and columns a bilinear resize to ``size`` (h, w) reads: mask
    logits computed from these and resized to ``size`` equal those of all pixels resized (``resize_taps``).

    Gathered in [B, H, W, C] order (a view of the channels_last maps the pixel decoder makes), so each tap copies a
    whole row, then a C-long run: on the [B, C, H, W] view the gather went element by element, 10x slower (9.8 vs 0.9
    ms at 256x128x128 to 32x32, 2 threads). Returns a [B, C, h', w'] view of channels_last memory."""
    features = mask_features.permute(0, 2, 3, 1)
    for dim, out_size in ((1, int(size[0])), (2, int(size[1]))):
        taps = resize_taps(features.shape[dim], out_size)
        if taps is not None:
            features = features.index_select(dim, taps.to(features.device))
    return features.permute(0, 3, 1, 2)
