"""MSDeformAttnPixelDecoder: a deformable-attention encoder over res3..res5 plus an FPN level on res2.

Outputs of ``forward_features``: mask features (stride 4, MASK_DIM channels), the stride-32 encoder output, and
the 3 multi-scale maps (strides 32, 16, 8) that the transformer decoder attends to. In training it runs in float32
under autocast (as the official code does); at inference under autocast only the deformable sampling does.
Parameter names match the official implementation.
"""

from __future__ import annotations

import math

import fvcore.nn.weight_init as weight_init
import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.layers import Conv2d, ShapeSpec, get_norm
from detectron2.modeling import SEM_SEG_HEADS_REGISTRY
from torch import nn

from dinat_m2f.modeling.linear import Linear
from dinat_m2f.modeling.pixel_decoder.ms_deform_attn import MSDeformAttn
from dinat_m2f.modeling.transformer_decoder.position_encoding import PositionEmbeddingSine


def in_feature_shapes(cfg, input_shape: dict[str, ShapeSpec]) -> dict[str, ShapeSpec]:
    """The backbone outputs named by MODEL.SEM_SEG_HEAD.IN_FEATURES; a name the backbone lacks is a config error."""
    in_features = cfg.MODEL.SEM_SEG_HEAD.IN_FEATURES
    missing = [k for k in in_features if k not in input_shape]
    if missing:
        raise ValueError(
            f"MODEL.SEM_SEG_HEAD.IN_FEATURES names {missing}, which the backbone does not output "
            f"(it outputs {sorted(input_shape)})"
        )
    return {k: v for k, v in input_shape.items() if k in in_features}


def build_pixel_decoder(cfg, input_shape: dict[str, ShapeSpec]) -> nn.Module:
    """Build the pixel decoder named by ``cfg.MODEL.SEM_SEG_HEAD.PIXEL_DECODER_NAME``."""
    name = cfg.MODEL.SEM_SEG_HEAD.PIXEL_DECODER_NAME
    model = SEM_SEG_HEADS_REGISTRY.get(name)(cfg, input_shape)
    if not callable(getattr(model, "forward_features", None)):
        raise ValueError(f"pixel decoder {name} has no forward_features method, which MaskFormerHead needs")
    return model


class MSDeformAttnTransformerEncoderLayer(nn.Module):
    """Post-norm encoder layer: deformable self-attention, then FFN."""

    def __init__(
        self,
        d_model: int = 256,
        d_ffn: int = 1024,
        dropout: float = 0.1,
        n_levels: int = 4,
        n_heads: int = 8,
        n_points: int = 4,
    ):
        super().__init__()
        self.self_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.linear1 = Linear(d_model, d_ffn)
        self.dropout2 = nn.Dropout(dropout)
        self.linear2 = Linear(d_ffn, d_model)
        self.dropout3 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)

    def forward(self, src, pos, reference_points, spatial_shapes, level_start_index, padding_mask=None):
        src2 = self.self_attn(src + pos, reference_points, src, spatial_shapes, level_start_index, padding_mask)
        src = self.norm1(src + self.dropout1(src2))
        # ReLU in place without autograd only: linear1's output is a fresh tensor (with autograd, an in-place op on
        # it may add a CopySlices node to the backward)
        hidden = self.linear1(src)
        src2 = self.linear2(self.dropout2(F.relu(hidden, inplace=not hidden.requires_grad)))
        return self.norm2(src + self.dropout3(src2))


