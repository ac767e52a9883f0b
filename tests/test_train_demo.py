"""The built-in synthetic dataset (deterministic, consistent formats) and demo/demo.py's overlays."""

from __future__ import annotations

import filecmp
import json
import os
import sys

import numpy as np
import pytest
import torch
import train_helpers
from PIL import Image

from dinat_m2f.config import load_config
from dinat_m2f.data.synthetic import CATEGORIES, SyntheticSpec, generate_synthetic_dataset

SPEC = SyntheticSpec(num_train=6, num_val=3, size=64, seed=3)


def _files(root):
    return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs)


def test_synthetic_dataset_is_deterministic(tmp_path):
    a = generate_synthetic_dataset(str(tmp_path / "a"), SPEC)
    b = generate_synthetic_dataset(str(tmp_path / "b"), SPEC)
    assert _files(a) == _files(b)
    _, mismatch, errors = filecmp.cmpfiles(a, b, _files(a), shallow=False)
    assert not mismatch and not errors
    c = generate_synthetic_dataset(str(tmp_path / "c"), SyntheticSpec(num_train=6, num_val=3, size=64, seed=4))
    assert not filecmp.cmp(os.path.join(a, "images/train/000001.jpg"), os.path.join(c, "images/train/000001.jpg"))


def test_synthetic_formats_agree(tmp_path):
    root = generate_synthetic_dataset(str(tmp_path / "s"), SPEC)
    with open(os.path.join(root, "panoptic_train.json")) as f:
        pan = json.load(f)
    with open(os.path.join(root, "instances_train.json")) as f:
        inst = json.load(f)
    assert [c["id"] for c in pan["categories"]] == [c["id"] for c in CATEGORIES]
    assert len(pan["images"]) == SPEC.num_train and len(pan["annotations"]) == SPEC.num_train
    thing_ids = {c["id"] for c in CATEGORIES if c["isthing"]}
    n_things = 0
    for ann in pan["annotations"]:
        rgb = np.asarray(Image.open(os.path.join(root, "panoptic_train", ann["file_name"])), dtype=np.int64)
        ids = rgb[..., 0] + 256 * rgb[..., 1] + 65536 * rgb[..., 2]
        sem = np.asarray(Image.open(os.path.join(root, "panoptic_semseg_train", ann["file_name"])))
        assert set(np.unique(ids)) == {s["id"] for s in ann["segments_info"]}  # every pixel labelled, no stray id
        for s in ann["segments_info"]:
            mask = ids == s["id"]
            assert mask.sum() == s["area"] > 0
            contiguous = [c["id"] for c in CATEGORIES].index(s["category_id"])
            assert (sem[mask] == contiguous).all()
            n_things += s["category_id"] in thing_ids
    assert len(inst["annotations"]) == n_things > 0
    assert {a["category_id"] for a in inst["annotations"]} <= thing_ids


def test_demo_writes_overlays_for_images_and_folders(tmp_path):
    from detectron2.modeling import build_model

    from dinat_m2f.engine import AtomicCheckpointer

    sys.path.insert(0, os.path.join(train_helpers.REPO, "demo"))
    import demo

    datasets = tmp_path / "datasets"
    train_helpers.make_tiny_dataset(str(datasets))
    cfg = load_config(train_helpers.DEMO_CONFIG, train_helpers.TINY_OPTS)
    torch.manual_seed(0)
    AtomicCheckpointer(build_model(cfg), save_dir=str(tmp_path)).save("tiny")
    images = datasets / "synthetic" / "images" / "val"
    opts = ["--opts", *train_helpers.TINY_OPTS, "MODEL.WEIGHTS", str(tmp_path / "tiny.pth")]

    written = demo.main(["--config-file", train_helpers.DEMO_CONFIG, "--input", str(images / "000001.jpg"),
                         "--output", str(tmp_path / "o1"), *opts])  # fmt: skip
    assert sorted(os.path.basename(p) for p in written) == [
        "000001_instance.png",
        "000001_panoptic.png",
        "000001_semantic.png",
    ]
    for p in written:
        assert Image.open(p).size == (64, 64)

    written = demo.main(["--config-file", train_helpers.DEMO_CONFIG, "--input", str(images), "--tasks", "semantic",
                         "--output", str(tmp_path / "o2"), *opts])  # fmt: skip
    assert len(written) == 4  # one semantic overlay per validation image of the tiny set

    # a video: one PNG per frame up to --max-frames, named <video>_<frame number>_<task>.png
    import cv2

    video = str(tmp_path / "clip.avi")
    writer = cv2.VideoWriter(video, cv2.VideoWriter_fourcc(*"MJPG"), 5, (64, 64))
    for name in sorted(os.listdir(images)):
        writer.write(cv2.imread(str(images / name)))
    writer.release()
    written = demo.main(["--config-file", train_helpers.DEMO_CONFIG, "--video-input", video, "--max-frames", "2",
                         "--tasks", "semantic", "--output", str(tmp_path / "o4"), *opts])  # fmt: skip
    assert [os.path.basename(p) for p in written] == ["clip_000000_semantic.png", "clip_000001_semantic.png"]

    with pytest.raises(FileNotFoundError, match="no such image file, folder or glob match"):
        demo.main(["--config-file", train_helpers.DEMO_CONFIG, "--input", str(tmp_path / "none.jpg"),
                   "--output", str(tmp_path / "o3"), *opts])  # fmt: skip


