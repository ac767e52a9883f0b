#!/usr/bin/env python
"""CPU speed of a Mask2Former model: inference and a training step, this tree against another commit's tree, or the
native deformable-attention op against grid_sample.

    python tools/benchmark_mask2former.py [--config-file CFG] [--size 512] [--rounds 5] [--threads N] [--json]
        [--mode inference|train|both] [--batch 2] [--baseline PATH] [--profile N] [--cpu-isa native|avx2]
        [--dtype float32|bfloat16] [--train-amp] [--op] [KEY VALUE ...]

Defaults to DiNAT-Tiny-Mask2Former (ADE20K semantic, 512x512) with random weights (seed 0), float32. Inference: eval
mode under ``torch.inference_mode``, batch 1, one image. Training step (``--mode train``): train mode, a batch of
``--batch`` synthetic images with 3 instances each, loss, backward and one step of the optimizer train_net builds
(``--optimizer train_net``, the default: each tree's own ``build_optimizer`` on the config's SOLVER, so AdamW with
its parameter groups and full-model gradient clipping) or of a plain AdamW (``--optimizer adamw``).

Without ``--baseline`` the two variants are ``MSDeformAttn.impl`` "native" (torch.ops.dinat_m2f.ms_deform_attn_*)
and "pytorch" (the grid_sample formulation), in this process; the median time inside the deformable attention is
reported too (inference).

With ``--baseline PATH`` the variants are this tree and the tree at PATH (a checkout of another commit with its
extension built in place). Each tree gets one long-lived worker process (``PYTHONPATH=<tree>``, the same thread
count) that builds the model from that tree's code and config with the same seed and times one forward or one
training step per request; only one worker runs at a time. A baseline of commit 09463ec:

    git worktree add ../base 09463ec && cd ../base && make build
    # CPU only: cd ../base && FORCE_CUDA=0 MAX_JOBS=2 python setup.py build_ext --inplace

In both cases one warm-up of each variant is followed by ``--rounds`` rounds, each timing every variant once (in
alternating order), so that load changes on the machine hit both alike; medians and the ratio (variant time over
the first variant's, > 1: the first variant is faster) are reported. With ``--baseline`` the workers' process CPU
time (all threads) per request is reported too: on a machine that other processes load, wall time includes the
time the workers wait for a core, and the CPU-time ratio is the steadier of the two.

``--cpu-isa avx2`` runs everything (the workers too) on the AVX2 code paths of every library, to see what a
CPU without AVX-512 would run: ATEN_CPU_CAPABILITY=avx2 (torch's vectorized kernels), ONEDNN_MAX_CPU_ISA=AVX2
(oneDNN's convolutions), MKL_ENABLE_INSTRUCTIONS=AVX2 (MKL) and DINAT_M2F_CPU_ISA=avx2 (this project's NA kernels;
a tree too old to read it must be built with DINAT_M2F_CPU_ARCH=x86-64-v3). Each worker reports the path each
library takes (torch's capability, the oneDNN kernel a convolution runs, build_info) and a mismatch is an error.
MKL cannot be asked; on AMD CPUs its float32 GEMM runs the AVX2 "zen" kernels whatever the variable says (ymm
registers only), so the matrix products are the same code on both paths there. This is AVX2 code on the same CPU
(same cores, caches and clock), not a machine without AVX-512.

``--dtype bfloat16`` runs this tree's inference in bfloat16 (MODEL.MASK_FORMER.TEST.DTYPE: the network under
autocast, the deformable sampling and the post-processing in float32); the baseline and
``--mode train`` stay float32 (the key is this tree's; SOLVER.AMP is training's switch). The header says which
variant ran in which precision. Without ``--baseline`` both MSDeformAttn variants run in that precision.

``--train-amp`` runs the training steps as train_net runs them with the config's SOLVER.AMP.ENABLED (the DiNAT and
Mask2Former configs enable it): the forward under ``torch.autocast`` in bfloat16 on the CPU (the dtype resolved by
each tree's own trainer code), backward and AdamW step outside, in every variant, the baseline too.

Each tree does what its entry points (train_net, demo, Predictor) do on the CPU: this tree tells glibc to keep freed
memory for reuse (``dinat_m2f.utils.cpu_memory``; ``DINAT_M2F_KEEP_FREED_MEMORY=0`` in the environment turns it off
in every worker), a tree without that module runs glibc's default; the header says which.

``--op`` times the multi-scale deformable attention op alone instead of the model, float32, at the shapes of one
call in the pixel decoder's encoder at ``--size`` (levels size/8, size/16, size/32, so 64x64, 32x32 and 16x16 at 512;
queries = all positions of all levels; 8 heads of 32 channels, 4 points per level; locations uniform in [0, 1),
weights softmaxed over levels and points, seed 0; a training step calls it once per encoder layer, 6 times).
Inference (batch 1): the forward. Training (batch ``--batch``): the forward, and the forward plus the backward of all
three inputs' gradients (value, locations, weights) for a random output gradient; the backward alone is the
difference of those medians. Without ``--baseline`` the variants are the native op and the grid_sample formulation
(``ms_deform_attn_reference``, autograd for its backward); with ``--baseline PATH`` this tree's native op and
PATH's, each in its worker. Interleaved rounds, medians and ratios as above; the header says the multiply-adds of
the sampling (samples x 4 corners x channels; the backward does twice that: dot products and value scatter).

``--profile N`` instead profiles this tree (``torch.profiler``, one inference and/or one training step after a
warm-up) and prints the N operators with the most self CPU time and the share of ``aten::copy_``.
"""

