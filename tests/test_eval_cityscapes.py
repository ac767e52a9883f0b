"""Cityscapes semantic (IoU), instance (AP) and panoptic (PQ) through cityscapesscripts: perfect predictions
score 100, corrupted ones score what numpy by hand / cityscapesscripts / panopticapi compute directly."""

from __future__ import annotations

import contextlib
import copy
import glob
import io
import os

import numpy as np
import pytest
from cityscapesscripts.helpers.labels import id2label, labels, trainId2label
from detectron2.data.datasets.builtin_meta import CITYSCAPES_CATEGORIES
from detectron2.evaluation import DatasetEvaluators
from eval_fixtures import instances_output, miou_by_hand, panoptic_output, pq_directly, register, run, sem_seg_output
from mini_datasets import Segment, make_cityscapes
from PIL import Image

from dinat_m2f.config import get_cfg
from dinat_m2f.evaluation import (
    CityscapesInstanceEvaluator,
    CityscapesPanopticEvaluator,
    CityscapesSemSegEvaluator,
    build_evaluator,
)
from dinat_m2f.evaluation.cityscapes_evaluation import cityscapesscripts_on_numpy2

INSTANCE_CLASSES = ["person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle"]
EVAL_LABEL_IDS = [lb.id for lb in labels if not lb.ignoreInEval]
SIDEWALK, ROAD, PERSON, RIDER, CAR = 8, 7, 24, 25, 26


@pytest.fixture(scope="module")
def cs(tmp_path_factory):
    from cityscapesscripts.preparation.createPanopticImgs import convert2panoptic

    root = str(tmp_path_factory.mktemp("cs_root"))
    images = make_cityscapes(root, "val", num_images=2)
    gt_root = os.path.join(root, "cityscapes", "gtFine")
    with contextlib.redirect_stdout(io.StringIO()):  # cityscapesscripts' own panoptic GT, as prepare_cityscapes does
        convert2panoptic(gt_root, gt_root, setNames=["val"])
    inputs = [
        {
            "file_name": os.path.join(
                root, "cityscapes", "leftImg8bit", "val", "frankfurt", im.stem + "_leftImg8bit.png"
            ),
            "image_id": im.stem,
            "height": im.height,
            "width": im.width,
        }
        for im in images
    ]
    gt_dir = os.path.join(gt_root, "val")
    sem = register("cityscapes_fine_sem_seg", inputs, gt_dir=gt_dir, evaluator_type="cityscapes_sem_seg")
    ins = register(
        "cityscapes_fine_instance_seg",
        inputs,
        gt_dir=gt_dir,
        thing_classes=INSTANCE_CLASSES,
        evaluator_type="cityscapes_instance",
    )
    names = [c["name"] for c in CITYSCAPES_CATEGORIES]  # detectron2's panoptic metadata: indexed by train id
    pan = register(
        "cityscapes_fine_panoptic",
        inputs,
        gt_dir=gt_dir,
        panoptic_root=os.path.join(gt_root, "cityscapes_panoptic_val"),
        panoptic_json=os.path.join(gt_root, "cityscapes_panoptic_val.json"),
        thing_classes=names,
        stuff_classes=names,
        thing_dataset_id_to_contiguous_id={c["id"]: c["trainId"] for c in CITYSCAPES_CATEGORIES if c["isthing"]},
        stuff_dataset_id_to_contiguous_id={c["id"]: c["trainId"] for c in CITYSCAPES_CATEGORIES if not c["isthing"]},
        evaluator_type="cityscapes_panoptic_seg",
        label_divisor=1000,
        ignore_label=255,
    )
    return {"images": images, "inputs": inputs, "sem": sem, "ins": ins, "pan": pan, "gt_dir": gt_dir}


def _cfg():
    cfg = get_cfg()
    cfg.MODEL.MASK_FORMER.TEST.PANOPTIC_ON = True
    cfg.MODEL.MASK_FORMER.TEST.INSTANCE_ON = True
    cfg.MODEL.MASK_FORMER.TEST.SEMANTIC_ON = True
    return cfg


def _label_map(im, segments=None) -> np.ndarray:
    """Cityscapes label ids of the segments; 0 (unlabeled) elsewhere."""
    out = np.zeros((im.height, im.width), dtype=np.int64)
    for s in im.segments if segments is None else segments:
        out[s.mask] = s.category_id
    return out


def _to_train_ids(label_ids: np.ndarray) -> np.ndarray:
    lut = np.full(256, 255, dtype=np.int64)
    for lb in labels:
        if 0 <= lb.id < 256 and lb.trainId not in (-1, 255):
            lut[lb.id] = lb.trainId
    return lut[label_ids]


