"""Cityscapes data: preparation through cityscapesscripts, registrations (root with a dot) and mappers."""

from __future__ import annotations

import contextlib
import io
import json
import os

import numpy as np
import pytest
import torch
from cityscapesscripts.helpers.labels import id2label
from detectron2.data import DatasetCatalog, MetadataCatalog
from mini_datasets import load_prep_script, make_cityscapes, registered_under
from panopticapi.utils import rgb2id
from PIL import Image

from dinat_m2f.data import MaskFormerInstanceDatasetMapper, MaskFormerPanopticDatasetMapper


@pytest.fixture(scope="module")
def cityscapes(tmp_path_factory):
    # A root with a "." in it: detectron2's own panoptic loader derives label paths by cutting at the first ".".
    root = str(tmp_path_factory.mktemp("city") / "data.v1")
    images = {split: make_cityscapes(root, split, num_images=2) for split in ("train", "val")}
    with contextlib.redirect_stdout(io.StringIO()):
        load_prep_script("prepare_cityscapes").main(["--root", root, "--workers", "1"])
    with registered_under(root):
        yield root, images


def _gt(root, split, stem, kind):
    return os.path.join(root, "cityscapes", "gtFine", split, "frankfurt", f"{stem}_gtFine_{kind}")


def test_train_ids_from_polygons(cityscapes):
    root, images = cityscapes
    for img in images["val"]:
        train = np.asarray(Image.open(_gt(root, "val", img.stem, "labelTrainIds.png")))
        label_ids = np.asarray(Image.open(_gt(root, "val", img.stem, "labelIds.png")))
        want = np.vectorize(lambda v: id2label[int(v)].trainId)(label_ids)
        np.testing.assert_array_equal(train, want)
        assert {0, 2, 10, 11, 13} <= set(np.unique(train).tolist())  # road, building, sky, person, car


def test_panoptic_prep_matches_instance_ids(cityscapes):
    root, images = cityscapes
    with open(os.path.join(root, "cityscapes", "gtFine", "cityscapes_panoptic_val.json")) as f:
        pan_json = json.load(f)
    for img, ann in zip(images["val"], pan_json["annotations"]):
        assert ann["image_id"] == img.stem
        pan = rgb2id(
            np.asarray(
                Image.open(os.path.join(root, "cityscapes", "gtFine", "cityscapes_panoptic_val", ann["file_name"]))
            )
        )
        for s in img.segments:
            if s.category_id < 7:  # void labels are not segments
                continue
            ids = np.unique(pan[s.mask])
            assert len(ids) == 1
            info = next(x for x in ann["segments_info"] if x["id"] == ids[0])
            assert info["category_id"] == s.category_id


def test_prep_is_resumable_and_names_missing_folder(cityscapes, tmp_path):
    root, images = cityscapes
    out = _gt(root, "val", images["val"][0].stem, "labelTrainIds.png")
    mtime = os.path.getmtime(out)
    with contextlib.redirect_stdout(io.StringIO()):
        load_prep_script("prepare_cityscapes").main(["--root", root, "--workers", "1"])
    assert os.path.getmtime(out) == mtime
    with pytest.raises(FileNotFoundError, match="cityscapes/gtFine"):
        load_prep_script("prepare_cityscapes").main(["--root", str(tmp_path)])


def test_registrations(cityscapes):
    root, images = cityscapes
    sem = DatasetCatalog.get("cityscapes_fine_sem_seg_val")
    assert len(sem) == 2 and all(d["sem_seg_file_name"].endswith("_labelTrainIds.png") for d in sem)
    assert MetadataCatalog.get("cityscapes_fine_sem_seg_val").evaluator_type == "cityscapes_sem_seg"
    ins = DatasetCatalog.get("cityscapes_fine_instance_seg_val")
    cats = sorted((a["category_id"], bool(a["iscrowd"])) for a in ins[0]["annotations"])
    assert cats == [(0, False), (2, False), (2, False), (2, True)]  # person, 2 cars, the car group (crowd)
    pan = DatasetCatalog.get("cityscapes_fine_panoptic_val")
    meta = MetadataCatalog.get("cityscapes_fine_panoptic_val")
    assert meta.evaluator_type == "cityscapes_panoptic_seg" and meta.label_divisor == 1000
    assert meta.gt_dir == os.path.join(root, "cityscapes", "gtFine", "val")
    for d in pan:
        assert os.path.isfile(d["sem_seg_file_name"]) and os.path.isfile(d["pan_seg_file_name"])
    things = sorted(s["category_id"] for s in pan[0]["segments_info"] if s["isthing"])
    assert things == [11, 13, 13, 13]  # person, 2 cars + the car group (a crowd segment in cityscapesscripts)


def test_panoptic_mapper_on_cityscapes(cityscapes):
    root, images = cityscapes
    d = DatasetCatalog.get("cityscapes_fine_panoptic_val")[0]
    out = MaskFormerPanopticDatasetMapper(augmentations=[], image_format="RGB", ignore_label=255, size_divisibility=-1)(
        d
    )
    inst = out["instances"]
    crowd = [s for s in d["segments_info"] if s["iscrowd"]]
    assert len(inst) == len(d["segments_info"]) - len(crowd)
    img = next(i for i in images["val"] if i.stem == d["image_id"])
    cars = [s.mask for s in img.segments if s.category_id == 26 and s.isthing]
    got = [m.numpy() for c, m in zip(inst.gt_classes.tolist(), inst.gt_masks) if c == 13]
    assert len(got) == 2 and all(any((g == c).all() for c in cars) for g in got)
    train = np.asarray(Image.open(d["sem_seg_file_name"]))
    np.testing.assert_array_equal(out["sem_seg"].numpy(), train)


def test_instance_mapper_on_cityscapes_polygons(cityscapes):
    d = DatasetCatalog.get("cityscapes_fine_instance_seg_val")[0]
    out = MaskFormerInstanceDatasetMapper(augmentations=[], image_format="RGB", size_divisibility=-1)(d)
    inst = out["instances"]
    assert sorted(inst.gt_classes.tolist()) == [0, 2, 2]  # person, 2 cars; the crowd is dropped
    ids = np.asarray(
        Image.open(d["file_name"].replace("leftImg8bit", "gtFine", 2).replace("gtFine.png", "gtFine_instanceIds.png"))
    )
    for m in inst.gt_masks.numpy():
        values, counts = np.unique(ids[m], return_counts=True)
        # polygons rasterised by pycocotools vs PIL differ by at most a boundary pixel
        assert counts.max() / counts.sum() > 0.8 and values[counts.argmax()] >= 24000


def test_instance_mapper_crop_drops_instances_outside(cityscapes):
    from detectron2.data import transforms as T

    d = DatasetCatalog.get("cityscapes_fine_instance_seg_val")[0]
    full = MaskFormerInstanceDatasetMapper(augmentations=[], image_format="RGB", size_divisibility=-1)(d)
    crop = T.CropTransform(0, 0, 40, 48)  # x < 40: the first car partly, not the second car nor the person
    out = MaskFormerInstanceDatasetMapper(augmentations=[crop], image_format="RGB", size_divisibility=-1)(d)
    inst = out["instances"]
    assert out["image"].shape == (3, 48, 40) and inst.gt_classes.tolist() == [2]
    first_car = next(
        m
        for c, m in zip(full["instances"].gt_classes.tolist(), full["instances"].gt_masks)
        if c == 2 and m[:, :40].any()
    )
    assert torch.equal(inst.gt_masks[0], first_car[:, :40])
