"""A training sampler that can resume mid-stream, and per-sample seeding of the augmentations."""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from detectron2.data.samplers import TrainingSampler
from detectron2.utils import comm


class ResumableTrainingSampler(TrainingSampler):
    """detectron2's TrainingSampler (an infinite, seeded, per-rank shuffled stream) that can start at ``start``.

    The stream of positions is a pure function of (size, shuffle, seed), so skipping the first ``start`` items of
    this rank's share puts a resumed run exactly where the interrupted one stopped. With ``yield_position`` the
    sampler yields ``position * size + index`` so the dataset can seed each sample's augmentation by its position.
    """

    def __init__(self, size: int, shuffle: bool = True, seed: int = 0, yield_position: bool = False) -> None:
        if size <= 0:
            raise ValueError(f"ResumableTrainingSampler: the training set is empty (size={size})")
        super().__init__(size, shuffle=shuffle, seed=seed)
        self.yield_position = yield_position
        self.start = 0  # items of this rank's stream to skip

    def __iter__(self) -> Iterator[int]:
        first = self._rank + self.start * self._world_size
        stream = itertools.islice(self._infinite_indices(), first, None, self._world_size)
        for position, index in enumerate(stream, start=self.start):
            yield position * self._size + index if self.yield_position else index


class PositionedDataset(torch.utils.data.Dataset):
    """Wraps dataset dicts so item ``position * size + index`` is (dicts[index], position)."""

    def __init__(self, dicts: Sequence[dict] | torch.utils.data.Dataset) -> None:
        self._dicts = dicts

    def __len__(self) -> int:
        return len(self._dicts)

    def __getitem__(self, key: int) -> tuple[dict, int]:
        return self._dicts[key % len(self._dicts)], key // len(self._dicts)


class SeededMapper:
    """Calls ``mapper`` with Python, NumPy and torch RNGs seeded from (seed, rank, position of the sample)."""

    def __init__(self, mapper: Callable[[dict], Any], seed: int) -> None:
        self.mapper = mapper
        self.seed = int(seed)
        self.rank = comm.get_rank()

    def __call__(self, item: tuple[dict, int]) -> Any:
        dataset_dict, position = item
        s = (self.seed * 7_919 + self.rank * 104_729 + position) % (2**31)
        random.seed(s)
        np.random.seed(s)
        torch.manual_seed(s)
        return self.mapper(dataset_dict)
