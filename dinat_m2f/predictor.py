"""Run a DiNAT-Mask2Former from Python: ``Predictor(config, weights)`` on images, structured results, overlays.

    >>> from dinat_m2f import Predictor
    >>> predictor = Predictor("dinat_l_coco_panoptic")             # a model-zoo name (weights fetched and cached)
    >>> predictor = Predictor("my.yaml", weights="model_final.pth", device="cuda", dtype="bfloat16")
    >>> result = predictor("photo.jpg")                           # or a numpy RGB array, a PIL image, or a list
    >>> [(s.class_name, s.score) for s in result.panoptic.segments]
    >>> overlay = predictor.draw("photo.jpg", result)            # RGB uint8, detectron2's Visualizer

Numpy arrays are RGB (as PIL and ``read_image`` give them); convert OpenCV's BGR with ``image[:, :, ::-1]``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from detectron2.config import CfgNode
from detectron2.data import MetadataCatalog
from detectron2.data import transforms as T

__all__ = [
    "ImageReadError",
    "InstanceResult",
    "PanopticResult",
    "PanopticSegment",
    "Prediction",
    "Predictor",
    "SemanticResult",
    "read_image",
]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ImageReadError(OSError):
    """An input image is truncated or not an image; the message names the file."""


def image_to_rgb8(image) -> np.ndarray:
    """A PIL image -> HxWx3 uint8 RGB. 16-bit images (grayscale PNG/TIFF: modes I;16*, or I holding 16-bit values)
    are scaled by 255/65535; PIL's own ``convert("RGB")`` would clip them to 255, an almost white image."""
    if image.mode.startswith("I;16") or image.mode == "I":
        values = np.asarray(image).astype(np.float64)
        if values.size and (values.min() < 0 or values.max() > 65535):
            raise ValueError(f"a {image.mode} image with values outside 0..65535 (not a 16-bit image)")
        gray = np.rint(values * (255.0 / 65535.0)).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    if image.mode == "F":
        raise ValueError("a floating-point (mode F) image: convert it to 8 or 16 bits first")
    return np.asarray(image.convert("RGB"))  # 8-bit modes; PIL reads 16-bit-per-channel RGB as 8-bit RGB


def read_image(path: str) -> np.ndarray:
    """An image file as an RGB uint8 array (H, W, 3), EXIF orientation applied (as detectron2's ``read_image``);
    a missing file is a FileNotFoundError, a truncated or undecodable one an ImageReadError, both naming it."""
    from PIL import Image, ImageOps

    if not os.path.isfile(path):
        raise FileNotFoundError(f"image not found: {path}")
    try:
        with Image.open(path) as image:
            return image_to_rgb8(ImageOps.exif_transpose(image))
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise ImageReadError(f"{path}: cannot read this image ({type(e).__name__}: {e})") from e


def _as_rgb(image) -> np.ndarray:
    if isinstance(image, (str, os.PathLike)):
        return read_image(os.fspath(image))
    if hasattr(image, "convert") and hasattr(image, "size"):  # a PIL image
        return image_to_rgb8(image)
    if isinstance(image, np.ndarray):
        if image.ndim == 2:
            image = np.repeat(image[:, :, None], 3, axis=2)
        if image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"a numpy image must be (H, W, 3) RGB or (H, W) gray, got shape {image.shape}")
        if image.dtype != np.uint8:
            raise ValueError(f"a numpy image must be uint8, got {image.dtype} (scale it to 0..255 first)")
        return image
    raise TypeError(f"an image is a path, a numpy array or a PIL image, got {type(image).__name__}")


@dataclass
class PanopticSegment:
    id: int  # its value in PanopticResult.segment_ids
    category_id: int  # contiguous class index
    class_name: str
    score: float | None
    isthing: bool
    area: int


@dataclass
class PanopticResult:
    segment_ids: np.ndarray  # (H, W) int32, 0 = no segment
    segments: list[PanopticSegment]


@dataclass
class InstanceResult:
    masks: np.ndarray  # (N, H, W) bool
    boxes: np.ndarray  # (N, 4) float32 XYXY, the tight boxes of the masks
    scores: np.ndarray  # (N,) float32
    class_ids: np.ndarray  # (N,) int64
    class_names: list[str]


@dataclass
class SemanticResult:
    label_map: np.ndarray  # (H, W) int64 class index
    class_names: list[str]


@dataclass
class Prediction:
    """What the model produced for one image (None where the config turned a task off)."""

    panoptic: PanopticResult | None = None
    instances: InstanceResult | None = None
    semantic: SemanticResult | None = None
    raw: dict = field(default_factory=dict, repr=False)  # the model's own output (detectron2 structures)


