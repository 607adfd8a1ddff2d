"""A tiny student with every kind of adapted layer (conv with bias, GroupNorm, linear)."""
import torch
import torch.nn.functional as F
from torch import nn


class TinyNet(nn.Module):
    def __init__(self, na=3, nb=3):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 3, 3)
        self.gn1 = nn.GroupNorm(1, 3)
        self.fc1 = nn.Linear(3 * 4 * 4, 8)
        self.head_a = nn.Linear(8, na)
        self.head_b = nn.Linear(8, nb)

    def features(self, x):
        return F.relu(self.fc1(F.relu(self.gn1(self.conv1(x))).flatten(1)))

    def forward(self, x, head="a"):
        z = self.features(x)
        return self.head_a(z) if head == "a" else self.head_b(z)


def tiny_data(n=64, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    xa = torch.randn(n, 1, 6, 6, generator=g, dtype=dtype)
    ya = torch.randint(0, 3, (n,), generator=g)
    xb = torch.randn(n, 1, 6, 6, generator=g, dtype=dtype) + 0.5
    yb = torch.randint(0, 3, (n,), generator=g)
    return xa, ya, xb, yb


def tiny_two_tasks(n=40, n_test=20):
    """TinyNet-shaped Task A and Task B (3 classes each) with an even D_B1 / D_B2 split."""
    from lrmt_fast.data.tasks import TaskData, TwoTasks, split_even
    xa, ya, xb, yb = tiny_data(n=n)
    xta, yta, xtb, ytb = tiny_data(n=n_test, seed=1)
    a = TaskData("A", 3, xa, ya, xta, yta, fp="a")
    b = TaskData("B", 3, xb, yb, xtb, ytb, fp="b")
    return TwoTasks(a, b, *split_even(b.train_x.shape[0], 0))
