"""dinat_m2f.Predictor on a tiny model: inputs of every kind, batching, structured results, autocast, overlays."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import train_helpers
from PIL import Image

from dinat_m2f import Predictor
from dinat_m2f.predictor import read_image


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(weights path, folder with two 64x80 images and one 48x64 image) of a tiny random DiNAT-Mask2Former."""
    from detectron2.modeling import build_model

    from dinat_m2f.config import load_config
    from dinat_m2f.engine import AtomicCheckpointer

    folder = tmp_path_factory.mktemp("predictor")
    cfg = load_config(train_helpers.DEMO_CONFIG, train_helpers.TINY_OPTS)
    torch.manual_seed(0)
    AtomicCheckpointer(build_model(cfg), save_dir=str(folder)).save("tiny")
    rng = np.random.default_rng(0)
    for name, (h, w) in {"a": (64, 80), "b": (64, 80), "c": (48, 64)}.items():
        image = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
        image[h // 4 : h // 2, w // 4 : w // 2] = (230, 40, 40)  # some structure
        Image.fromarray(image).save(folder / f"{name}.png")
    return str(folder / "tiny.pth"), folder


# A random model is never confident: keep every query so that panoptic segments exist.
OPTS = [*train_helpers.TINY_OPTS, "MODEL.MASK_FORMER.TEST.OBJECT_MASK_THRESHOLD", "0.0"]


def _predictor(weights, **kw):
    return Predictor(train_helpers.DEMO_CONFIG, weights=weights, device="cpu", opts=OPTS, **kw)


def test_path_array_and_pil_give_the_same_structured_result(tiny):
    weights, folder = tiny
    predictor = _predictor(weights)
    path = str(folder / "a.png")
    by_path = predictor(path)
    by_array = predictor(read_image(path))
    by_pil = predictor(Image.open(path))
    for other in (by_array, by_pil):
        assert torch.equal(other.raw["sem_seg"], by_path.raw["sem_seg"])
    # structured results: shapes of the input image, class names of the metadata
    assert by_path.panoptic.segment_ids.shape == (64, 80) and by_path.panoptic.segment_ids.dtype == np.int32
    assert by_path.panoptic.segments
    for s in by_path.panoptic.segments:
        assert s.class_name == predictor.class_names[s.category_id] and 0.0 < s.score <= 1.0
        assert s.area == int((by_path.panoptic.segment_ids == s.id).sum()) > 0
    inst = by_path.instances
    assert inst.masks.shape[1:] == (64, 80) and inst.masks.dtype == bool
    assert len(inst.scores) == len(inst.class_names) == len(inst.boxes) == inst.masks.shape[0] > 0
    for mask, box in zip(inst.masks, inst.boxes):
        if mask.any():  # tight box of the mask
            ys, xs = np.nonzero(mask)
            np.testing.assert_allclose(box, [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
    assert by_path.semantic.label_map.shape == (64, 80)
    assert set(np.unique(by_path.semantic.label_map)) <= set(range(len(predictor.class_names)))
    assert by_path.raw["sem_seg"].is_inference()  # ran under torch.inference_mode


def test_matches_detectron2_default_predictor(tiny):
    """The same model through detectron2's DefaultPredictor (BGR input, its own resize and weight loading)."""
    from detectron2.engine.defaults import DefaultPredictor

    from dinat_m2f.config import load_config

    weights, folder = tiny
    cfg = load_config(train_helpers.DEMO_CONFIG, [*OPTS, "MODEL.WEIGHTS", weights])
    rgb = read_image(str(folder / "a.png"))
    with torch.no_grad():
        expected = DefaultPredictor(cfg)(rgb[:, :, ::-1].copy())
    got = _predictor(weights)(rgb)
    torch.testing.assert_close(got.raw["sem_seg"], expected["sem_seg"])
    assert np.array_equal(got.panoptic.segment_ids, expected["panoptic_seg"][0].numpy())


def test_a_batch_equals_one_image_at_a_time(tiny):
    weights, folder = tiny
    predictor = _predictor(weights)
    paths = [str(folder / n) for n in ("a.png", "b.png")]
    batched = predictor(paths, batch_size=2)
    assert isinstance(batched, list) and len(batched) == 2
    for path, result in zip(paths, batched):
        alone = predictor(path)
        torch.testing.assert_close(result.raw["sem_seg"], alone.raw["sem_seg"], atol=1e-5, rtol=1e-5)
    mixed = predictor([paths[0], str(folder / "c.png")], batch_size=2)  # different sizes: each at its own size
    assert mixed[0].semantic.label_map.shape == (64, 80) and mixed[1].semantic.label_map.shape == (48, 64)


def test_bfloat16_autocast_is_close_to_float32(tiny):
    weights, folder = tiny
    path = str(folder / "a.png")
    full = _predictor(weights)(path)
    half = _predictor(weights, dtype="bfloat16")(path)
    torch.testing.assert_close(half.raw["sem_seg"].float(), full.raw["sem_seg"], atol=0.05, rtol=0.05)
    with pytest.raises(ValueError, match="dtype must be one of"):
        _predictor(weights, dtype="int8")
    with pytest.raises(ValueError, match="float16 runs on CUDA only"):
        _predictor(weights, dtype="float16")


def test_draw_gives_an_overlay_per_task(tiny):
    weights, folder = tiny
    predictor = _predictor(weights)
    path = str(folder / "a.png")
    result = predictor(path)
    for task in ("panoptic", "instance", "semantic"):
        overlay = predictor.draw(path, result, task=task, confidence_threshold=0.0)
        assert overlay.shape == (64, 80, 3) and overlay.dtype == np.uint8
        assert not np.array_equal(overlay, read_image(path)), task
    result.instances = None
    with pytest.raises(ValueError, match="no 'instance' output"):
        predictor.draw(path, result, task="instance")


def test_clear_errors(tiny, tmp_path, monkeypatch):
    from dinat_m2f import model_zoo
    from dinat_m2f.config import ConfigError

    weights, _ = tiny
    with pytest.raises(ConfigError, match="no weights"):
        Predictor(train_helpers.DEMO_CONFIG, device="cpu", opts=train_helpers.TINY_OPTS)
    with pytest.raises(FileNotFoundError, match="neither a config file nor a model-zoo name.*dinat_l_coco_panoptic"):
        Predictor("nope.yaml")
    with pytest.raises(ValueError, match="ImageNet backbone"):
        Predictor("dinat_mini_in1k")
    monkeypatch.setenv("DINAT_M2F_CACHE", str(tmp_path))
    monkeypatch.setattr(model_zoo.urllib.request, "urlopen", _offline)
    with pytest.raises(model_zoo.WeightsUnavailableError, match="mask2former_dinat_large_coco_panoptic.pth"):
        Predictor("dinat_l_coco_panoptic")
    predictor = _predictor(weights)
    with pytest.raises(FileNotFoundError, match="image not found: .*missing.jpg"):
        predictor(str(tmp_path / "missing.jpg"))
    with pytest.raises(ValueError, match="must be uint8"):
        predictor(np.zeros((8, 8, 3), dtype=np.float32))


def _offline(*args, **kwargs):
    import urllib.error

    raise urllib.error.URLError("no network")
