"""LeNet [20, 50, 500, 10] of the paper's MNIST -> FashionMNIST experiment."""
import torch
import torch.nn.functional as F
from torch import nn


class LeNet(nn.Module):
    """conv5x5(20) - pool - conv5x5(50) - pool - fc(500) = representation - heads (10 each)."""

    def __init__(self, num_classes_a: int = 10, num_classes_b: int = 10, in_channels: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 20, 5)
        self.conv2 = nn.Conv2d(20, 50, 5)
        self.fc1 = nn.Linear(50 * 4 * 4, 500)
        self.head_a = nn.Linear(500, num_classes_a)
        self.head_b = nn.Linear(500, num_classes_b)
        self.rep_dim = 500

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return F.relu(self.fc1(x.flatten(1)))

    def forward(self, x: torch.Tensor, head: str = "a") -> torch.Tensor:
        z = self.features(x)
        return self.head_a(z) if head == "a" else self.head_b(z)
