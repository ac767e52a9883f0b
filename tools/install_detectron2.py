#!/usr/bin/env python
"""Install detectron2 0.6 on today's Python stack.

The package registry has no detectron2 wheel. The only usable source is the sdist ``pb1-detectron2==0.6``
(detectron2 0.6's Python code without its C++ sources). This script builds it with its extension switched
off, mends what breaks on today's Pillow / numpy / setuptools, and installs a ``detectron2._C`` placeholder
that raises a clear error when one of the missing compiled ops is called.

This is the only place in the project that works around detectron2. If a complete detectron2 (one with a
real compiled ``_C``) is already importable, it is used and left alone.

Usage: python tools/install_detectron2.py [--force]
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import os
import re
import subprocess
import sys
import tarfile
import tempfile
import urllib.request
from pathlib import Path

SDIST_URL = (
    "https://files.pythonhosted.org/packages/60/26/48f5bbb7ee492696a21da23303daeecdfe3942c498a70d34108acf63b2bd/"
    "pb1-detectron2-0.6.tar.gz"
)
SDIST_SHA256 = "5d2e9e51e523ec72f6a31cca04b0a515492e9514b773a3d134cedc0677170b29"
CACHE_DIR = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "dinat_m2f"
PLACEHOLDER_MARKER = "__dinat_m2f_placeholder__"
# Bump when a mend is added, so that an older install of ours is rebuilt.
MEND_VERSION = 2

# The placeholder module. Attribute access (i.e. calling any compiled op) raises with the op's name.
PLACEHOLDER_SOURCE = f'''"""Placeholder for detectron2's compiled ops (installed by dinat-m2f's tools/install_detectron2.py).

This detectron2 was built from the pb1-detectron2==0.6 sdist, which ships no C++/CUDA sources. Everything
written in Python works; the compiled ops (deformable convolution, rotated boxes / ROIAlignRotated, the
fast COCOeval) do not.
"""

{PLACEHOLDER_MARKER} = {MEND_VERSION}  # the version of the mends applied


def __getattr__(name):
    if name.startswith("__"):
        raise AttributeError(name)
    raise RuntimeError(
        f"this detectron2 was built without its compiled ops: {{name}} is unavailable "
        "(detectron2._C is a placeholder; use COCOEvaluator(use_fast_impl=False) for COCO evaluation, and "
        "avoid deformable convolution and rotated boxes, or install a complete detectron2 build)"
    )


def get_compiler_version():
    return "none (placeholder)"


def get_cuda_version():
    return "none (placeholder)"


def has_cuda():
    return False
'''


def installed_detectron2() -> str | None:
    """Return 'complete', 'ours', 'ours-outdated' or None for the detectron2 importable by this interpreter."""
    if importlib.util.find_spec("detectron2") is None:
        return None
    code = (
        "import detectron2._C as C, detectron2.data, detectron2.modeling;"
        f"v = getattr(C, '{PLACEHOLDER_MARKER}', None);"
        f"print('complete' if v is None else 'ours' if v == {MEND_VERSION} else 'ours-outdated')"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    return proc.stdout.strip() if proc.returncode == 0 else None


def fetch_sdist() -> Path:
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    target = CACHE_DIR / "pb1-detectron2-0.6.tar.gz"
    if not target.exists() or hashlib.sha256(target.read_bytes()).hexdigest() != SDIST_SHA256:
        print(f"[install_detectron2] downloading {SDIST_URL}")
        tmp = target.with_suffix(".part")
        urllib.request.urlretrieve(SDIST_URL, tmp)
        digest = hashlib.sha256(tmp.read_bytes()).hexdigest()
        if digest != SDIST_SHA256:
            raise SystemExit(f"pb1-detectron2 sdist checksum mismatch: got {digest}, expected {SDIST_SHA256}")
        tmp.replace(target)
    return target


def substitute(path: Path, pattern: str, repl: str, *, regex: bool = False, expect: bool = True) -> None:
    text = path.read_text()
    new = re.sub(pattern, repl, text) if regex else text.replace(pattern, repl)
    if expect and new == text:
        raise SystemExit(f"mend failed: {pattern!r} not found in {path} (unexpected sdist contents)")
    path.write_text(new)


def mend(src: Path) -> None:
    d2 = src / "detectron2"
    # 1. The sdist has no detectron2/layers/csrc: build no extension at all.
    substitute(src / "setup.py", "ext_modules=get_extensions(),", "ext_modules=[],")
    # 1b. Its model-zoo config list is globbed from a top-level configs/ that the sdist lacks; the files are
    #     under detectron2/model_zoo/configs, so name them there.
    substitute(
        src / "setup.py",
        'package_data={"detectron2.model_zoo": get_model_zoo_configs()},',
        'package_data={"detectron2.model_zoo": ["configs/**/*.yaml", "configs/**/*.py"]},',
    )
    # 2. Pillow 10 removed Image.LINEAR (a default argument, so detectron2.data fails at import);
    #    Image.BILINEAR is the same filter.
    substitute(d2 / "data/transforms/transform.py", "Image.LINEAR", "Image.BILINEAR")
    # 3. numpy 1.24 removed the aliases np.bool / np.int / np.float / np.str; the builtins are the same types.
    for py in d2.rglob("*.py"):
        substitute(py, r"\bnp\.(bool|int|float|str)\b(?!_)", r"\1", regex=True, expect=False)
    # 4. setuptools 81+ no longer ships pkg_resources; the model zoo only needs a file path inside the package.
    substitute(
        d2 / "model_zoo/model_zoo.py",
        "import pkg_resources",
        "import importlib.resources as _resources",
    )
    substitute(
        d2 / "model_zoo/model_zoo.py",
        'pkg_resources.resource_filename(\n        "detectron2.model_zoo", os.path.join("configs", config_path)\n    )',
        'str(_resources.files("detectron2.model_zoo").joinpath("configs", config_path))',
    )
    # 5. Python 3.11 refuses random.sample() on a set: MapDataset's retry after a skipped (None) sample fails.
    substitute(
        d2 / "data/common.py",
        "self._rng.sample(self._fallback_candidates, k=1)[0]",
        "self._rng.choice(sorted(self._fallback_candidates))",
    )
    # 6. The compiled ops are missing: a placeholder `_C` lets every module import and names the op
    #    when one is actually used.
    (d2 / "_C.py").write_text(PLACEHOLDER_SOURCE)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--force", action="store_true", help="reinstall even if detectron2 imports")
    args = parser.parse_args()

    state = installed_detectron2()
    if state == "complete" and not args.force:
        print("[install_detectron2] a complete detectron2 is installed: using it as it is")
        return
    if state == "ours" and not args.force:
        print("[install_detectron2] detectron2 (pb1-detectron2 0.6, mended) already installed")
        return

    sdist = fetch_sdist()
    with tempfile.TemporaryDirectory() as tmp:
        with tarfile.open(sdist) as tar:
            tar.extractall(tmp, filter="data")
        src = Path(tmp) / "pb1-detectron2-0.6"
        mend(src)
        cmd = [sys.executable, "-m", "pip", "install", "--no-build-isolation", "--no-deps", "-q", str(src)]
        print("[install_detectron2]", " ".join(cmd))
        subprocess.run(cmd, check=True)
    if installed_detectron2() != "ours":
        raise SystemExit("detectron2 was installed but does not import; see the errors above")
    print("[install_detectron2] done")


if __name__ == "__main__":
    main()
