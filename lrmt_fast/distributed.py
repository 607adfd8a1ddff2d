"""Data-parallel meta-training on torch.distributed (docs/distributed.md).

One process per GPU (or per CPU worker), started by ``torchrun``. Every rank runs
Algorithm 1 on its own episodes (its episode generators are seeded by
``(seed, rank, episode)``), and the ranks stay in lockstep through the two
collectives of the ``sync`` protocol of :mod:`lrmt_fast.meta_training`:

* ``average_grads(meta)``: after every inner step's backward, one all-reduce of
  all meta-gradients (flattened into one buffer) divided by ``world_size``, so
  every rank's Adam takes the identical step and theta stays identical
  (equivalent to DDP, with one bucket);
* ``any(flag)``: a collective OR (all-reduce MAX) of the "loss over the
  curriculum threshold" flag, so that all ranks end an episode at the same step.

At the start, rank 0's theta, optimiser state, episode counter and history
(fresh, or from ``--resume``'s checkpoint) are broadcast to every rank
(``sync_start``), so a resumed multi-node job needs the checkpoint only where
rank 0 runs. Only rank 0 writes checkpoints and results.

Failure: every collective runs under the process group's timeout
(``init_process_group(timeout=...)``, ``--dist-timeout``); a collective that
fails (a peer died: gloo sees the closed connection at once; NCCL's watchdog
aborts after the timeout) raises :class:`DistributedError` naming the rank, the
operation and ``--resume``. Under ``torchrun`` the elastic agent then tears the
other workers down and exits non-zero.
"""
from __future__ import annotations

import datetime
import os
import sys
import time
from typing import Any, List, Optional, Tuple

import torch
import torch.distributed as dist

from .meta_training import LocalSync

DEFAULT_TIMEOUT_S = 900.0


class DistributedError(RuntimeError):
    """A collective failed or timed out: some rank died or stalled."""


def launched_distributed() -> bool:
    """True under torchrun (or any launcher that sets the env rendezvous) with more than one rank."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


class DistSync:
    """The sync protocol of :func:`lrmt_fast.meta_training.metatrain` over a process group."""

    def __init__(self, device="cpu", group=None, timeout_s: float = DEFAULT_TIMEOUT_S):
        if not dist.is_initialized():
            raise DistributedError("DistSync needs an initialised process group (init_distributed)")
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self.device = torch.device(device)
        self.timeout_s = timeout_s
        self.backend = dist.get_backend(group)
        self.steps = 0      # collectives done, for error messages

    # --- collectives with clear failures ------------------------------------------
    def _run(self, what: str, fn, *args, **kw):
        try:
            return fn(*args, group=self.group, **kw)
        except Exception as e:   # gloo: RuntimeError/DistNetworkError; NCCL: DistBackendError
            raise DistributedError(
                f"rank {self.rank}/{self.world_size}: collective {what} failed after {self.steps} "
                f"synchronised steps ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). "
                f"Another rank probably died or stalled for more than the {self.timeout_s:.0f}s timeout; "
                f"the job stops. Restart the same command with --resume to continue from the last "
                f"checkpoint.") from e

    def average_grads(self, meta: torch.nn.Module) -> None:
        """All-reduce the meta-gradients (sum) and divide by world_size, in one flat buffer.

        A parameter whose gradient is None on every rank stays None (Adam skips it,
        as in one process); one that has a gradient on some rank gets zeros elsewhere."""
        params = list(meta.parameters())
        if not params:
            return
        dev = params[0].device
        dtype = params[0].dtype
        parts = [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).to(dtype) for p in params]
        present = torch.tensor([p.grad is not None for p in params], dtype=dtype, device=dev)
        flat = torch.cat(parts + [present])
        self._run("all_reduce(meta-gradients)", dist.all_reduce, flat, op=dist.ReduceOp.SUM)
        self.steps += 1
        flat.div_(self.world_size)
        present = flat[-len(params):]
        off = 0
        for p, here in zip(params, present.tolist()):
            n = p.numel()
            if here > 0:
                g = flat[off:off + n].view_as(p).to(p.dtype)
                if p.grad is None:
                    p.grad = g.clone()
                else:
                    p.grad.copy_(g)
            else:
                p.grad = None
            off += n

    def any(self, flag: bool) -> bool:
        """Collective OR: True on every rank if ``flag`` is True on any rank."""
        t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=self._coll_device())
        self._run("all_reduce(episode-end flag)", dist.all_reduce, t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        box: List[Any] = [obj if self.rank == src else None]
        kw = {"device": self._coll_device()} if self.backend == "nccl" else {}
        self._run("broadcast_object_list", dist.broadcast_object_list, box, src=src, **kw)
        return box[0]

    def barrier(self) -> None:
        kw = {"device_ids": [self.device.index or 0]} if self.backend == "nccl" else {}
        self._run("barrier", dist.barrier, **kw)

    def sync_start(self, meta: torch.nn.Module, opt: torch.optim.Optimizer, start: int,
                   history: List[dict]) -> Tuple[int, List[dict]]:
        """Make every rank start from rank 0's theta, optimiser state, episode and history."""
        payload = None
        if self.rank == 0:
            payload = {"meta": {k: v.detach().cpu() for k, v in meta.state_dict().items()},
                       "opt": _to_cpu(opt.state_dict()), "start": int(start), "history": list(history)}
        payload = self.broadcast_object(payload)
        if self.rank != 0:
            meta.load_state_dict(payload["meta"])
            opt.load_state_dict(payload["opt"])    # moves state to the params' device
        return int(payload["start"]), list(payload["history"])

    def _coll_device(self) -> torch.device:
        return self.device if self.backend == "nccl" else torch.device("cpu")


