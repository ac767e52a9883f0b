"""Registrations of every dataset name: metadata, re-pointing at a root, clear errors before preparation;
Mapillary Vistas and COCO-Stuff-10k on small hand-made copies."""

from __future__ import annotations

import os
import random

import numpy as np
import pytest
from detectron2.data import DatasetCatalog, MetadataCatalog
from mini_datasets import make_mapillary_vistas, registered_under
from PIL import Image

import dinat_m2f.data  # noqa: F401  (registers)
from dinat_m2f.config import load_config
from dinat_m2f.data import MaskFormerPanopticDatasetMapper, MaskFormerSemanticDatasetMapper, build_train_mapper

NAMES = {
    "coco_2017_train_panoptic_with_sem_seg": "coco_panoptic_seg",
    "coco_2017_val_panoptic_with_sem_seg": "coco_panoptic_seg",
    "coco_2017_train": "coco",
    "coco_2017_val": "coco",
    "ade20k_sem_seg_train": "sem_seg",
    "ade20k_sem_seg_val": "sem_seg",
    "ade20k_panoptic_train": "ade20k_panoptic_seg",
    "ade20k_panoptic_val": "ade20k_panoptic_seg",
    "ade20k_instance_train": "coco",
    "ade20k_instance_val": "coco",
    "ade20k_full_sem_seg_train": "sem_seg",
    "ade20k_full_sem_seg_val": "sem_seg",
    "cityscapes_fine_sem_seg_train": "cityscapes_sem_seg",
    "cityscapes_fine_instance_seg_val": "cityscapes_instance",
    "cityscapes_fine_panoptic_train": "cityscapes_panoptic_seg",
    "cityscapes_fine_panoptic_val": "cityscapes_panoptic_seg",
    "coco_2017_train_stuff_10k_sem_seg": "sem_seg",
    "coco_2017_test_stuff_10k_sem_seg": "sem_seg",
    "mapillary_vistas_sem_seg_train": "sem_seg",
    "mapillary_vistas_sem_seg_val": "sem_seg",
    "mapillary_vistas_panoptic_train": "mapillary_vistas_panoptic_seg",
    "mapillary_vistas_panoptic_val": "mapillary_vistas_panoptic_seg",
}


@pytest.mark.parametrize("name", sorted(NAMES))
def test_every_name_is_registered_with_its_evaluator_type(name):
    assert name in DatasetCatalog.list()
    assert MetadataCatalog.get(name).evaluator_type == NAMES[name]


def test_metadata_sizes():
    m = MetadataCatalog.get
    assert len(m("coco_2017_test_stuff_10k_sem_seg").stuff_classes) == 171
    assert m("coco_2017_test_stuff_10k_sem_seg").ignore_label == 255
    mv = m("mapillary_vistas_panoptic_val")
    assert len(mv.stuff_classes) == 65 and mv.ignore_label == 65 and mv.label_divisor == 1000
    assert len(mv.thing_dataset_id_to_contiguous_id) == 37  # Vistas v1.2: 37 instance classes
    assert m("mapillary_vistas_sem_seg_val").ignore_label == 65
    ade = m("ade20k_panoptic_val")
    assert sorted(ade.thing_dataset_id_to_contiguous_id) != list(range(100))  # interleaved with stuff ids
    assert len(m("cityscapes_fine_sem_seg_val").stuff_classes) == 19
    assert len(m("cityscapes_fine_instance_seg_val").thing_classes) == 8


def test_default_root_comes_from_environment(tmp_path, monkeypatch):
    from dinat_m2f.data.datasets import register_all

    monkeypatch.setenv("DETECTRON2_DATASETS", str(tmp_path))
    try:
        register_all()
        image_root = MetadataCatalog.get("ade20k_sem_seg_val").image_root
        assert image_root == os.path.join(str(tmp_path), "ADEChallengeData2016", "images", "validation")
    finally:
        monkeypatch.undo()
        register_all()


