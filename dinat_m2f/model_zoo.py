"""The official DiNAT-Mask2Former models and DiNAT ImageNet backbones: names, configs, files, addresses, metrics.

Every address and metric below is the one the official repository publishes (SHI-Labs/Neighborhood-Attention-
Transformer: ``mask2former/README.md`` for the segmentation models, ``classification/dinat.py`` ``model_urls`` and
``classification/DiNAT.md`` for the backbones). The official repository records no checksums, so ``sha256`` is None
for every entry (configs/MODEL_ZOO.md says so); a download is then checked only for its full length.

    >>> from dinat_m2f import model_zoo
    >>> [m.name for m in model_zoo.list_models(task="panoptic")]
    >>> path = model_zoo.get_weights("dinat_l_coco_panoptic")  # cached download, or an error saying where to put it
"""

from __future__ import annotations

import hashlib
import os
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass, field

_M2F_URL = "https://shi-labs.com/projects/dinat/checkpoints/m2f/"
_IN1K_URL = "https://shi-labs.com/projects/dinat/checkpoints/imagenet1k/"
_IN22K_URL = "https://shi-labs.com/projects/dinat/checkpoints/imagenet22k/"
_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_CHUNK = 1 << 20


class WeightsUnavailableError(FileNotFoundError):
    """A model-zoo file is not in the cache and cannot be downloaded (no network, bad address...)."""


class ChecksumError(ValueError):
    """A downloaded file does not have the recorded sha256 (or length): it was removed."""


@dataclass(frozen=True)
class ZooModel:
    """One published model: what it is, the config that builds it, where its weights are, what the paper reports."""

    name: str
    kind: str  # "segmentation" (a full DiNAT-Mask2Former) or "backbone" (an ImageNet DiNAT)
    task: str  # panoptic / instance / semantic, or classification for the backbones
    dataset: str
    config: str | None  # relative to the repository root; for a backbone, a config that starts from it
    file_name: str
    url: str
    metrics: dict[str, float] = field(default_factory=dict)
    sha256: str | None = None  # the official repository publishes none

    @property
    def config_path(self) -> str | None:
        return None if self.config is None else os.path.join(_REPO_ROOT, self.config)


def _m2f(name: str, task: str, dataset: str, config: str, official: str, metrics: dict[str, float]) -> ZooModel:
    return ZooModel(name, "segmentation", task, dataset, config, official, _M2F_URL + official, metrics)


def _backbone(name: str, dataset: str, config: str | None, official: str, base: str, top1: float | None) -> ZooModel:
    metrics = {} if top1 is None else {"top1": top1}
    return ZooModel(name, "backbone", "classification", dataset, config, official, base + official, metrics)


def _in1k_backbone(size: str, top1: float) -> ZooModel:
    # The ImageNet-1K DiNAT-{mini..base} share one naming scheme; their ADE20K semantic config starts from them.
    config = f"configs/ade20k/semantic-segmentation/dinat/maskformer2_dinat_{size}_bs16_160k.yaml"
    return _backbone(f"dinat_{size}_in1k", "imagenet1k", config, f"dinat_{size}_in1k_224.pth", _IN1K_URL, top1)


_COCO_PAN = "configs/coco/panoptic-segmentation/dinat/"
_ADE_SEM = "configs/ade20k/semantic-segmentation/dinat/"
_L = "maskformer2_dinat_large_IN21k_bs16_"

# Metrics: the current README numbers (after the 2023-01 "Updated DiNAT-L" commit); semantic mIoU is multi-scale.
_MODELS: tuple[ZooModel, ...] = (
    _m2f(
        "dinat_l_coco_panoptic",
        "panoptic",
        "coco",
        _COCO_PAN + _L + "100ep.yaml",
        "mask2former_dinat_large_coco_panoptic.pth",
        {"PQ": 58.5, "AP": 49.2, "mIoU": 68.3},
    ),
    _m2f(
        "dinat_l_coco_instance",
        "instance",
        "coco",
        "configs/coco/instance-segmentation/dinat/" + _L + "100ep.yaml",
        "mask2former_dinat_large_coco_instance.pth",
        {"AP": 50.8},
    ),
    _m2f(
        "dinat_l_ade20k_semantic",
        "semantic",
        "ade20k",
        _ADE_SEM + _L + "160k.yaml",
        "mask2former_dinat_large_ade20k_semantic.pth",
        {"mIoU_ms": 58.1},
    ),
    _m2f(
        "dinat_l_ade20k_panoptic",
        "panoptic",
        "ade20k",
        "configs/ade20k/panoptic-segmentation/dinat/" + _L + "160k.yaml",
        "mask2former_dinat_large_ade20k_panoptic.pth",
        {"PQ": 49.4, "AP": 35.0, "mIoU": 56.3},
    ),
    _m2f(
        "dinat_l_ade20k_instance",
        "instance",
        "ade20k",
        "configs/ade20k/instance-segmentation/dinat/" + _L + "160k.yaml",
        "mask2former_dinat_large_ade20k_instance.pth",
        {"AP": 35.4},
    ),
    _m2f(
        "dinat_l_cityscapes_semantic",
        "semantic",
        "cityscapes",
        "configs/cityscapes/semantic-segmentation/dinat/" + _L + "90k.yaml",
        "mask2former_dinat_large_cityscapes_semantic.pth",
        {"mIoU_ms": 84.5},
    ),
    _m2f(
        "dinat_l_cityscapes_instance",
        "instance",
        "cityscapes",
        "configs/cityscapes/instance-segmentation/dinat/" + _L + "90k.yaml",
        "mask2former_dinat_large_cityscapes_instance.pth",
        {"AP": 45.1},
    ),
    _m2f(
        "dinat_l_cityscapes_panoptic",
        "panoptic",
        "cityscapes",
        "configs/cityscapes/panoptic-segmentation/dinat/" + _L + "90k.yaml",
        "mask2former_dinat_large_cityscapes_panoptic.pth",
        {"PQ": 67.2, "AP": 44.5, "mIoU": 83.4},
    ),
    _in1k_backbone("mini", 81.8),
    _in1k_backbone("tiny", 82.7),
    _in1k_backbone("small", 83.8),
    _in1k_backbone("base", 84.4),
    _backbone("dinat_large_in22k_in1k_224", "imagenet1k", None, "dinat_large_in22k_in1k_224.pth", _IN1K_URL, 86.6),
    _backbone("dinat_large_in22k_in1k_384", "imagenet1k", None, "dinat_large_in22k_in1k_384.pth", _IN1K_URL, 87.4),
    _backbone(
        "dinat_large_in22k_in1k_384_11x11", "imagenet1k", None, "dinat_large_in22k_in1k_384_11x11.pth", _IN1K_URL,
        87.5,
    ),
    # ImageNet-22K pre-training only: no top-1 is published for these.
    _backbone("dinat_large_in22k", "imagenet22k", None, "dinat_large_in22k_224.pth", _IN22K_URL, None),
    _backbone(
        "dinat_large_in22k_11x11interp", "imagenet22k", _COCO_PAN + _L + "100ep.yaml",
        "dinat_large_in22k_224_11x11interp.pth", _IN22K_URL, None,
    ),
)  # fmt: skip


