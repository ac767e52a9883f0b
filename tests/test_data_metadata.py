"""Class-metadata tables pinned to the reference values (Mask2Former/MaskFormer registrations): names, ids,
isthing flags and official colours of ADE20K-150, COCO-Stuff-10k (171) and Mapillary Vistas v1.2 (65)."""

from __future__ import annotations

from detectron2.data import MetadataCatalog

import dinat_m2f.data  # noqa: F401  (registers)
from dinat_m2f.data.datasets.ade20k import ADE20K_150_CATEGORIES, ADE20K_THING_IDS
from dinat_m2f.data.datasets.coco import COCO_STUFF_171_CATEGORIES
from dinat_m2f.data.datasets.mapillary_vistas import MAPILLARY_VISTAS_CATEGORIES


def _by_name(categories: list[dict]) -> dict[str, dict]:
    return {c["name"]: c for c in categories}


def test_ade20k_150_table():
    cats = ADE20K_150_CATEGORIES
    assert [c["id"] for c in cats] == list(range(150))
    assert sum(c["isthing"] for c in cats) == 100 == len(ADE20K_THING_IDS)
    assert cats[0] == {"id": 0, "name": "wall", "isthing": 0, "color": [120, 120, 120]}
    assert cats[-1] == {"id": 149, "name": "flag", "isthing": 1, "color": [92, 0, 255]}
    assert cats[7] == {"id": 7, "name": "bed", "isthing": 1, "color": [204, 5, 255]}  # first thing
    assert cats[8]["name"] == "window"  # the reference spells it "window " (trailing space)
    assert cats[12] == {"id": 12, "name": "person", "isthing": 1, "color": [150, 5, 61]}
    assert cats[20]["color"] == [0, 102, 200] and cats[20]["name"] == "car"
    assert cats[96]["name"].startswith("escalator") and cats[96]["isthing"] == 0
    assert cats[147] == {"id": 147, "name": "glass, drinking glass", "isthing": 1, "color": [25, 194, 194]}
    # The official palette repeats one colour ("road, route" and "skyscraper"); all others are distinct.
    assert cats[6]["color"] == cats[48]["color"] == [140, 140, 140]
    assert len({tuple(c["color"]) for c in cats}) == 149


def test_ade20k_registered_metadata_uses_official_colours():
    sem = MetadataCatalog.get("ade20k_sem_seg_val")
    assert sem.stuff_colors[0] == [120, 120, 120] and sem.stuff_colors[149] == [92, 0, 255]
    pan = MetadataCatalog.get("ade20k_panoptic_val")
    assert pan.thing_dataset_id_to_contiguous_id[12] == 12 and 0 not in pan.thing_dataset_id_to_contiguous_id
    ins = MetadataCatalog.get("ade20k_instance_val")
    assert len(ins.thing_classes) == 100
    assert ins.thing_classes[0] == "bed" and ins.thing_colors[0] == [204, 5, 255]
    assert ins.thing_classes[-1] == "flag" and ins.thing_colors[-1] == [92, 0, 255]


def test_coco_stuff_171_table():
    cats = COCO_STUFF_171_CATEGORIES
    assert len(cats) == 171 and sum(c["isthing"] for c in cats) == 80
    assert [c["id"] for c in cats] == sorted(c["id"] for c in cats)
    assert cats[0] == {"id": 1, "name": "person", "isthing": 1, "color": [220, 20, 60]}
    assert cats[79]["id"] == 90 and cats[79]["name"] == "toothbrush" and cats[79]["color"] == [191, 162, 208]
    assert (cats[80]["id"], cats[80]["name"], cats[80]["isthing"]) == (92, "banner", 0)
    assert (cats[-1]["id"], cats[-1]["name"]) == (182, "wood")
    named = _by_name(cats)
    assert named["wall-brick"]["id"] == 171 and named["sky-other"]["id"] == 157 and named["stop sign"]["id"] == 13
    meta = MetadataCatalog.get("coco_2017_train_stuff_10k_sem_seg")
    assert meta.stuff_classes[80] == "banner" and meta.stuff_dataset_id_to_contiguous_id[182] == 170


def test_mapillary_vistas_table():
    cats = MAPILLARY_VISTAS_CATEGORIES
    assert [c["id"] for c in cats] == list(range(1, 66))
    assert sum(c["isthing"] for c in cats) == 37
    assert cats[0] == {"id": 1, "name": "Bird", "color": [165, 42, 42], "isthing": 1}
    assert cats[-1] == {"id": 65, "name": "Ego Vehicle", "color": [120, 10, 10], "isthing": 0}
    named = _by_name(cats)
    assert named["Road"]["color"] == [128, 64, 128] and named["Road"]["isthing"] == 0
    assert named["Crosswalk - Plain"]["isthing"] == 1 and named["Lane Marking - Crosswalk"]["isthing"] == 1
    assert named["Lane Marking - General"]["isthing"] == 0 and named["Pothole"]["isthing"] == 0
    assert named["On Rails"]["isthing"] == 0 and named["On Rails"]["color"] == [0, 80, 100]
    assert named["Traffic Sign (Front)"]["color"] == [220, 220, 0] and named["Car"]["id"] == 56
    meta = MetadataCatalog.get("mapillary_vistas_sem_seg_val")
    assert meta.stuff_classes[27] == "Sky" and meta.stuff_colors[27] == [70, 130, 180]
