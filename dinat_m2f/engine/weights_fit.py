"""Does a weight file fit the model? Missing or mis-shaped tensors are an error unless they are expected.

detectron2 loads whatever fits and only logs the rest, so a renamed, truncated or wrong-kernel file trains or
evaluates a randomly initialised model. ``match_weights`` pairs the file's tensors with the model's (by exact name,
or by detectron2's longest-dotted-suffix rule when the file asks for ``matching_heuristics``), and
``check_weights_fit`` decides what may stay unloaded:

1. **What the file is.** A *backbone-only* file (an ImageNet backbone, converted) is one whose every matched tensor
   lands in ``backbone.*`` and whose every unmatched tensor is the classifier's head (``head.*``) or final norm
   (``norm.*``). Any other file is a *full-model* file (a detectron2 checkpoint: ours, or an official
   DiNAT-Mask2Former release). A file none of whose tensors has a model counterpart is an error either way.
2. **What it must fill.** A full-model file must fill every tensor of the model. A backbone-only file must fill
   the backbone, except its output norms ``backbone.norm0..3`` (not part of a classifier); the pixel decoder and
   the transformer decoder are trained from scratch (logged).
3. **Declared exceptions.** Tensors matching a ``MODEL.WEIGHTS_REINIT`` pattern (``fnmatch`` globs on the model's
   names, e.g. ``sem_seg_head.predictor.class_embed.*`` for another class count) may be missing or mis-shaped;
   they keep their fresh init (logged).
4. Everything else missing or mis-shaped is a ``WeightsMismatchError`` naming how many and the first few; a
   relative-position bias of another kernel size says to run ``tools/convert_dinat_checkpoint.py``.

Tensors of the file that fill nothing are logged (not an error: the model is fully filled without them).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

__all__ = [
    "CLASSIFIER_PREFIXES",
    "WeightsFit",
    "WeightsMismatchError",
    "check_weights_fit",
    "fit_from_incompatible",
    "match_weights",
]

CLASSIFIER_PREFIXES = ("head.", "norm.")  # an ImageNet classifier's head and final norm: unused by the backbone
BACKBONE_PREFIX = "backbone."
BACKBONE_OUTPUT_NORMS = tuple(f"backbone.norm{i}." for i in range(4))
SHOWN = 10  # how many names an error lists

Shape = tuple[int, ...]


class WeightsMismatchError(ValueError):
    """The weight file does not fit the model; the message names the file, the counts and the first tensors."""


@dataclass
class WeightsFit:
    """How a file's tensors pair with a model's. ``matched``: model name -> file name (shapes may differ)."""

    matched: dict[str, str] = field(default_factory=dict)
    misshaped: list[tuple[str, Shape, Shape]] = field(default_factory=list)  # (model name, file, model shape)
    missing: list[str] = field(default_factory=list)  # model names no file tensor pairs with
    unexpected: list[str] = field(default_factory=list)  # file names that pair with no model tensor


def _suffix_match(model_key: str, file_key: str) -> bool:
    return model_key == file_key or model_key.endswith("." + file_key)


def match_weights(
    model_shapes: Mapping[str, Shape], file_shapes: Mapping[str, Shape], heuristics: bool = False
) -> WeightsFit:
    """Pair each model tensor with the file's tensor of the same name, or (``heuristics``) the longest file name
    that is a dotted suffix of it, as detectron2's ``align_and_update_state_dicts`` does.

    A classifier's ``norm.weight`` is a suffix of every ``*.norm.weight`` of the decoders too; where its shape does
    not fit (detectron2 then skips it), that is no pairing but the unused classifier head.
    """
    fit = WeightsFit()
    for model_key in model_shapes:
        if model_key in file_shapes:
            fit.matched[model_key] = model_key
        elif heuristics:
            candidates = [k for k in file_shapes if _suffix_match(model_key, k)]
            best = max(candidates, key=len) if candidates else None
            if best is None:
                continue
            if best.startswith(CLASSIFIER_PREFIXES) and tuple(file_shapes[best]) != tuple(model_shapes[model_key]):
                continue
            fit.matched[model_key] = best
    for model_key, file_key in fit.matched.items():
        if tuple(file_shapes[file_key]) != tuple(model_shapes[model_key]):
            fit.misshaped.append((model_key, tuple(file_shapes[file_key]), tuple(model_shapes[model_key])))
    fit.missing = [k for k in model_shapes if k not in fit.matched]
    used = set(fit.matched.values())
    fit.unexpected = [k for k in file_shapes if k not in used]
    return fit


def fit_from_incompatible(model_shapes: Mapping[str, Shape], incompatible) -> WeightsFit:
    """The fit of a file loaded by exact names, from fvcore's ``_IncompatibleKeys`` (after the model's load hooks,
    which rename legacy keys). fvcore drops mis-shaped tensors before loading, so they are also in ``missing_keys``."""
    misshaped = [(k, tuple(a), tuple(b)) for k, a, b in incompatible.incorrect_shapes]
    skipped, unloaded = {k for k, _, _ in misshaped}, set(incompatible.missing_keys)
    missing = [k for k in model_shapes if k in unloaded and k not in skipped]
    return WeightsFit(
        matched={k: k for k in model_shapes if k not in unloaded or k in skipped},
        misshaped=misshaped,
        missing=missing,
        unexpected=list(incompatible.unexpected_keys),
    )


def _first(names: Sequence[str]) -> str:
    more = f", ... ({len(names) - SHOWN} more)" if len(names) > SHOWN else ""
    return ", ".join(names[:SHOWN]) + more


def _declared(name: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def is_backbone_only(fit: WeightsFit) -> bool:
    """Rule 1 of the module docstring."""
    return (
        bool(fit.matched)
        and all(k.startswith(BACKBONE_PREFIX) for k in fit.matched)
        and all(k.startswith(CLASSIFIER_PREFIXES) for k in fit.unexpected)
    )


def _is_rpb_of_another_kernel(name: str, file_shape: Shape, model_shape: Shape) -> bool:
    return name.endswith(".rpb") and len(file_shape) == len(model_shape) == 3 and file_shape[0] == model_shape[0]


def check_weights_fit(fit: WeightsFit, source: str, reinit: Sequence[str] = ()) -> list[str]:
    """Raise WeightsMismatchError unless ``fit`` is acceptable (module docstring); else return lines to log."""
    if not fit.matched:
        raise WeightsMismatchError(
            f"{source}: none of its {len(fit.unexpected)} tensors has a counterpart in the model (first: "
            f"{_first(fit.unexpected)}; the model has e.g. {_first(fit.missing)}). An ImageNet classification "
            "checkpoint must first be converted with tools/convert_dinat_checkpoint.py"
        )
    log: list[str] = []
    backbone_only = is_backbone_only(fit)
    missing = fit.missing
    if backbone_only:
        outside = [k for k in missing if not k.startswith(BACKBONE_PREFIX) or k.startswith(BACKBONE_OUTPUT_NORMS)]
        if outside:
            log.append(
                f"{source} is a backbone-only file: {len(outside)} tensors outside it start from their init "
                f"(pixel decoder, transformer decoder, backbone output norms)"
            )
        missing = [k for k in missing if k not in set(outside)]
        if fit.unexpected:
            log.append(f"{source}: the classifier's head/final norm is not used ({_first(fit.unexpected)})")
    elif fit.unexpected:
        log.append(f"{source}: {len(fit.unexpected)} tensors fit nothing in the model: {_first(fit.unexpected)}")

    declared = [k for k in missing if _declared(k, reinit)]
    declared += [k for k, _, _ in fit.misshaped if _declared(k, reinit)]
    if declared:
        log.append(f"re-initialised as declared by MODEL.WEIGHTS_REINIT ({len(declared)}): {_first(declared)}")
    missing = [k for k in missing if not _declared(k, reinit)]
    misshaped = [m for m in fit.misshaped if not _declared(m[0], reinit)]
    if not missing and not misshaped:
        return log

    problems = []
    if misshaped:
        problems.append(
            f"{len(misshaped)} mis-shaped: "
            + _first([f"{k} (file {tuple(a)}, model {tuple(b)})" for k, a, b in misshaped])
        )
    if missing:
        problems.append(f"{len(missing)} missing: {_first(missing)}")
    hints = []
    if any(_is_rpb_of_another_kernel(*m) for m in misshaped):
        hints.append(
            "Relative-position biases of another kernel size: convert the ImageNet checkpoint for this config with "
            "`tools/convert_dinat_checkpoint.py IN.pth OUT.pth --config-file CONFIG` (resizes them), or declare "
            "them re-initialisable with MODEL.WEIGHTS_REINIT \"['backbone.*.rpb']\""
        )
    if fit.unexpected and not backbone_only:
        hints.append(f"The file has {len(fit.unexpected)} tensors that fit nothing: {_first(fit.unexpected)}")
    hints.append(
        "If these tensors are meant to start from their init (e.g. another number of classes), list them "
        "(fnmatch patterns) in MODEL.WEIGHTS_REINIT"
    )
    kind = "backbone-only file" if backbone_only else "full-model file"
    raise WeightsMismatchError(
        f"{source} ({kind}, {len(fit.matched)} of {len(fit.matched) + len(fit.missing)} model tensors paired) does "
        f"not fit the model: " + "; ".join(problems) + ". " + ". ".join(hints)
    )
