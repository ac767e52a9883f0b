"""Multi-process launch: detectron2's ``launch`` on GPUs (NCCL), the same protocol with gloo on CPU."""

from __future__ import annotations

import functools
import gc
import logging
from collections.abc import Callable
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from detectron2.engine import launch as d2_launch
from detectron2.engine.launch import DEFAULT_TIMEOUT, _find_free_port
from detectron2.utils import comm


def launch(
    main_func: Callable,
    num_gpus_per_machine: int,
    num_machines: int = 1,
    machine_rank: int = 0,
    dist_url: str | None = None,
    args: tuple = (),
    timeout: timedelta = DEFAULT_TIMEOUT,
    device: str = "auto",
) -> None:
    """Run ``main_func(*args)`` in ``num_gpus_per_machine`` processes on each of ``num_machines`` machines.

    ``device="auto"`` uses CUDA + NCCL when CUDA is available (detectron2's own launch), else CPU processes
    joined with gloo; ``num_gpus_per_machine`` is then the number of CPU worker processes.
    """
    if num_gpus_per_machine < 1 or num_machines < 1:
        raise ValueError(
            f"launch: need >= 1 process per machine and >= 1 machine, got {num_gpus_per_machine}, {num_machines}"
        )
    if not 0 <= machine_rank < num_machines:
        raise ValueError(f"launch: --machine-rank {machine_rank} is outside [0, {num_machines})")
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if use_cuda:
        # detectron2's workers never tear their groups down (see _release_process_groups for what that risks).
        worker_main = functools.partial(_run_then_release_groups, main_func)
        return d2_launch(worker_main, num_gpus_per_machine, num_machines, machine_rank, dist_url, args, timeout)
    world_size = num_machines * num_gpus_per_machine
    if world_size == 1:
        return main_func(*args)
    if dist_url in (None, "auto"):
        if num_machines > 1:
            raise ValueError("launch: --dist-url auto only works on one machine; pass tcp://<host of rank 0>:<port>")
        dist_url = f"tcp://127.0.0.1:{_find_free_port()}"
    mp.start_processes(
        _cpu_worker,
        nprocs=num_gpus_per_machine,
        args=(main_func, world_size, num_gpus_per_machine, machine_rank, dist_url, args, timeout),
        daemon=False,
        start_method="spawn",
    )


def _cpu_worker(
    local_rank: int,
    main_func: Callable,
    world_size: int,
    num_per_machine: int,
    machine_rank: int,
    dist_url: str,
    args: tuple,
    timeout: timedelta,
) -> None:
    global_rank = machine_rank * num_per_machine + local_rank
    try:
        dist.init_process_group("gloo", init_method=dist_url, world_size=world_size, rank=global_rank, timeout=timeout)
    except Exception:
        logging.getLogger(__name__).error(f"Process group URL: {dist_url}")
        raise
    # detectron2's comm helpers need the group of processes on this machine.
    num_machines = world_size // num_per_machine
    for i in range(num_machines):
        group = dist.new_group(list(range(i * num_per_machine, (i + 1) * num_per_machine)))
        if i == machine_rank:
            comm._LOCAL_PROCESS_GROUP = group
    comm.synchronize()
    _run_then_release_groups(main_func, *args)


def _run_then_release_groups(main_func: Callable, *args) -> None:
    try:
        main_func(*args)
    finally:
        if dist.is_initialized():  # detectron2 runs a one-process job without a group
            _release_process_groups()


def _release_process_groups() -> None:
    """Destroy the process groups and drop every reference to them while Python is still fully alive.

    ``destroy_process_group`` alone leaves the groups alive when something else holds them (detectron2's
    ``comm._LOCAL_PROCESS_GROUP`` and the cached ``_get_global_gloo_group``). A gloo group's worker thread may then
    still be freeing a finished collective whose tensors belong to Python objects when the interpreter finalizes:
    the thread cannot take the GIL, exits mid-destructor and the worker dies with SIGABRT ("terminate called
    without an active exception"). Releasing the last reference here joins those threads before the exit (torch
    releases the GIL while a group's destructor joins them).
    """
    dist.destroy_process_group()
    comm._LOCAL_PROCESS_GROUP = None
    comm._get_global_gloo_group.cache_clear()
    gc.collect()  # groups held by reference cycles (a trainer's DDP model) go now, not at finalization
