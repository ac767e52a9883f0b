"""MaskFormerHead: the pixel decoder followed by the transformer decoder (the model's ``sem_seg_head``)."""

from __future__ import annotations

import logging

from detectron2.config import configurable
from detectron2.layers import ShapeSpec
from detectron2.modeling import SEM_SEG_HEADS_REGISTRY
from torch import nn

from dinat_m2f.modeling.pixel_decoder.msdeformattn import build_pixel_decoder, in_feature_shapes
from dinat_m2f.modeling.transformer_decoder.mask2former_transformer_decoder import build_transformer_decoder


@SEM_SEG_HEADS_REGISTRY.register()
class MaskFormerHead(nn.Module):
    _version = 2

    @configurable
    def __init__(
        self,
        input_shape: dict[str, ShapeSpec],
        *,
        num_classes: int,
        pixel_decoder: nn.Module,
        loss_weight: float = 1.0,
        ignore_value: int = -1,
        transformer_predictor: nn.Module,
        transformer_in_feature: str,
    ):
        """
        Args:
            input_shape: shapes of the backbone features the head uses.
            num_classes: classes to predict (without the no-object class).
            pixel_decoder: the pixel decoder (``forward_features`` gives mask and multi-scale features).
            transformer_predictor: the transformer decoder.
            transformer_in_feature: which features the decoder reads; Mask2Former uses "multi_scale_pixel_decoder".
        """
        super().__init__()
        if transformer_in_feature != "multi_scale_pixel_decoder":
            raise ValueError(
                "MaskFormerHead: MODEL.MASK_FORMER.TRANSFORMER_IN_FEATURE must be 'multi_scale_pixel_decoder' "
                f"(the Mask2Former decoder); got {transformer_in_feature!r}"
            )
        input_shape = sorted(input_shape.items(), key=lambda x: x[1].stride)
        self.in_features = [k for k, _ in input_shape]
        self.ignore_value = ignore_value
        self.common_stride = 4
        self.loss_weight = loss_weight
        self.pixel_decoder = pixel_decoder
        self.predictor = transformer_predictor
        self.transformer_in_feature = transformer_in_feature
        self.num_classes = num_classes

    @classmethod
    def from_config(cls, cfg, input_shape: dict[str, ShapeSpec]) -> dict:
        num_classes = cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            # 0 would build a model whose only class is "no object" (and whose panoptic/instance output is empty)
            raise ValueError(
                f"MODEL.SEM_SEG_HEAD.NUM_CLASSES must be the number of classes of the dataset (>= 1, without the "
                f"no-object class), got {num_classes!r}"
            )
        return {
            "input_shape": in_feature_shapes(cfg, input_shape),
            "ignore_value": cfg.MODEL.SEM_SEG_HEAD.IGNORE_VALUE,
            "num_classes": num_classes,
            "pixel_decoder": build_pixel_decoder(cfg, input_shape),
            "loss_weight": cfg.MODEL.SEM_SEG_HEAD.LOSS_WEIGHT,
            "transformer_in_feature": cfg.MODEL.MASK_FORMER.TRANSFORMER_IN_FEATURE,
            "transformer_predictor": build_transformer_decoder(
                cfg, cfg.MODEL.SEM_SEG_HEAD.CONVS_DIM, mask_classification=True
            ),
        }

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errs):
        # version-1 checkpoints kept the pixel decoder's parameters directly under the head
        version = local_metadata.get("version", None)
        if version is None or version < 2:
            renamed = False
            for k in list(state_dict.keys()):
                if (
                    k.startswith(prefix)
                    and not k.startswith(prefix + "predictor")
                    and not k.startswith(prefix + "pixel_decoder.")
                ):
                    state_dict[prefix + "pixel_decoder." + k[len(prefix) :]] = state_dict.pop(k)
                    renamed = True
            if renamed:
                logging.getLogger(__name__).warning(
                    "%s: renamed a version-1 checkpoint's pixel decoder weights to %spixel_decoder.*", prefix, prefix
                )
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errs)

    def forward(self, features, mask=None, *, aux_outputs: bool = True) -> dict:
        """The transformer decoder's predictions; ``aux_outputs=False``: those of its last layer only."""
        mask_features, _, multi_scale_features = self.pixel_decoder.forward_features(features)
        return self.predictor(multi_scale_features, mask_features, mask, aux_outputs=aux_outputs)
