"""Bad inputs get errors that say what is wrong and where: a truncated dataset JSON is named, a training set of
which no sample can be read says so (with DATALOADER.SKIP_CORRUPT), and NUM_CLASSES 0 does not build a model."""

from __future__ import annotations

import glob
import json
import os

import pytest
import train_helpers
from mini_datasets import corrupt_file


def _truncated_json(path: str, content: dict) -> str:
    text = json.dumps(content)
    with open(path, "w") as f:
        f.write(text[: len(text) // 2])
    return path


def test_truncated_panoptic_json_is_named(tmp_path):
    from dinat_m2f.data.datasets._common import DatasetFileError
    from dinat_m2f.data.datasets.loaders import load_panoptic_json

    for d in ("images", "panoptic"):
        (tmp_path / d).mkdir()
    path = _truncated_json(str(tmp_path / "panoptic_val.json"), {"annotations": [{"image_id": i} for i in range(9)]})
    meta = {"thing_dataset_id_to_contiguous_id": {}, "stuff_dataset_id_to_contiguous_id": {}}
    with pytest.raises(DatasetFileError, match=r"panoptic_val\.json is not valid JSON .*truncated or corrupt"):
        load_panoptic_json(path, str(tmp_path / "images"), str(tmp_path / "panoptic"), meta)


def test_truncated_coco_instances_json_is_named(tmp_path):
    from detectron2.data import DatasetCatalog

    from dinat_m2f.data.datasets import coco
    from dinat_m2f.data.datasets._common import DatasetFileError

    os.makedirs(tmp_path / "coco" / "annotations")
    os.makedirs(tmp_path / "coco" / "val2017")
    _truncated_json(
        str(tmp_path / "coco/annotations/instances_val2017.json"), {"images": [{"id": i} for i in range(9)]}
    )
    coco.register_all_coco_instances(str(tmp_path))
    try:
        with pytest.raises(DatasetFileError, match=r"instances_val2017\.json is not valid JSON"):
            DatasetCatalog.get("coco_2017_val")
    finally:
        coco.register_all_coco_instances()  # back to the default root


def test_truncated_ground_truth_json_of_the_evaluator_is_named(tmp_path):
    from detectron2.data import DatasetCatalog, MetadataCatalog

    from dinat_m2f.data.datasets._common import DatasetFileError
    from dinat_m2f.evaluation import COCOEvaluator

    path = _truncated_json(str(tmp_path / "gt.json"), {"images": [{"id": i} for i in range(9)]})
    DatasetCatalog.register("truncated_gt_test", list)
    MetadataCatalog.get("truncated_gt_test").set(json_file=path)
    with pytest.raises(DatasetFileError, match=r"gt\.json is not valid JSON"):
        COCOEvaluator("truncated_gt_test", tasks=("segm",))


def test_skip_corrupt_with_every_sample_corrupt_says_no_sample_could_be_read(tmp_path):
    import train_net
    from dinat_m2f.data.dataset_mappers._common import NoReadableSampleError

    datasets = str(tmp_path / "datasets")
    train_helpers.make_tiny_dataset(datasets)
    images = glob.glob(os.path.join(datasets, "synthetic", "images", "train", "*.jpg"))
    assert len(images) == 8
    for path in images:
        corrupt_file(path)
    opts = [*train_helpers.TINY_OPTS, "DATALOADER.SKIP_CORRUPT", "True", "OUTPUT_DIR", str(tmp_path / "out")]
    cfg = train_net.load_config(train_helpers.DEMO_CONFIG, opts)
    loader = train_net.Trainer.build_train_loader(cfg)
    with pytest.raises(NoReadableSampleError, match=r"SKIP_CORRUPT: none of the 8 training samples could be read"):
        next(iter(loader))


def test_skip_corrupt_still_skips_when_some_samples_load(tmp_path):
    import train_net

    datasets = str(tmp_path / "datasets")
    train_helpers.make_tiny_dataset(datasets)
    images = sorted(glob.glob(os.path.join(datasets, "synthetic", "images", "train", "*.jpg")))
    for path in images[:-1]:  # one of eight readable
        corrupt_file(path)
    opts = [*train_helpers.TINY_OPTS, "DATALOADER.SKIP_CORRUPT", "True", "OUTPUT_DIR", str(tmp_path / "out")]
    loader = iter(train_net.Trainer.build_train_loader(train_net.load_config(train_helpers.DEMO_CONFIG, opts)))
    for _ in range(3):
        batch = next(loader)
        assert {d["file_name"] for d in batch} == {images[-1]}


def test_a_corrupt_image_in_the_evaluation_loader_is_named(tmp_path):
    import train_net
    from dinat_m2f.data.dataset_mappers import CorruptSampleError

    datasets = str(tmp_path / "datasets")
    train_helpers.make_tiny_dataset(datasets)
    bad = sorted(glob.glob(os.path.join(datasets, "synthetic", "images", "val", "*.jpg")))[0]
    corrupt_file(bad)
    cfg = train_net.load_config(train_helpers.DEMO_CONFIG, [*train_helpers.TINY_OPTS, "OUTPUT_DIR", str(tmp_path)])
    loader = train_net.Trainer.build_test_loader(cfg, "synthetic_sem_seg_val")
    with pytest.raises(CorruptSampleError, match=os.path.basename(bad)):
        for _ in loader:
            pass


@pytest.mark.parametrize("num_classes", ["0", "-3"])
def test_num_classes_below_one_is_rejected_at_model_build(num_classes):
    from detectron2.modeling import build_model

    import train_net

    cfg = train_net.load_config(
        train_helpers.DEMO_CONFIG, [*train_helpers.TINY_OPTS, "MODEL.SEM_SEG_HEAD.NUM_CLASSES", num_classes]
    )
    with pytest.raises(ValueError, match=rf"MODEL.SEM_SEG_HEAD.NUM_CLASSES must be .*got {num_classes}"):
        build_model(cfg)