# ------------------------------------------------------------------------------------------------ semantic
def test_cityscapes_semantic_perfect(cs):
    ev = build_evaluator(_cfg(), cs["sem"], output_folder=None)
    assert type(ev) is CityscapesSemSegEvaluator
    outputs = [sem_seg_output(_to_train_ids(_label_map(im)), 19) for im in cs["images"]]
    res = run(ev, cs["inputs"], outputs)["sem_seg"]
    for key in ("IoU", "iIoU", "IoU_sup", "iIoU_sup"):
        assert res[key] == pytest.approx(100.0), key


def test_cityscapes_semantic_corrupted_equals_hand_computed(cs):
    """Image 0: the person predicted as rider; image 1: the sidewalk predicted as road."""
    preds, gts = [], []
    for i, im in enumerate(cs["images"]):
        gt = _label_map(im)
        pred = gt.copy()
        pred[gt == (PERSON if i == 0 else SIDEWALK)] = RIDER if i == 0 else ROAD
        preds.append(pred)
        gts.append(np.where(np.isin(gt, EVAL_LABEL_IDS), gt, 255))
    outputs = [sem_seg_output(_to_train_ids(p), 19) for p in preds]
    res = run(CityscapesSemSegEvaluator(cs["sem"]), cs["inputs"], outputs)["sem_seg"]
    expected = miou_by_hand(gts, preds)
    assert 50 < expected < 95
    assert res["IoU"] == pytest.approx(expected, abs=1e-6)


def test_cityscapes_missing_gt_dir_is_named(cs, tmp_path):
    name = register("cityscapes_missing", cs["inputs"], gt_dir=str(tmp_path / "nowhere"))
    ev = CityscapesSemSegEvaluator(name)
    ev.reset()
    ev.process(cs["inputs"][:1], [sem_seg_output(np.zeros((48, 96), dtype=np.int64), 19)])
    with pytest.raises(FileNotFoundError, match="nowhere"):
        ev.evaluate()


# ------------------------------------------------------------------------------------------------ instance
def _instance_outputs(images, corrupt: bool, classes: list[str]):
    """Instances (class index into ``classes``). Corrupted: image 0 loses its first car and its person becomes
    a rider with score 0.6; image 1's second car is shifted 5 px with score 0.7."""
    outs = []
    for i, im in enumerate(images):
        masks, cls, scores = [], [], []
        cars = 0
        for s in im.segments:
            if not s.isthing:
                continue
            name, mask, score = id2label[s.category_id].name, s.mask, 1.0
            if corrupt and name == "car":
                cars += 1
                if i == 0 and cars == 1:
                    continue
                if i == 1 and cars == 2:
                    mask, score = np.roll(mask, 5, axis=1), 0.7
            if corrupt and i == 0 and name == "person":
                name, score = "rider", 0.6
            masks.append(mask)
            cls.append(classes.index(name))
            scores.append(score)
        outs.append(instances_output(im.height, im.width, masks, cls, scores))
    return outs


def _cityscapes_ap_directly(cs, outputs, folder) -> dict:
    """cityscapesscripts' instance evaluation on prediction files written here (its documented format)."""
    from cityscapesscripts.evaluation import evalInstanceLevelSemanticLabeling as cs_eval  # noqa: N813

    os.makedirs(folder)
    for x, out in zip(cs["inputs"], outputs):
        stem = os.path.splitext(os.path.basename(x["file_name"]))[0]
        inst = out["instances"]
        with open(os.path.join(folder, stem + "_pred.txt"), "w") as f:
            for k, (m, c, sc) in enumerate(
                zip(inst.pred_masks.numpy(), inst.pred_classes.tolist(), inst.scores.tolist())
            ):
                png = f"{stem}_{k}.png"
                Image.fromarray(m.astype(np.uint8) * 255).save(os.path.join(folder, png))
                label_id = next(lb.id for lb in labels if lb.name == INSTANCE_CLASSES[c])
                f.write(f"{png} {label_id} {sc}\n")
    args = cs_eval.args
    args.predictionPath, args.predictionWalk, args.JSONOutput, args.quiet = folder, None, False, True
    args.gtInstancesFile = os.path.join(folder, "gtInstances.json")
    gts = sorted(glob.glob(os.path.join(cs["gt_dir"], "*", "*_gtFine_instanceIds.png")))
    with cityscapesscripts_on_numpy2(folder), contextlib.redirect_stdout(io.StringIO()):
        preds = [cs_eval.getPrediction(g, args) for g in gts]
        res = cs_eval.evaluateImgLists(preds, gts, args)["averages"]
    return {"AP": 100 * res["allAp"], "AP50": 100 * res["allAp50%"]}


