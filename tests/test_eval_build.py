"""build_evaluator: the evaluators Mask2Former's train_net picks for each evaluator_type and TEST.*_ON switch."""

from __future__ import annotations

import os

import pytest
from detectron2.data.datasets.builtin_meta import COCO_CATEGORIES
from detectron2.evaluation import DatasetEvaluators
from eval_fixtures import register
from mini_datasets import make_coco

from dinat_m2f.config import get_cfg
from dinat_m2f.evaluation import (
    CityscapesInstanceEvaluator,
    CityscapesSemSegEvaluator,
    COCOEvaluator,
    COCOPanopticEvaluator,
    InstanceSegEvaluator,
    SemSegEvaluator,
    build_evaluator,
)


@pytest.fixture(scope="module")
def coco_files(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("coco_build"))
    make_coco(root, num_images=1)
    ann = os.path.join(root, "coco", "annotations")
    return {
        "json_file": os.path.join(ann, "instances_val2017.json"),
        "panoptic_json": os.path.join(ann, "panoptic_val2017.json"),
        "panoptic_root": os.path.join(root, "coco", "panoptic_val2017"),
    }


def _cfg(panoptic: bool, instance: bool, semantic: bool, output_dir: str = "./output"):
    cfg = get_cfg()
    cfg.OUTPUT_DIR = output_dir
    test = cfg.MODEL.MASK_FORMER.TEST
    test.PANOPTIC_ON, test.INSTANCE_ON, test.SEMANTIC_ON = panoptic, instance, semantic
    return cfg


def _types(ev):
    return [type(e) for e in ev._evaluators] if isinstance(ev, DatasetEvaluators) else [type(ev)]


def _coco_panoptic(coco_files):
    return register(
        "coco_2017_val_panoptic_with_sem_seg",
        [{"file_name": "x.jpg", "sem_seg_file_name": "x.png"}],
        thing_dataset_id_to_contiguous_id={c["id"]: i for i, c in enumerate(COCO_CATEGORIES) if c["isthing"]},
        stuff_dataset_id_to_contiguous_id={c["id"]: i for i, c in enumerate(COCO_CATEGORIES)},
        stuff_classes=[c["name"] for c in COCO_CATEGORIES],
        ignore_label=255,
        evaluator_type="coco_panoptic_seg",
        **coco_files,
    )


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        ((True, True, True), [COCOPanopticEvaluator, COCOEvaluator, SemSegEvaluator]),
        ((True, False, False), [COCOPanopticEvaluator]),
        ((False, True, False), [COCOEvaluator]),
        ((False, False, True), [SemSegEvaluator]),
    ],
)
def test_coco_panoptic_follows_switches(coco_files, flags, expected, tmp_path):
    assert _types(build_evaluator(_cfg(*flags), _coco_panoptic(coco_files), str(tmp_path))) == expected


def test_coco_panoptic_with_all_switches_off_is_an_error(coco_files):
    with pytest.raises(NotImplementedError, match="coco_panoptic_seg"):
        build_evaluator(_cfg(False, False, False), _coco_panoptic(coco_files))


def test_coco_instance_and_non_contiguous_things(coco_files, tmp_path):
    things = {c["id"]: i for i, c in enumerate(c for c in COCO_CATEGORIES if c["isthing"])}
    coco = register("coco_2017_val", [], evaluator_type="coco", json_file=coco_files["json_file"],
                    thing_dataset_id_to_contiguous_id=things)  # fmt: skip
    ev = build_evaluator(_cfg(True, True, True), coco, str(tmp_path))
    assert type(ev) is COCOEvaluator
    assert ev._tasks == ("segm",)  # Mask2Former's boxes are zeros: no box AP
    interleaved = register("my_instances", [], evaluator_type="coco", json_file=coco_files["json_file"],
                           thing_dataset_id_to_contiguous_id={k: 2 * v for k, v in things.items()})  # fmt: skip
    assert type(build_evaluator(_cfg(True, True, True), interleaved, str(tmp_path))) is InstanceSegEvaluator


def test_cityscapes_single_evaluators(tmp_path):
    sem = register("cityscapes_fine_sem_seg_val", [], evaluator_type="cityscapes_sem_seg", gt_dir=str(tmp_path))
    ins = register("cityscapes_fine_instance_seg_val", [], evaluator_type="cityscapes_instance", gt_dir=str(tmp_path))
    assert _types(build_evaluator(_cfg(True, True, True), sem)) == [CityscapesSemSegEvaluator]
    assert _types(build_evaluator(_cfg(True, True, True), ins)) == [CityscapesInstanceEvaluator]


def test_default_output_folder_and_errors(tmp_path):
    sem = register("ade20k_sem_seg_val", [{"file_name": "a.jpg", "sem_seg_file_name": "a.png"}],
                   evaluator_type="sem_seg", stuff_classes=["a", "b"], ignore_label=255)  # fmt: skip
    ev = build_evaluator(_cfg(True, True, True, output_dir=str(tmp_path)), sem)
    assert type(ev) is SemSegEvaluator
    assert ev._output_dir == os.path.join(str(tmp_path), "inference")
    with pytest.raises(ValueError, match="no evaluator_type"):
        build_evaluator(_cfg(True, True, True), register("unregistered_type", []))
    with pytest.raises(NotImplementedError, match="'pascal_voc'"):
        build_evaluator(_cfg(True, True, True), register("voc", [], evaluator_type="pascal_voc"))