def _resolve_config(config: str, weights: str | None) -> tuple[str, str | None]:
    """A config file stays as is; a model-zoo name gives its config and (unless given) its cached weights."""
    if os.path.isfile(config):
        return config, weights
    from dinat_m2f import model_zoo

    try:
        entry = model_zoo.get(config)
    except KeyError:
        raise FileNotFoundError(
            f"{config!r} is neither a config file nor a model-zoo name "
            f"(model-zoo names: {', '.join(m.name for m in model_zoo.list_models(kind='segmentation'))})"
        ) from None
    if entry.kind != "segmentation":
        raise ValueError(f"model-zoo entry {config!r} is an ImageNet backbone, not a segmentation model")
    return entry.config_path, weights if weights is not None else model_zoo.get_weights(config)


def _resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device={device!r} but CUDA is not available here: use device='cpu' or 'auto'")
    return device


class Predictor:
    """A DiNAT-Mask2Former ready for inference.

    Args:
        config: a config file or a model-zoo name (``dinat_m2f.model_zoo.list_models()``).
        weights: a checkpoint; default: the model zoo's file for a zoo name, else the config's MODEL.WEIGHTS.
            Loaded through ``AtomicCheckpointer`` (the project's checkpoint loader).
        device: "auto" (CUDA if available), "cpu", "cuda", "cuda:1", ...
        dtype: "float32" (full precision), "bfloat16" or "float16" (CUDA only): the precision of the backbone and
            the head (autocast; post-processing in float32). None: the config's MODEL.MASK_FORMER.TEST.DTYPE.
        opts: config overrides, ``["KEY", "VALUE", ...]``.
        metadata_name: the dataset whose class names and colours to use (default: the config's first test set,
            else its first training set).
    """

    def __init__(
        self,
        config: str,
        weights: str | None = None,
        device: str = "auto",
        dtype: str | torch.dtype | None = None,
        opts: Sequence[str] = (),
        metadata_name: str | None = None,
    ) -> None:
        from dinat_m2f.config import load_config

        config_file, weights = _resolve_config(config, weights)
        opts = list(opts)
        if device != "auto" or "MODEL.DEVICE" not in opts[0::2]:  # an explicit device wins over MODEL.DEVICE
            opts += ["MODEL.DEVICE", _resolve_device(device)]
        cfg = load_config(config_file, opts)
        _resolve_device(cfg.MODEL.DEVICE)
        self._setup(cfg, weights, dtype, metadata_name, name=config)

    @classmethod
    def from_cfg(
        cls, cfg: CfgNode, weights: str | None = None, dtype=None, metadata_name: str | None = None
    ) -> Predictor:
        """A Predictor of an already loaded config (its MODEL.DEVICE; weights default to its MODEL.WEIGHTS)."""
        self = cls.__new__(cls)
        _resolve_device(cfg.MODEL.DEVICE)
        self._setup(cfg, weights, dtype, metadata_name, name="the config")
        return self

    def _setup(self, cfg: CfgNode, weights: str | None, dtype, metadata_name: str | None, name: str) -> None:
        from detectron2.modeling import build_model

        import dinat_m2f.modeling  # noqa: F401  (registers the model parts)
        from dinat_m2f.config import ConfigError
        from dinat_m2f.data.datasets.custom import register_from_config
        from dinat_m2f.engine import AtomicCheckpointer

        self.cfg = cfg
        self.device = cfg.MODEL.DEVICE
        register_from_config(cfg)
        weights = weights if weights is not None else cfg.MODEL.WEIGHTS
        if not weights:
            raise ConfigError(
                f"no weights for {name!r}: pass weights=... (or set MODEL.WEIGHTS); a model with random "
                "weights predicts nothing useful"
            )
        dtype = self._resolve_dtype(dtype)
        self.model = build_model(cfg).eval()
        if dtype is not None:  # an explicit dtype wins over MODEL.MASK_FORMER.TEST.DTYPE
            self.model.inference_dtype = None if dtype == torch.float32 else dtype
        self.dtype = self.model.inference_dtype  # None: float32
        # MODEL.TRUST_WEIGHTS / MODEL.WEIGHTS_REINIT of the config decide how strictly the file is read and fitted
        AtomicCheckpointer.from_config(cfg, self.model).load(weights)
        self.weights = weights

        names = [metadata_name] if metadata_name else [*cfg.DATASETS.TEST, *cfg.DATASETS.TRAIN]
        if not names:
            raise ConfigError("DATASETS.TEST and DATASETS.TRAIN are empty: pass metadata_name= for the class names")
        self.metadata = MetadataCatalog.get(names[0])
        self.class_names = self._class_names()
        self.resize = T.ResizeShortestEdge([cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MIN_SIZE_TEST], cfg.INPUT.MAX_SIZE_TEST)
        self.input_format = cfg.INPUT.FORMAT
        if self.input_format not in ("RGB", "BGR"):
            raise ConfigError(f"INPUT.FORMAT must be RGB or BGR, got {self.input_format!r}")

    def _class_names(self) -> list[str]:
        """The names indexed by the model's class ids: all classes (semantic / panoptic) or the things (instance)."""
        num_classes = self.cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES
        for key in ("stuff_classes", "thing_classes"):
            names = self.metadata.get(key, None)
            if names is not None and len(names) == num_classes:
                return list(names)
        from dinat_m2f.config import ConfigError

        raise ConfigError(
            f"dataset {self.metadata.name!r} has no class list of MODEL.SEM_SEG_HEAD.NUM_CLASSES={num_classes} names "
            "(stuff_classes / thing_classes): pass metadata_name= of a dataset with this model's classes"
        )

    def _resolve_dtype(self, dtype) -> torch.dtype | None:
        if dtype is None:
            return None
        if isinstance(dtype, str):
            if dtype not in _DTYPES:
                raise ValueError(f"dtype must be one of {list(_DTYPES)} or None, got {dtype!r}")
            dtype = _DTYPES[dtype]
        if dtype not in _DTYPES.values():
            raise ValueError(f"dtype must be float32, bfloat16 or float16, got {dtype}")
        if dtype == torch.float16 and torch.device(self.device).type == "cpu":
            raise ValueError(
                "dtype float16 runs on CUDA only (the CPU kernels have no float16): use 'bfloat16' on the CPU"
            )
        return dtype

    def _model_input(self, rgb: np.ndarray) -> dict:
        height, width = rgb.shape[:2]
        image = self.resize.get_transform(rgb).apply_image(rgb)
        if self.input_format == "BGR":
            image = image[:, :, ::-1]
        tensor = torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)).astype("float32"))
        return {"image": tensor, "height": height, "width": width}

    def __call__(self, images, batch_size: int = 4):
        """One image -> a Prediction; a list -> a list of Predictions (run ``batch_size`` at a time)."""
        single = not isinstance(images, (list, tuple))
        batch = [images] if single else list(images)
        out: list[Prediction] = []
        for start in range(0, len(batch), batch_size):
            inputs = [self._model_input(_as_rgb(im)) for im in batch[start : start + batch_size]]
            with torch.inference_mode():  # the model autocasts to its inference_dtype itself
                raw = self.model(inputs)
            out.extend(self._structure(r) for r in raw)
        return out[0] if single else out

    def _structure(self, raw: dict) -> Prediction:
        result = Prediction(raw=raw)
        if "panoptic_seg" in raw:
            ids, infos = raw["panoptic_seg"]
            ids = ids.cpu().numpy().astype(np.int32)
            segments = [
                PanopticSegment(
                    id=int(s["id"]),
                    category_id=int(s["category_id"]),
                    class_name=self.class_names[s["category_id"]],
                    score=float(s["score"]) if "score" in s else None,
                    isthing=bool(s["isthing"]),
                    area=int((ids == s["id"]).sum()),
                )
                for s in infos
            ]
            result.panoptic = PanopticResult(ids, segments)
        if "instances" in raw:
            inst = raw["instances"].to("cpu")
            masks = inst.pred_masks.numpy().astype(bool)
            class_ids = inst.pred_classes.numpy().astype(np.int64)
            result.instances = InstanceResult(
                masks=masks,
                boxes=inst.pred_boxes.tensor.float().numpy(),
                scores=inst.scores.float().numpy(),
                class_ids=class_ids,
                class_names=[self.class_names[c] for c in class_ids],
            )
        if "sem_seg" in raw:
            labels = raw["sem_seg"].argmax(dim=0).cpu().numpy().astype(np.int64)
            result.semantic = SemanticResult(labels, self.class_names)
        return result

    def draw(self, image, result: Prediction, task: str | None = None, confidence_threshold: float = 0.5) -> np.ndarray:
        """The overlay (RGB uint8) of one task of ``result`` on ``image``, drawn with detectron2's Visualizer.

        ``task``: "panoptic", "instance" or "semantic"; default: the first the result has, in that order.
        """
        from detectron2.structures import Boxes, Instances
        from detectron2.utils.visualizer import ColorMode, Visualizer

        rgb = _as_rgb(image)
        available = {
            "panoptic": result.panoptic is not None,
            "instance": result.instances is not None,
            "semantic": result.semantic is not None,
        }
        task = task or next((t for t, ok in available.items() if ok), None)
        if task not in available or not available[task]:
            raise ValueError(f"the result has no {task!r} output; it has {[t for t, ok in available.items() if ok]}")
        vis = Visualizer(rgb, self.metadata, instance_mode=ColorMode.IMAGE)
        if task == "panoptic":
            infos = [
                {"id": s.id, "category_id": s.category_id, "isthing": s.isthing}
                | ({"score": s.score} if s.score is not None else {})
                for s in result.panoptic.segments
            ]
            return vis.draw_panoptic_seg(torch.from_numpy(result.panoptic.segment_ids), infos).get_image()
        if task == "instance":
            r = result.instances
            keep = r.scores > confidence_threshold
            inst = Instances(rgb.shape[:2])
            inst.pred_masks = torch.from_numpy(r.masks[keep])
            inst.pred_boxes = Boxes(torch.from_numpy(r.boxes[keep]))
            inst.scores = torch.from_numpy(r.scores[keep])
            inst.pred_classes = torch.from_numpy(r.class_ids[keep])
            return vis.draw_instance_predictions(inst).get_image()
        return vis.draw_sem_seg(torch.from_numpy(result.semantic.label_map)).get_image()