def test_cityscapes_instance_perfect(cs):
    ev = build_evaluator(_cfg(), cs["ins"], output_folder=None)
    assert type(ev) is CityscapesInstanceEvaluator
    res = run(ev, cs["inputs"], _instance_outputs(cs["images"], False, INSTANCE_CLASSES))["segm"]
    assert res == {"AP": pytest.approx(100.0), "AP50": pytest.approx(100.0)}


def test_cityscapes_instance_corrupted_equals_cityscapesscripts(cs, tmp_path):
    outputs = _instance_outputs(cs["images"], True, INSTANCE_CLASSES)
    res = run(CityscapesInstanceEvaluator(cs["ins"]), cs["inputs"], copy.deepcopy(outputs))["segm"]
    expected = _cityscapes_ap_directly(cs, outputs, str(tmp_path / "direct"))
    assert expected["AP"] < 90
    assert res["AP"] == pytest.approx(expected["AP"], abs=1e-9)
    assert res["AP50"] == pytest.approx(expected["AP50"], abs=1e-9)
    assert not os.path.exists("matches.json")  # cityscapesscripts' debug file stays out of the working directory


# ------------------------------------------------------------------------------------------------ panoptic
def _train_id(s: Segment) -> int:
    return id2label[s.category_id].trainId


def _panoptic_outputs(images, corrupt: bool):
    """Every non-crowd segment (the "cargroup" crowd region is left void). Corrupted: image 0 loses its first
    car and its person becomes a rider; image 1's sidewalk is merged into the road."""
    outs = []
    for i, im in enumerate(images):
        segs = [copy.copy(s) for s in im.segments if s.segment_id >= 1000 or not id2label[s.category_id].hasInstances]
        if corrupt and i == 0:
            first_car = next(s for s in segs if s.category_id == CAR)
            segs = [s for s in segs if s is not first_car]
            for s in segs:
                if s.category_id == PERSON:
                    s.category_id = RIDER
        if corrupt and i == 1:
            road = next(s for s in segs if s.category_id == ROAD)
            side = next(s for s in segs if s.category_id == SIDEWALK)
            segs = [s for s in segs if s not in (road, side)] + [Segment(ROAD, road.mask | side.mask, False)]
        outs.append(panoptic_output(im, _train_id, segs))
    return outs


def test_cityscapes_panoptic_perfect_all_three_tasks(cs, tmp_path):
    """build_evaluator for cityscapes_panoptic_seg: PQ (cityscapesscripts), IoU and AP, all 100."""
    ev = build_evaluator(_cfg(), cs["pan"], str(tmp_path))
    assert isinstance(ev, DatasetEvaluators)
    types = [type(e) for e in ev._evaluators]
    assert types == [CityscapesPanopticEvaluator, CityscapesSemSegEvaluator, CityscapesInstanceEvaluator]
    outputs = []
    for im, pan in zip(cs["images"], _panoptic_outputs(cs["images"], False)):
        names = [c["name"] for c in CITYSCAPES_CATEGORIES]
        inst = _instance_outputs([im], False, names)[0]
        outputs.append({**pan, **inst, **sem_seg_output(_to_train_ids(_label_map(im)), 19)})
    res = run(ev, cs["inputs"], outputs)
    assert res["panoptic_seg"]["PQ"] == pytest.approx(100.0)
    assert res["sem_seg"]["IoU"] == pytest.approx(100.0)
    assert res["segm"]["AP"] == pytest.approx(100.0)


def test_cityscapes_panoptic_corrupted_equals_cityscapesscripts_and_panopticapi(cs, tmp_path):
    outputs = _panoptic_outputs(cs["images"], True)
    res = run(CityscapesPanopticEvaluator(cs["pan"]), cs["inputs"], copy.deepcopy(outputs))["panoptic_seg"]
    meta_json = os.path.join(os.path.dirname(cs["gt_dir"]), "cityscapes_panoptic_val.json")
    gt_folder = os.path.join(os.path.dirname(cs["gt_dir"]), "cityscapes_panoptic_val")
    to_label = {lb.trainId: lb.id for lb in trainId2label.values() if lb.trainId not in (-1, 255)}
    args = (meta_json, gt_folder, cs["images"], outputs, lambda c, t: to_label[c])
    direct_cs = pq_directly(*args, str(tmp_path / "cs"), lib="cityscapesscripts")
    direct_pa = pq_directly(*args, str(tmp_path / "pa"), lib="panopticapi")
    assert res["PQ"] < 90
    for key in direct_cs:
        assert res[key] == pytest.approx(direct_cs[key], abs=1e-9), key
        assert res[key] == pytest.approx(direct_pa[key], abs=1e-9), key
