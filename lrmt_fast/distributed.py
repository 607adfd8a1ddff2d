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
rank 0 runs. Only rank 0 writes checkpoints and results. Objects go between ranks as JSON
plus raw tensor bytes (:meth:`DistSync.broadcast_object`), never as pickles, and a job on
one node creates its own rendezvous store on 127.0.0.1 only (:func:`_loopback_store`);
docs/distributed.md, "Security", says what still listens where.

Failure: every collective runs under the process group's timeout
(``init_process_group(timeout=...)``, ``--dist-timeout``); a collective that
fails (a peer died: gloo sees the closed connection at once; NCCL's watchdog
aborts after the timeout) raises :class:`DistributedError` naming the rank, the
operation and ``--resume``. Under ``torchrun`` the elastic agent then tears the
other workers down and exits non-zero.
"""
from __future__ import annotations

import datetime
import json
import os
import socket
import sys
import time
from collections import OrderedDict
from typing import Any, Dict, List, Optional, Tuple

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
        """``obj`` from rank ``src`` on every rank, sent as JSON plus raw tensor bytes, never a pickle.

        ``dist.broadcast_object_list`` pickles on the sender and unpickles on the receivers, so
        anything that can connect to the process group could make every rank run code of its
        choosing. Here the payload is tensors and plain data only (see :func:`encode_payload`):
        a JSON header (the structure, with each tensor's dtype and shape) and one byte buffer
        holding the tensors, each sent with ``dist.broadcast``; receivers parse JSON and copy
        bytes, which runs no code. Something else (an arbitrary object) raises ``TypeError``
        naming its type and place on the sender, and, so that no rank waits for the timeout,
        on the receivers too. ``src`` gets ``obj`` itself back; the others get tensors on the CPU
        (on their own GPU, under NCCL, where the sender's were on a GPU)."""
        dev = self._coll_device()
        header, buf, error = b"", None, None
        if self.rank == src:
            try:
                header, buf = encode_payload(obj, dev)
            except Exception as e:      # tell the receivers, rather than leave them to the timeout
                error = e
                header = json.dumps({"error": f"{type(e).__name__}: {e}"}).encode()
        sizes = torch.tensor([0 if error else 1, len(header), 0 if buf is None else buf.numel()]
                             if self.rank == src else [0, 0, 0], dtype=torch.int64, device=dev)
        self._run("broadcast(object sizes)", dist.broadcast, sizes, src=src)
        ok, n_header, n_buf = (int(v) for v in sizes.tolist())
        hdr = (torch.frombuffer(bytearray(header), dtype=torch.uint8).to(dev) if self.rank == src
               else torch.empty(n_header, dtype=torch.uint8, device=dev))
        if n_header:
            self._run("broadcast(object header)", dist.broadcast, hdr, src=src)
        if not ok:
            if self.rank == src:
                raise error
            sent = _json_loads(hdr, src)
            why = str(sent.get("error", "?")) if isinstance(sent, dict) else "?"
            raise (TypeError if why.startswith("TypeError: ") else DistributedError)(
                f"rank {src} could not send its object ({why})")
        if self.rank == src:
            if n_buf:
                self._run("broadcast(object tensors)", dist.broadcast, buf, src=src)
            return obj
        data = torch.empty(n_buf, dtype=torch.uint8, device=dev)
        if n_buf:
            self._run("broadcast(object tensors)", dist.broadcast, data, src=src)
        return decode_payload(hdr.cpu().numpy().tobytes(), data, src=src, device=self.device)

    def barrier(self) -> None:
        kw = {"device_ids": [self.device.index or 0]} if self.backend == "nccl" else {}
        self._run("barrier", dist.barrier, **kw)

    def sync_start(self, meta: torch.nn.Module, opt: torch.optim.Optimizer, start: int,
                   history: List[dict]) -> Tuple[int, List[dict]]:
        """Make every rank start from rank 0's theta, optimiser state, episode and history.

        Sent by :meth:`broadcast_object`, so as tensors and JSON: the state dicts (Adam's with its
        integer parameter ids, ``betas`` tuple and step tensors) round-trip exactly."""
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


# --- objects between ranks: JSON for the structure, raw bytes for the tensors ------------------

# dtype names a peer may ask for (a header naming anything else is refused)
_DTYPES: Dict[str, torch.dtype] = {str(d).replace("torch.", ""): d for d in vars(torch).values()
                                   if isinstance(d, torch.dtype)}
_PLAIN = (str, int, float, bool)
_SENDABLE = "tensors and plain data (dict, list, tuple, str, int, float, bool, None)"


def _type_name(x) -> str:
    t = type(x)
    return t.__qualname__ if t.__module__ == "builtins" else f"{t.__module__}.{t.__qualname__}"


class _Encoder:
    """Turns a payload into a JSON-able tree and a list of tensors (see :func:`encode_payload`)."""

    def __init__(self):
        self.tensors: List[torch.Tensor] = []
        self.meta: List[dict] = []
        self._index: Dict[int, int] = {}

    def refuse(self, x, where: str):
        raise TypeError(f"broadcast_object: cannot send {where} of type {_type_name(x)}: ranks exchange only "
                        f"{_SENDABLE}, never pickles")

    def key(self, k, where: str):
        if k is None or type(k) in _PLAIN:
            return k
        self.refuse(k, f"a key of {where}")

    def enc(self, x, where: str):
        t = type(x)
        if x is None or t in _PLAIN:      # exact types: a subclass (numpy.float64, an enum) is refused
            return x
        if isinstance(x, torch.Tensor):
            return {"X": self.tensor(x, where)}
        if t is list or t is tuple:
            return {"L" if t is list else "T": [self.enc(v, f"{where}[{i}]") for i, v in enumerate(x)]}
        if t is dict or t is OrderedDict:
            node = {"D" if t is dict else "O": [[self.key(k, where), self.enc(v, f"{where}[{k!r}]")]
                                                for k, v in x.items()]}
            md = getattr(x, "_metadata", None)     # a module state dict's versions (load_state_dict reads them)
            if md is not None:
                node["m"] = self.enc(md, f"{where}._metadata")
            return node
        self.refuse(x, where)

    def tensor(self, x: torch.Tensor, where: str) -> int:
        if x.layout != torch.strided or x.is_quantized or getattr(x, "is_nested", False) or x.is_meta:
            raise TypeError(f"broadcast_object: cannot send {where}, a {x.layout} {x.dtype} tensor: only dense "
                            f"tensors are sent")
        i = self._index.get(id(x))
        if i is None:   # the same tensor twice (tied weights) is sent once and arrives as one tensor
            i = self._index[id(x)] = len(self.tensors)
            flat = x.detach().resolve_conj().resolve_neg().contiguous().reshape(-1)
            self.tensors.append(flat.view(torch.uint8))
            self.meta.append({"dtype": str(x.dtype).replace("torch.", ""), "shape": list(x.shape),
                              "grad": bool(x.requires_grad), "cuda": x.device.type == "cuda"})
        return i


def encode_payload(obj, device="cpu") -> Tuple[bytes, torch.Tensor]:
    """``(header, buffer)`` for :meth:`DistSync.broadcast_object`: UTF-8 JSON of the structure
    (lists, tuples, dicts with scalar keys, OrderedDicts with a state dict's ``_metadata``;
    each tensor as its index, dtype, shape) and the tensors' bytes, concatenated, on ``device``.
    ``TypeError`` (naming the type and where it is) for anything else."""
    e = _Encoder()
    try:
        tree = e.enc(obj, "payload")
    except RecursionError:
        raise TypeError("broadcast_object: the payload is nested too deeply or contains itself") from None
    header = json.dumps({"v": 1, "obj": tree, "tensors": e.meta}, allow_nan=True).encode()
    dev = torch.device(device)
    buf = (torch.cat([t.to(dev) for t in e.tensors]) if e.tensors
           else torch.empty(0, dtype=torch.uint8, device=dev))
    return header, buf


def _json_loads(hdr: torch.Tensor, src: int):
    try:
        return json.loads(hdr.cpu().numpy().tobytes().decode())
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise DistributedError(f"rank {src} sent a malformed object header ({e}); is a foreign process "
                               f"connected to the job's port?") from None


def decode_payload(header: bytes, buf: torch.Tensor, src: int = 0, device="cpu"):
    """The object :func:`encode_payload` described: parses JSON and copies bytes, runs no code.
    A header that is not of that form raises :class:`DistributedError`."""
    def bad(why: str):
        return DistributedError(f"rank {src} sent a malformed object ({why}); is a foreign process connected "
                                f"to the job's port?")
    try:
        h = json.loads(header.decode())
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise bad(f"header: {e}") from None
    if not (type(h) is dict and h.get("v") == 1 and type(h.get("tensors")) is list):
        raise bad("no version-1 header")
    dev = torch.device(device)
    cpu_buf = buf if buf.device.type == "cpu" else None
    tensors, off = [], 0
    for m in h["tensors"]:
        if not (type(m) is dict and m.get("dtype") in _DTYPES and type(m.get("shape")) is list
                and all(type(n) is int and n >= 0 for n in m["shape"])):
            raise bad(f"tensor description {str(m)[:80]}")
        dtype = _DTYPES[m["dtype"]]
        numel = 1
        for n in m["shape"]:
            numel *= n
        nbytes = numel * torch.empty((), dtype=dtype).element_size()
        if off + nbytes > buf.numel():
            raise bad("tensors larger than the buffer")
        if m.get("cuda") and dev.type == "cuda" and buf.device.type == "cuda":
            part = buf[off:off + nbytes]
        else:
            if cpu_buf is None:
                cpu_buf = buf.cpu()
            part = cpu_buf[off:off + nbytes]
        t = part.clone().view(dtype).reshape(m["shape"])   # own, aligned storage
        if m.get("grad") and (t.is_floating_point() or t.is_complex()):
            t.requires_grad_(True)
        tensors.append(t)
        off += nbytes
    if off != buf.numel():
        raise bad("buffer size does not match the tensors")

    def dec(node):
        if node is None or type(node) in _PLAIN:
            return node
        if type(node) is dict:
            if set(node) == {"X"} and type(node["X"]) is int and 0 <= node["X"] < len(tensors):
                return tensors[node["X"]]
            if set(node) in ({"L"}, {"T"}) and type(next(iter(node.values()))) is list:
                items = [dec(v) for v in next(iter(node.values()))]
                return items if "L" in node else tuple(items)
            kind = "D" if "D" in node else "O" if "O" in node else None
            if kind and (set(node) == {kind} or (kind == "O" and set(node) == {"O", "m"})) \
                    and type(node[kind]) is list:
                out = {} if kind == "D" else OrderedDict()
                for kv in node[kind]:
                    if not (type(kv) is list and len(kv) == 2 and (kv[0] is None or type(kv[0]) in _PLAIN)):
                        raise bad("dict item")
                    out[kv[0]] = dec(kv[1])
                if "m" in node:
                    out._metadata = dec(node["m"])
                return out
        raise bad(f"node {str(node)[:80]}")

    try:
        return dec(h.get("obj"))
    except RecursionError:
        raise bad("nested too deeply") from None


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
                store = _loopback_store(timeout)
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
    the fix is the agent's: docs/distributed.md, "Several nodes"; rank 0 warns once.
    On one node (:func:`single_node`) the workers reach the agent's store over the loopback."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True" or int(os.environ.get("TORCHELASTIC_MAX_RESTARTS",
                                                                                         "0")) <= 0:
        return None
    if int(os.environ.get("GROUP_WORLD_SIZE", "1")) != 1:
        if os.environ.get("RANK") == "0":
            print("lrmt: warning: torchrun --max-restarts on several nodes with a shared rendezvous store can "
                  "restart into a stale process group; use --rdzv-backend c10d and set "
                  "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 for torchrun (docs/distributed.md)", file=sys.stderr, flush=True)
        return None
    host = LOOPBACK if single_node() else os.environ["MASTER_ADDR"]
    store = dist.TCPStore(host, int(os.environ["MASTER_PORT"]), int(os.environ["WORLD_SIZE"]), False, timeout)
    return dist.PrefixStore(f"lrmt/attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


LOOPBACK = "127.0.0.1"


def single_node() -> bool:
    """True when every rank of the job runs on this machine (torchrun's LOCAL_WORLD_SIZE equals
    WORLD_SIZE); False when unknown (a launcher that does not set LOCAL_WORLD_SIZE)."""
    local = os.environ.get("LOCAL_WORLD_SIZE")
    return local is not None and int(local) == int(os.environ.get("WORLD_SIZE", "1"))


def _loopback_store(timeout: datetime.timedelta):
    """On one node, when the workers are to create the rendezvous store themselves (torchrun
    without its agent's store, e.g. ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1``, or another
    launcher that sets LOCAL_WORLD_SIZE): a TCPStore that listens on 127.0.0.1 only; else None
    (the default ``env://`` rendezvous).

    ``env://`` makes rank 0 start a TCPStore that listens on every interface (``*:MASTER_PORT``,
    whatever MASTER_ADDR says), so any host that can reach the port could read and write the
    job's keys while it runs. TCPStore binds no address of its own choosing, but it accepts a
    listening socket (``master_listen_fd``): rank 0 binds one to 127.0.0.1 and hands it over,
    the other ranks connect to 127.0.0.1. torchrun's own agent store is not ours to bind
    (docs/distributed.md, "Security")."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True" or not single_node():
        return None
    port, world = int(os.environ["MASTER_PORT"]), int(os.environ["WORLD_SIZE"])
    if int(os.environ["RANK"]) != 0:
        return dist.TCPStore(LOOPBACK, port, world, False, timeout)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((LOOPBACK, port))
        sock.listen(max(128, world))
        store = dist.TCPStore(LOOPBACK, port, world, True, timeout, master_listen_fd=sock.fileno())
    except BaseException:
        sock.close()
        raise
    sock.detach()       # the store's server owns the socket now
    return store


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
