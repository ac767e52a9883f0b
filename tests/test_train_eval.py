"""train_net.py --eval-only: loads MODEL.WEIGHTS, evaluates with the real evaluators, and with TEST.AUG.ENABLED adds
the multi-scale + flip semantic results (``*_TTA``)."""

from __future__ import annotations

import torch
import train_helpers


def test_eval_only_with_semantic_tta(tmp_path):
    from detectron2.modeling import build_model

    import train_net
    from dinat_m2f.config import load_config
    from dinat_m2f.engine import AtomicCheckpointer

    train_helpers.make_tiny_dataset(str(tmp_path / "datasets"))
    cfg = load_config(train_helpers.DEMO_CONFIG, train_helpers.TINY_OPTS)
    torch.manual_seed(0)
    AtomicCheckpointer(build_model(cfg), save_dir=str(tmp_path)).save("tiny")

    argv = ["--eval-only", "--config-file", train_helpers.DEMO_CONFIG, *train_helpers.TINY_OPTS]
    argv += ["MODEL.WEIGHTS", str(tmp_path / "tiny.pth"), "OUTPUT_DIR", str(tmp_path / "out")]
    argv += ["DATASETS.TEST", "('synthetic_sem_seg_val', 'synthetic_panoptic_val_with_sem_seg')"]
    argv += ["TEST.AUG.ENABLED", "True", "TEST.AUG.MIN_SIZES", "(48, 64)", "TEST.AUG.MAX_SIZE", "128"]
    results = train_net.main(train_net.argument_parser().parse_args(argv))

    assert set(results) == {
        "synthetic_sem_seg_val",
        "synthetic_panoptic_val_with_sem_seg",
        "synthetic_sem_seg_val_TTA",
        "synthetic_panoptic_val_with_sem_seg_TTA",
    }
    assert 0.0 <= results["synthetic_sem_seg_val"]["sem_seg"]["mIoU"] <= 100.0
    assert 0.0 <= results["synthetic_sem_seg_val_TTA"]["sem_seg"]["mIoU"] <= 100.0
    panoptic = results["synthetic_panoptic_val_with_sem_seg"]
    assert {"panoptic_seg", "segm", "sem_seg"} <= set(panoptic)
