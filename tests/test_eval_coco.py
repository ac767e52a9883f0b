"""COCO panoptic PQ and COCO instance mask AP: perfect predictions score 100, corrupted ones score what
panopticapi / pycocotools (and detectron2's own COCOPanopticEvaluator) compute on the same predictions."""

from __future__ import annotations

import contextlib
import copy
import io
import os

import numpy as np
import pytest
import torch
from detectron2.data.datasets.builtin_meta import COCO_CATEGORIES
from eval_fixtures import instances_output, panoptic_output, pq_directly, pycocotools_segm, register, rle, run
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


def _to_dataset_id(category_id: int, isthing: bool | None = None) -> int:
    return DATASET_ID[category_id]


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
    meta = coco["meta"]
    direct = pq_directly(
        meta["panoptic_json"], meta["panoptic_root"], coco["images"], outputs, _to_dataset_id, str(tmp_path / "d")
    )
    d2 = run(D2COCOPanopticEvaluator(coco["name"], str(tmp_path / "d2")), coco["inputs"], copy.deepcopy(outputs))
    d2 = d2["panoptic_seg"]
    assert ours["PQ"] < 90  # the corruption is visible
    for key in direct:
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


@pytest.mark.parametrize("use_fast_impl", [True, False])
def test_coco_instance_perfect(coco, use_fast_impl):
    ev = COCOEvaluator(coco["name"], tasks=("segm",), distributed=False, use_fast_impl=use_fast_impl)
    res = run(ev, coco["inputs"], _instance_outputs(coco["images"], corrupt=False))["segm"]
    assert res["AP"] == pytest.approx(100.0)
    assert res["AP-person"] == pytest.approx(100.0)


def test_coco_instance_corrupted_fast_and_slow_equal_pycocotools(coco):
    outputs = _instance_outputs(coco["images"], corrupt=True)
    expected = pycocotools_segm(coco["meta"]["json_file"], coco["images"], outputs, _to_dataset_id)
    keys = ["AP", "AP50", "AP75", "APs", "APm", "APl"]
    assert 0 < expected[0] < 90
    for use_fast_impl in (True, False):
        ev = COCOEvaluator(coco["name"], tasks=("segm",), distributed=False, use_fast_impl=use_fast_impl)
        res = run(ev, coco["inputs"], copy.deepcopy(outputs))["segm"]
        got = np.array([res[k] for k in keys])
        np.testing.assert_allclose(got, expected, atol=1e-9, equal_nan=True, err_msg=f"use_fast_impl={use_fast_impl}")


def _to_label_divisor_format(output):
    """The DeepLab-style output: class * label_divisor + instance, -1 = void, segments_info None."""
    pan, infos = output["panoptic_seg"]
    out = torch.full_like(pan, -1)
    for k, s in enumerate(infos):
        out[pan == s["id"]] = s["category_id"] * 1000 + k
    return {"panoptic_seg": (out, None)}


def test_coco_panoptic_label_divisor_format(coco):
    outputs = _corrupted_panoptic(coco["images"])
    expected = run(COCOPanopticEvaluator(coco["name"]), coco["inputs"], copy.deepcopy(outputs))["panoptic_seg"]
    converted = [_to_label_divisor_format(o) for o in outputs]
    got = run(COCOPanopticEvaluator(coco["name"]), coco["inputs"], converted)["panoptic_seg"]
    assert got["PQ"] < 90
    for key in expected:
        assert got[key] == pytest.approx(expected[key], abs=1e-9), key


def test_fast_and_slow_cocoeval_agree_on_random_predictions(coco):
    """All 12 COCO summary numbers of faster-coco-eval and pycocotools, on many random masks, scores and classes
    (including score ties), for both custom and default max detections."""
    from pycocotools.coco import COCO

    from dinat_m2f.evaluation import evaluate_predictions_on_coco

    rng = np.random.default_rng(0)
    results = []
    for im in coco["images"]:
        for s in im.segments:
            if not s.isthing:
                continue
            for _ in range(6):
                mask = np.roll(s.mask, tuple(rng.integers(-4, 5, size=2)), axis=(0, 1))
                score = float(rng.choice([0.3, 0.5, 0.5, 0.9, rng.random()]))
                cat = int(rng.choice([s.category_id, PERSON, CAR, BICYCLE]))
                results.append({"image_id": im.image_id, "category_id": cat, "segmentation": rle(mask), "score": score})
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(coco["meta"]["json_file"])
    for max_dets in ([1, 10, 100], [1, 5, 7]):
        fast = evaluate_predictions_on_coco(gt, results, "segm", use_fast_impl=True, max_dets_per_image=max_dets)
        slow = evaluate_predictions_on_coco(gt, results, "segm", use_fast_impl=False, max_dets_per_image=max_dets)
        assert 0 < slow.stats[0] < 0.9
        np.testing.assert_allclose(fast.stats[:12], slow.stats[:12], atol=1e-12, err_msg=str(max_dets))
        np.testing.assert_allclose(fast.eval["precision"], slow.eval["precision"], atol=1e-12)
