"""ADE20K semantic (mIoU), panoptic (PQ + mask AP + mIoU through build_evaluator) and instance (mask AP):
perfect predictions score 100, corrupted ones score what numpy by hand / panopticapi / pycocotools compute."""

from __future__ import annotations

import copy
import os

import numpy as np
import pytest
from detectron2.data.datasets.builtin_meta import ADE20K_SEM_SEG_CATEGORIES
from detectron2.evaluation import DatasetEvaluators
from eval_fixtures import (
    instances_output,
    miou_by_hand,
    panoptic_output,
    pq_directly,
    pycocotools_segm,
    register,
    run,
    sem_seg_output,
    write_instances_gt,
    write_panoptic_gt,
)
from mini_datasets import Segment, make_ade20k
from PIL import Image

from dinat_m2f.config import get_cfg
from dinat_m2f.evaluation import COCOPanopticEvaluator, InstanceSegEvaluator, SemSegEvaluator, build_evaluator
from dinat_m2f.evaluation.coco_evaluation import COCOEvaluator

# The 100 thing classes of the ADE20K instance benchmark, as 0-based ids of the 150-class list.
THING_IDS = sorted(
    (7, 8, 10, 12, 14, 15, 18, 19, 20, 22, 23, 24, 27, 30, 31, 32, 33, 35, 36, 37, 38, 39, 41, 42, 43, 44, 45, 47,
     49, 50, 53, 55, 56, 57, 58, 62, 64, 65, 66, 67, 69, 70, 71, 72, 73, 74, 75, 76, 78, 80, 81, 82, 83, 85, 86, 87,
     88, 89, 90, 92, 93, 95, 97, 98, 102, 103, 104, 107, 108, 110, 111, 112, 115, 116, 118, 119, 120, 121, 123, 124,
     125, 126, 127, 129, 130, 132, 133, 134, 135, 136, 137, 138, 139, 142, 143, 144, 146, 147, 148, 149)
)  # fmt: skip
NAMES = [n.strip() for n in ADE20K_SEM_SEG_CATEGORIES]
CATEGORIES = [{"id": i, "name": n, "isthing": int(i in THING_IDS)} for i, n in enumerate(NAMES)]
WALL, FLOOR, BED, PERSON, CAR = 0, 3, 7, 12, 20


@pytest.fixture(scope="module")
def ade(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("ade_root"))
    images = make_ade20k(root, "validation", num_images=2)
    base = os.path.join(root, "ADEChallengeData2016")
    # What datasets/prepare_ade20k_{sem,pan,ins}_seg.py produce: 0-based semantic PNGs (255 = ignore), the
    # panoptic json/PNGs (category ids 0..149) and the instance json (the 100 thing ids of the 150 list).
    sem_dir = os.path.join(base, "annotations_detectron2", "validation")
    os.makedirs(sem_dir)
    for im in images:
        Image.fromarray(im.semantic(255).astype(np.uint8)).save(os.path.join(sem_dir, im.stem + ".png"))
    pan_json, pan_dir = write_panoptic_gt(base, "ade20k_panoptic_val", images, CATEGORIES, lambda s: s.category_id)
    ins_json = write_instances_gt(
        os.path.join(base, "ade20k_instance_val.json"),
        images,
        [c for c in CATEGORIES if c["isthing"]],
        lambda s: s.category_id,
    )
    inputs = [
        {
            "file_name": os.path.join(base, "images", "validation", im.stem + ".jpg"),
            "sem_seg_file_name": os.path.join(sem_dir, im.stem + ".png"),
            "image_id": im.image_id,
            "height": im.height,
            "width": im.width,
        }
        for im in images
    ]
    sem = register("ade20k_sem_seg", inputs, stuff_classes=NAMES, ignore_label=255, evaluator_type="sem_seg")
    pan_meta = {
        "thing_classes": NAMES,
        "stuff_classes": NAMES,
        "thing_dataset_id_to_contiguous_id": {i: i for i in THING_IDS},
        "stuff_dataset_id_to_contiguous_id": {i: i for i in range(150)},
        "panoptic_json": pan_json,
        "panoptic_root": pan_dir,
        "json_file": ins_json,
        "evaluator_type": "ade20k_panoptic_seg",
        "ignore_label": 255,
        "label_divisor": 1000,
    }
    pan = register("ade20k_panoptic", inputs, **pan_meta)
    ins = register(
        "ade20k_instance",
        inputs,
        thing_classes=[NAMES[i] for i in THING_IDS],
        thing_dataset_id_to_contiguous_id={d: i for i, d in enumerate(THING_IDS)},
        json_file=ins_json,
        evaluator_type="coco",
    )
    return {"images": images, "inputs": inputs, "sem": sem, "pan": pan, "ins": ins, "meta": pan_meta}


