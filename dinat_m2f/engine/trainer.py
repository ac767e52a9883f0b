"""``Trainer``: detectron2's DefaultTrainer with Mask2Former's loaders, optimizer, schedules and evaluators.

Additions over Mask2Former's train_net.py: AMP on CPU (bfloat16) as well as GPU (float16), a NaN guard, atomic
checkpoints, a data stream that resumes where it stopped, and a deterministic mode (DETERMINISTIC: True) in which a
run killed and resumed ends with the same weights as an uninterrupted one.
"""

from __future__ import annotations

import logging
import os
import weakref
from collections import OrderedDict
from typing import Any

import torch
from detectron2.config import CfgNode
from detectron2.data import (
    DatasetFromList,
    build_detection_test_loader,
    build_detection_train_loader,
    get_detection_dataset_dicts,
)
from detectron2.engine import DefaultTrainer, TrainerBase, create_ddp_model, hooks
from detectron2.evaluation import DatasetEvaluator, verify_results
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from dinat_m2f.data import build_train_mapper
from dinat_m2f.data.dataset_mappers import CheckedDatasetMapper
from dinat_m2f.engine.checkpoint import AtomicCheckpointer
from dinat_m2f.engine.hooks import FiniteWeightsPeriodicCheckpointer
from dinat_m2f.engine.lr_scheduler import build_lr_scheduler
from dinat_m2f.engine.optimizer import build_optimizer
from dinat_m2f.engine.sampler import PositionedDataset, ResumableTrainingSampler, SeededMapper
from dinat_m2f.engine.train_loop import MaskFormerTrainLoop, resolve_amp_dtype
from dinat_m2f.utils.d2_compat import evaluator_parts, periodic_writer_writers


def training_seed(cfg: CfgNode) -> int:
    """cfg.SEED if set, else one random seed shared by all workers."""
    return cfg.SEED if cfg.SEED >= 0 else comm.shared_random_seed()