def _to_cpu(obj):
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


def init_distributed(device: str = "cpu", timeout_s: float = DEFAULT_TIMEOUT_S,
                     backend: Optional[str] = None):
    """Join the process group described by the environment (torchrun's RANK, WORLD_SIZE,
    LOCAL_RANK, MASTER_ADDR/PORT) and return ``(sync, device)``.

    Not launched distributed (WORLD_SIZE unset or 1): ``(LocalSync(), device)``.
    ``device='cuda'``: NCCL, and each rank takes GPU ``LOCAL_RANK``; ``'cpu'``: gloo.
    """
    if not launched_distributed():
        return LocalSync(), device
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = str(device)
    if dev.startswith("cuda"):
        if not torch.cuda.is_available():
            raise DistributedError("--device cuda but CUDA is not available on this node")
        if local_rank >= torch.cuda.device_count():
            raise DistributedError(f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} GPU(s) here; "
                                   f"use --nproc_per_node <= the GPU count")
        torch.cuda.set_device(local_rank)
        dev = f"cuda:{local_rank}"
    backend = backend or ("nccl" if dev.startswith("cuda") else "gloo")
    if not dist.is_initialized():
        timeout = datetime.timedelta(seconds=timeout_s)
        try:
            store = _restart_safe_store(timeout)
            if store is None:
                dist.init_process_group(backend, timeout=timeout)
            else:
                dist.init_process_group(backend, store=store, rank=int(os.environ["RANK"]),
                                        world_size=int(os.environ["WORLD_SIZE"]), timeout=timeout)
        except Exception as e:
            raise DistributedError(f"could not join the process group (backend {backend}, "
                                   f"MASTER_ADDR={os.environ.get('MASTER_ADDR')}, "
                                   f"MASTER_PORT={os.environ.get('MASTER_PORT')}, "
                                   f"RANK={os.environ.get('RANK')}, WORLD_SIZE={os.environ.get('WORLD_SIZE')}): "
                                   f"{type(e).__name__}: {e}") from e
    return DistSync(dev, timeout_s=timeout_s), dev


def _restart_safe_store(timeout: datetime.timedelta):
    """The store for ``init_process_group`` under torchrun with ``--max-restarts``, or None for
    the default (``env://``).

    torchrun's agent keeps one TCP store for all restarts of its workers (the static rendezvous
    always; c10d unless ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1``), and ``init_process_group``
    does not separate the attempts: the workers of a restart can read the keys of the attempt
    before (a dead peer's gloo address, NCCL's unique id) and fail to join ("Gloo
    connectFullMesh failed ... Connection refused"; pytorch/pytorch#135712), which uses up the
    restarts. On one node every worker has the same ``TORCHELASTIC_RESTART_COUNT``, so the
    attempt's keys go under a prefix of their own. Across nodes the count is kept per node and
    need not agree (an agent that restarts for a peer's failure does not count it), so there
    the fix is the agent's: docs/distributed.md, "Several nodes"; rank 0 warns once."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True" or int(os.environ.get("TORCHELASTIC_MAX_RESTARTS",
                                                                                         "0")) <= 0:
        return None
    if int(os.environ.get("GROUP_WORLD_SIZE", "1")) != 1:
        if os.environ.get("RANK") == "0":
            print("lrmt: warning: torchrun --max-restarts on several nodes with a shared rendezvous store can "
                  "restart into a stale process group; use --rdzv-backend c10d and set "
                  "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 for torchrun (docs/distributed.md)", file=sys.stderr, flush=True)
        return None
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), int(os.environ["WORLD_SIZE"]),
                          False, timeout)
    return dist.PrefixStore(f"lrmt/attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


# Seconds the main thread sleeps (GIL released) before leaving the process group; see shutdown().
SHUTDOWN_GRACE_S = 0.2


def shutdown(sync) -> None:
    """Leave the process group (each rank, at the end of its run or on an error).

    A backend's worker thread (gloo's ``runLoop``) drops its reference to a finished collective
    after ``wait()`` has returned in Python; when that reference is the tensor's last, freeing
    it takes the GIL. A rank that returns straight after its last collective (every rank but 0,
    after meta-training) could reach interpreter finalisation with that release still pending,
    and the worker, unable to take the GIL then, ended in std::terminate (SIGABRT, "terminate
    called without an active exception"; seen about once in ten 2-rank runs on a loaded 2-core
    machine, backtrace: ProcessGroupGloo::runLoop -> ~AsyncAllreduceWork -> decref_pyobject ->
    take_gil during Py_FinalizeEx). Sleeping briefly releases the GIL so that the worker finishes
    first; destroy_process_group then shuts the backends down."""
    if isinstance(sync, DistSync) and dist.is_initialized():
        time.sleep(SHUTDOWN_GRACE_S)
        dist.destroy_process_group()
        time.sleep(SHUTDOWN_GRACE_S)


def broadcast_object(sync, obj: Any, src: int = 0) -> Any:
    """``obj`` from rank ``src`` on every rank; the identity without distribution."""
    if isinstance(sync, DistSync):
        return sync.broadcast_object(obj, src)
    return obj


def is_main(sync) -> bool:
    return getattr(sync, "rank", 0) == 0
