"""Build of lorecomm: setup.py drives CMake (CMakeLists.txt is the one source
of truth for native targets, as vLLM does).

    pip install --no-build-isolation -c requirements/constraints-cpu.txt -e .

builds ``lorecomm._C`` (the ``torch.ops.lorecomm`` ops + pybind11 bindings)
against the installed torch. Environment knobs:
  MAX_JOBS=N               parallel compile jobs (default: all cores)
  LORECOMM_BUILD_TYPE=...  CMake build type (default Release)
  LORECOMM_DISABLE_CUDA=1  never build CUDA sources
  LORECOMM_CMAKE_ARGS="-D..."  extra CMake arguments
"""
from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


class CMakeExtension(Extension):
    """An extension built by CMake: ``target`` is the CMake target name."""

    def __init__(self, name: str, target: str, cmake_lists_dir: str = ".") -> None:
        super().__init__(name, sources=[], py_limited_api=False)
        self.target = target
        self.cmake_lists_dir = str((ROOT / cmake_lists_dir).resolve())


class cmake_build_ext(build_ext):
    """Configure once per build dir, then build each CMake target into the
    place setuptools expects the extension (in-place for editable installs)."""

    def build_extensions(self) -> None:
        if shutil.which("cmake") is None:
            raise RuntimeError("cmake not found: pip install cmake (>=3.18)")
        import torch  # the torch we build against (no build isolation)

        build_temp = Path(self.build_temp).resolve()
        build_temp.mkdir(parents=True, exist_ok=True)
        for ext in self.extensions:
            outdir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
            outdir.mkdir(parents=True, exist_ok=True)
            cfg = os.environ.get("LORECOMM_BUILD_TYPE", "Debug" if self.debug else "Release")
            args = [
                f"-DCMAKE_BUILD_TYPE={cfg}",
                f"-DLORECOMM_OUTPUT_DIR={outdir}",
                f"-DLORECOMM_TORCH_CMAKE_PREFIX={torch.utils.cmake_prefix_path}",
                f"-DPython_EXECUTABLE={sys.executable}",
            ]
            if os.environ.get("LORECOMM_DISABLE_CUDA", "0") not in ("", "0"):
                args.append("-DLORECOMM_DISABLE_CUDA=ON")
            if (build_temp / "CMakeCache.txt").exists():
                pass  # keep the generator the cache was made with
            elif shutil.which("ninja"):
                args += ["-G", "Ninja"]
            args += shlex.split(os.environ.get("LORECOMM_CMAKE_ARGS", ""))
            subprocess.check_call(["cmake", ext.cmake_lists_dir, *args], cwd=build_temp)
            jobs = os.environ.get("MAX_JOBS") or str(os.cpu_count() or 1)
            subprocess.check_call(
                ["cmake", "--build", ".", "--target", ext.target, "--config", cfg, "-j", jobs],
                cwd=build_temp)


def extras() -> dict[str, list[str]]:
    """``extras_require`` from requirements/extra-<name>.txt."""
    out = {}
    for path in sorted((ROOT / "requirements").glob("extra-*.txt")):
        name = path.stem[len("extra-"):]
        reqs = []
        for line in path.read_text().splitlines():
            line = line.split("#", 1)[0].strip()
            if line and not line.startswith("-"):
                reqs.append(line)
        out[name] = reqs
    return out


packages = ["lorecomm"]
package_dir = {"lorecomm": "lorecomm"}
for sub in sorted(p for p in (ROOT / "lorecomm").iterdir() if (p / "__init__.py").exists()):
    packages.append(f"lorecomm.{sub.name}")
if (ROOT / "kernels" / "__init__.py").exists():  # top-level kernels/ is lorecomm.kernels
    packages.append("lorecomm.kernels")
    package_dir["lorecomm.kernels"] = "kernels"

setup(
    name="lorecomm",
    version="0.1.0",
    description="Low-rank compressed gradient communication (GreedyLore) for PyTorch",
    python_requires=">=3.10",
    packages=packages,
    package_dir=package_dir,
    install_requires=["torch>=2.4", "numpy"],
    extras_require=extras(),
    ext_modules=[CMakeExtension("lorecomm._C", target="_C")],
    cmdclass={"build_ext": cmake_build_ext},
    zip_safe=False,
)
