"""End to end: wall time per meta-training episode and per inner step of Exp 1 CIFAR
(ResNet-32 GN, the ``quick`` profile's meta-training settings) with the fused path against the
reference path, in the same process on the same episodes.

    python -m lrmt_fast.bench.e2e_exp1_cifar_metatrain --device cuda --episodes 4 --max-steps 20
    python -m lrmt_fast.bench.e2e_exp1_cifar_metatrain --data-root data --taskA-ckpt FILE ...

Without ``--data-root`` the images are random CIFAR-shaped uint8 tensors (``--synthetic N``
per task) and, without ``--taskA-ckpt``, Task A is the seeded untrained network: the time of an
inner step does not depend on what the pixels or weights are, so this measures the step (the
student's forward and backward on Task B, the teacher's on A and B, the meta-update and its
T-BPTT backward) without the data or a pretrained checkpoint, e.g. on a lent GPU that the
data cannot reach. How many steps an episode runs does depend on them (the curriculum
threshold), so ``--max-steps`` fixes an upper length for the timing and the record gives both
seconds per inner step and per episode; the ``quick`` meta-training's time is estimated from
its step budget (``max_total_steps``). Writes
``runs/bench/e2e_exp1_cifar_metatrain_<device>.json`` (``--update-records``: also
``benchmarks/results/``).
"""
from __future__ import annotations

import argparse

import torch

from .e2e import time_impls, write_record


def synthetic_images(n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, 32, 32), generator=g, dtype=torch.uint8), torch.randint(0, 5, (n,), generator=g)


def main(argv=None) -> int:
    from lrmt_fast.config import config_path, load_spec, profile_names
    from lrmt_fast.data.cifar import CifarSource, CifarTaskStream, cifar5a, cifar5b, split_b
    from lrmt_fast.pretrain_cifar import CifarPretrainConfig, load_state, make_model

    CONFIG = config_path("exp1_cifar.json")

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--profile", default="quick", choices=profile_names(CONFIG))
    p.add_argument("--data-root", default=None, help="real CIFAR-10 (default: synthetic images)")
    p.add_argument("--synthetic", type=int, default=2048, metavar="N", help="synthetic images per task")
    p.add_argument("--taskA-ckpt", default=None, metavar="FILE", help="Task A checkpoint (default: untrained)")
    p.add_argument("--episodes", type=int, default=4)
    p.add_argument("--max-steps", type=int, default=20, help="cap on an episode's inner steps (0: the profile's)")
    p.add_argument("--impls", default="fused,reference")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=None, help="record file (default runs/bench/<name>_<device>.json)")
    p.add_argument("--update-records", action="store_true",
                   help="also write the committed copy under benchmarks/results/")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    spec = load_spec(CONFIG, a.profile, CifarPretrainConfig)
    cfg, pcfg = spec.raw, spec.pretrain
    model = make_model(pcfg)
    if a.taskA_ckpt:
        model.load_state_dict(load_state(a.taskA_ckpt))
    model = model.to(a.device)
    w0 = {k: v.detach().clone() for k, v in model.named_parameters()}
    if a.data_root:
        src = CifarSource(a.data_root)
        task_a, (b1, _) = cifar5a(src), split_b(cifar5b(src), int(cfg.get("data", {}).get("split_seed", 0)))
        xa, xb = (task_a.train_x, task_a.train_y), (b1.train_x, b1.train_y)
        data = f"CIFAR-10 from {a.data_root}"
    else:
        xa, xb = synthetic_images(a.synthetic, 1), synthetic_images(a.synthetic, 2)
        data = f"synthetic, {a.synthetic} images per task"
    mt = dict(cfg["metatrain"])
    if a.max_steps:
        mt["max_steps"] = min(int(mt.get("max_steps", a.max_steps)), a.max_steps)

    def stream():
        return CifarTaskStream([w0], xa, xb, int(mt.get("batch_a", 64)), int(mt.get("batch_b", 64)), a.device)

    impls = [i.strip() for i in a.impls.split(",") if i.strip()]
    rows = time_impls(model, stream, mt, a.episodes, a.device, impls)
    cap = cfg.get("metatrain_budget", {}).get("max_total_steps")
    for r in rows:
        if cap:
            r[f"{a.profile}_metatrain_estimate_s"] = round(cap * r["s_per_step"], 1)
        ratio = r["speedup_vs_reference"]
        print(f"{r['impl']:9s}: {1e3 * r['s_per_step']:.1f} ms/step, {r['s_per_episode']:.2f} s/episode"
              + (f", x{ratio:.2f} vs reference" if ratio else "")
              + (f", {a.profile} meta-training ({cap} steps) ~ {cap * r['s_per_step'] / 60:.1f} min" if cap else ""))
    write_record(f"exp1_cifar_{a.profile}_metatrain", "e2e_exp1_cifar_metatrain", a.device, rows, a.out,
                 update_records=a.update_records,
                 profile=a.profile, episodes=a.episodes, max_steps=mt.get("max_steps"), data=data,
                 task_a=a.taskA_ckpt or "untrained (seeded)", budget_max_total_steps=cap)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
