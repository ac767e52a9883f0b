"""Semantic test-time augmentation on a toy model: every scale and flip is run, flips are undone, scores averaged."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from dinat_m2f.config import get_cfg
from dinat_m2f.evaluation import SemanticSegmentorWithTTA

H, W = 12, 20


class ToyModel(nn.Module):
    """sem_seg at the original size with 3 "classes": the column position in the frame the model sees (so an
    un-undone flip shows), the short side of its input (so the average over scales shows), and the image's
    first channel resized back (so the content of flipped copies shows)."""

    def __init__(self, wrong_size: bool = False):
        super().__init__()
        self.seen: list[tuple[int, int]] = []
        self.wrong_size = wrong_size

    def forward(self, batched_inputs):
        outs = []
        for x in batched_inputs:
            h_in, w_in = x["image"].shape[1:]
            self.seen.append((h_in, w_in))
            h, w = x["height"], x["width"] + int(self.wrong_size)
            ramp = (torch.arange(w, dtype=torch.float32) / w).expand(h, w)
            short = torch.full((h, w), float(min(h_in, w_in)))
            content = nn.functional.interpolate(x["image"][None, :1].float(), size=(h, w), mode="nearest")[0, 0]
            outs.append({"sem_seg": torch.stack([ramp, short, content]), "panoptic_seg": None})
        return outs


def _cfg(flip: bool):
    cfg = get_cfg()
    cfg.INPUT.FORMAT = "RGB"
    cfg.TEST.AUG.MIN_SIZES = (24, 36)
    cfg.TEST.AUG.MAX_SIZE = 1000
    cfg.TEST.AUG.FLIP = flip
    return cfg


def _image() -> torch.Tensor:
    img = torch.zeros((3, H, W), dtype=torch.uint8)
    img[:, :, W // 2 :] = 200  # dark left half, bright right half
    return img


@pytest.mark.parametrize("batch_size", [1, 3])
def test_tta_multiscale_flip(batch_size):
    model = ToyModel()
    tta = SemanticSegmentorWithTTA(_cfg(flip=True), model, batch_size=batch_size)
    (out,) = tta([{"image": _image(), "height": H, "width": W}])
    assert set(out) == {"sem_seg"}  # semantic only
    sem = out["sem_seg"]
    assert sem.shape == (3, H, W)
    # each scale once plain and once flipped; shortest edge resized to 24 and 36
    assert sorted(model.seen) == [(24, 40), (24, 40), (36, 60), (36, 60)]
    # ramp x/W and its flipped-back mirror (W-1-x)/W average to a constant
    torch.testing.assert_close(sem[0], torch.full((H, W), (W - 1) / (2 * W)))
    torch.testing.assert_close(sem[1], torch.full((H, W), 30.0))
    # the content comes back in place (not mirrored): dark left, bright right, away from the edge
    assert (sem[2][:, : W // 2 - 2] < 20).all() and (sem[2][:, W // 2 + 2 :] > 180).all()


def test_tta_no_flip():
    model = ToyModel()
    (out,) = SemanticSegmentorWithTTA(_cfg(flip=False), model)([{"image": _image(), "height": H, "width": W}])
    assert sorted(model.seen) == [(24, 40), (36, 60)]
    torch.testing.assert_close(out["sem_seg"][0], (torch.arange(W, dtype=torch.float32) / W).expand(H, W))
    torch.testing.assert_close(out["sem_seg"][1], torch.full((H, W), 30.0))


def test_tta_reads_file_when_no_image(tmp_path):
    path = str(tmp_path / "img.png")
    Image.fromarray(_image().permute(1, 2, 0).numpy()).save(path)
    model = ToyModel()
    (out,) = SemanticSegmentorWithTTA(_cfg(flip=True), model)([{"file_name": path}])
    assert out["sem_seg"].shape == (3, H, W)
    assert np.allclose(out["sem_seg"][1].numpy(), 30.0)


def test_tta_rejects_output_of_wrong_size():
    tta = SemanticSegmentorWithTTA(_cfg(flip=True), ToyModel(wrong_size=True))
    with pytest.raises(ValueError, match="original image size"):
        tta([{"image": _image(), "height": H, "width": W}])
