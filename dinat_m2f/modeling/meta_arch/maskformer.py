"""MaskFormer meta-architecture (Mask2Former): backbone -> MaskFormerHead -> losses or inference.

Inference modes (spec 1.1): semantic (softmax x sigmoid), panoptic (object-mask and overlap thresholds, stuff
merging, segment ids from 1) and instance (top-k over queries x classes, mask-score rescoring). Unlike the
official code, instance predictions get boxes computed from their masks, so box AP is meaningful.
"""

from __future__ import annotations

import contextlib
import warnings

import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.data import MetadataCatalog
from detectron2.modeling import META_ARCH_REGISTRY, build_backbone, build_sem_seg_head
from detectron2.modeling.backbone import Backbone
from detectron2.modeling.postprocessing import sem_seg_postprocess as d2_sem_seg_postprocess
from detectron2.structures import BitMasks, ImageList, Instances
from detectron2.utils.memory import retry_if_cuda_oom
from torch import nn

from dinat_m2f.modeling.criterion import SetCriterion
from dinat_m2f.modeling.matcher import HungarianMatcher
from dinat_m2f.utils.cpu_bfloat16 import cpu_has_fast_bfloat16


def sem_seg_postprocess(result: torch.Tensor, img_size, output_height: int, output_width: int) -> torch.Tensor:
    """detectron2's ``sem_seg_postprocess`` (crop the padding away, resize bilinearly to the output size) without
    the resize when the crop already has the output size: a bilinear resize (align_corners=False) to the same size
    samples every pixel at its own centre, so it returns the same values for finite inputs. (It would spread a
    NaN or infinity to a neighbour, which a model's finite scores never hold.)"""
    cropped = result[:, : img_size[0], : img_size[1]]
    if tuple(cropped.shape[-2:]) == (output_height, output_width):
        return cropped.contiguous()
    return d2_sem_seg_postprocess(result, img_size, output_height, output_width)