class MSDeformAttnTransformerEncoder(nn.Module):
    def __init__(self, layers: list[nn.Module]):
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.num_layers = len(layers)

    @staticmethod
    def get_reference_points(spatial_shapes: list[tuple[int, int]], num_levels: int, device) -> torch.Tensor:
        """Pixel centres of every level, normalised to [0, 1]: [1, S, levels, 2] (x, y). Without padding masks
        the valid ratios are 1, so every level sees the same normalised point."""
        points = []
        for h, w in spatial_shapes:
            # arange + 0.5 == linspace(0.5, n - 0.5, n) exactly, and keeps n symbolic under torch.export
            ref_y, ref_x = torch.meshgrid(
                (torch.arange(h, dtype=torch.float32, device=device) + 0.5) / h,
                (torch.arange(w, dtype=torch.float32, device=device) + 0.5) / w,
                indexing="ij",
            )
            points.append(torch.stack((ref_x.reshape(-1), ref_y.reshape(-1)), -1))
        return torch.cat(points, 0)[None, :, None].expand(1, -1, num_levels, 2)

    def forward(self, src, spatial_shapes, shapes_list, level_start_index, pos, padding_mask=None):
        reference_points = self.get_reference_points(shapes_list, len(shapes_list), src.device)
        reference_points = reference_points.expand(src.shape[0], -1, -1, -1)
        output = src
        for layer in self.layers:
            output = layer(output, pos, reference_points, spatial_shapes, level_start_index, padding_mask)
        return output


class MSDeformAttnTransformerEncoderOnly(nn.Module):
    def __init__(
        self,
        d_model: int = 256,
        nhead: int = 8,
        num_encoder_layers: int = 6,
        dim_feedforward: int = 1024,
        dropout: float = 0.1,
        num_feature_levels: int = 4,
        enc_n_points: int = 4,
    ):
        super().__init__()
        self.d_model = d_model
        self.nhead = nhead
        layers = [
            MSDeformAttnTransformerEncoderLayer(
                d_model, dim_feedforward, dropout, num_feature_levels, nhead, enc_n_points
            )
            for _ in range(num_encoder_layers)
        ]
        self.encoder = MSDeformAttnTransformerEncoder(layers)
        self.level_embed = nn.Parameter(torch.empty(num_feature_levels, d_model))
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        for m in self.modules():
            if isinstance(m, MSDeformAttn):
                m._reset_parameters()
        nn.init.normal_(self.level_embed)

    def forward(self, srcs: list[torch.Tensor], pos_embeds: list[torch.Tensor]):
        src_flatten, lvl_pos_embed_flatten, shapes_list = [], [], []
        for lvl, (src, pos_embed) in enumerate(zip(srcs, pos_embeds)):
            shapes_list.append((src.shape[2], src.shape[3]))
            src_flatten.append(src.flatten(2).transpose(1, 2))
            pos_embed = pos_embed.flatten(2).transpose(1, 2)
            lvl_pos_embed_flatten.append(pos_embed + self.level_embed[lvl].view(1, 1, -1))
        src_flatten = torch.cat(src_flatten, 1)
        lvl_pos_embed_flatten = torch.cat(lvl_pos_embed_flatten, 1)
        # scalar_tensor, not as_tensor: torch.export keeps the sizes symbolic (as_tensor would bake them in).
        # On the CPU whatever the device of the features: the deformable-attention op checks the level sizes on the
        # host, and device copies of them would make every call wait for the GPU to read them back.
        spatial_shapes = torch.stack(
            [torch.stack([torch.scalar_tensor(s, dtype=torch.long) for s in hw]) for hw in shapes_list]
        )
        level_start_index = torch.cat((spatial_shapes.new_zeros((1,)), spatial_shapes.prod(1).cumsum(0)[:-1]))
        memory = self.encoder(src_flatten, spatial_shapes, shapes_list, level_start_index, lvl_pos_embed_flatten)
        return memory, shapes_list, level_start_index


