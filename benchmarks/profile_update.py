"""Profile target: the fused LeNet meta-test update at 1 thread for 20 s (docs/performance.md).

    PYTHONPATH=. perf record -F 999 -o perf.data python benchmarks/profile_update.py
    perf report -i perf.data --no-children --sort symbol --stdio
"""
import torch, time
torch.set_num_threads(1)
from benchmarks.cases import make_case
c = make_case("lenet_update", "fused")
for _ in range(50): c.fn()
t=time.perf_counter(); n=0
while time.perf_counter()-t < 20: c.fn(); n+=1
print("steps", n, "ms/step", 1000*(time.perf_counter()-t)/n)
