"""Weight drift and Task B training loss of SGD on the meta-test's own batches, for comparison
with the gate trace of "ours" (x4_trace/gate_trace.png).

Rolls out, for meta-test seed SEED of the ``cpu_finish_avg_x4_trace`` profile, a meta-learner at
its initialisation (delta = 1 everywhere: exactly the "sgd" method, tests/test_gate_trace.py)
with the gate trace on, from the same start (Task A network, fresh head_b of that seed) over the
same D_B2 batches as the profile's meta-test (evaluate.run_meta_test's seeding), and prints every
100 steps ||w_t - w_0|| / ||w_0|| over the adapted layers and the mean Task B training loss of
the last 100 steps. Optionally also a trained meta-learner (META_CKPT) on the same batches. Run
from the repository root:

    python experiments/results/exp1_cifar_cpu_finish_avg_budget/drift_check.py DATA_ROOT [SEED] [META_CKPT]
"""
import sys

import torch

from experiments import common
from experiments import exp1_cifar as E
from lrmt_fast.baselines import OursLearner
from lrmt_fast.data.cifar import even_split, to_task_data
from lrmt_fast.data.tasks import TwoTasks
from lrmt_fast.evaluate import MetaTestConfig, run_start
from lrmt_fast.metatrain import build_meta_learner, load_meta
from lrmt_fast.student import param_dict

PROFILE = "cpu_finish_avg_x4_trace"


def main(data_root: str, seed: int = 0, meta_path: str = None) -> None:
    p = E.argparse.ArgumentParser()
    E.add_cifar_arguments(p, E.CONFIG, E.DEFAULT_OUT)
    args = p.parse_args(["--profile", PROFILE, "--data-root", data_root, "--no-progress"])
    cfg = common.resolve_profile(E.CONFIG, PROFILE)
    torch.set_num_threads(2)
    task_a, task_b = E.load_task_a(args, cfg), E.load_task_b(args, cfg)
    i1, i2 = even_split(task_b.train_x.shape[0], int(cfg["data"].get("split_seed", 0)))
    tasks = TwoTasks(to_task_data(task_a), to_task_data(task_b), i1, i2)
    state, info, pcfg = E.task_a_weights(args, cfg, task_a, None, "cpu", False, print)
    model = E.build_model(pcfg, state, "cpu")
    w0 = param_dict(model)
    mtest = common.dataclass_from(MetaTestConfig, cfg["metatest"], "metatest")
    metas = {"sgd (meta-learner at init)": build_meta_learner(model, cfg["metatrain"]["hidden"],
                                                               cfg["metatrain"]["hidden_gn"])}
    if meta_path:
        metas["ours (" + meta_path + ")"] = load_meta(meta_path)
    for name, meta in metas.items():
        start, stream = run_start(w0, *tasks.b2, mtest, seed)
        learner = OursLearner(model, start, meta, mtest.lr, trace=True)
        losses = []
        for t in range(1, mtest.steps + 1):
            losses.append(learner.step(*stream.next()))
            if t % 100 == 0:
                tr = learner.trace.to_dict()["groups"]["all"]
                dn, dp = tr["drift_neg"][-1], tr["drift_pos"][-1]
                print(f"{name} seed {seed} step {t}: drift (delta < 0) {dn:.4f}, (delta >= 0) {dp:.4f}; "
                      f"Task B training loss, mean of the last 100 steps {sum(losses) / len(losses):.3f}", flush=True)
                losses = []


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 0, sys.argv[3] if len(sys.argv) > 3 else None)
