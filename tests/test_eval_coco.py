"""COCO panoptic PQ and COCO instance mask AP: perfect predictions score 100, corrupted ones score what
panopticapi / pycocotools (and detectron2's own COCOPanopticEvaluator) compute on the same predictions."""

from __future__ import annotations

import contextlib
import copy
import io
import json
import os

import numpy as np
import pytest
from detectron2.data.datasets.builtin_meta import COCO_CATEGORIES
from eval_fixtures import instances_output, panoptic_output, register, rle, run
from mini_datasets import Segment, make_coco

from dinat_m2f.evaluation import COCOEvaluator, COCOPanopticEvaluator

CONTIGUOUS = {c["id"]: i for i, c in enumerate(COCO_CATEGORIES)}  # things are 0..79, stuff 80..132
DATASET_ID = {v: k for k, v in CONTIGUOUS.items()}
PERSON, BICYCLE, CAR = 1, 2, 3


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("coco_root"))
    images = make_coco(root, num_images=2)
    ann = os.path.join(root, "coco", "annotations")
    meta = {
        "thing_classes": [c["name"] for c in COCO_CATEGORIES],
        "stuff_classes": [c["name"] for c in COCO_CATEGORIES],
        "thing_dataset_id_to_contiguous_id": {c["id"]: i for i, c in enumerate(COCO_CATEGORIES) if c["isthing"]},
        "stuff_dataset_id_to_contiguous_id": dict(CONTIGUOUS),
        "panoptic_json": os.path.join(ann, "panoptic_val2017.json"),
        "panoptic_root": os.path.join(root, "coco", "panoptic_val2017"),
        "json_file": os.path.join(ann, "instances_val2017.json"),
        "evaluator_type": "coco_panoptic_seg",
        "label_divisor": 1000,
        "ignore_label": 255,
    }
    inputs = [
        {"file_name": os.path.join(root, "coco", "val2017", im.stem + ".jpg"), "image_id": im.image_id} for im in images
    ]
    name = register("coco_panoptic", inputs, **meta)
    return {"root": root, "images": images, "inputs": inputs, "name": name, "meta": meta}


def _contiguous(s: Segment) -> int:
    return CONTIGUOUS[s.category_id]


# ------------------------------------------------------------------------------------------------ panoptic
def _corrupted_panoptic(images):
    """Image 0: the car is left void and the (non-crowd) person is called a bicycle. Image 1: the two stuff
    regions are predicted as one segment of the bottom class."""
    out = []
    for i, im in enumerate(images):
        segs = [copy.copy(s) for s in im.segments]
        if i == 0:
            segs = [s for s in segs if s.category_id != CAR]
            for s in segs:
                if s.category_id == PERSON and not s.iscrowd:
                    s.category_id = BICYCLE
        else:
            top, bottom = segs[0], segs[1]
            segs = [Segment(bottom.category_id, top.mask | bottom.mask, False), *segs[2:]]
        out.append(panoptic_output(im, _contiguous, segs))
    return out


def _pq_compute_directly(coco, outputs, folder) -> dict:
    """panopticapi's pq_compute on prediction files written here, independently of the evaluator."""
    from panopticapi.evaluation import pq_compute
    from panopticapi.utils import id2rgb

    os.makedirs(folder, exist_ok=True)
    anns = []
    for im, out in zip(coco["images"], outputs):
        pan, infos = out["panoptic_seg"]
        png = im.stem + ".png"
        from PIL import Image

        Image.fromarray(id2rgb(pan.numpy())).save(os.path.join(folder, png))
        segs = [{"id": s["id"], "category_id": DATASET_ID[s["category_id"]]} for s in infos]
        anns.append({"image_id": im.image_id, "file_name": png, "segments_info": segs})
    with open(coco["meta"]["panoptic_json"]) as f:
        gt = json.load(f)
    gt["annotations"] = anns
    pred_json = folder + ".json"
    with open(pred_json, "w") as f:
        json.dump(gt, f)
    with contextlib.redirect_stdout(io.StringIO()):
        res = pq_compute(coco["meta"]["panoptic_json"], pred_json, coco["meta"]["panoptic_root"], folder)
    return {"PQ": 100 * res["All"]["pq"], "PQ_th": 100 * res["Things"]["pq"], "PQ_st": 100 * res["Stuff"]["pq"]}


def test_coco_panoptic_perfect(coco):
    outputs = [panoptic_output(im, _contiguous) for im in coco["images"]]
    res = run(COCOPanopticEvaluator(coco["name"]), coco["inputs"], outputs)["panoptic_seg"]
    for key in ("PQ", "SQ", "RQ", "PQ_th", "PQ_st"):
        assert res[key] == pytest.approx(100.0), key


def test_coco_panoptic_corrupted_equals_panopticapi_and_detectron2(coco, tmp_path):
    from detectron2.evaluation import COCOPanopticEvaluator as D2COCOPanopticEvaluator

    outputs = _corrupted_panoptic(coco["images"])
    ours = run(COCOPanopticEvaluator(coco["name"], str(tmp_path / "ours")), coco["inputs"], copy.deepcopy(outputs))
    ours = ours["panoptic_seg"]
    direct = _pq_compute_directly(coco, outputs, str(tmp_path / "direct"))
    d2 = run(D2COCOPanopticEvaluator(coco["name"], str(tmp_path / "d2")), coco["inputs"], copy.deepcopy(outputs))
    d2 = d2["panoptic_seg"]
    assert ours["PQ"] < 90  # the corruption is visible
    for key in ("PQ", "PQ_th", "PQ_st"):
        assert ours[key] == pytest.approx(direct[key], abs=1e-9), key
    for key in d2:
        assert ours[key] == pytest.approx(d2[key], abs=1e-9), key


