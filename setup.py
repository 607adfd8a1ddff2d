"""Install lrmt_fast and build its C++/CUDA extension ``lrmt_fast._C`` (csrc/).

The CPU extension is always built when torch is importable. The CUDA kernels are
added when a CUDA toolkit and a CUDA build of torch are present:

  LRMT_CUDA=auto (default) | 1 (required: fail if impossible) | 0 (CPU only)
  CUDA_HOME                 toolkit location (else nvcc on PATH / /usr/local/cuda)
  TORCH_CUDA_ARCH_LIST      default "9.0+PTX" (sm_90 SASS plus compute_90 PTX)
  MAX_JOBS                  parallel compile jobs (ninja)

Build:  pip install --no-build-isolation -e .
"""
import glob
import os
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_ARCH = "9.0+PTX"


def _cuda_library_includes(cuda_home):
    """Header folders of the CUDA math libraries (cuBLAS, cuSPARSE, ...) that ATen's CUDA
    headers include. A minimal toolkit (nvcc + runtime only) lacks them; torch's pip wheels
    ship them in site-packages/nvidia/*/include, which is then added to the include path."""
    if os.path.exists(os.path.join(cuda_home, "include", "cusparse.h")):
        return []
    import site
    roots = list(site.getsitepackages()) + [site.getusersitepackages()]
    found = []
    for root in roots:
        for inc in sorted(glob.glob(os.path.join(root, "nvidia", "*", "include"))):
            if os.path.exists(os.path.join(inc, "cusparse.h")) and inc not in found:
                found.append(inc)
    if not found:
        print("lrmt_fast setup: warning: cusparse.h/cublas_v2.h not found under CUDA_HOME or the nvidia pip "
              "packages; the CUDA build may fail", file=sys.stderr)
    return found


def _extension():
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except ImportError:  # metadata-only operations (no torch yet): no extension
        print("lrmt_fast setup: WARNING: torch is not importable here, so the C++/CUDA extension is NOT built "
              "(the package will run on the slower reference path). Install torch first, then "
              "`pip install --no-build-isolation -e .` (or `make install`).", file=sys.stderr)
        return [], {}

    mode = os.environ.get("LRMT_CUDA", "auto").strip().lower()
    if mode not in ("auto", "0", "1"):
        raise RuntimeError(f"LRMT_CUDA must be auto, 0 or 1, got {mode!r}")
    have_toolkit = CUDA_HOME is not None and os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc"))
    have_torch_cuda = torch.version.cuda is not None
    use_cuda = mode == "1" or (mode == "auto" and have_toolkit and have_torch_cuda)
    if mode == "1" and not (have_toolkit and have_torch_cuda):
        raise RuntimeError(
            "LRMT_CUDA=1 but CUDA cannot be built: "
            + ("no CUDA toolkit found (set CUDA_HOME); " if not have_toolkit else "")
            + ("torch is a CPU-only build" if not have_torch_cuda else ""))

    os.environ.setdefault("MAX_JOBS", "2")
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    cxx = ["-O3", "-fopenmp", "-fno-math-errno", "-Wno-unknown-pragmas"]
    define_macros = []
    extra_link = ["-fopenmp"]
    if use_cuda:
        arch = os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip() or DEFAULT_ARCH
        os.environ["TORCH_CUDA_ARCH_LIST"] = arch
        sources += sorted(glob.glob(os.path.join("csrc", "*.cu")))
        include_dirs = _cuda_library_includes(CUDA_HOME)
        define_macros += [("LRMT_WITH_CUDA", None), ("LRMT_CUDA_ARCH_LIST", f'"{arch}"')]
        nvcc = ["-O3", "--expt-relaxed-constexpr", "-lineinfo"]
        ext = CUDAExtension("lrmt_fast._C", sources, define_macros=define_macros, include_dirs=include_dirs,
                            extra_compile_args={"cxx": cxx, "nvcc": nvcc}, extra_link_args=extra_link)
        print(f"lrmt_fast setup: building CPU + CUDA extension (TORCH_CUDA_ARCH_LIST={arch}, "
              f"CUDA_HOME={CUDA_HOME})", file=sys.stderr)
    else:
        ext = CppExtension("lrmt_fast._C", sources, define_macros=define_macros,
                           extra_compile_args={"cxx": cxx}, extra_link_args=extra_link)
        print("lrmt_fast setup: building the CPU extension"
              + ("" if mode == "0" else " (no CUDA toolkit or CPU-only torch)"), file=sys.stderr)
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extension()

setup(
    name="lrmt_fast",
    version="0.1.0",
    description="Learning to Remember from a Multi-Task Teacher, with fused meta-update kernels",
    packages=find_packages(include=["lrmt_fast", "lrmt_fast.*"]),
    package_data={"lrmt_fast": ["assets/*", "configs/*.json"]},
    python_requires=">=3.10",
    install_requires=["torch", "torchvision", "numpy", "ninja", "pybind11", "tqdm", "matplotlib",
                      "pytest-benchmark"],
    extras_require={"test": ["pytest", "pytest-benchmark"]},
    entry_points={"console_scripts": ["lrmt = lrmt_fast.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