def _cfg(panoptic=True, instance=True, semantic=True):
    cfg = get_cfg()
    cfg.MODEL.MASK_FORMER.TEST.PANOPTIC_ON = panoptic
    cfg.MODEL.MASK_FORMER.TEST.INSTANCE_ON = instance
    cfg.MODEL.MASK_FORMER.TEST.SEMANTIC_ON = semantic
    return cfg


def _things(im):
    return [s for s in im.segments if s.isthing]


# ------------------------------------------------------------------------------------------------ semantic
def _corrupt_semantic(images):
    """Image 0: the bed is predicted as floor; image 1: the unlabeled column as wall (ignored, no effect) and
    the right person as a car (a class absent from the ground truth)."""
    preds = []
    for i, im in enumerate(images):
        pred = im.semantic(255)
        if i == 0:
            pred[pred == BED] = FLOOR
        else:
            pred[pred == 255] = WALL
            right_person = [s for s in im.segments if s.category_id == PERSON][-1]
            pred[right_person.mask] = CAR
        preds.append(pred)
    return preds


def test_ade20k_semantic_perfect(ade):
    outputs = [sem_seg_output(im.semantic(255), 150) for im in ade["images"]]
    res = run(build_evaluator(_cfg(), ade["sem"], output_folder=None), ade["inputs"], outputs)["sem_seg"]
    assert res["mIoU"] == pytest.approx(100.0)
    assert res["pACC"] == pytest.approx(100.0)


def test_ade20k_semantic_corrupted_equals_hand_computed(ade):
    preds = _corrupt_semantic(ade["images"])
    evaluator = build_evaluator(_cfg(), ade["sem"], output_folder=None)
    assert isinstance(evaluator, SemSegEvaluator)
    res = run(evaluator, ade["inputs"], [sem_seg_output(p, 150) for p in preds])["sem_seg"]
    expected = miou_by_hand([im.semantic(255) for im in ade["images"]], preds)
    assert 40 < expected < 90
    assert res["mIoU"] == pytest.approx(expected, abs=1e-9)
    beds = [int(s.mask.sum()) for im in ade["images"] for s in im.segments if s.category_id == BED]
    assert res["IoU-bed"] == pytest.approx(100 * beds[1] / (beds[0] + beds[1]), abs=1e-9)  # only image 1's is right


# ------------------------------------------------------------------------------------------------ panoptic
def _all_outputs(images, corrupt: bool):
    """sem_seg + panoptic_seg + instances of each image, perfect or with a known corruption:
    image 0's bed is called a car everywhere (semantic, panoptic, instance); image 1's two persons are merged
    into one panoptic segment and one instance mask; image 1's wall is left void in the panoptic output."""
    outs = []
    for i, im in enumerate(images):
        segs = [copy.copy(s) for s in im.segments]
        if corrupt and i == 0:
            for s in segs:
                if s.category_id == BED:
                    s.category_id = CAR
        if corrupt and i == 1:
            persons = [s for s in segs if s.category_id == PERSON]
            merged = Segment(PERSON, persons[0].mask | persons[1].mask, True)
            segs = [s for s in segs if s.category_id not in (PERSON, WALL)] + [merged]
        sem = np.full((im.height, im.width), 255, dtype=np.int64)
        for s in segs:
            sem[s.mask] = s.category_id
        if corrupt and i == 1:  # the void wall is still wall in the semantic output
            sem[[s for s in im.segments if s.category_id == WALL][0].mask] = WALL
        things = [s for s in segs if s.isthing]
        out = {
            **sem_seg_output(sem, 150),
            **panoptic_output(im, lambda s: s.category_id, segs),
            **instances_output(
                im.height, im.width, [s.mask for s in things], [s.category_id for s in things], [1.0] * len(things)
            ),
        }
        outs.append(out)
    return outs


def test_ade20k_panoptic_build_evaluator_choice(ade):
    ev = build_evaluator(_cfg(), ade["pan"], output_folder=None)
    assert isinstance(ev, DatasetEvaluators)
    assert [type(e) for e in ev._evaluators] == [SemSegEvaluator, COCOPanopticEvaluator, InstanceSegEvaluator]
    ev = build_evaluator(_cfg(panoptic=False, instance=False), ade["pan"], output_folder=None)
    assert isinstance(ev, SemSegEvaluator)  # ADE20K panoptic always reports mIoU


def test_ade20k_panoptic_perfect(ade, tmp_path):
    res = run(build_evaluator(_cfg(), ade["pan"], str(tmp_path)), ade["inputs"], _all_outputs(ade["images"], False))
    assert res["panoptic_seg"]["PQ"] == pytest.approx(100.0)
    assert res["segm"]["AP"] == pytest.approx(100.0)
    assert res["sem_seg"]["mIoU"] == pytest.approx(100.0)


