"""COCO data: semantic-from-panoptic preparation, panoptic/instance registrations and the LSJ mappers."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data import transforms as T
from detectron2.data.datasets.builtin_meta import COCO_CATEGORIES
from mini_datasets import corrupt_file, load_prep_script, make_coco, registered_under
from PIL import Image

from dinat_m2f.data import (
    COCOInstanceNewBaselineDatasetMapper,
    COCOPanopticNewBaselineDatasetMapper,
    CorruptSampleError,
)

CONTIGUOUS = {c["id"]: i for i, c in enumerate(COCO_CATEGORIES)}


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("coco"))
    images = {split: make_coco(root, split, num_images=2) for split in ("train2017", "val2017")}
    load_prep_script("prepare_coco_semantic_annos_from_panoptic_annos").main(["--root", root, "--workers", "2"])
    with registered_under(root):
        yield root, images


def test_semantic_from_panoptic_prep(coco, tmp_path):
    root, images = coco
    for split in ("train2017", "val2017"):
        for img in images[split]:
            sem = np.asarray(Image.open(os.path.join(root, "coco", f"panoptic_semseg_{split}", img.stem + ".png")))
            # every category (things too, crowds included) gets its contiguous id, void 255
            np.testing.assert_array_equal(sem, img.semantic(255, CONTIGUOUS))
    with pytest.raises(FileNotFoundError, match="panoptic_val2017.json"):
        load_prep_script("prepare_coco_semantic_annos_from_panoptic_annos").main(["--root", str(tmp_path)])


def test_panoptic_with_sem_seg_registration(coco):
    root, images = coco
    dicts = DatasetCatalog.get("coco_2017_val_panoptic_with_sem_seg")
    meta = MetadataCatalog.get("coco_2017_val_panoptic_with_sem_seg")
    assert meta.evaluator_type == "coco_panoptic_seg" and meta.label_divisor == 1000 and meta.ignore_label == 255
    assert len(meta.stuff_dataset_id_to_contiguous_id) == 133 and len(meta.thing_dataset_id_to_contiguous_id) == 80
    assert len(meta.stuff_classes) == 133 and meta.json_file.endswith("instances_val2017.json")
    assert meta.panoptic_root == os.path.join(root, "coco", "panoptic_val2017")
    for d, img in zip(dicts, images["val2017"]):
        assert d["image_id"] == img.image_id and os.path.isfile(d["sem_seg_file_name"])
        got = sorted((s["category_id"], s["isthing"], s["iscrowd"]) for s in d["segments_info"])
        want = sorted((CONTIGUOUS[s.category_id], s.isthing, int(s.iscrowd)) for s in img.segments)
        assert got == want
    plain = DatasetCatalog.get("coco_2017_val_panoptic")
    assert [s["category_id"] for s in plain[0]["segments_info"]] == [
        s["category_id"] for s in dicts[0]["segments_info"]
    ]
    assert "sem_seg_file_name" not in plain[0]


def test_instances_registration(coco):
    root, images = coco
    dicts = DatasetCatalog.get("coco_2017_val")
    assert MetadataCatalog.get("coco_2017_val").evaluator_type == "coco"
    assert MetadataCatalog.get("coco_2017_val").json_file.startswith(root)
    anns = dicts[0]["annotations"]
    assert sorted((a["category_id"], a["iscrowd"]) for a in anns) == [(0, 0), (0, 1), (2, 0)]  # person, crowd, car


def _lsj(cls, flip=False, size=64):
    augs = [T.RandomFlip(prob=1.0)] if flip else []
    augs += [T.ResizeScale(1.0, 1.0, size, size), T.FixedSizeCrop((size, size))]
    return cls(augmentations=augs, image_format="RGB")


def test_lsj_panoptic_mapper_masks_boxes_and_padding(coco):
    _, images = coco
    d = DatasetCatalog.get("coco_2017_val_panoptic_with_sem_seg")[0]
    img = images["val2017"][0]
    out = _lsj(COCOPanopticNewBaselineDatasetMapper)(d)
    assert out["image"].shape == (3, 64, 64)  # 48x64 fits the 64x64 box at scale 1, padded at the bottom
    assert (out["image"][:, 48:] == 128).all()
    assert out["padding_mask"][48:].all() and not out["padding_mask"][:48].any()
    inst = out["instances"]
    segs = [s for s in img.segments if not s.iscrowd]  # the crowd is not a target
    assert sorted(inst.gt_classes.tolist()) == sorted(CONTIGUOUS[s.category_id] for s in segs)
    for c, m, box in zip(inst.gt_classes.tolist(), inst.gt_masks, inst.gt_boxes.tensor):
        s = next(s for s in segs if CONTIGUOUS[s.category_id] == c)
        np.testing.assert_array_equal(m[:48].numpy(), s.mask)
        ys, xs = np.nonzero(s.mask)
        assert box.tolist() == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]


def test_lsj_instance_mapper_polygons_crowd_and_flip(coco):
    _, images = coco
    d = DatasetCatalog.get("coco_2017_val")[0]
    things = [s for s in images["val2017"][0].segments if s.isthing and not s.iscrowd]
    for flip in (False, True):
        out = _lsj(COCOInstanceNewBaselineDatasetMapper, flip=flip)(d)
        inst = out["instances"]
        assert sorted(inst.gt_classes.tolist()) == [0, 2]
        for c, m in zip(inst.gt_classes.tolist(), inst.gt_masks):
            want = next(s.mask for s in things if CONTIGUOUS[s.category_id] == c)
            np.testing.assert_array_equal(m[:48].numpy(), want[:, ::-1] if flip else want)
            assert not m[48:].any()


def test_lsj_from_config_scales_to_image_size(coco):
    from dinat_m2f.config import get_cfg

    cfg = get_cfg()
    cfg.INPUT.IMAGE_SIZE = 32
    cfg.INPUT.MIN_SCALE, cfg.INPUT.MAX_SCALE = 0.5, 2.0
    for cls, name in (
        (COCOPanopticNewBaselineDatasetMapper, "coco_2017_train_panoptic"),
        (COCOInstanceNewBaselineDatasetMapper, "coco_2017_train"),
    ):
        mapper = cls(cfg, True)
        for d in DatasetCatalog.get(name):
            out = mapper(d)
            assert out["image"].shape == (3, 32, 32) and out["padding_mask"].shape == (32, 32)
            inst = out["instances"]
            assert inst.gt_masks.shape[1:] == (32, 32) and inst.gt_masks.dtype == torch.bool
            assert all(m.any() for m in inst.gt_masks)  # instances emptied by the crop are dropped
            assert len(inst.gt_boxes) == len(inst.gt_classes)


def test_lsj_corrupt_files(coco, tmp_path):
    d = dict(DatasetCatalog.get("coco_2017_val_panoptic")[0])
    bad = str(tmp_path / "broken.png")
    corrupt_file(bad)
    with pytest.raises(CorruptSampleError, match="broken.png"):
        _lsj(COCOPanopticNewBaselineDatasetMapper)({**d, "pan_seg_file_name": bad})
    with pytest.raises(CorruptSampleError, match="broken.png"):
        _lsj(COCOPanopticNewBaselineDatasetMapper)({**d, "file_name": bad})
    other = DatasetCatalog.get("coco_2017_val_panoptic")[1]["segments_info"]
    with pytest.raises(CorruptSampleError, match="not in segments_info"):
        _lsj(COCOPanopticNewBaselineDatasetMapper)({**d, "segments_info": other})
    mapper = _lsj(COCOInstanceNewBaselineDatasetMapper)
    mapper.skip_corrupt = True
    inst = dict(DatasetCatalog.get("coco_2017_val")[0])
    assert mapper({**inst, "file_name": str(tmp_path / "missing.jpg")}) is None
    assert mapper.num_skipped == 1