# MODEL.MASK_FORMER.TEST.DTYPE -> the autocast dtype of inference (None: float32, no autocast)
INFERENCE_DTYPES: dict[str, torch.dtype | None] = {
    "float32": None,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


def inference_dtype(name: str, device_type: str) -> torch.dtype | None:
    """The autocast dtype of MODEL.MASK_FORMER.TEST.DTYPE ``name`` on ``device_type`` (None: float32)."""
    if name not in INFERENCE_DTYPES:
        raise ValueError(f"MODEL.MASK_FORMER.TEST.DTYPE must be one of {list(INFERENCE_DTYPES)}, got {name!r}")
    dtype = INFERENCE_DTYPES[name]
    if dtype == torch.float16 and device_type == "cpu":
        raise ValueError(
            "MODEL.MASK_FORMER.TEST.DTYPE float16 runs on CUDA only (the CPU kernels have no float16): "
            "use bfloat16 on the CPU"
        )
    if dtype == torch.bfloat16 and device_type == "cpu" and not cpu_has_fast_bfloat16():
        warnings.warn(
            "MODEL.MASK_FORMER.TEST.DTYPE bfloat16 on a CPU without AVX-512 bfloat16 instructions (torch's CPU "
            f"capability: {torch.backends.cpu.get_cpu_capability()}): the bfloat16 matrix products and convolutions "
            "run many times slower than float32 there (measured on the AVX2 path: a whole inference 15-70x slower). "
            "Use float32 on this CPU.",
            stacklevel=2,
        )
    return dtype


# the parameters that autocast would cast to the low-precision dtype at every call (matrix products, convolutions)
_LOW_PRECISION_PARAMS = {
    nn.Linear: ("weight", "bias"),
    nn.Conv2d: ("weight", "bias"),
    nn.MultiheadAttention: ("in_proj_weight", "in_proj_bias"),
}


class LowPrecisionWeights:
    """Copies of the weights of matrix products and convolutions in the inference dtype, made once and kept while
    the float32 parameters are unchanged (same tensor, same ``_version``), and swapped in for a forward.

    Under autocast every such op casts its float32 weight again at every call (autocast keeps its casts only until
    the outermost autocast region exits); with the copies in place its casts of them are no-ops. The values are
    autocast's own casts (``Tensor.to``), so the outputs are the same, bit for bit.
    """

    def __init__(self):
        self._copies: dict[tuple[int, str], tuple[torch.Tensor, int, nn.Parameter]] = {}

    def slots(self, model: nn.Module):
        """(module, parameter name) of every weight to copy; submodules that a module lists in its
        ``float32_submodules`` (they run with autocast off) keep theirs."""
        float32 = {id(getattr(m, n)) for m in model.modules() for n in getattr(m, "float32_submodules", ())}
        for module in model.modules():
            if id(module) in float32:
                continue
            for kind, names in _LOW_PRECISION_PARAMS.items():
                if isinstance(module, kind):
                    for name in names:
                        if module._parameters.get(name) is not None:
                            yield module, name

    @contextlib.contextmanager
    def swapped_in(self, model: nn.Module, dtype: torch.dtype):
        swapped = []
        try:
            for module, name in list(self.slots(model)):
                param = module._parameters[name]
                key = (id(module), name)
                entry = self._copies.get(key)
                if entry is None or entry[0] is not param or entry[1] != param._version or entry[2].dtype != dtype:
                    copy = nn.Parameter(param.detach().to(dtype), requires_grad=False)
                    entry = self._copies[key] = (param, param._version, copy)
                module._parameters[name] = entry[2]
                swapped.append((module, name, param))
            yield
        finally:
            for module, name, param in swapped:
                module._parameters[name] = param


@META_ARCH_REGISTRY.register()
class MaskFormer(nn.Module):
    @configurable
    def __init__(
        self,
        *,
        backbone: Backbone,
        sem_seg_head: nn.Module,
        criterion: nn.Module,
        num_queries: int,
        object_mask_threshold: float,
        overlap_threshold: float,
        metadata,
        size_divisibility: int,
        sem_seg_postprocess_before_inference: bool,
        pixel_mean: tuple[float, ...],
        pixel_std: tuple[float, ...],
        semantic_on: bool,
        panoptic_on: bool,
        instance_on: bool,
        test_topk_per_image: int,
        deep_supervision: bool = True,
        inference_dtype: torch.dtype | None = None,
    ):
        """
        Args:
            backbone: a detectron2 Backbone (its outputs feed the head).
            sem_seg_head: MaskFormerHead.
            criterion: SetCriterion; its losses are multiplied by ``criterion.weight_dict``.
            object_mask_threshold / overlap_threshold: panoptic inference thresholds.
            metadata: metadata of the training set (thing classes decide isthing at inference).
            size_divisibility: pad the batch to a multiple of this (< 0: the backbone's).
            sem_seg_postprocess_before_inference: resize mask logits to the output size before inference
                (needed for panoptic and instance inference).
            test_topk_per_image: instances kept per image.
            inference_dtype: None (float32), or the autocast dtype (bfloat16, float16) that the backbone and the
                head run in at inference; the post-processing reads their outputs in float32. Training is not
                affected (SOLVER.AMP is its switch).
        """
        super().__init__()
        if not semantic_on and not sem_seg_postprocess_before_inference:
            raise ValueError(
                "MaskFormer: without semantic inference, masks must be resized before inference "
                "(TEST.SEM_SEG_POSTPROCESSING_BEFORE_INFERENCE, implied by PANOPTIC_ON or INSTANCE_ON)"
            )
        self.backbone = backbone
        self.sem_seg_head = sem_seg_head
        self.criterion = criterion
        self.num_queries = num_queries
        self.overlap_threshold = overlap_threshold
        self.object_mask_threshold = object_mask_threshold
        self.metadata = metadata
        if size_divisibility < 0:
            size_divisibility = self.backbone.size_divisibility
        self.size_divisibility = size_divisibility
        self.sem_seg_postprocess_before_inference = sem_seg_postprocess_before_inference
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(-1, 1, 1), False)
        self.semantic_on = semantic_on
        self.instance_on = instance_on
        self.panoptic_on = panoptic_on
        self.test_topk_per_image = test_topk_per_image
        self.deep_supervision = deep_supervision
        self.inference_dtype = inference_dtype
        self._low_precision_weights = LowPrecisionWeights()

    @classmethod
    def from_config(cls, cfg) -> dict:
        backbone = build_backbone(cfg)
        sem_seg_head = build_sem_seg_head(cfg, backbone.output_shape())
        mf = cfg.MODEL.MASK_FORMER

        matcher = HungarianMatcher(
            cost_class=mf.CLASS_WEIGHT,
            cost_mask=mf.MASK_WEIGHT,
            cost_dice=mf.DICE_WEIGHT,
            num_points=mf.TRAIN_NUM_POINTS,
        )
        weight_dict = {"loss_ce": mf.CLASS_WEIGHT, "loss_mask": mf.MASK_WEIGHT, "loss_dice": mf.DICE_WEIGHT}
        if mf.DEEP_SUPERVISION:
            aux_weight_dict = {}
            for i in range(mf.DEC_LAYERS - 1):
                aux_weight_dict.update({f"{k}_{i}": v for k, v in weight_dict.items()})
            weight_dict.update(aux_weight_dict)
        criterion = SetCriterion(
            sem_seg_head.num_classes,
            matcher=matcher,
            weight_dict=weight_dict,
            eos_coef=mf.NO_OBJECT_WEIGHT,
            losses=["labels", "masks"],
            num_points=mf.TRAIN_NUM_POINTS,
            oversample_ratio=mf.OVERSAMPLE_RATIO,
            importance_sample_ratio=mf.IMPORTANCE_SAMPLE_RATIO,
        )
        test = mf.TEST
        return {
            "backbone": backbone,
            "sem_seg_head": sem_seg_head,
            "criterion": criterion,
            "num_queries": mf.NUM_OBJECT_QUERIES,
            "object_mask_threshold": test.OBJECT_MASK_THRESHOLD,
            "overlap_threshold": test.OVERLAP_THRESHOLD,
            "metadata": MetadataCatalog.get(cfg.DATASETS.TRAIN[0]) if cfg.DATASETS.TRAIN else None,
            "size_divisibility": mf.SIZE_DIVISIBILITY,
            "sem_seg_postprocess_before_inference": (
                test.SEM_SEG_POSTPROCESSING_BEFORE_INFERENCE or test.PANOPTIC_ON or test.INSTANCE_ON
            ),
            "pixel_mean": tuple(cfg.MODEL.PIXEL_MEAN),
            "pixel_std": tuple(cfg.MODEL.PIXEL_STD),
            "semantic_on": test.SEMANTIC_ON,
            "instance_on": test.INSTANCE_ON,
            "panoptic_on": test.PANOPTIC_ON,
            "test_topk_per_image": cfg.TEST.DETECTIONS_PER_IMAGE,
            "deep_supervision": mf.DEEP_SUPERVISION,
            "inference_dtype": inference_dtype(test.DTYPE, torch.device(cfg.MODEL.DEVICE).type),
        }

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    def _thing_ids(self) -> set[int]:
        """Contiguous ids of the thing classes of the training set (empty when it has none)."""
        mapping = getattr(self.metadata, "thing_dataset_id_to_contiguous_id", None) if self.metadata else None
        return set(mapping.values()) if mapping else set()

    def forward(self, batched_inputs: list[dict]):
        """
        Args:
            batched_inputs: detectron2's list of dicts: "image" (C, H, W) in the model's input format, and for
                training "instances" with gt_classes and gt_masks; optional "height"/"width" for the output size.
        Returns: the weighted losses in training; otherwise per image a dict with "sem_seg" (K, H, W),
            "panoptic_seg" (int32 ids (H, W), segments_info) and/or "instances", as enabled.
        """
        images = [x["image"].to(self.device) for x in batched_inputs]
        images = [(x - self.pixel_mean) / self.pixel_std for x in images]
        images = ImageList.from_tensors(images, self.size_divisibility)

        with self.inference_autocast():
            features = self.backbone(images.tensor)
            # inference reads the last layer's predictions only (the others just make the attention masks)
            outputs = self.sem_seg_head(features, aux_outputs=self.training and self.deep_supervision)

        if self.training:
            if "instances" not in batched_inputs[0]:
                raise ValueError("MaskFormer: training inputs need 'instances' (gt_classes, gt_masks)")
            gt_instances = [x["instances"].to(self.device) for x in batched_inputs]
            targets = self.prepare_targets(gt_instances, images)
            losses = self.criterion(outputs, targets)
            weight_dict = self.criterion.weight_dict
            return {k: v * weight_dict[k] for k, v in losses.items() if k in weight_dict}

        mask_cls_results = outputs["pred_logits"].float()
        mask_pred_results = F.interpolate(
            outputs["pred_masks"].float(),
            size=(images.tensor.shape[-2], images.tensor.shape[-1]),
            mode="bilinear",
            align_corners=False,
        )
        del outputs

        processed_results = []
        for mask_cls_result, mask_pred_result, input_per_image, image_size in zip(
            mask_cls_results, mask_pred_results, batched_inputs, images.image_sizes
        ):
            height = input_per_image.get("height", image_size[0])
            width = input_per_image.get("width", image_size[1])
            processed_results.append({})
            if self.sem_seg_postprocess_before_inference:
                mask_pred_result = retry_if_cuda_oom(sem_seg_postprocess)(mask_pred_result, image_size, height, width)
                mask_cls_result = mask_cls_result.to(mask_pred_result)
            if self.semantic_on:
                if self.panoptic_on or self.instance_on or mask_pred_result.requires_grad:
                    r = retry_if_cuda_oom(self.semantic_inference)(mask_cls_result, mask_pred_result)
                else:  # nothing reads the mask logits after this: their sigmoid in place (no second buffer)
                    r = retry_if_cuda_oom(self.semantic_scores)(mask_cls_result, mask_pred_result.sigmoid_())
                if not self.sem_seg_postprocess_before_inference:
                    r = retry_if_cuda_oom(sem_seg_postprocess)(r, image_size, height, width)
                processed_results[-1]["sem_seg"] = r
            if self.panoptic_on:
                processed_results[-1]["panoptic_seg"] = retry_if_cuda_oom(self.panoptic_inference)(
                    mask_cls_result, mask_pred_result
                )
            if self.instance_on:
                processed_results[-1]["instances"] = retry_if_cuda_oom(self.instance_inference)(
                    mask_cls_result, mask_pred_result
                )
        return processed_results

    @contextlib.contextmanager
    def inference_autocast(self):
        """Autocast to ``inference_dtype`` in eval mode, with the weights of the backbone and the head copied to it
        once (``LowPrecisionWeights``); nothing in training or for float32."""
        if self.training or self.inference_dtype is None:
            yield
            return
        with (
            self._low_precision_weights.swapped_in(self, self.inference_dtype),
            torch.autocast(device_type=self.device.type, dtype=self.inference_dtype),
        ):
            yield

    def prepare_targets(self, targets: list[Instances], images: ImageList) -> list[dict]:
        """Zero-pad each image's gt masks to the padded batch size."""
        h_pad, w_pad = images.tensor.shape[-2:]
        new_targets = []
        for targets_per_image in targets:
            gt_masks = targets_per_image.gt_masks
            gt_masks = gt_masks.tensor if hasattr(gt_masks, "tensor") else gt_masks
            padded_masks = torch.zeros((gt_masks.shape[0], h_pad, w_pad), dtype=gt_masks.dtype, device=gt_masks.device)
            padded_masks[:, : gt_masks.shape[1], : gt_masks.shape[2]] = gt_masks
            new_targets.append({"labels": targets_per_image.gt_classes, "masks": padded_masks})
        return new_targets

    def semantic_inference(self, mask_cls: torch.Tensor, mask_pred: torch.Tensor) -> torch.Tensor:
        """Per-class scores (K, H, W): sum over queries of p(class) x sigmoid(mask)."""
        return self.semantic_scores(mask_cls, mask_pred.sigmoid())

    @staticmethod
    def semantic_scores(mask_cls: torch.Tensor, mask_prob: torch.Tensor) -> torch.Tensor:
        """``semantic_inference`` from the mask probabilities (Q, H, W) instead of the logits."""
        mask_cls = F.softmax(mask_cls, dim=-1)[..., :-1]
        return torch.einsum("qc,qhw->chw", mask_cls, mask_prob)

    def panoptic_inference(self, mask_cls: torch.Tensor, mask_pred: torch.Tensor):
        """(panoptic_seg int32 (H, W) with 0 = void, segments_info [{"id", "isthing", "category_id", "score"}])."""
        num_classes = self.sem_seg_head.num_classes
        scores, labels = F.softmax(mask_cls, dim=-1).max(-1)
        mask_pred = mask_pred.sigmoid()
        keep = labels.ne(num_classes) & (scores > self.object_mask_threshold)
        cur_scores = scores[keep]
        cur_classes = labels[keep]
        cur_masks = mask_pred[keep]
        cur_prob_masks = cur_scores.view(-1, 1, 1) * cur_masks

        h, w = cur_masks.shape[-2:]
        panoptic_seg = torch.zeros((h, w), dtype=torch.int32, device=cur_masks.device)
        segments_info = []
        if cur_masks.shape[0] == 0:
            return panoptic_seg, segments_info

        thing_ids = self._thing_ids()
        cur_mask_ids = cur_prob_masks.argmax(0)  # each pixel goes to the query with the highest score x prob
        stuff_memory_list: dict[int, int] = {}
        current_segment_id = 0
        for k in range(cur_classes.shape[0]):
            pred_class = int(cur_classes[k].item())
            isthing = pred_class in thing_ids
            mask_area = (cur_mask_ids == k).sum().item()
            original_area = (cur_masks[k] >= 0.5).sum().item()
            mask = (cur_mask_ids == k) & (cur_masks[k] >= 0.5)
            if mask_area == 0 or original_area == 0 or mask.sum().item() == 0:
                continue
            if mask_area / original_area < self.overlap_threshold:
                continue  # mostly covered by other segments
            if not isthing:
                if pred_class in stuff_memory_list:  # one segment per stuff class
                    panoptic_seg[mask] = stuff_memory_list[pred_class]
                    continue
                stuff_memory_list[pred_class] = current_segment_id + 1
            current_segment_id += 1
            panoptic_seg[mask] = current_segment_id
            segments_info.append(
                {
                    "id": current_segment_id,
                    "isthing": bool(isthing),
                    "category_id": pred_class,
                    "score": float(cur_scores[k]),  # the query's class probability (for users and Visualizer)
                }
            )
        return panoptic_seg, segments_info

    def instance_inference(self, mask_cls: torch.Tensor, mask_pred: torch.Tensor) -> Instances:
        """Top-k (query, class) pairs; score = p(class) x mean mask probability inside the binary mask; boxes
        are the tight boxes of the binary masks."""
        image_size = mask_pred.shape[-2:]
        num_classes = self.sem_seg_head.num_classes
        scores = F.softmax(mask_cls, dim=-1)[:, :-1]
        labels = torch.arange(num_classes, device=scores.device).unsqueeze(0).repeat(scores.shape[0], 1).flatten(0, 1)
        k = min(self.test_topk_per_image, scores.numel())
        scores_per_image, topk_indices = scores.flatten(0, 1).topk(k, sorted=False)
        labels_per_image = labels[topk_indices]
        mask_pred = mask_pred[topk_indices // num_classes]

        if self.panoptic_on:  # with panoptic inference on, instances are things only
            thing_ids = self._thing_ids()
            keep = torch.tensor([int(lab) in thing_ids for lab in labels_per_image], dtype=torch.bool)
            keep = keep.to(scores_per_image.device)
            scores_per_image = scores_per_image[keep]
            labels_per_image = labels_per_image[keep]
            mask_pred = mask_pred[keep]

        result = Instances(image_size)
        binary_masks = mask_pred > 0
        result.pred_masks = binary_masks.float()
        result.pred_boxes = BitMasks(binary_masks).get_bounding_boxes().to(mask_pred.device)
        flat = result.pred_masks.flatten(1)
        mask_scores_per_image = (mask_pred.sigmoid().flatten(1) * flat).sum(1) / (flat.sum(1) + 1e-6)
        result.scores = scores_per_image * mask_scores_per_image
        result.pred_classes = labels_per_image
        return result