class Trainer(DefaultTrainer):
    """DefaultTrainer for DiNAT + Mask2Former (see the module docstring)."""

    def __init__(self, cfg: CfgNode) -> None:
        # DefaultTrainer.__init__ would build AMPTrainer (CUDA only) and a plain checkpointer; build ours instead.
        TrainerBase.__init__(self)
        logger = logging.getLogger("detectron2")
        if not logger.isEnabledFor(logging.INFO):
            setup_logger()
        cfg = DefaultTrainer.auto_scale_workers(cfg, comm.get_world_size())

        model = self.build_model(cfg)
        optimizer = self.build_optimizer(cfg, model)
        data_loader = self.build_train_loader(cfg)
        device = next(model.parameters()).device
        model = create_ddp_model(
            model, broadcast_buffers=False, device_ids=[device.index] if device.type == "cuda" else None
        )
        amp_dtype = resolve_amp_dtype(cfg.SOLVER.AMP.DTYPE, device.type) if cfg.SOLVER.AMP.ENABLED else None
        self._trainer = MaskFormerTrainLoop(
            model,
            data_loader,
            optimizer,
            amp_dtype=amp_dtype,
            nan_guard=cfg.SOLVER.NAN_GUARD,
            seed=training_seed(cfg) if cfg.DETERMINISTIC else None,
        )
        self.scheduler = self.build_lr_scheduler(cfg, optimizer)
        self.checkpointer = AtomicCheckpointer.from_config(cfg, model, cfg.OUTPUT_DIR, trainer=weakref.proxy(self))
        self.start_iter = 0
        self.max_iter = cfg.SOLVER.MAX_ITER
        self.cfg = cfg
        self.register_hooks(self.build_hooks())

    # ---- resuming ---------------------------------------------------------------------------------------------
    def resume_or_load(self, resume: bool = True) -> None:
        super().resume_or_load(resume=resume)
        sampler = getattr(self._trainer.data_loader, "resumable_sampler", None)
        if self.start_iter > 0 and sampler is not None:
            # Skip what this rank already consumed, so the data stream continues where the run stopped.
            per_rank_batch = self.cfg.SOLVER.IMS_PER_BATCH // comm.get_world_size()
            sampler.start = self.start_iter * per_rank_batch
            self._trainer.reset_data_loader()
            logging.getLogger(__name__).info(f"Resumed the data stream at sample {sampler.start} of this worker")

    def state_dict(self) -> dict:
        # detectron2 0.6's DefaultTrainer leaves the inner loop out, so checkpoints would miss the optimizer state
        # (AdamW moments, the LR it was at) and the AMP grad scaler; a resumed run would then diverge.
        ret = super().state_dict()
        ret["_trainer"] = self._trainer.state_dict()
        return ret

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        if "_trainer" in state_dict:
            self._trainer.load_state_dict(state_dict["_trainer"])
        else:
            logging.getLogger(__name__).warning(
                "The checkpoint has no optimizer state (written by another trainer): the optimizer starts afresh"
            )

    # ---- builders ---------------------------------------------------------------------------------------------
    @classmethod
    def build_optimizer(cls, cfg: CfgNode, model: torch.nn.Module) -> torch.optim.Optimizer:
        return build_optimizer(cfg, model)

    @classmethod
    def build_lr_scheduler(cls, cfg: CfgNode, optimizer: torch.optim.Optimizer):
        return build_lr_scheduler(cfg, optimizer)

    @classmethod
    def build_train_loader(cls, cfg: CfgNode):
        mapper = build_train_mapper(cfg)
        dicts = get_detection_dataset_dicts(
            cfg.DATASETS.TRAIN,
            filter_empty=cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS,
            min_keypoints=0,
            proposal_files=None,
        )
        if hasattr(mapper, "dataset_size"):
            mapper.dataset_size = len(dicts)  # so SKIP_CORRUPT can say "no sample could be read" (SkipCorruptMixin)
        seed = training_seed(cfg)  # once: with SEED < 0 each call is a collective drawing a new random seed
        sampler = ResumableTrainingSampler(len(dicts), seed=seed, yield_position=cfg.DETERMINISTIC)
        dataset: Any = dicts
        if cfg.DETERMINISTIC:
            dataset = PositionedDataset(DatasetFromList(dicts, copy=False))  # serialized: no copy-on-read growth
            mapper = SeededMapper(mapper, seed)
        loader = build_detection_train_loader(cfg, dataset=dataset, mapper=mapper, sampler=sampler)
        loader.resumable_sampler = sampler
        return loader

    @classmethod
    def build_test_loader(cls, cfg: CfgNode, dataset_name: str):
        # detectron2's test loader and mapper, but an unreadable image is an error that names the file
        return build_detection_test_loader(cfg, dataset_name, mapper=CheckedDatasetMapper(cfg, False))

    @classmethod
    def build_evaluator(cls, cfg: CfgNode, dataset_name: str, output_folder: str | None = None) -> DatasetEvaluator:
        from dinat_m2f.evaluation import build_evaluator

        if output_folder is None:
            output_folder = os.path.join(cfg.OUTPUT_DIR, "inference")
        return build_evaluator(cfg, dataset_name, output_folder)

    def build_hooks(self) -> list[hooks.HookBase]:
        ret = super().build_hooks()
        period = self.cfg.SOLVER.LOG_PERIOD
        for i, h in enumerate(ret):
            if isinstance(h, hooks.PeriodicCheckpointer):
                ret[i] = FiniteWeightsPeriodicCheckpointer(  # never saves NaN/inf weights
                    self.checkpointer,
                    self.cfg.SOLVER.CHECKPOINT_PERIOD,
                    max_iter=self.max_iter,
                    max_to_keep=self.cfg.CHECKPOINT.MAX_TO_KEEP,
                )
            elif isinstance(h, hooks.PeriodicWriter):
                # Keep the writers super() built (building them again would open metrics.json and a TensorBoard
                # event file a second time); only the period changes.
                ret[i] = hooks.PeriodicWriter(periodic_writer_writers(h), period=period)
        return ret

    def build_writers(self) -> list:
        """Console (iteration, losses, LR, ETA) and metrics.json; TensorBoard too when it is installed."""
        import importlib.util

        from detectron2.utils.events import CommonMetricPrinter, JSONWriter, TensorboardXWriter

        os.makedirs(self.cfg.OUTPUT_DIR, exist_ok=True)
        writers = [CommonMetricPrinter(self.max_iter), JSONWriter(os.path.join(self.cfg.OUTPUT_DIR, "metrics.json"))]
        if importlib.util.find_spec("tensorboard") is not None:
            writers.append(TensorboardXWriter(self.cfg.OUTPUT_DIR))
        return writers

    # ---- test-time augmentation -------------------------------------------------------------------------------
    @classmethod
    def test_with_TTA(cls, cfg: CfgNode, model: torch.nn.Module) -> OrderedDict:  # noqa: N802 (d2 name)
        """Multi-scale + flip semantic segmentation (TEST.AUG.*); results get the suffix ``_TTA``."""
        from dinat_m2f.evaluation import SemanticSegmentorWithTTA

        logging.getLogger("detectron2.trainer").info("Running inference with test-time augmentation ...")
        model = SemanticSegmentorWithTTA(cfg, model)
        evaluators = [
            semantic_evaluators(
                cls.build_evaluator(cfg, name, output_folder=os.path.join(cfg.OUTPUT_DIR, "inference_TTA")), name
            )
            for name in cfg.DATASETS.TEST
        ]
        res = cls.test(cfg, model, evaluators)
        return OrderedDict({k + "_TTA": v for k, v in res.items()})


def semantic_evaluators(evaluator: DatasetEvaluator, dataset_name: str) -> DatasetEvaluator:
    """The semantic-segmentation part of ``evaluator`` (TTA produces only ``sem_seg``)."""
    from detectron2.evaluation import CityscapesSemSegEvaluator as D2CityscapesSemSeg
    from detectron2.evaluation import DatasetEvaluators, SemSegEvaluator

    kinds = (SemSegEvaluator, D2CityscapesSemSeg)
    kept = [e for e in evaluator_parts(evaluator) if isinstance(e, kinds)]
    if not kept:
        raise ValueError(
            f"TEST.AUG.ENABLED: test-time augmentation is semantic only, and {dataset_name} has no "
            "semantic evaluator (set MODEL.MASK_FORMER.TEST.SEMANTIC_ON True or turn TEST.AUG off)"
        )
    return kept[0] if len(kept) == 1 else DatasetEvaluators(kept)


def evaluate(cfg: CfgNode, model: torch.nn.Module) -> OrderedDict:
    """Evaluate ``model`` on cfg.DATASETS.TEST (plus TTA when TEST.AUG.ENABLED); verify EXPECTED_RESULTS."""
    res = Trainer.test(cfg, model)
    if cfg.TEST.AUG.ENABLED:
        res.update(Trainer.test_with_TTA(cfg, model))
    if comm.is_main_process():
        verify_results(cfg, res)
    return res


__all__ = ["Trainer", "evaluate"]
