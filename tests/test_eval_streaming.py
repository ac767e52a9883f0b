"""The instance and semantic evaluators stream per-image predictions to disk: they hold nothing per image, and
their metrics and dumped files are identical to detectron2's in-memory evaluators (one process and two)."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
import torch
from detectron2.evaluation import COCOEvaluator as D2COCOEvaluator
from detectron2.evaluation import SemSegEvaluator as D2SemSegEvaluator
from detectron2.structures import Boxes, Instances
from eval_fixtures import rle, run
from PIL import Image

from dinat_m2f.data.datasets._common import register_dataset
from dinat_m2f.evaluation import COCOEvaluator, SemSegEvaluator

H, W = 40, 48
THING_IDS = {1: 0, 2: 1, 5: 2}  # dataset id -> contiguous id
NUM_IMAGES = 6


def _rect(rng) -> np.ndarray:
    y0, x0 = rng.integers(0, H - 8), rng.integers(0, W - 8)
    m = np.zeros((H, W), dtype=bool)
    m[y0 : y0 + rng.integers(4, H - y0), x0 : x0 + rng.integers(4, W - x0)] = True
    return m


def _box(m: np.ndarray) -> list[float]:
    ys, xs = np.nonzero(m)
    return [float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)]


def make_instance_dataset(root: str, tag: str) -> tuple[str, list[dict], list[dict]]:
    """A registered COCO-format instance set of random rectangles, and random predictions (some good, some not)."""
    rng = np.random.default_rng(0)
    images, anns, inputs, outputs = [], [], [], []
    for i in range(NUM_IMAGES):
        images.append({"id": 10 + i, "file_name": f"{i}.jpg", "height": H, "width": W})
        inputs.append({"image_id": 10 + i, "file_name": os.path.join(root, f"{i}.jpg"), "height": H, "width": W})
        gt = [(_rect(rng), int(rng.choice(list(THING_IDS)))) for _ in range(3)]
        for m, cat in gt:
            ys, xs = np.nonzero(m)
            bbox = [int(xs.min()), int(ys.min()), int(np.ptp(xs) + 1), int(np.ptp(ys) + 1)]
            anns.append(
                {"id": len(anns) + 1, "image_id": 10 + i, "category_id": cat, "segmentation": rle(m),
                 "area": int(m.sum()), "bbox": bbox, "iscrowd": 0}
            )  # fmt: skip
        masks = [m for m, _ in gt] + [_rect(rng) for _ in range(4)]
        classes = [THING_IDS[c] for _, c in gt] + [int(c) for c in rng.integers(0, 3, 4)]
        inst = Instances((H, W))
        inst.pred_masks = torch.as_tensor(np.stack(masks))
        inst.pred_boxes = Boxes(torch.tensor([_box(m) for m in masks]))
        inst.pred_classes = torch.as_tensor(classes)
        inst.scores = torch.as_tensor(rng.random(len(masks)), dtype=torch.float32)
        outputs.append({"instances": inst})
    categories = [{"id": k, "name": f"thing{k}"} for k in THING_IDS]
    json_file = os.path.join(root, "instances.json")
    with open(json_file, "w") as f:
        json.dump({"images": images, "annotations": anns, "categories": categories}, f)
    name = f"streaming_instances_{tag}"
    register_dataset(
        name,
        lambda: inputs,
        json_file=json_file,
        thing_classes=[c["name"] for c in categories],
        thing_dataset_id_to_contiguous_id=THING_IDS,
    )
    return name, inputs, outputs


def make_semantic_dataset(root: str, tag: str, num_classes: int = 4) -> tuple[str, list[dict], list[dict]]:
    rng = np.random.default_rng(1)
    inputs, outputs = [], []
    for i in range(NUM_IMAGES):
        gt = rng.integers(0, num_classes, (H, W)).astype(np.uint8)
        gt[:3] = 255  # ignored
        gt_file = os.path.join(root, f"gt{i}.png")
        Image.fromarray(gt).save(gt_file)
        inputs.append({"file_name": os.path.join(root, f"{i}.jpg"), "sem_seg_file_name": gt_file})
        pred = np.where(rng.random((H, W)) < 0.7, gt % num_classes, rng.integers(0, num_classes, (H, W)))
        outputs.append({"sem_seg": torch.nn.functional.one_hot(torch.as_tensor(pred), num_classes).permute(2, 0, 1)})
    name = f"streaming_semantic_{tag}"
    register_dataset(
        name,
        lambda: inputs,
        stuff_classes=[f"c{k}" for k in range(num_classes)],
        stuff_dataset_id_to_contiguous_id={10 + k: k for k in range(num_classes)},
        ignore_label=255,
    )
    return name, inputs, outputs


def assert_same_results(got: dict, expected: dict) -> None:
    assert got.keys() == expected.keys()
    for task in expected:
        assert got[task].keys() == expected[task].keys(), task
        for key, value in expected[task].items():
            same = got[task][key] == value or (math.isnan(got[task][key]) and math.isnan(value))
            assert same, f"{task}/{key}: {got[task][key]} != {value}"


def _read(path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def test_instance_evaluator_streams_and_equals_detectron2(tmp_path):
    name, inputs, outputs = make_instance_dataset(str(tmp_path), "one")
    # tasks inferred: bbox and segm, so the results are read back twice (segm without boxes)
    ours = COCOEvaluator(name, distributed=False, output_dir=str(tmp_path / "new"), use_fast_impl=False)
    ours.reset()
    for x, y in zip(inputs, outputs):
        ours.process([x], [y])
    assert ours._predictions == []  # nothing per image in memory ...
    (spool,) = [os.path.join(d, f) for d, _, fs in os.walk(tmp_path / "new") for f in fs if f.endswith(".jsonl")]
    with open(spool) as f:
        assert len(f.readlines()) == NUM_IMAGES  # ... but one record per image on disk
    got = ours.evaluate()
    assert not os.path.exists(spool)  # the scratch folder is gone

    reference = D2COCOEvaluator(name, distributed=False, output_dir=str(tmp_path / "old"), use_fast_impl=False)
    expected = run(reference, inputs, outputs)
    assert set(expected) == {"bbox", "segm"} and 0 < expected["segm"]["AP"] < 100
    assert_same_results(got, expected)
    name_json = "coco_instances_results.json"
    assert _read(tmp_path / "new" / name_json) == _read(tmp_path / "old" / name_json)

    fast = run(COCOEvaluator(name, tasks=("segm",), distributed=False, output_dir=str(tmp_path / "f")), inputs, outputs)
    assert fast["segm"]["AP"] == pytest.approx(expected["segm"]["AP"], abs=1e-9)


def test_semantic_evaluator_streams_and_equals_detectron2(tmp_path):
    name, inputs, outputs = make_semantic_dataset(str(tmp_path), "one")
    ours = SemSegEvaluator(name, distributed=False, output_dir=str(tmp_path / "new"))
    ours.reset()
    for x, y in zip(inputs, outputs):
        ours.process([x], [y])
    assert ours._predictions == []
    got = ours.evaluate()
    expected = run(D2SemSegEvaluator(name, distributed=False, output_dir=str(tmp_path / "old")), inputs, outputs)
    assert 0 < expected["sem_seg"]["mIoU"] < 100
    assert_same_results(got, expected)
    assert _read(tmp_path / "new" / "sem_seg_predictions.json") == _read(tmp_path / "old" / "sem_seg_predictions.json")
    saved = [torch.load(tmp_path / d / "sem_seg_evaluation.pth", weights_only=False) for d in ("new", "old")]
    assert saved[0] == saved[1]
    assert sorted(os.listdir(tmp_path / "new")) == ["sem_seg_evaluation.pth", "sem_seg_predictions.json"]

    # without an output folder nothing is spooled or written, and the metrics are the same
    bare = SemSegEvaluator(name, distributed=False)
    assert_same_results(run(bare, inputs, outputs), expected)


def _two_worker_evaluation(out_dir: str, data_dir: str) -> None:
    """A worker of the two-process test: evaluates every other image, rank 0 saves the results."""
    from detectron2.utils import comm

    rank = comm.get_rank()
    # Each rank writes its own copy of the (seeded, identical) data: two processes writing the same files raced (a
    # rank could read another's half-written annotation file).
    rank_dir = os.path.join(data_dir, f"rank{rank}")
    os.makedirs(rank_dir, exist_ok=True)
    results = {}
    for kind, make, evaluator_cls in (
        ("instances", make_instance_dataset, COCOEvaluator),
        ("semantic", make_semantic_dataset, SemSegEvaluator),
    ):
        name, inputs, outputs = make(rank_dir, "workers")
        kwargs = {"use_fast_impl": False} if kind == "instances" else {}
        ev = evaluator_cls(name, distributed=True, output_dir=os.path.join(out_dir, kind), **kwargs)
        ev.reset()
        for x, y in list(zip(inputs, outputs))[rank::2]:
            ev.process([x], [y])
        results[kind] = ev.evaluate()
    if rank == 0:
        torch.save(results, os.path.join(out_dir, "results.pt"))
    comm.synchronize()


@pytest.mark.slow
def test_two_workers_equal_one_process(tmp_path):
    """Each worker spools its half; rank 0 reads both: the same metrics as one process over all images (the
    order of the records differs, which COCOeval and the confusion matrix do not see)."""
    from dinat_m2f.engine import launch

    data = tmp_path / "data"
    data.mkdir()
    launch(_two_worker_evaluation, 2, dist_url="auto", args=(str(tmp_path), str(data)), device="cpu")
    got = torch.load(tmp_path / "results.pt", weights_only=False)

    name, inputs, outputs = make_instance_dataset(str(data), "single")
    expected = run(D2COCOEvaluator(name, distributed=False, output_dir=str(tmp_path / "d2"), use_fast_impl=False),
                   inputs, outputs)  # fmt: skip
    assert_same_results(got["instances"], expected)
    name, inputs, outputs = make_semantic_dataset(str(data), "single")
    assert_same_results(got["semantic"], run(D2SemSegEvaluator(name, distributed=False), inputs, outputs))
    for kind in ("instances", "semantic"):
        assert not [f for _, _, fs in os.walk(tmp_path / kind) for f in fs if f.endswith(".jsonl")]