def list_models(kind: str | None = None, task: str | None = None) -> list[ZooModel]:
    """The published models, optionally only one kind ("segmentation"/"backbone") or task."""
    return [m for m in _MODELS if (kind is None or m.kind == kind) and (task is None or m.task == task)]


def get(name: str) -> ZooModel:
    for model in _MODELS:
        if model.name == name:
            return model
    raise KeyError(f"unknown model-zoo name {name!r}; known names: {', '.join(m.name for m in _MODELS)}")


def cache_dir() -> str:
    """$DINAT_M2F_CACHE, else $XDG_CACHE_HOME/dinat_m2f, else ~/.cache/dinat_m2f."""
    if os.environ.get("DINAT_M2F_CACHE"):
        return os.environ["DINAT_M2F_CACHE"]
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(xdg, "dinat_m2f")


def cached_path(name: str) -> str:
    return os.path.join(cache_dir(), get(name).file_name)


def sha256_of(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _progress(total: int | None, initial: int, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, unit="B", unit_scale=True, desc=desc, file=sys.stderr, leave=False)


def download(url: str, dest: str, sha256: str | None = None, progress: bool = True, timeout: float = 30.0) -> str:
    """Fetch ``url`` into ``dest``, resuming a partial ``dest + '.part'`` with an HTTP Range request.

    The file is renamed into place only when complete (and, when ``sha256`` is given, when its digest matches;
    a mismatch deletes the partial file and raises ChecksumError). ``file://`` addresses are copied.
    """
    os.makedirs(os.path.dirname(os.path.abspath(dest)), exist_ok=True)
    part = dest + ".part"
    done = os.path.getsize(part) if os.path.exists(part) else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={done}-"} if done else {})
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and done:  # the partial file already holds everything the server has
            response = None
        else:
            raise
    if response is not None:
        with response:
            resumed = done and getattr(response, "status", 200) == 206
            if not resumed:
                done = 0  # the server ignored the Range header (or nothing to resume): start over
            length = response.headers.get("Content-Length")
            total = done + int(length) if length is not None else None
            bar = _progress(total, done, os.path.basename(dest)) if progress else None
            with open(part, "ab" if resumed else "wb") as f:
                while chunk := response.read(_CHUNK):
                    f.write(chunk)
                    if bar is not None:
                        bar.update(len(chunk))
            if bar is not None:
                bar.close()
            if total is not None and os.path.getsize(part) != total:
                raise ChecksumError(
                    f"{url}: download stopped at {os.path.getsize(part)} of {total} bytes; run again to resume "
                    f"from {part}"
                )
    if sha256 is not None:
        actual = sha256_of(part)
        if actual != sha256.lower():
            os.remove(part)
            raise ChecksumError(f"{url}: sha256 {actual} does not match the recorded {sha256}; the file was removed")
    os.replace(part, dest)
    return dest


def get_weights(name: str, progress: bool = True) -> str:
    """Local path of a model-zoo file: the cached copy, else a download into the cache.

    Without a network the error says which file to fetch from where and where to put it.
    """
    model = get(name)
    dest = cached_path(name)
    if os.path.isfile(dest):
        return dest
    try:
        return download(model.url, dest, sha256=model.sha256, progress=progress)
    except OSError as e:  # URLError and HTTPError are OSErrors
        raise WeightsUnavailableError(
            f"model-zoo weights {name!r} are not in the cache and could not be downloaded ({e}). "
            f"Fetch {model.url} on a machine with a network and put it at {dest} "
            "(or set DINAT_M2F_CACHE to the folder that holds it)"
        ) from None
