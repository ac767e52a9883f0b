"""Per-image evaluation records streamed to disk, so an evaluator's memory does not grow with the dataset.

detectron2's COCO and semantic evaluators keep every image's RLE-encoded predictions in a list (0.1-0.8 MB per
image for Mask2Former's 100 instance masks) and pickle them all to rank 0 in ``evaluate()``. A
:class:`PredictionSpool` appends each record to a JSON-lines file per rank instead, in a scratch folder inside the
evaluator's output folder that all ranks of a machine share (ranks on several machines need a shared file system,
as for the panoptic evaluator). Rank 0 then reads the files back one record at a time, in rank order, which is the
order detectron2's gather produced, so results and dumped files are identical.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from typing import Any, TextIO

from detectron2.utils import comm
from detectron2.utils.file_io import PathManager

__all__ = ["PredictionSpool", "SpooledRecords", "write_json_array"]


class SpooledRecords:
    """The records of some spool files, re-readable: each iteration streams them from disk again."""

    def __init__(self, paths: list[str]) -> None:
        self.paths = paths

    def __iter__(self) -> Iterator[Any]:
        for path in self.paths:
            with open(path) as f:
                for line in f:
                    yield json.loads(line)

    def is_empty(self) -> bool:
        return all(os.path.getsize(p) == 0 for p in self.paths)


class PredictionSpool:
    """One JSON-lines file per rank in a scratch folder; ``reset`` starts afresh, ``write`` appends a record,
    ``finish`` syncs the ranks and gives rank 0 (every rank when not ``distributed``) the records of all of them.

    ``reset`` and ``finish`` are collective when ``distributed``: call them on every rank.
    """

    def __init__(self, prefix: str, output_dir: str | None, distributed: bool = True) -> None:
        self.prefix = prefix
        self.output_dir = output_dir
        self.distributed = distributed
        self._scratch: tempfile.TemporaryDirectory | None = None
        self._file: TextIO | None = None
        self._path: str | None = None

    def reset(self) -> None:
        self.cleanup()
        gather = self.distributed and comm.get_world_size() > 1
        folder = None
        if not gather or comm.is_main_process():
            if self.output_dir:
                PathManager.mkdirs(self.output_dir)
            self._scratch = tempfile.TemporaryDirectory(prefix=self.prefix, dir=self.output_dir or None)
            folder = self._scratch.name
        if gather:
            folder = comm.all_gather(folder)[0]  # rank 0's folder; every rank writes its own file into it
        os.makedirs(folder, exist_ok=True)
        self._path = os.path.join(folder, f"rank{comm.get_rank()}.jsonl")
        self._file = open(self._path, "w")  # noqa: SIM115 (open until finish(): one file per evaluation)

    def write(self, record: Any) -> None:
        if self._file is None:
            raise RuntimeError(f"{type(self).__name__}.write before reset()")
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()  # each record reaches the file at once: the file is all the state an evaluator keeps

    def finish(self) -> SpooledRecords | None:
        """Close this rank's file; return the records of all ranks on rank 0 (None on the others)."""
        if self._file is None:
            raise RuntimeError(f"{type(self).__name__}.finish before reset()")
        self._file.close()
        self._file = None
        if not (self.distributed and comm.get_world_size() > 1):
            return SpooledRecords([self._path])
        comm.synchronize()
        paths = comm.gather(self._path, dst=0)
        if not comm.is_main_process():
            return None
        missing = [p for p in paths if not os.path.isfile(p)]
        if missing:
            raise FileNotFoundError(
                f"{len(missing)} evaluation spool files are missing (e.g. {missing[0]}); ranks on several machines "
                "need an evaluator output_dir on a shared file system"
            )
        return SpooledRecords(paths)

    def cleanup(self) -> None:
        """Delete the scratch folder (rank 0 owns it; call once the records were read)."""
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._scratch is not None:
            self._scratch.cleanup()
            self._scratch = None


def write_json_array(path: str, items: Iterable[Any]) -> None:
    """Write ``items`` as a JSON array one item at a time: the same bytes as ``json.dumps(list(items))``
    without holding the list or the whole string."""
    with PathManager.open(path, "w") as f:
        f.write("[")
        for i, item in enumerate(items):
            if i:
                f.write(", ")
            f.write(json.dumps(item))
        f.write("]")
