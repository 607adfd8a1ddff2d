"""How far apart do rollouts of a trained meta-learner drift under float32 rounding alone?

Rolls "ours" out for a few steps on the Task A network of ``cpu_finish_avg`` (random
CIFAR-shaped batches, fresh head_b, lr 0.1) three ways that compute the same arithmetic in a
different order: the meta-test's in-place fused step (OursLearner), the meta-training update on
the fused path and on the reference path. Prints, after each step, the largest difference of the
LSTM cell states and of the weights between them, and the largest |c| (a saturated LSTM unit
adds exactly 1 a step). Run from the repository root:

    python experiments/results/exp1_cifar_cpu_finish_avg_budget/divergence_check.py META_CKPT [STEPS]
"""
import sys

import torch

from experiments import common
from experiments import exp1_cifar as E
from lrmt_fast.baselines import OursLearner
from lrmt_fast.metatrain import load_meta, student_meta_update
from lrmt_fast.pretrain import fresh_head_b
from lrmt_fast.pretrain_cifar import CifarPretrainConfig
from lrmt_fast.student import param_dict

TASK_A = "experiments/results/cifar5a_pretrain_finish_avg/cifar5a-c89cbb7a6ec4.pt"


def main(meta_path: str, steps: int = 6) -> None:
    torch.manual_seed(0)
    cfg = common.resolve_profile(E.CONFIG, "cpu_finish_avg")
    pcfg = common.dataclass_from(CifarPretrainConfig, cfg["pretrain"], "pretrain")
    model = E.build_model(pcfg, torch.load(TASK_A, map_location="cpu", weights_only=False)["state_dict"], "cpu")
    meta = load_meta(meta_path).requires_grad_(False)
    w0 = fresh_head_b(param_dict(model), torch.Generator().manual_seed(3))
    ours = OursLearner(model, {k: v.clone() for k, v in w0.items()}, meta, 0.1, impl="fused")
    runs = {i: ({k: v.clone() for k, v in w0.items()}, meta.init_state()) for i in ("fused", "reference")}
    g = torch.Generator().manual_seed(1)

    def worst(a, b):
        return max((float((a[k] - b[k]).abs().max()), k) for k in a)

    for t in range(steps):
        x, y = torch.randn(64, 3, 32, 32, generator=g), torch.randint(0, 5, (64,), generator=g)
        ours.step(x, y)
        for impl, (p, s) in list(runs.items()):
            p, s, _, _ = student_meta_update(model, meta, p, s, x, y, 0.1, impl=impl)
            runs[impl] = ({k: v.detach() for k, v in p.items()}, meta.detach_state(s))
        (pf, sf), (pr, sr) = runs["fused"], runs["reference"]
        cs = lambda s: {k: v[1] for k, v in s.items()}
        print(f"step {t + 1}: cell state, in-place vs fused {worst(cs(ours.state), cs(sf))}, fused vs reference "
              f"{worst(cs(sf), cs(sr))}; weights, in-place vs fused {worst(ours.params, pf)}, fused vs reference "
              f"{worst(pf, pr)}; max |c| {max(float(v[1].abs().max()) for v in sf.values()):.1f}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 6)
