# lrmt_fast: set-up and common jobs. `make install` is the README's first command.
PYTHON ?= python
CUDA_HOME ?= /usr/local/cuda
export CUDA_HOME
export PATH := $(CUDA_HOME)/bin:$(PATH)

.PHONY: install build test demo bench data clean

# torch first (pinned), then the build tools, then the package with its C++/CUDA
# extension, built against the installed torch (hence --no-build-isolation).
install:
	$(PYTHON) -m pip install torch==2.14.1 torchvision==0.29.1
	$(PYTHON) -m pip install ninja pybind11 numpy pytest pytest-benchmark tqdm matplotlib
	$(PYTHON) -m pip install --no-build-isolation -e .
	$(PYTHON) -m lrmt_fast info

# rebuild the extension only (after editing csrc/)
build:
	$(PYTHON) -m pip install --no-build-isolation --no-deps -e .

test:
	$(PYTHON) -m pytest -q tests/

demo:
	$(PYTHON) -m lrmt_fast demo

bench:
	$(PYTHON) -m pytest benchmarks/ --benchmark-only

# the real datasets of this project's machines (see README: data)
data:
	$(PYTHON) ../shared/data/unpack.py data

clean:
	rm -rf build lrmt_fast/_C*.so
