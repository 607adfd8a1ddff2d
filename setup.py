"""Install lrmt_fast. The C++/CUDA extension (csrc/) is added by the fused-kernels work."""
from setuptools import find_packages, setup

setup(
    name="lrmt_fast",
    version="0.1.0",
    description="Learning to Remember from a Multi-Task Teacher, with fused meta-update kernels",
    packages=find_packages(include=["lrmt_fast", "lrmt_fast.*", "experiments", "experiments.*"]),
    package_data={"lrmt_fast": ["assets/*"], "experiments": ["configs/*.json"]},
    python_requires=">=3.10",
    install_requires=["torch", "torchvision", "numpy", "ninja", "pybind11", "tqdm", "matplotlib",
                      "pytest-benchmark"],
    extras_require={"test": ["pytest", "pytest-benchmark"]},
    entry_points={"console_scripts": ["lrmt = lrmt_fast.cli:main"]},
)