def test_ade20k_panoptic_corrupted_equals_references(ade, tmp_path):
    images, meta = ade["images"], ade["meta"]
    outputs = _all_outputs(images, True)
    res = run(build_evaluator(_cfg(), ade["pan"], str(tmp_path / "out")), ade["inputs"], copy.deepcopy(outputs))

    pq = pq_directly(
        meta["panoptic_json"], meta["panoptic_root"], images, outputs, lambda c, t: c, str(tmp_path / "pq")
    )
    assert res["panoptic_seg"]["PQ"] < 90
    for key in pq:
        assert res["panoptic_seg"][key] == pytest.approx(pq[key], abs=1e-9), key

    ap = pycocotools_segm(meta["json_file"], images, outputs, lambda c: c)
    assert res["segm"]["AP"] < 90
    np.testing.assert_allclose([res["segm"][k] for k in ("AP", "AP50", "AP75", "APs", "APm", "APl")], ap, atol=1e-9)

    sem_preds = [o["sem_seg"].argmax(0).numpy() for o in outputs]
    assert res["sem_seg"]["mIoU"] == pytest.approx(
        miou_by_hand([im.semantic(255) for im in images], sem_preds), abs=1e-9
    )


# ------------------------------------------------------------------------------------------------ instance
def _instance_outputs(images, corrupt: bool):
    """Things with contiguous ids 0..99. Corrupted: image 0's bed gets score 0.6 and a 4-px shift, and an extra
    "person" is predicted over it with score 0.8."""
    contiguous = {d: i for i, d in enumerate(THING_IDS)}
    outs = []
    for i, im in enumerate(images):
        masks, classes, scores = [], [], []
        for s in _things(im):
            mask, score = s.mask, 1.0
            if corrupt and i == 0 and s.category_id == BED:
                mask, score = np.roll(s.mask, 4, axis=0), 0.6
                masks.append(s.mask)
                classes.append(contiguous[PERSON])
                scores.append(0.8)
            masks.append(mask)
            classes.append(contiguous[s.category_id])
            scores.append(score)
        outs.append(instances_output(im.height, im.width, masks, classes, scores))
    return outs


def test_ade20k_instance_perfect(ade):
    ev = build_evaluator(_cfg(), ade["ins"], output_folder=None)
    assert type(ev) is InstanceSegEvaluator
    res = run(ev, ade["inputs"], _instance_outputs(ade["images"], False))["segm"]
    assert res["AP"] == pytest.approx(100.0)
    assert res["AP-bed"] == pytest.approx(100.0)


def test_ade20k_instance_corrupted_equals_pycocotools(ade):
    outputs = _instance_outputs(ade["images"], True)
    res = run(build_evaluator(_cfg(), ade["ins"], output_folder=None), ade["inputs"], copy.deepcopy(outputs))
    expected = pycocotools_segm(ade["meta"]["json_file"], ade["images"], outputs, lambda c: THING_IDS[c])
    assert expected[0] < 90
    np.testing.assert_allclose(
        [res["segm"][k] for k in ("AP", "AP50", "AP75", "APs", "APm", "APl")], expected, atol=1e-9
    )


def test_coco_evaluator_refuses_interleaved_thing_ids(ade):
    """detectron2's rule (thing ids 0..N-1) on ADE20K panoptic fails loudly; InstanceSegEvaluator exists for it."""
    outputs = _all_outputs(ade["images"], False)
    with pytest.raises(ValueError, match="InstanceSegEvaluator"):
        run(COCOEvaluator(ade["pan"], tasks=("segm",), distributed=False), ade["inputs"], outputs)


def test_semantic_ground_truth_errors_name_the_file(ade, tmp_path):
    """A label outside the class list (and not ignore) or an unreadable PNG is an error naming the file."""
    bad_label = str(tmp_path / "bad_label.png")
    gt = ade["images"][0].semantic(255).astype(np.uint8)
    gt[0, 0] = 200
    Image.fromarray(gt).save(bad_label)
    broken = str(tmp_path / "broken.png")
    with open(broken, "wb") as f:
        f.write(b"not a png")
    for path, error in ((bad_label, ValueError), (broken, OSError), (str(tmp_path / "missing.png"), FileNotFoundError)):
        inputs = [dict(ade["inputs"][0], sem_seg_file_name=path)]
        name = register("ade20k_sem_seg_bad", inputs, stuff_classes=NAMES, ignore_label=255, evaluator_type="sem_seg")
        with pytest.raises(error, match=os.path.basename(path)):
            run(SemSegEvaluator(name), inputs, [sem_seg_output(ade["images"][0].semantic(255), 150)])