def test_unprepared_dataset_errors_name_file_and_script(tmp_path):
    (tmp_path / "ADEChallengeData2016" / "images" / "validation").mkdir(parents=True)
    (tmp_path / "cityscapes" / "leftImg8bit" / "val").mkdir(parents=True)
    with registered_under(str(tmp_path)):
        with pytest.raises(FileNotFoundError, match=r"ade20k_panoptic_val\.json.*prepare_ade20k_pan_seg\.py"):
            DatasetCatalog.get("ade20k_panoptic_val")
        with pytest.raises(FileNotFoundError, match=r"ade20k_instance_val\.json.*prepare_ade20k_ins_seg\.py"):
            DatasetCatalog.get("ade20k_instance_val")
        with pytest.raises(FileNotFoundError, match=r"cityscapes_panoptic_val\.json.*prepare_cityscapes\.py"):
            DatasetCatalog.get("cityscapes_fine_panoptic_val")
        with pytest.raises(FileNotFoundError, match=r"coco/annotations/panoptic_val2017\.json$"):
            DatasetCatalog.get("coco_2017_val_panoptic_with_sem_seg")
    assert not MetadataCatalog.get("ade20k_sem_seg_val").image_root.startswith(str(tmp_path))  # restored


def test_mapillary_vistas_semantic_and_panoptic(tmp_path):
    images = make_mapillary_vistas(str(tmp_path))
    with registered_under(str(tmp_path)):
        sem = DatasetCatalog.get("mapillary_vistas_sem_seg_val")
        assert len(sem) == 2
        mapper = MaskFormerSemanticDatasetMapper(
            augmentations=[], image_format="RGB", ignore_label=65, size_divisibility=-1
        )
        out = mapper(sem[0])
        assert 65 not in out["instances"].gt_classes.tolist() and len(out["instances"]) == 3  # sky, road, car
        pan = DatasetCatalog.get("mapillary_vistas_panoptic_val")
        names = MetadataCatalog.get("mapillary_vistas_panoptic_val").stuff_classes
        segs = pan[0]["segments_info"]
        assert sorted((names[s["category_id"]], s["isthing"]) for s in segs) == [
            ("Car", True),
            ("Car", True),
            ("Road", False),
            ("Sky", False),
        ]
        out = MaskFormerPanopticDatasetMapper(
            augmentations=[], image_format="RGB", ignore_label=65, size_divisibility=-1
        )(pan[0])
        for c, m in zip(out["instances"].gt_classes.tolist(), out["instances"].gt_masks.numpy()):
            assert sum(bool((m == s.mask).all()) and s.category_id == c for s in images[0].segments) == 1


def test_panoptic_json_with_contradicting_isthing_is_refused(tmp_path):
    import json

    make_mapillary_vistas(str(tmp_path), num_images=1)
    path = tmp_path / "mapillary_vistas" / "validation" / "panoptic" / "panoptic_2018.json"
    info = json.loads(path.read_text())
    info["categories"][27]["isthing"] = 1  # "Sky" claimed as a thing
    path.write_text(json.dumps(info))
    with registered_under(str(tmp_path)), pytest.raises(ValueError, match=r"categories \[28\] disagree"):
        DatasetCatalog.get("mapillary_vistas_panoptic_val")


def test_coco_stuff_10k_prep_registration_and_mapper(tmp_path):
    from mini_datasets import load_prep_script, make_coco_stuff_10k

    from dinat_m2f.data.datasets.coco import COCO_STUFF_171_CATEGORIES

    images = make_coco_stuff_10k(str(tmp_path))
    script = load_prep_script("prepare_coco_stuff_10k_sem_seg")
    script.main(["--root", str(tmp_path), "--workers", "1"])
    contiguous = {c["id"]: i for i, c in enumerate(COCO_STUFF_171_CATEGORIES)}
    assert contiguous[1] == 0 and contiguous[18] == 16 and contiguous[92] == 80 and contiguous[182] == 170
    with registered_under(str(tmp_path)):
        meta = MetadataCatalog.get("coco_2017_train_stuff_10k_sem_seg")
        assert meta.stuff_classes[contiguous[157]] == "sky-other" and meta.stuff_classes[16] == "dog"
        dicts = DatasetCatalog.get("coco_2017_train_stuff_10k_sem_seg")
        assert [os.path.basename(d["file_name"])[:-4] for d in dicts] == [i.stem for i in images["train"]]
        mapper = MaskFormerSemanticDatasetMapper(
            augmentations=[], image_format="RGB", ignore_label=255, size_divisibility=-1
        )
        for d, img in zip(dicts, images["train"]):
            label = np.asarray(Image.open(d["sem_seg_file_name"]))
            np.testing.assert_array_equal(label, img.semantic(255, contiguous))
            assert mapper(d)["instances"].gt_classes.tolist() == sorted(contiguous[s.category_id] for s in img.segments)
        assert len(DatasetCatalog.get("coco_2017_test_stuff_10k_sem_seg")) == 1
    with pytest.raises(FileNotFoundError, match="coco_stuff_10k/images"):
        script.main(["--root", str(tmp_path / "nothing")])