from __future__ import annotations

import argparse
import ctypes
import hashlib
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
CONFIG_IN_TREE = Path("configs/ade20k/semantic-segmentation/dinat/maskformer2_dinat_tiny_bs16_160k.yaml")
DEFAULT_CONFIG = ROOT / CONFIG_IN_TREE
MODES = ("inference", "train")
# the environment that puts every library on its AVX2 code path (--cpu-isa avx2)
AVX2_ENV = {
    "ATEN_CPU_CAPABILITY": "avx2",  # torch's vectorized (ATen) kernels
    "ONEDNN_MAX_CPU_ISA": "AVX2",  # oneDNN (convolutions)
    "MKL_ENABLE_INSTRUCTIONS": "AVX2",  # MKL (its AMD "zen" GEMM kernels are AVX2 anyway)
    "DINAT_M2F_CPU_ISA": "avx2",  # this project's NA kernels
}


def load_cfg(config_file: Path, opts: list[str]):
    """The config of ``config_file`` with ``opts``, on the CPU, without weights."""
    from dinat_m2f.config import get_cfg

    cfg = get_cfg()
    cfg.merge_from_file(str(config_file))
    cfg.merge_from_list(["MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", "", *opts])
    cfg.freeze()
    return cfg


def build(config_file: Path, opts: list[str], train: bool = False) -> torch.nn.Module:
    """The model of ``config_file`` on the CPU with random weights (seed 0), in eval or train mode."""
    from detectron2.modeling import build_model

    import dinat_m2f.modeling  # noqa: F401  (registers the model)

    cfg = load_cfg(config_file, opts)
    torch.manual_seed(0)
    return build_model(cfg).train(train)


def train_amp_dtype(args: argparse.Namespace) -> torch.dtype | None:
    """The autocast dtype of a training step: None (float32) without ``--train-amp``, else what the config's
    SOLVER.AMP gives on the CPU, resolved by the tree's own trainer code (bfloat16 for "auto")."""
    if not args.train_amp:
        return None
    from dinat_m2f.engine.train_loop import resolve_amp_dtype

    cfg = load_cfg(args.config_file, args.opts)
    if not cfg.SOLVER.AMP.ENABLED:
        raise ValueError(
            f"--train-amp: {args.config_file} sets SOLVER.AMP.ENABLED False (train_net would not autocast)"
        )
    return resolve_amp_dtype(cfg.SOLVER.AMP.DTYPE, "cpu")


def set_impl(model: torch.nn.Module, impl: str) -> list:
    from dinat_m2f.modeling.pixel_decoder.ms_deform_attn import MSDeformAttn

    modules = [m for m in model.modules() if isinstance(m, MSDeformAttn)]
    if not modules:
        raise RuntimeError("the model has no MSDeformAttn module: is its pixel decoder MSDeformAttnPixelDecoder?")
    for m in modules:
        m.impl = impl
    return modules


class AttnTimer:
    """Wall time spent inside the MSDeformAttn modules (forward hooks)."""

    def __init__(self, modules):
        self.total = 0.0
        self._start = 0.0
        for m in modules:
            m.register_forward_pre_hook(self._pre)
            m.register_forward_hook(self._post)

    def _pre(self, *_):
        self._start = time.perf_counter()

    def _post(self, *_):
        self.total += time.perf_counter() - self._start


def inference_inputs(size: int) -> list[dict]:
    image = torch.rand(3, size, size, generator=torch.Generator().manual_seed(0)) * 255
    return [{"image": image, "height": size, "width": size}]


def train_inputs(size: int, batch: int) -> list[dict]:
    """``batch`` random images, each with 3 instances: horizontal bands of classes 1, 5 and 7."""
    from detectron2.structures import Instances

    generator = torch.Generator().manual_seed(0)
    samples = []
    for _ in range(batch):
        instances = Instances((size, size))
        instances.gt_classes = torch.tensor([1, 5, 7])
        masks = torch.zeros(3, size, size, dtype=torch.bool)
        cuts = [0, size * 2 // 5, size * 4 // 5, size]
        for i in range(3):
            masks[i, cuts[i] : cuts[i + 1]] = True
        instances.gt_masks = masks
        image = torch.rand(3, size, size, generator=generator) * 255
        samples.append({"image": image, "instances": instances, "height": size, "width": size})
    return samples


def inference_fn(model: torch.nn.Module, size: int) -> Callable[[], torch.Tensor]:
    """One forward of one image: returns its sem_seg (or the first output tensor of another task)."""
    inputs = inference_inputs(size)

    def run() -> torch.Tensor:
        with torch.inference_mode():
            out = model(inputs)[0]
        return out["sem_seg"] if "sem_seg" in out else out["panoptic_seg"][0]

    return run


def train_optimizer(model: torch.nn.Module, args: argparse.Namespace) -> torch.optim.Optimizer:
    """The optimizer of a training step: with ``--optimizer train_net`` the one train_net builds, by the tree's own
    ``dinat_m2f.engine.build_optimizer`` from the config's SOLVER (AdamW, its parameter groups, full-model gradient
    clipping); with ``--optimizer adamw`` a plain ``torch.optim.AdamW(lr=1e-5)`` (this benchmark before 2026-11-30)."""
    if args.optimizer == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=1e-5)
    from dinat_m2f.engine.optimizer import build_optimizer

    return build_optimizer(load_cfg(args.config_file, list(args.opts)), model)


