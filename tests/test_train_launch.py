"""Two CPU worker processes joined with gloo: they agree on the weights after each step, and their loss equals a
single process's loss over the same (combined) batch."""

from __future__ import annotations

import pytest
import torch
import train_helpers

from dinat_m2f.config import load_config
from dinat_m2f.engine import launch

# Uniform point sampling with many points, so the point-sampled mask losses barely depend on the random draw.
OPTS = [
    "SOLVER.MAX_ITER", "2",
    "SOLVER.CHECKPOINT_PERIOD", "100",
    "MODEL.MASK_FORMER.TRAIN_NUM_POINTS", "4096",
    "MODEL.MASK_FORMER.OVERSAMPLE_RATIO", "1.0",
    "MODEL.MASK_FORMER.IMPORTANCE_SAMPLE_RATIO", "0.0",
]  # fmt: skip


@pytest.mark.slow
def test_two_gloo_workers_agree_and_match_one_process(tmp_path):
    datasets = str(tmp_path / "datasets")
    train_helpers.make_tiny_dataset(datasets)  # before the workers start: they only read it
    out = tmp_path / "out"
    out.mkdir()
    launch(train_helpers.launch_worker, 2, dist_url="auto", args=(str(out), datasets, OPTS), device="cpu")

    r0, r1 = (torch.load(out / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    assert r0["world_size"] == r1["world_size"] == 2
    # each worker saw its own image (IMS_PER_BATCH 2 over 2 workers)
    assert len(r0["batch"]) == len(r1["batch"]) == 1
    assert r0["batch"][0]["file_name"] != r1["batch"][0]["file_name"]
    # same weights after the steps (DDP all-reduced the gradients) ...
    init = torch.load(out / "init.pt", weights_only=False)
    assert r0["final"].keys() == r1["final"].keys()
    for name in r0["final"]:
        assert torch.equal(r0["final"][name], r1["final"][name]), f"workers disagree on {name}"
    assert any(not torch.equal(init[k], r0["final"][k]) for k in init)  # ... and the steps did change them

    # one process, same initial weights, both images in one batch: the same loss as the mean over the workers
    from detectron2.modeling import build_model

    cfg = load_config(train_helpers.DEMO_CONFIG, train_helpers.TINY_OPTS + OPTS)
    model = build_model(cfg)
    model.load_state_dict(init)
    model.train()
    torch.manual_seed(0)
    with torch.no_grad():
        single = model(r0["batch"] + r1["batch"])
    assert single.keys() == r0["losses"].keys()

    # The mask and dice terms are normalised by the number of masks all-reduced over the workers (Mask2Former's
    # num_masks), so the workers' mean equals the single-process value up to the random point sampling.
    # (The class term is a weighted mean per worker in Mask2Former, so it only matches approximately.)
    def point_terms(losses):
        return sum(v.item() for k, v in losses.items() if k.startswith(("loss_mask", "loss_dice")))

    workers = (point_terms(r0["losses"]) + point_terms(r1["losses"])) / 2
    assert workers == pytest.approx(point_terms(single), rel=0.01)
    total_workers = (sum(r0["losses"].values()) + sum(r1["losses"].values())).item() / 2
    assert total_workers == pytest.approx(sum(single.values()).item(), rel=0.05)


def test_worker_teardown_releases_every_reference_to_the_groups(tmp_path):
    """A group that outlives the interpreter lets a gloo thread free a collective's tensors during finalization
    (SIGABRT, "terminate called without an active exception"): the teardown must leave no reference behind."""
    import torch.distributed as dist
    from detectron2.utils import comm

    from dinat_m2f.engine.launch import _release_process_groups

    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, world_size=1, rank=0)
    try:
        comm._LOCAL_PROCESS_GROUP = dist.new_group([0])
        out = [None]
        dist.all_gather_object(out, {"rank": 0}, group=comm._get_global_gloo_group())  # detectron2 caches it
        assert out == [{"rank": 0}] and comm._get_global_gloo_group.cache_info().currsize == 1
    finally:
        _release_process_groups()
    assert not dist.is_initialized()
    assert comm._LOCAL_PROCESS_GROUP is None
    assert comm._get_global_gloo_group.cache_info().currsize == 0


def _record_group_state(out: list) -> None:
    from detectron2.utils import comm

    out.append(comm._LOCAL_PROCESS_GROUP is not None)


def test_gpu_workers_release_their_groups_too(tmp_path, monkeypatch):
    """On CUDA, detectron2's launch runs the workers; what it runs must release the groups after main_func."""
    import importlib
    import pickle

    import torch.distributed as dist
    from detectron2.utils import comm

    launch_module = importlib.import_module("dinat_m2f.engine.launch")  # the package exports the function as `launch`

    launched = {}
    monkeypatch.setattr(launch_module, "d2_launch", lambda fn, *_: launched.update(fn=fn))
    seen: list = []
    launch_module.launch(_record_group_state, 2, args=(seen,), device="cuda")
    worker_main = pickle.loads(pickle.dumps(launched["fn"]))  # spawn pickles it
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, world_size=1, rank=0)
    try:
        comm._LOCAL_PROCESS_GROUP = dist.new_group([0])
        worker_main(seen)
        assert seen == [True]  # main_func ran with the groups in place
        assert not dist.is_initialized() and comm._LOCAL_PROCESS_GROUP is None
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        comm._LOCAL_PROCESS_GROUP = None
    worker_main(seen)  # detectron2's one-process path (no group) runs the same wrapper
    assert seen == [True, False]
