"""DATASETS.REGISTER: a generated tiny dataset in each format is registered from the config, trained a few
iterations and evaluated; bad entries fail with errors naming the entry, the file and the fix."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import train_helpers
from PIL import Image

from dinat_m2f.data.datasets.custom import CustomDatasetError, register_custom_dataset, register_from_config

CLASSES = ["disc", "square", "triangle", "cross", "sky", "grass", "sand"]


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> str:
    """A 4+2 image, 64 px dataset written in COCO instances / COCO panoptic / semantic-PNG formats."""
    from dinat_m2f.data.synthetic import SyntheticSpec, ensure_synthetic_dataset

    root = str(tmp_path_factory.mktemp("own") / "synthetic")
    ensure_synthetic_dataset(root, SyntheticSpec(num_train=4, num_val=2, size=64))
    return root


def _entries(root: str, fmt: str) -> tuple[list, list[str], str]:
    """(DATASETS.REGISTER entries, the extra opts, the mapper) of ``fmt`` on the synthetic files."""
    entries = []
    for split in ("train", "val"):
        images = os.path.join(root, "images", split)
        if fmt == "coco_instances":
            entries.append(
                [f"own_{fmt}_{split}", fmt, images, os.path.join(root, f"instances_{split}.json"), CLASSES[:4]]
            )
        elif fmt == "coco_panoptic":
            entries.append([f"own_{fmt}_{split}", fmt, images, os.path.join(root, f"panoptic_{split}.json"), CLASSES])
        else:
            entries.append([f"own_{fmt}_{split}", fmt, images, os.path.join(root, f"panoptic_semseg_{split}"), CLASSES])
    tasks = {
        "coco_instances": ("mask_former_instance", 4, ("False", "True", "False")),
        "coco_panoptic": ("mask_former_panoptic", 7, ("True", "False", "False")),
        "sem_seg": ("mask_former_semantic", 7, ("False", "False", "True")),
    }
    mapper, num_classes, (pan, ins, sem) = tasks[fmt]
    opts = ["DATASETS.REGISTER", repr(entries), "DATASETS.TRAIN", f"('own_{fmt}_train',)"]
    opts += ["DATASETS.TEST", f"('own_{fmt}_val',)", "INPUT.DATASET_MAPPER_NAME", mapper]
    opts += ["MODEL.SEM_SEG_HEAD.NUM_CLASSES", str(num_classes), "MODEL.MASK_FORMER.TEST.PANOPTIC_ON", pan]
    opts += ["MODEL.MASK_FORMER.TEST.INSTANCE_ON", ins, "MODEL.MASK_FORMER.TEST.SEMANTIC_ON", sem]
    return entries, opts, mapper


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["coco_instances", "coco_panoptic", "sem_seg"])
def test_register_train_and_evaluate_each_format(fmt, synthetic, tmp_path):
    import train_net

    _, opts, _ = _entries(synthetic, fmt)
    opts += ["SOLVER.MAX_ITER", "2", "TEST.EVAL_PERIOD", "0", "OUTPUT_DIR", str(tmp_path)]
    base = ["--config-file", train_helpers.DEMO_CONFIG, *train_helpers.TINY_OPTS]
    train_net.main(train_net.argument_parser().parse_args(base + opts))
    weights = os.path.join(str(tmp_path), "model_final.pth")
    assert os.path.isfile(weights)
    argv = ["--eval-only", *base, *opts, "MODEL.WEIGHTS", weights]
    results = train_net.main(train_net.argument_parser().parse_args(argv))
    metric = {"coco_instances": ("segm", "AP"), "coco_panoptic": ("panoptic_seg", "PQ"), "sem_seg": ("sem_seg", "mIoU")}
    task, key = metric[fmt]
    assert 0.0 <= results[task][key] <= 100.0, results


def _cfg(opts):
    from dinat_m2f.config import load_config

    return load_config(train_helpers.DEMO_CONFIG, [*train_helpers.TINY_OPTS, *opts])


def test_metadata_and_evaluator_type_of_each_format(synthetic):
    from detectron2.data import DatasetCatalog, MetadataCatalog

    expected = {"coco_instances": "coco", "coco_panoptic": "coco_panoptic_seg", "sem_seg": "sem_seg"}
    for fmt, evaluator_type in expected.items():
        _, opts, _ = _entries(synthetic, fmt)
        register_from_config(_cfg(opts))
        meta = MetadataCatalog.get(f"own_{fmt}_val")
        assert meta.evaluator_type == evaluator_type
        dicts = DatasetCatalog.get(f"own_{fmt}_val")
        assert len(dicts) == 2 and all(os.path.isfile(d["file_name"]) for d in dicts)
    assert MetadataCatalog.get("own_coco_panoptic_val").thing_classes == CLASSES  # Mask2Former's convention
    assert sorted(MetadataCatalog.get("own_coco_panoptic_val").thing_dataset_id_to_contiguous_id) == [1, 2, 3, 4]
    assert MetadataCatalog.get("own_coco_instances_val").thing_classes == CLASSES[:4]
    assert MetadataCatalog.get("own_sem_seg_val").stuff_classes == CLASSES


def test_bad_entries_fail_clearly(synthetic, tmp_path):
    images = os.path.join(synthetic, "images", "val")
    ins = os.path.join(synthetic, "instances_val.json")
    with pytest.raises(CustomDatasetError, match=r"'x': annotation not found: .*nope.json"):
        register_custom_dataset("x", "coco_instances", images, str(tmp_path / "nope.json"), ["a"])
    with pytest.raises(CustomDatasetError, match=r"'x': image folder not found"):
        register_custom_dataset("x", "coco_instances", str(tmp_path / "noimg"), ins, ["a"])
    with pytest.raises(CustomDatasetError, match=r"unknown format 'yolo'"):
        register_custom_dataset("x", "yolo", images, ins, ["a"])
    with pytest.raises(CustomDatasetError, match=r"class names \['disc', 'dog'.* differ from the categories of"):
        register_custom_dataset("x", "coco_instances", images, ins, ["disc", "dog", "triangle", "cross"])
    with pytest.raises(CustomDatasetError, match="duplicate class names"):
        register_custom_dataset("x", "sem_seg", images, images, ["a", "a"])

    # an annotation whose category id is not among the classes: raised when loaded, naming the file
    with open(ins) as f:
        data = json.load(f)
    data["annotations"][0]["category_id"] = 99
    bad_json = tmp_path / "bad.json"
    bad_json.write_text(json.dumps(data))
    from detectron2.data import DatasetCatalog

    register_custom_dataset("own_bad_ids", "coco_instances", images, str(bad_json), CLASSES[:4])
    with pytest.raises(Exception, match="99"):
        DatasetCatalog.get("own_bad_ids")

    # a label value beyond the class list
    labels = tmp_path / "labels"
    shutil.copytree(os.path.join(synthetic, "panoptic_semseg_val"), labels)
    first = sorted(labels.iterdir())[0]
    arr = np.array(Image.open(first))
    arr[0, 0] = 9
    Image.fromarray(arr).save(first)
    register_custom_dataset("own_bad_labels", "sem_seg", images, str(labels), CLASSES)
    with pytest.raises(CustomDatasetError, match=rf"{first.name} has label values \[9\] but only 7 classes"):
        DatasetCatalog.get("own_bad_labels")


def test_class_count_must_fit_the_model(synthetic):
    _, opts, _ = _entries(synthetic, "sem_seg")
    i = opts.index("MODEL.SEM_SEG_HEAD.NUM_CLASSES")
    opts[i + 1] = "5"
    with pytest.raises(CustomDatasetError, match="has 7 classes but MODEL.SEM_SEG_HEAD.NUM_CLASSES is 5: set it to 7"):
        register_from_config(_cfg(opts))
    with pytest.raises(CustomDatasetError, match=r"each entry is \[name, format"):
        register_from_config(_cfg(["DATASETS.REGISTER", "[['only', 'two']]"]))