def train_fn(
    model: torch.nn.Module,
    size: int,
    batch: int,
    amp_dtype: torch.dtype | None,
    optimizer: torch.optim.Optimizer,
) -> Callable[[], torch.Tensor]:
    """One training step (losses, backward, a step of ``optimizer``, see ``train_optimizer``): returns the total
    loss. With ``amp_dtype`` the forward runs under ``torch.autocast`` in that dtype, as train_net's training loop
    runs it with SOLVER.AMP.ENABLED."""
    inputs = train_inputs(size, batch)

    def run() -> torch.Tensor:
        with torch.autocast("cpu", dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            losses = model(inputs)
        loss = sum(losses.values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        return loss.detach()

    run.optimizer = optimizer  # type: ignore[attr-defined]  (reported in the header)
    return run


def optimizer_description(optimizer: torch.optim.Optimizer) -> str:
    """The optimizer's class and torch's kernel choice, e.g. "FullModelGradientClippingAdamW, fused"."""
    group = optimizer.param_groups[0]
    kernel = "fused" if group.get("fused") else "foreach" if group.get("foreach") else "for-loop (torch's CPU default)"
    return f"{type(optimizer).__name__}, {kernel}"


def step_fn(model: torch.nn.Module, mode: str, args: argparse.Namespace) -> Callable[[], torch.Tensor]:
    """One inference or one training step of ``model``, as ``args`` ask."""
    if mode == "inference":
        return inference_fn(model, args.size)
    return train_fn(model, args.size, args.batch, train_amp_dtype(args), train_optimizer(model, args))


OP_HEADS, OP_CHANNELS, OP_POINTS, OP_STRIDES = 8, 32, 4, (8, 16, 32)  # the pixel decoder's encoder


def op_inputs(size: int, batch: int) -> tuple[torch.Tensor, ...]:
    """Inputs of one deformable attention call of the encoder at image size ``size`` (seed 0): value, spatial_shapes,
    level_start_index, sampling_locations, attention_weights."""
    g = torch.Generator().manual_seed(0)
    shapes = torch.tensor([[size // s, size // s] for s in OP_STRIDES], dtype=torch.int64)
    areas = shapes.prod(1)
    starts = torch.cat([areas.new_zeros(1), areas.cumsum(0)[:-1]])
    positions, levels = int(areas.sum()), len(OP_STRIDES)
    value = torch.randn(batch, positions, OP_HEADS, OP_CHANNELS, generator=g)
    loc = torch.rand(batch, positions, OP_HEADS, levels, OP_POINTS, 2, generator=g)
    weights = torch.rand(batch, positions, OP_HEADS, levels * OP_POINTS, generator=g).softmax(-1)
    return value, shapes, starts, loc, weights.view(batch, positions, OP_HEADS, levels, OP_POINTS)


def op_multiply_adds(size: int, batch: int) -> int:
    """Multiply-adds of one forward's sampling: samples x 4 corners x channels."""
    positions = sum((size // s) ** 2 for s in OP_STRIDES)
    return batch * positions * OP_HEADS * len(OP_STRIDES) * OP_POINTS * 4 * OP_CHANNELS


def requests(args: argparse.Namespace) -> list[str]:
    """What a worker times per request: the modes, or with ``--op`` the op timings of ``op_fns``."""
    if not args.op:
        return list(args.modes)
    return [
        name for mode in args.modes for name in (f"{mode}_forward", f"{mode}_forward_backward")[: 1 + (mode == "train")]
    ]


def op_fns(args: argparse.Namespace, impl: str) -> dict[str, Callable[[], torch.Tensor]]:
    """The op timings of ``--op`` for ``impl`` ("native" or "pytorch"), by the names of ``requests``: the forward
    for each mode, and the forward plus backward in training (it returns the three gradients, concatenated)."""
    from dinat_m2f.ops.ms_deform_attn import ms_deform_attn
    from dinat_m2f.ops.ms_deform_attn_reference import ms_deform_attn_reference

    def op(value, shapes, starts, loc, weights):
        if impl == "native":
            return ms_deform_attn(value, shapes, starts, loc, weights)
        return ms_deform_attn_reference(value, shapes, loc, weights)

    fns: dict[str, Callable[[], torch.Tensor]] = {}
    for mode in args.modes:
        value, shapes, starts, loc, weights = op_inputs(args.size, 1 if mode == "inference" else args.batch)

        def forward(value=value, shapes=shapes, starts=starts, loc=loc, weights=weights) -> torch.Tensor:
            with torch.no_grad():
                return op(value, shapes, starts, loc, weights)

        fns[f"{mode}_forward"] = forward
        if mode == "train":
            inputs = [t.clone().requires_grad_() for t in (value, loc, weights)]
            grad = torch.randn(forward().shape, generator=torch.Generator().manual_seed(1))

            def forward_backward(inputs=inputs, shapes=shapes, starts=starts, grad=grad) -> torch.Tensor:
                out = op(inputs[0], shapes, starts, inputs[1], inputs[2])
                grads = torch.autograd.grad(out, inputs, grad)
                return torch.cat([g.flatten() for g in grads])

            fns[f"{mode}_forward_backward"] = forward_backward
    return fns


def timed(fn: Callable[[], torch.Tensor]) -> tuple[float, torch.Tensor]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def digest(t: torch.Tensor) -> str:
    """A short hash of a tensor's values: equal hashes in two trees mean bit-identical outputs."""
    return hashlib.sha1(t.detach().contiguous().cpu().numpy().tobytes()).hexdigest()[:16]


def cpu_isa() -> str:
    """The instruction set of the NA kernels: build_info's cpu_isa, or the -march of a tree too old to choose."""
    import dinat_m2f

    info = getattr(dinat_m2f, "build_info", None)
    if info is None:
        return "unknown (no build_info)"
    info = info()
    if "cpu_isa" in info:
        return info["cpu_isa"]
    march = re.search(r"-march=(\S+)", info.get("cxx_flags", ""))
    return f"-march={march.group(1)}" if march else "unknown"


def onednn_conv_kernel() -> str:
    """The oneDNN kernel a float32 convolution (a patch embedding) runs here, e.g. "jit:avx2", from oneDNN's
    verbose lines (printed by C code on file descriptor 1, so read back from a temporary file)."""
    x, w = torch.randn(1, 3, 128, 128), torch.randn(64, 3, 4, 4)
    sys.stdout.flush()
    saved = os.dup(1)
    with tempfile.TemporaryFile(mode="w+") as f:
        os.dup2(f.fileno(), 1)
        try:
            with torch.backends.mkldnn.verbose(torch.backends.mkldnn.VERBOSE_ON):
                torch.nn.functional.conv2d(x, w, stride=4)
            ctypes.CDLL(None).fflush(None)
        finally:
            os.dup2(saved, 1)
            os.close(saved)
        f.seek(0)
        lines = [line for line in f.read().splitlines() if ",convolution," in line]
    return lines[0].split(",convolution,", 1)[1].split(",", 1)[0] if lines else "none (no oneDNN convolution ran)"


def isa_paths() -> dict[str, str]:
    """The code path each library takes in this process."""
    return {
        "aten": torch.backends.cpu.get_cpu_capability(),
        "onednn_conv": onednn_conv_kernel(),
        "mkl": "MKL_ENABLE_INSTRUCTIONS=" + os.environ.get("MKL_ENABLE_INSTRUCTIONS", "(unset)"),
        "dinat_m2f": cpu_isa(),
    }


def check_avx2_paths(paths: dict[str, str], where: str) -> None:
    """Raise unless every library of ``paths`` takes its AVX2 path (--cpu-isa avx2)."""
    wrong = []
    if paths["aten"] != "AVX2":
        wrong.append(f"torch's capability is {paths['aten']} (ATEN_CPU_CAPABILITY=avx2 not read?)")
    if paths["onednn_conv"] != "jit:avx2":
        wrong.append(f"oneDNN convolutions run {paths['onednn_conv']} (ONEDNN_MAX_CPU_ISA=AVX2 not read?)")
    if paths["dinat_m2f"] not in ("avx2", "-march=x86-64-v3"):
        wrong.append(
            f"the NA kernels take {paths['dinat_m2f']}: a tree without DINAT_M2F_CPU_ISA must be built with "
            "DINAT_M2F_CPU_ARCH=x86-64-v3"
        )
    if wrong:
        raise RuntimeError(f"--cpu-isa avx2: {where}: " + "; ".join(wrong))


def sgemm_gflops(threads: int, n: int = 1024, reps: int = 10) -> float:
    """The machine's float32 matrix-product rate (torch.mm, n x n x n, best of ``reps``) at ``threads`` threads."""
    torch.set_num_threads(threads)
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    best = min(timed(lambda: torch.mm(a, b))[0] for _ in range(reps))
    return 2 * n**3 / best / 1e9


# ---------------------------------------------------------------------------------------------------------------------
# worker: one tree, one process; requests on stdin, one JSON line per answer on the saved stdout


def keep_freed_memory_as_the_tree_does() -> bool | None:
    """What the tree's entry points (train_net, demo, Predictor) do on the CPU: glibc keeps freed memory for reuse,
    where the tree has dinat_m2f.utils.cpu_memory (None: it has not; False: DINAT_M2F_KEEP_FREED_MEMORY=0)."""
    import importlib.util

    if importlib.util.find_spec("dinat_m2f.utils.cpu_memory") is None:
        return None
    from dinat_m2f.utils.cpu_memory import keep_freed_cpu_memory

    return keep_freed_cpu_memory()


def worker_main(args: argparse.Namespace) -> int:
    """Build the model of the tree on sys.path (this process's PYTHONPATH), then time one forward or one training
    step per request line ("inference" / "train") until "quit". With ``--op``: the op timings of ``op_fns``."""
    answers = os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1)
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())  # model-building chatter must not reach the answers
    sys.stdout = sys.stderr
    torch.set_num_threads(args.threads)
    import dinat_m2f

    fns: dict[str, Callable[[], torch.Tensor]] = {}
    info: dict = {"dinat_m2f": str(Path(dinat_m2f.__file__).parent), "threads": torch.get_num_threads()}
    info["keeps_freed_memory"] = keep_freed_memory_as_the_tree_does()
    if args.op:
        fns = op_fns(args, "native")
        for name, fn in fns.items():
            _, out = timed(fn)  # warm-up
            info[f"{name}_first_output"] = {"sha1": digest(out), "sum": float(out.double().sum())}
    for mode in () if args.op else args.modes:
        model = build(args.config_file, args.opts, train=mode == "train")
        info["params_m"] = round(sum(p.numel() for p in model.parameters()) / 1e6, 2)
        fns[mode] = step_fn(model, mode, args)
        if mode == "train":
            info["optimizer"] = optimizer_description(fns[mode].optimizer)
        _, out = timed(fns[mode])  # warm-up; the first output identifies the tree's numerics
        if mode == "train":  # the loss, then every weight after the first step
            out = torch.cat([out.view(1), *(p.detach().flatten() for p in model.parameters())])
        info[f"{mode}_first_output"] = {"sha1": digest(out), "sum": float(out.double().sum())}
    info["cpu_isa"] = cpu_isa()
    info["isa_paths"] = isa_paths()
    answers.write(json.dumps(info) + "\n")
    for line in sys.stdin:
        request = line.strip()
        if request == "quit":
            break
        if request not in fns:
            answers.write(json.dumps({"error": f"unknown request {request!r}"}) + "\n")
            continue
        cpu_start = time.process_time()
        seconds, _ = timed(fns[request])
        answers.write(json.dumps({"s": seconds, "cpu_s": time.process_time() - cpu_start}) + "\n")
    return 0


class Worker:
    """A worker process for the tree at ``tree``: PYTHONPATH=tree, cwd=tree, the config of that tree."""

    def __init__(self, tree: Path, args: argparse.Namespace, extra_opts: tuple[str, ...] = ()):
        config = args.config_file
        if args.config_file.is_relative_to(ROOT):
            config = tree / args.config_file.relative_to(ROOT)
        if not config.is_file():
            raise FileNotFoundError(f"config {config} is missing in the tree {tree}")
        env = dict(os.environ, PYTHONPATH=str(tree))
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            env[var] = str(args.threads)
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "--config-file", str(config)]
        cmd += ["--size", str(args.size), "--batch", str(args.batch), "--threads", str(args.threads)]
        cmd += ["--optimizer", args.optimizer]
        cmd += ["--mode", args.mode] + (["--train-amp"] if args.train_amp else []) + (["--op"] if args.op else [])
        cmd += [*args.opts, *extra_opts]
        self.tree = tree
        self.cpu_times: dict[str, list[float]] = {name: [] for name in requests(args)}
        self.proc = subprocess.Popen(cmd, cwd=tree, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.info = self._answer()
        if args.cpu_isa == "avx2":
            try:
                check_avx2_paths(self.info["isa_paths"], f"the worker for {tree}")
            except RuntimeError:
                self.close()
                raise
        built_from = Path(self.info["dinat_m2f"]).resolve().parent
        if built_from != tree.resolve():
            self.close()
            raise RuntimeError(f"the worker for {tree} imported dinat_m2f from {built_from}: is {tree} a checkout?")

    def _answer(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the worker for {self.tree} exited (status {self.proc.wait()}); its stderr says why")
        answer = json.loads(line)
        if "error" in answer:
            raise RuntimeError(f"worker for {self.tree}: {answer['error']}")
        return answer

    def time(self, mode: str) -> float:
        self.proc.stdin.write(mode + "\n")
        self.proc.stdin.flush()
        answer = self._answer()
        self.cpu_times[mode].append(answer["cpu_s"])
        return answer["s"]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.write("quit\n")
            self.proc.stdin.close()
            self.proc.wait()


def interleaved(timers: dict[str, Callable[[], float]], rounds: int) -> dict[str, list[float]]:
    """``rounds`` rounds timing every variant once, the order reversed every other round."""
    times: dict[str, list[float]] = {name: [] for name in timers}
    names = list(timers)
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            times[name].append(timers[name]())
    return times


def summarize(times: dict[str, list[float]], result: dict, mode: str) -> None:
    names = list(times)
    first = statistics.median(times[names[0]])
    for name in names:
        median = statistics.median(times[name])
        result[f"{mode}_{name}_s_median"] = round(median, 4)
        result[f"{mode}_{name}_s_all"] = [round(t, 4) for t in times[name]]
        if name != names[0]:
            result[f"{mode}_{name}_over_{names[0]}"] = round(median / first, 3)


def dtype_opts(args: argparse.Namespace) -> tuple[str, ...]:
    """The config overrides of ``--dtype`` for this tree (nothing for float32: the config's default)."""
    return () if args.dtype == "float32" else ("MODEL.MASK_FORMER.TEST.DTYPE", args.dtype)


def compare_trees(args: argparse.Namespace, result: dict) -> list[str]:
    workers = {"this": Worker(ROOT, args, dtype_opts(args))}
    try:
        workers["baseline"] = Worker(args.baseline, args)
        result["trees"] = {name: w.info for name, w in workers.items()}
        lines = []
        width = max(9, *(len(name) for name in requests(args)))
        for mode in requests(args):
            timers = {name: (lambda w=w, m=mode: w.time(m)) for name, w in workers.items()}
            times = interleaved(timers, args.rounds)
            summarize(times, result, mode)
            summarize({name: w.cpu_times[mode] for name, w in workers.items()}, result, f"{mode}_cpu")
            same = workers["this"].info[f"{mode}_first_output"] == workers["baseline"].info[f"{mode}_first_output"]
            result[f"{mode}_identical_first_output"] = same
            lines.append(
                f"  {mode:{width}s} this {result[f'{mode}_this_s_median']:.4f} s  baseline "
                f"{result[f'{mode}_baseline_s_median']:.4f} s  baseline/this "
                f"{result[f'{mode}_baseline_over_this']:.3f}x (process CPU time: "
                f"{result[f'{mode}_cpu_baseline_over_this']:.3f}x)  first outputs bit-identical: {same}"
            )
        if args.op:
            lines += op_backward_lines(result, requests(args), list(workers))
        return lines
    finally:
        for w in workers.values():
            w.close()


def compare_impls(args: argparse.Namespace, result: dict) -> list[str]:
    lines = []
    for mode in args.modes:
        lines += compare_impls_in(mode, args, result)
    if "max_abs_diff_sem_seg" in result:
        lines.append(f"  max |sem_seg native - pytorch| = {result['max_abs_diff_sem_seg']:.2e}")
    return lines


def compare_impls_in(mode: str, args: argparse.Namespace, result: dict) -> list[str]:
    """Native against grid_sample deformable attention in one model of this tree, for one mode."""
    impls = ("native", "pytorch")
    model = build(args.config_file, [*args.opts, *dtype_opts(args)], train=mode == "train")
    result["params_m"] = round(sum(p.numel() for p in model.parameters()) / 1e6, 2)
    timer = AttnTimer(set_impl(model, "native"))
    fn = step_fn(model, mode, args)
    if mode == "train":
        result["optimizer"] = optimizer_description(fn.optimizer)
    outputs, attn_times = {}, {impl: [] for impl in impls}

    def run(impl: str) -> float:
        set_impl(model, impl)
        timer.total = 0.0
        seconds, outputs[impl] = timed(fn)
        attn_times[impl].append(timer.total)
        return seconds

    for impl in impls:  # warm-up
        run(impl)
        attn_times[impl].clear()
    if mode == "inference":
        result["max_abs_diff_sem_seg"] = (outputs["native"] - outputs["pytorch"]).abs().max().item()
    times = interleaved({impl: (lambda impl=impl: run(impl)) for impl in impls}, args.rounds)
    summarize(times, result, mode)
    for impl in impls:
        result[f"{mode}_{impl}_msdeformattn_forward_s_median"] = round(statistics.median(attn_times[impl]), 4)
    lines = [
        f"  {mode:9s} {impl:8s} median {result[f'{mode}_{impl}_s_median']:.3f} s (deformable attention "
        f"forward {result[f'{mode}_{impl}_msdeformattn_forward_s_median']:.3f} s)  "
        f"all {result[f'{mode}_{impl}_s_all']}"
        for impl in impls
    ]
    lines.append(f"  {mode:9s} pytorch/native {result[f'{mode}_pytorch_over_native']:.3f}x")
    return lines


def compare_op_impls(args: argparse.Namespace, result: dict) -> list[str]:
    """The native op against the grid_sample formulation, alone (``--op``)."""
    impls = ("native", "pytorch")
    fns = {impl: op_fns(args, impl) for impl in impls}
    width = max(len(name) for name in requests(args))
    lines = []
    for name in requests(args):
        outputs = {impl: fns[impl][name]() for impl in impls}  # warm-up
        result[f"{name}_max_abs_diff"] = (outputs["native"] - outputs["pytorch"]).abs().max().item()
        times = interleaved({impl: (lambda fn=fns[impl][name]: timed(fn)[0]) for impl in impls}, args.rounds)
        summarize(times, result, name)
        lines.append(
            f"  {name:{width}s} native {result[f'{name}_native_s_median'] * 1e3:8.2f} ms  pytorch "
            f"{result[f'{name}_pytorch_s_median'] * 1e3:8.2f} ms  pytorch/native "
            f"{result[f'{name}_pytorch_over_native']:.3f}x  (max |native - pytorch| {result[f'{name}_max_abs_diff']:.1e})"
        )
    return lines + op_backward_lines(result, requests(args), list(impls))


def op_backward_lines(result: dict, names: list[str], variants: list[str]) -> list[str]:
    """The backward alone (forward+backward median minus forward median) and its ratio to the forward."""
    if "train_forward_backward" not in names:
        return []
    backward = {}
    for v in variants:
        forward = result[f"train_forward_{v}_s_median"]
        backward[v] = result[f"train_forward_backward_{v}_s_median"] - forward
        result[f"train_backward_{v}_s_from_medians"] = round(backward[v], 4)
        result[f"train_backward_over_forward_{v}"] = round(backward[v] / forward, 3)
    return [
        "  train backward (forward+backward minus forward, medians): "
        + "  ".join(
            f"{v} {backward[v] * 1e3:.2f} ms ({result[f'train_backward_over_forward_{v}']:.2f}x its forward)"
            for v in variants
        )
    ]


def profile(args: argparse.Namespace) -> int:
    """Top operators by self CPU time of one inference and/or one training step of this tree."""
    for mode in args.modes:
        model = build(args.config_file, [*args.opts, *dtype_opts(args)], train=mode == "train")
        fn = step_fn(model, mode, args)
        fn()  # warm-up
        activities = [torch.profiler.ProfilerActivity.CPU]
        with torch.profiler.profile(activities=activities, with_flops=True, record_shapes=True) as prof:
            fn()
        events = prof.key_averages()
        total = sum(e.self_cpu_time_total for e in events)
        copy = sum(e.self_cpu_time_total for e in events if e.key == "aten::copy_")
        print(
            f"{mode} ({precision(args, mode)}): {total / 1e6:.3f} s self CPU time in operators, "
            f"{torch.get_num_threads()} threads, NA kernels: {cpu_isa()}; aten::copy_ {100 * copy / total:.1f}%"
        )
        print(events.table(sort_by="self_cpu_time_total", row_limit=args.profile))
        print(copy_sites(prof.events(), total, args.profile))
        print(matrix_product_rates(events, total, args.threads))
    return 0


def copy_sites(events, total_us: float, rows: int) -> str:
    """The ``aten::copy_`` time by the operator that called it and the copied shape, largest first."""
    sites: dict[tuple[str, str], list[float]] = {}
    for e in events:
        if e.name != "aten::copy_":
            continue
        caller = e.cpu_parent.name if e.cpu_parent is not None else "(python)"
        if caller in ("aten::_to_copy", "aten::clone") and e.cpu_parent.cpu_parent is not None:
            caller = f"{e.cpu_parent.cpu_parent.name} > {caller}"
        site = sites.setdefault((caller, str(e.input_shapes[0]) if e.input_shapes else "?"), [0.0, 0])
        site[0] += e.self_cpu_time_total
        site[1] += 1
    lines = ["aten::copy_ by caller and shape:"]
    for (caller, shape), (us, count) in sorted(sites.items(), key=lambda kv: -kv[1][0])[:rows]:
        lines.append(f"  {us / 1e3:8.1f} ms  {100 * us / total_us:5.1f}%  x{count:<4d} {caller}  {shape}")
    return "\n".join(lines)


def amp_dtype_name(args: argparse.Namespace) -> str | None:
    """What this tree's trainer makes of SOLVER.AMP here with ``--train-amp``: "bfloat16", or None (float32: no
    autocast, where the CPU has no fast bfloat16)."""
    dtype = train_amp_dtype(args) if args.train_amp else None
    return None if dtype is None else str(dtype).removeprefix("torch.")


def precision(args: argparse.Namespace, mode: str) -> str:
    """How this tree runs ``mode``: "float32", or "bfloat16 inference (...)" with --dtype bfloat16."""
    if mode == "train":
        if not args.train_amp:
            return "float32"
        dtype = train_amp_dtype(args)
        resolved = "float32: no fast bfloat16 on this CPU" if dtype is None else f"{dtype} autocast"
        return f"the config's SOLVER.AMP as train_net runs it ({resolved})"
    if args.dtype == "float32":
        return "float32"
    return f"{args.dtype} inference: autocast, deformable sampling and post-processing float32"


def matrix_product_rates(events, total_us: float, threads: int) -> str:
    """The matrix-product operators' share of the operator time and their rate (profiler FLOPs over self time,
    which leaves out addmm's bias copy), against torch.mm's rate on 1024^3 at the same thread count."""
    lines = [f"matrix products (torch.mm 1024^3 float32 here: {sgemm_gflops(threads):.1f} GFLOP/s):"]
    for e in events:
        if e.key in ("aten::addmm", "aten::mm", "aten::bmm", "aten::baddbmm") and e.self_cpu_time_total > 0:
            lines.append(
                f"  {e.key:14s} {e.self_cpu_time_total / 1e3:8.1f} ms  {100 * e.self_cpu_time_total / total_us:5.1f}% "
                f"of operator time  {e.flops / e.self_cpu_time_total / 1e3:6.1f} GFLOP/s  ({e.count} calls)"
            )
    return "\n".join(lines)


def print_op_header(args: argparse.Namespace, result: dict) -> None:
    against = f"this tree's native op vs {args.baseline}'s" if args.baseline is not None else "native vs grid_sample"
    levels = "/".join(f"{args.size // s}x{args.size // s}" for s in OP_STRIDES)
    print(
        f"ms_deform_attn alone, float32 ({against}): levels {levels}, queries = positions, {OP_HEADS} heads x "
        f"{OP_CHANNELS} channels, {OP_POINTS} points  {result['threads']} threads  {args.rounds} rounds  "
        f"torch.mm 1024^3 float32: {result['sgemm_gflops']} GFLOP/s"
    )
    for mode in args.modes:
        batch = 1 if mode == "inference" else args.batch
        print(
            f"  {mode}: batch {batch}, {op_multiply_adds(args.size, batch) / 1e6:.1f}M multiply-adds per forward "
            "(samples x 4 corners x channels; the backward: twice that)"
        )
    print("  code paths (this): " + ", ".join(f"{k} {v}" for k, v in result["isa_paths"].items()))
    print(f"  the op's CPU kernel has no run-time ISA choice: this tree built it with {op_kernel_march()}")


def op_kernel_march() -> str:
    """The -march the extension's baseline code (the deformable attention kernel among it) was compiled for."""
    import dinat_m2f

    march = re.search(r"-march=(\S+)", dinat_m2f.build_info().get("cxx_flags", ""))
    return f"-march={march.group(1)}" if march else "an unknown -march (build_info has no cxx_flags)"


def parse_args(argv: list[str] | None) -> tuple[argparse.ArgumentParser, argparse.Namespace]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", type=Path, default=DEFAULT_CONFIG)
    parser.add_argument("--size", type=int, default=512, help="square input size (pixels)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--mode", choices=(*MODES, "both"), default="inference")
    parser.add_argument("--batch", type=int, default=2, help="images per training step")
    parser.add_argument(
        "--optimizer",
        choices=("train_net", "adamw"),
        default="train_net",
        help="a training step's optimizer: train_net's (each tree's build_optimizer) or a plain AdamW",
    )
    parser.add_argument("--baseline", type=Path, default=None, help="a tree of another commit, extension built")
    parser.add_argument("--profile", type=int, default=0, metavar="N", help="print the top N operators instead")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument(
        "--cpu-isa",
        choices=("native", "avx2"),
        default="native",
        help="avx2: every library on its AVX2 code path (an AVX2-only CPU's code, on this CPU)",
    )
    parser.add_argument(
        "--dtype",
        choices=("float32", "bfloat16"),
        default="float32",
        help="this tree's inference precision (MODEL.MASK_FORMER.TEST.DTYPE); the baseline stays float32",
    )
    parser.add_argument(
        "--train-amp",
        action="store_true",
        help="training steps under the config's SOLVER.AMP autocast (bfloat16 on the CPU), as train_net runs them, "
        "in every variant (the baseline too)",
    )
    parser.add_argument(
        "--op",
        action="store_true",
        help="time the deformable attention op alone at the encoder's shapes (forward; forward+backward in training)",
    )
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides KEY VALUE ...")
    args = parser.parse_args(argv)
    args.modes = MODES if args.mode == "both" else (args.mode,)
    if args.baseline is not None:
        args.baseline = args.baseline.resolve()  # its worker runs in that tree: a relative path would not resolve there
    return parser, args


def main(argv: list[str] | None = None) -> int:
    parser, args = parse_args(argv)
    if not args.config_file.is_file():
        parser.error(f"config file not found: {args.config_file}")
    if args.rounds < 1 or args.batch < 1 or args.size < 32:
        parser.error("--rounds and --batch must be >= 1 and --size >= 32")
    if args.cpu_isa == "avx2" and any(os.environ.get(k) != v for k, v in AVX2_ENV.items()):
        # the libraries read these variables once, at start-up: run again with them set (the workers inherit them)
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **AVX2_ENV})
    if args.worker:
        return worker_main(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.threads = torch.get_num_threads()  # the workers get the same count
    paths = isa_paths()
    if args.cpu_isa == "avx2":
        check_avx2_paths(paths, "this process")
    kept = None if args.baseline is not None else keep_freed_memory_as_the_tree_does()  # the workers do their own
    if args.op and (args.profile or args.dtype != "float32" or args.train_amp):
        parser.error("--op times the float32 op alone: it takes no --profile, --dtype or --train-amp")
    if args.profile:
        print(f"code paths: {paths}; glibc keeps freed memory: {kept}")
        return profile(args)
    if args.baseline is not None and not (args.baseline / "dinat_m2f").is_dir():
        parser.error(f"--baseline {args.baseline}: no dinat_m2f package there (a checkout of this project?)")

    config = args.config_file
    result = {
        "config": str(config.relative_to(ROOT) if config.is_relative_to(ROOT) else config),
        "input": f"1x3x{args.size}x{args.size}",
        "train_batch": args.batch,
        "threads": args.threads,
        "cpu_isa": cpu_isa() if args.baseline is None else None,
        "rounds": args.rounds,
        "cpu_isa_option": args.cpu_isa,
        "this_inference_dtype": args.dtype,
        "train_amp": args.train_amp,
        # what this tree's trainer resolves SOLVER.AMP to here (float32 where the CPU has no fast bfloat16)
        "train_amp_dtype": amp_dtype_name(args),
        "isa_paths": paths,
        "sgemm_gflops": round(sgemm_gflops(args.threads), 1),
    }
    if args.baseline is not None:
        result["baseline"] = str(args.baseline)
        lines = compare_trees(args, result)
        result["cpu_isa"] = result["trees"]["this"]["cpu_isa"]
        result["params_m"] = result["trees"]["this"].get("params_m")
    else:
        lines = compare_op_impls(args, result) if args.op else compare_impls(args, result)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    if args.op:
        print_op_header(args, result)
        print("\n".join(lines))
        return 0
    against = f"this tree vs {args.baseline}" if args.baseline is not None else "native vs grid_sample MSDA"
    print(
        f"{result['config']}  input {result['input']}  {result['params_m']}M params  {result['threads']} threads  "
        f"{args.rounds} rounds  NA kernels: {result['cpu_isa']}  ({against})"
    )
    print(f"  --cpu-isa {args.cpu_isa}; torch.mm 1024^3 float32: {result['sgemm_gflops']} GFLOP/s")
    variants = "this tree" if args.baseline is not None else "both variants"
    for mode in args.modes:
        baseline = precision(args, mode) if mode == "train" else "float32"
        print(f"  {mode}: {variants} {precision(args, mode)}" + (f", baseline {baseline}" if args.baseline else ""))
    this = {"isa_paths": paths, "keeps_freed_memory": kept, "optimizer": result.get("optimizer")}
    trees = result.get("trees", {"this": this})
    for name, info in trees.items():
        print(f"  code paths ({name}): " + ", ".join(f"{k} {v}" for k, v in info["isa_paths"].items()))
        memory = {True: "yes", False: "no (DINAT_M2F_KEEP_FREED_MEMORY=0)", None: "no (not in this tree)"}
        print(f"  glibc keeps freed memory ({name}): {memory[info['keeps_freed_memory']]}")
        if info.get("optimizer"):
            print(f"  training optimizer ({name}, --optimizer {args.optimizer}): {info['optimizer']}")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