def _demo_module():
    sys.path.insert(0, os.path.join(train_helpers.REPO, "demo"))
    import demo

    return demo


def test_demo_scales_16bit_images_instead_of_clipping(tmp_path):
    import cv2

    from dinat_m2f.predictor import read_image

    gray = np.array([[0, 257 * 64, 32768, 65535]], dtype=np.uint16)  # 8-bit equivalents 0, 64, 128, 255
    Image.fromarray(gray).save(tmp_path / "gray16.png")
    rgb = read_image(str(tmp_path / "gray16.png"))
    assert rgb.dtype == np.uint8 and rgb.shape == (1, 4, 3)
    assert rgb[0, :, 0].tolist() == rgb[0, :, 2].tolist() == [0, 64, 128, 255]

    colour = np.zeros((2, 2, 3), dtype=np.uint16)
    colour[..., 0] = 65535  # OpenCV order: full blue, half green, no red
    colour[..., 1] = 32768
    cv2.imwrite(str(tmp_path / "bgr48.png"), colour)
    assert read_image(str(tmp_path / "bgr48.png"))[0, 0].tolist() == [0, 128, 255]  # RGB


def test_demo_names_unreadable_images_and_skips_them_with_the_flag(tmp_path, capsys):
    from detectron2.modeling import build_model

    import train_net
    from dinat_m2f.engine import AtomicCheckpointer

    demo = _demo_module()
    datasets = tmp_path / "datasets"
    train_helpers.make_tiny_dataset(str(datasets))
    cfg = train_net.load_config(train_helpers.DEMO_CONFIG, train_helpers.TINY_OPTS)
    torch.manual_seed(0)
    AtomicCheckpointer(build_model(cfg), save_dir=str(tmp_path)).save("tiny")
    opts = ["--opts", *train_helpers.TINY_OPTS, "MODEL.WEIGHTS", str(tmp_path / "tiny.pth")]

    inputs = tmp_path / "inputs"
    inputs.mkdir()
    good = (datasets / "synthetic" / "images" / "val" / "000001.jpg").read_bytes()
    (inputs / "a_good.jpg").write_bytes(good)
    (inputs / "b_truncated.jpg").write_bytes(good[: len(good) // 2])
    (inputs / "c_not_an_image.png").write_bytes(b"hello")
    Image.fromarray(np.full((64, 64), 40000, dtype=np.uint16)).save(inputs / "d_gray16.png")
    argv = ["--config-file", train_helpers.DEMO_CONFIG, "--input", str(inputs), "--tasks", "semantic",
            "--output", str(tmp_path / "out"), *opts]  # fmt: skip

    with pytest.raises(demo.ImageReadError, match=r"b_truncated\.jpg: cannot read this image"):
        demo.main(argv)
    written = demo.main([*argv[: -len(opts)], "--skip-bad-images", *opts])
    assert [os.path.basename(p) for p in written] == ["a_good_semantic.png", "d_gray16_semantic.png"]
    report = capsys.readouterr().err
    assert "Skipped 2 unreadable image(s)" in report
    assert "b_truncated.jpg" in report and "c_not_an_image.png" in report

    for name in ("a_good.jpg", "d_gray16.png"):
        os.remove(inputs / name)
    with pytest.raises(demo.ImageReadError, match="none of the 2 input images could be read"):
        demo.main([*argv[: -len(opts)], "--skip-bad-images", *opts])
