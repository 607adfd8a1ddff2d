"""Profile target: the fused LeNet meta-test update at 1 thread for 20 s (docs/performance.md).

    PYTHONPATH=. perf record -F 999 -o perf.data python benchmarks/profile_update.py
    perf report -i perf.data --no-children --sort symbol --stdio
"""
import time

import torch

from lrmt_fast.bench.cases import make_case


def main(seconds: float = 20.0, warmup: int = 50):
    torch.set_num_threads(1)
    case = make_case("lenet_update", "fused")
    for _ in range(warmup):
        case.fn()
    t0, n = time.perf_counter(), 0
    while time.perf_counter() - t0 < seconds:
        case.fn()
        n += 1
    print(f"steps {n}, {1000 * (time.perf_counter() - t0) / n:.2f} ms/step")


if __name__ == "__main__":
    main()
