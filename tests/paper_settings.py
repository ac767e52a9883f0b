"""The paper's (dataset, task) settings, written out once for the tests that check configs and the model zoo cover them."""

PAPER_SETTINGS = frozenset(
    {
        ("coco", "panoptic"),
        ("coco", "instance"),
        ("ade20k", "semantic"),
        ("ade20k", "panoptic"),
        ("ade20k", "instance"),
        ("cityscapes", "semantic"),
        ("cityscapes", "instance"),
        ("cityscapes", "panoptic"),
    }
)