@SEM_SEG_HEADS_REGISTRY.register()
class MSDeformAttnPixelDecoder(nn.Module):
    @configurable
    def __init__(
        self,
        input_shape: dict[str, ShapeSpec],
        *,
        transformer_dropout: float,
        transformer_nheads: int,
        transformer_dim_feedforward: int,
        transformer_enc_layers: int,
        conv_dim: int,
        mask_dim: int,
        norm: str | None = None,
        transformer_in_features: list[str],
        common_stride: int,
    ):
        """
        Args:
            input_shape: shapes of the input features (channels and stride), e.g. res2..res5.
            transformer_*: deformable encoder settings (the official configs use dropout 0, 8 heads, FFN 1024).
            conv_dim: channels of the encoder and FPN convs; mask_dim: channels of the mask features.
            norm: normalization of the FPN convs ("GN").
            transformer_in_features: the features the deformable encoder runs on (res3..res5).
            common_stride: stride of the mask features (4).
        """
        super().__init__()
        missing = [f for f in transformer_in_features if f not in input_shape]
        if missing:
            raise ValueError(
                f"MSDeformAttnPixelDecoder: transformer input features {missing} are not among the backbone "
                f"outputs {sorted(input_shape)} (check MODEL.SEM_SEG_HEAD.IN_FEATURES)"
            )
        transformer_input_shape = {k: v for k, v in input_shape.items() if k in transformer_in_features}
        input_shape = sorted(input_shape.items(), key=lambda x: x[1].stride)
        self.in_features = [k for k, _ in input_shape]  # from high to low resolution
        self.feature_strides = [v.stride for _, v in input_shape]
        self.feature_channels = [v.channels for _, v in input_shape]

        transformer_input_shape = sorted(transformer_input_shape.items(), key=lambda x: x[1].stride)
        self.transformer_in_features = [k for k, _ in transformer_input_shape]
        transformer_in_channels = [v.channels for _, v in transformer_input_shape]
        self.transformer_feature_strides = [v.stride for _, v in transformer_input_shape]

        self.transformer_num_feature_levels = len(self.transformer_in_features)
        # from low to high resolution (res5 -> res3), the order in which the encoder sees the levels
        self.input_proj = nn.ModuleList(
            nn.Sequential(nn.Conv2d(in_channels, conv_dim, kernel_size=1), nn.GroupNorm(32, conv_dim))
            for in_channels in transformer_in_channels[::-1]
        )
        for proj in self.input_proj:
            nn.init.xavier_uniform_(proj[0].weight, gain=1)
            nn.init.constant_(proj[0].bias, 0)

        self.transformer = MSDeformAttnTransformerEncoderOnly(
            d_model=conv_dim,
            dropout=transformer_dropout,
            nhead=transformer_nheads,
            dim_feedforward=transformer_dim_feedforward,
            num_encoder_layers=transformer_enc_layers,
            num_feature_levels=self.transformer_num_feature_levels,
        )
        self.pe_layer = PositionEmbeddingSine(conv_dim // 2, normalize=True)

        self.mask_dim = mask_dim
        self.mask_features = Conv2d(conv_dim, mask_dim, kernel_size=1, stride=1, padding=0)
        weight_init.c2_xavier_fill(self.mask_features)

        self.maskformer_num_feature_levels = 3  # always use 3 scales
        self.common_stride = common_stride
        # extra FPN levels between the smallest transformer stride and the common stride (1: res2)
        stride = min(self.transformer_feature_strides)
        self.num_fpn_levels = max(0, round(math.log2(stride / self.common_stride)))

        lateral_convs, output_convs = [], []
        use_bias = norm == ""
        for idx, in_channels in enumerate(self.feature_channels[: self.num_fpn_levels]):
            lateral_conv = Conv2d(in_channels, conv_dim, kernel_size=1, bias=use_bias, norm=get_norm(norm, conv_dim))
            output_conv = Conv2d(
                conv_dim,
                conv_dim,
                kernel_size=3,
                stride=1,
                padding=1,
                bias=use_bias,
                norm=get_norm(norm, conv_dim),
                activation=F.relu,
            )
            weight_init.c2_xavier_fill(lateral_conv)
            weight_init.c2_xavier_fill(output_conv)
            self.add_module(f"adapter_{idx + 1}", lateral_conv)
            self.add_module(f"layer_{idx + 1}", output_conv)
            lateral_convs.append(lateral_conv)
            output_convs.append(output_conv)
        # from low to high resolution (plain lists: the modules are registered by name above)
        self.lateral_convs = lateral_convs[::-1]
        self.output_convs = output_convs[::-1]

    @classmethod
    def from_config(cls, cfg, input_shape: dict[str, ShapeSpec]) -> dict:
        return {
            "input_shape": in_feature_shapes(cfg, input_shape),
            "conv_dim": cfg.MODEL.SEM_SEG_HEAD.CONVS_DIM,
            "mask_dim": cfg.MODEL.SEM_SEG_HEAD.MASK_DIM,
            "norm": cfg.MODEL.SEM_SEG_HEAD.NORM,
            "transformer_dropout": cfg.MODEL.MASK_FORMER.DROPOUT,
            "transformer_nheads": cfg.MODEL.MASK_FORMER.NHEADS,
            # the official decoder hard-codes the FFN width (MASK_FORMER.DIM_FEEDFORWARD is the decoder's)
            "transformer_dim_feedforward": 1024,
            "transformer_enc_layers": cfg.MODEL.SEM_SEG_HEAD.TRANSFORMER_ENC_LAYERS,
            "transformer_in_features": cfg.MODEL.SEM_SEG_HEAD.DEFORMABLE_TRANSFORMER_ENCODER_IN_FEATURES,
            "common_stride": cfg.MODEL.SEM_SEG_HEAD.COMMON_STRIDE,
        }

    def forward_features(self, features: dict[str, torch.Tensor]):
        """Returns (mask_features, stride-32 encoder output, [3 multi-scale maps from low to high resolution]).

        In training it runs in float32 whatever autocast says, as the official code does (for float16 AMP). At
        inference under autocast (MODEL.MASK_FORMER.TEST.DTYPE bfloat16) the convolutions, projections and FFNs run
        in autocast's dtype and the deformable sampling in float32 (MSDeformAttn)."""
        device_type = next(iter(features.values())).device.type
        if not self.training and torch.is_autocast_enabled(device_type):
            return self._forward_features(features)
        with torch.autocast(device_type=device_type, enabled=False):
            return self._forward_features(features)

    def _forward_features(self, features: dict[str, torch.Tensor]):
        srcs, pos = [], []
        for idx, f in enumerate(self.transformer_in_features[::-1]):
            x = features[f].float()
            srcs.append(self.input_proj[idx](x))
            pos.append(self.pe_layer(x))

        y, shapes_list, _ = self.transformer(srcs, pos)
        bs = y.shape[0]
        y = torch.split(y, [h * w for h, w in shapes_list], dim=1)
        out = [z.transpose(1, 2).reshape(bs, -1, h, w) for z, (h, w) in zip(y, shapes_list)]
        # The finest encoder map for the FPN resize as a channels-last view of its tokens with the batch stride of
        # the token tensor: the view above has batch stride C when B = 1 (a size-1 dim's stride is arbitrary), so
        # suggest_memory_format calls it contiguous and the CPU resize, which computes a channels-last input
        # channels-last, copies its result to NCHW. The same values, one copy of the upsampled map fewer.
        coarser = y[-1].reshape(bs, *shapes_list[-1], -1).permute(0, 3, 1, 2)

        # extra FPN levels on the higher-resolution features
        for idx, f in enumerate(self.in_features[: self.num_fpn_levels][::-1]):
            x = features[f].float()
            cur_fpn = self.lateral_convs[idx](x)
            upsampled = F.interpolate(coarser, size=cur_fpn.shape[-2:], mode="bilinear", align_corners=False)
            y = cur_fpn + upsampled
            out.append(self.output_convs[idx](y))
            coarser = out[-1]

        multi_scale_features = out[: self.maskformer_num_feature_levels]
        return self.mask_features(out[-1]), out[0], multi_scale_features