def test_coco_panoptic_streams_pngs_to_disk(coco):
    ev = COCOPanopticEvaluator(coco["name"])
    ev.reset()
    outputs = [panoptic_output(im, _contiguous) for im in coco["images"]]
    ev.process(coco["inputs"][:1], outputs[:1])
    pred_dir = ev._pred_dir
    assert os.listdir(pred_dir) == [coco["images"][0].stem + ".png"]
    assert all(set(p) == {"image_id", "file_name", "segments_info"} for p in ev._predictions)  # no PNG bytes
    ev.process(coco["inputs"][1:], outputs[1:])
    assert ev.evaluate()["panoptic_seg"]["PQ"] == pytest.approx(100.0)
    assert not os.path.exists(pred_dir)  # scratch directory removed


def test_coco_panoptic_rejects_unknown_class(coco):
    out = panoptic_output(coco["images"][0], lambda s: 500 if s.isthing else _contiguous(s))
    ev = COCOPanopticEvaluator(coco["name"])
    ev.reset()
    with pytest.raises(ValueError, match="thing class 500"):
        ev.process(coco["inputs"][:1], [out])


def test_coco_panoptic_missing_gt_names_file(coco, tmp_path):
    meta = dict(coco["meta"], panoptic_json=str(tmp_path / "nope.json"))
    name = register("coco_panoptic_missing", coco["inputs"], **meta)
    ev = COCOPanopticEvaluator(name)
    ev.reset()
    ev.process(coco["inputs"][:1], [panoptic_output(coco["images"][0], _contiguous)])
    with pytest.raises(FileNotFoundError, match="nope.json"):
        ev.evaluate()


# ------------------------------------------------------------------------------------------------ instance AP
def _instance_outputs(images, corrupt: bool):
    """Non-crowd things with score 1 (perfect) or, if ``corrupt``: the person shifted 3 px right, the car of
    image 1 called a truck, and an extra low-score "car" over image 0's person."""
    outputs = []
    for i, im in enumerate(images):
        masks, classes, scores = [], [], []
        for s in im.segments:
            if not s.isthing or s.iscrowd:
                continue
            mask, cat, score = s.mask, s.category_id, 1.0
            if corrupt and cat == PERSON:
                mask, score = np.roll(s.mask, 3, axis=1), 0.9
            if corrupt and cat == CAR and i == 1:
                cat, score = 8, 0.7  # truck
            masks.append(mask)
            classes.append(CONTIGUOUS[cat])
            scores.append(score)
            if corrupt and cat == PERSON and i == 0:
                masks.append(s.mask)
                classes.append(CONTIGUOUS[CAR])
                scores.append(0.5)
        outputs.append(instances_output(im.height, im.width, masks, classes, scores))
    return outputs


def _pycocotools_ap(json_file: str, outputs, images) -> np.ndarray:
    """pycocotools' segm COCOeval called directly on json results built here."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    results = []
    for im, out in zip(images, outputs):
        inst = out["instances"]
        for m, c, sc in zip(inst.pred_masks.numpy(), inst.pred_classes.tolist(), inst.scores.tolist()):
            results.append({"image_id": im.image_id, "category_id": DATASET_ID[c], "segmentation": rle(m), "score": sc})
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(json_file)
        ev = COCOeval(gt, gt.loadRes(results), "segm")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    stats = ev.stats[:6] * 100
    return np.where(stats >= 0, stats, np.nan)  # detectron2 reports "cannot compute" (-1) as NaN


@pytest.mark.parametrize("use_fast_impl", [True, False])
def test_coco_instance_perfect(coco, use_fast_impl):
    ev = COCOEvaluator(coco["name"], tasks=("segm",), distributed=False, use_fast_impl=use_fast_impl)
    res = run(ev, coco["inputs"], _instance_outputs(coco["images"], corrupt=False))["segm"]
    assert res["AP"] == pytest.approx(100.0)
    assert res["AP-person"] == pytest.approx(100.0)


def test_coco_instance_corrupted_fast_and_slow_equal_pycocotools(coco):
    outputs = _instance_outputs(coco["images"], corrupt=True)
    expected = _pycocotools_ap(coco["meta"]["json_file"], outputs, coco["images"])
    keys = ["AP", "AP50", "AP75", "APs", "APm", "APl"]
    assert 0 < expected[0] < 90
    for use_fast_impl in (True, False):
        ev = COCOEvaluator(coco["name"], tasks=("segm",), distributed=False, use_fast_impl=use_fast_impl)
        res = run(ev, coco["inputs"], copy.deepcopy(outputs))["segm"]
        got = np.array([res[k] for k in keys])
        np.testing.assert_allclose(got, expected, atol=1e-9, equal_nan=True, err_msg=f"use_fast_impl={use_fast_impl}")
