"""pytest-benchmark configuration of the benchmark suite (``pytest benchmarks/ --benchmark-only``)."""
import pytest
import torch


def pytest_configure(config):
    import os
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU (skipped without one)")
    threads = os.environ.get("LRMT_BENCH_THREADS")
    if threads:  # e.g. LRMT_BENCH_THREADS=1 on a shared machine (as `lrmt bench --threads 1`)
        torch.set_num_threads(int(threads))


def pytest_collection_modifyitems(config, items):
    skip_cuda = pytest.mark.skip(reason="no CUDA GPU")
    for item in items:
        if "cuda" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_cuda)


def pytest_ignore_collect(collection_path, config):
    """Collect the benchmarks only when benchmarks/ (or a file in it) is named on the command
    line, so that a plain ``pytest`` at the repository root does not run them."""
    from pathlib import Path
    here = Path(__file__).parent.resolve()
    named = [Path(str(a).split("::")[0]).resolve() for a in config.args]
    if any(here == p or here in p.parents for p in named):
        return None
    return True