def test_build_train_mapper_by_name():
    from detectron2.data import DatasetMapper

    from dinat_m2f.config import ConfigError, get_cfg

    cfg = get_cfg()
    cfg.DATASETS.TRAIN = ("ade20k_sem_seg_train",)
    expected = {
        "mask_former_semantic": "MaskFormerSemanticDatasetMapper",
        "mask_former_panoptic": "MaskFormerPanopticDatasetMapper",
        "mask_former_instance": "MaskFormerInstanceDatasetMapper",
        "coco_instance_lsj": "COCOInstanceNewBaselineDatasetMapper",
        "coco_panoptic_lsj": "COCOPanopticNewBaselineDatasetMapper",
    }
    for name, cls in expected.items():
        cfg.INPUT.DATASET_MAPPER_NAME = name
        assert type(build_train_mapper(cfg)).__name__ == cls
    cfg.INPUT.DATASET_MAPPER_NAME = "default"
    assert type(build_train_mapper(cfg)) is DatasetMapper
    cfg.INPUT.DATASET_MAPPER_NAME = "detectron2_default"
    with pytest.raises(ConfigError, match=r"INPUT.DATASET_MAPPER_NAME: unknown mapper 'detectron2_default'; known: .*"
                       r"coco_instance_lsj, .*default, .*mask_former_semantic"):  # fmt: skip
        build_train_mapper(cfg)


def test_every_paper_config_maps_a_prepared_sample(tmp_path):
    """The mapper and dataset each paper config names work together on the prepared mini datasets, with the
    config's own resize/crop/pad settings (crop size == fixed pad size where the config pads)."""
    import contextlib
    import glob
    import io

    from mini_datasets import load_prep_script, make_ade20k, make_cityscapes, make_coco

    seed = int(os.environ.get("DINAT_TEST_SEED", "0"))  # the mappers' random crops draw from numpy's global RNG
    np.random.seed(seed)
    random.seed(seed)
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

    root = str(tmp_path)
    for split in ("training", "validation"):
        make_ade20k(root, split, num_images=1)
    for split in ("train2017", "val2017"):
        make_coco(root, split, num_images=1)
    for split in ("train", "val"):
        make_cityscapes(root, split, num_images=1)
    scripts = ("sem_seg", "pan_seg", "ins_seg")
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        for name in [f"prepare_ade20k_{s}" for s in scripts] + ["prepare_cityscapes"]:
            load_prep_script(name).main(["--root", root, "--workers", "1"])
    configs = sorted(glob.glob(os.path.join(repo, "configs", "*", "*", "dinat", "*large*.yaml")))
    assert len(configs) == 8
    with registered_under(root):
        for path in configs:
            cfg = load_config(path, [])
            out = build_train_mapper(cfg)(DatasetCatalog.get(cfg.DATASETS.TRAIN[0])[0])
            h, w = out["image"].shape[-2:]
            if cfg.INPUT.DATASET_MAPPER_NAME.endswith("_lsj"):
                assert (h, w) == (cfg.INPUT.IMAGE_SIZE,) * 2
            elif cfg.INPUT.SIZE_DIVISIBILITY > 0:
                assert (h, w) == (cfg.INPUT.SIZE_DIVISIBILITY,) * 2
            else:
                assert (h, w) == tuple(cfg.INPUT.CROP.SIZE)
            inst = out["instances"]
            assert len(inst) > 0 and inst.gt_masks.shape[-2:] == (h, w), path
            assert int(inst.gt_classes.max()) < cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES, path
