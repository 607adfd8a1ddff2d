"""Student/teacher networks: a trunk that gives the representation, and two task heads.

Every network has ``features(x)`` (the representation: the last layer before the
classifiers), ``head_a`` (the old Task A classifier) and ``head_b`` (the new Task B
classifier), and ``forward(x, head)`` with head in {"a", "b"}.
"""
from .lenet import LeNet
from .resnet_gn import ResNetGN, resnet32_gn

__all__ = ["LeNet", "ResNetGN", "resnet32_gn", "build_model"]


def build_model(name: str, num_classes_a: int, num_classes_b: int, **kw):
    if name == "lenet":
        return LeNet(num_classes_a, num_classes_b, **kw)
    if name == "resnet32_gn":
        return resnet32_gn(num_classes_a, num_classes_b, **kw)
    raise ValueError(f"unknown model {name!r}: expected 'lenet' or 'resnet32_gn'")
