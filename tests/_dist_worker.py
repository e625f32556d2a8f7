"""One rank of the distributed tests (tests/test_distributed.py); also the shared case builders.

Launched torchrun-style (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT`` in the
environment) as ``python tests/_dist_worker.py OUT_DIR``. Runs, in one gloo process group on the
CPU, every distributed scenario and saves what the test compares to ``OUT_DIR/rank{r}.pt``:

- ``ddp``: a tiny :class:`miras.nn.MirasLM` (Titans-style linear memory with momentum) under
  ``DistributedDataParallel``, each rank on its half of the batch, a few SGD steps;
- ``fsdp``: the same under FSDP2 (``fully_shard`` per block, then the root);
- ``sp``: sequence parallelism by state passing: rank r runs tokens [split[r], split[r+1]) of
  every sequence, starting from rank r-1's final memory state (received), and sends the gradient
  of that state back after its backward.

The single-process references are computed by the test itself with the same builders.
"""
from __future__ import annotations

import os
import sys
import time
from datetime import timedelta

import torch
import torch.nn.functional as F

import miras
from miras.nn import MirasLM
from conftest import make_inputs, op_kwargs  # this file's directory (tests/) is on sys.path

# ---- data-parallel case ---------------------------------------------------------------------
LM = dict(vocab_size=29, hidden_size=16, num_layers=2, num_heads=2, mixer="titans", chunk_size=8)
BATCH, SEQ, STEPS = 4, 20, 3  # SEQ is not a multiple of chunk_size: a partial last chunk


def build_lm() -> MirasLM:
    torch.manual_seed(0)
    return MirasLM(**LM).double()  # float64: the comparisons can be tight


def lm_batches() -> torch.Tensor:
    """[STEPS, BATCH, SEQ] token ids (the global batch of every step)."""
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, LM["vocab_size"], (STEPS, BATCH, SEQ), generator=g)


def lm_loss(model, ids: torch.Tensor) -> torch.Tensor:
    """Next-token cross entropy through ``model``'s forward (a DDP/FSDP wrapper's, for its hooks)."""
    logits = model(ids)
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def _full(t: torch.Tensor) -> torch.Tensor:
    """A plain tensor (an FSDP2 DTensor shard gathered; a collective: every rank calls it)."""
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().clone()


def train(model, named_params, batches) -> dict:
    """SGD with momentum over ``batches``; the per-step gradients, losses and the final parameters."""
    opt = torch.optim.SGD([p for _, p in named_params], lr=0.5, momentum=0.9)
    grads, losses = [], []
    for ids in batches:
        opt.zero_grad(set_to_none=True)
        loss = lm_loss(model, ids)
        loss.backward()
        grads.append({n: _full(p.grad) for n, p in named_params})
        losses.append(loss.detach().clone())
        opt.step()
    return dict(grads=grads, losses=losses, params={n: _full(p) for n, p in named_params})


def _my_rows(batches, rank, world):
    per = BATCH // world
    return batches[:, rank * per:(rank + 1) * per]


def run_ddp(rank, world) -> dict:
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = build_lm()
    ddp = DDP(model)
    return train(ddp, list(model.named_parameters()), _my_rows(lm_batches(), rank, world))


def run_fsdp(rank, world) -> dict:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model = build_lm()
    mesh = init_device_mesh("cpu", (world,))
    for block in model.layers:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    sharded = sum(1 for p in model.parameters() if type(p).__name__ == "DTensor")
    out = train(model, list(model.named_parameters()), _my_rows(lm_batches(), rank, world))
    out["sharded_params"] = sharded
    return out


# ---- sequence-parallel case -----------------------------------------------------------------
SP = dict(B=2, T=40, H=2, Dk=8, Dv=6, C=8)
SP_CFG = dict(bias="lp", retention="l2", momentum=True)   # the gloo run; the in-process test has more
SP_SPLITS = (16, 21)  # rank 1 starts on a chunk boundary (16), or 5 tokens into a chunk (21)
_PER_TOKEN = ("delta", "robust_delta", "gamma")


def sp_case(bias="lp", retention="l2", momentum=True, huber_mode="yaad", seed=5):
    """float64 inputs of one sequence-parallel problem (no grad) and the cotangents of its loss."""
    args, kw = make_inputs(B=SP["B"], T=SP["T"], H=SP["H"], Dk=SP["Dk"], Dv=SP["Dv"], dtype=torch.float64,
                           momentum=momentum, seed=seed, bias=bias, retention=retention, huber_mode=huber_mode)
    g = torch.Generator().manual_seed(seed + 1)
    N, H, Dk, Dv = SP["B"], SP["H"], SP["Dk"], SP["Dv"]
    cot = dict(o=torch.randn(SP["B"], SP["T"], H, Dv, generator=g, dtype=torch.float64),
               X=torch.randn(N, H, Dk, Dv, generator=g, dtype=torch.float64),
               P=torch.randn(N, H, Dk, Dv, generator=g, dtype=torch.float64))
    return args, op_kwargs(kw), cot


def segment(args, kw, a, b):
    """Tokens [a, b) of every sequence: (args, kw) with fresh leaves that require grad."""
    def cut(t):
        return t[:, a:b].detach().clone().requires_grad_() if isinstance(t, torch.Tensor) else t
    return [cut(t) for t in args], {n: (cut(x) if n in _PER_TOKEN else x) for n, x in kw.items()}


def leaves(args, kw):
    """{name: tensor} of a segment's differentiable inputs."""
    named = dict(zip(("q", "k", "v", "lr", "alpha", "momentum"), args))
    named.update({n: kw[n] for n in _PER_TOKEN if isinstance(kw.get(n), torch.Tensor)})
    return {n: t for n, t in named.items() if isinstance(t, torch.Tensor)}


def continue_from(args, kw, state, C):
    """``memory_update`` over a segment that starts from ``state`` (None: a sequence start).

    At a chunk boundary (``state.offset == 0``) this is one ``memory_update`` call. Inside a chunk
    (offset > 0), ``memory_update`` refuses the state (SPEC §7); the segment's first
    ``C - offset`` tokens are then stepped with ``memory_step`` (gradient at ``state.anchor``)
    up to the boundary and the rest is one ``memory_update`` — the chunk grid of the unsplit call
    (the README recipe). Offsets must be equal across the batch (no varlen here).
    Returns ``(o, final_state)`` with the final state's anchor and offset.
    """
    q, k, v, lr, alpha, mom = args
    T = q.shape[1]
    off = 0 if state is None else int(state.offset[0])
    n_step = min(T, (C - off) % C)
    outs = []
    for t in range(n_step):
        tok = {n: (x[:, t] if n in _PER_TOKEN and isinstance(x, torch.Tensor) else x) for n, x in kw.items()}
        o_t, state = miras.memory_step(q[:, t], k[:, t], v[:, t], lr[:, t], alpha[:, t],
                                       None if mom is None else mom[:, t], state=state, chunk_size=C, **tok)
        outs.append(o_t[:, None])
    if n_step < T:
        rest = {n: (x[:, n_step:] if n in _PER_TOKEN and isinstance(x, torch.Tensor) else x) for n, x in kw.items()}
        if state is not None:  # at a boundary now: the anchor is X itself
            state = miras.MemoryState(X=state.X, P=state.P)
        o, state = miras.memory_update(q[:, n_step:], k[:, n_step:], v[:, n_step:], lr[:, n_step:],
                                       alpha[:, n_step:], None if mom is None else mom[:, n_step:],
                                       chunk_size=C, initial_state=state, output_final_state=True, **rest)
        outs.append(o)
    return torch.cat(outs, dim=1), state


def segment_loss(o, cot, a, b, final_state=None):
    """This segment's part of ⟨o, cot_o⟩ (+ ⟨X_T, cot_X⟩ + ⟨P_T, cot_P⟩ on the last segment)."""
    loss = (o * cot["o"][:, a:b]).sum()
    if final_state is not None:
        loss = loss + (final_state.X * cot["X"]).sum()
        if final_state.P is not None:
            loss = loss + (final_state.P * cot["P"]).sum()
    return loss


def run_sp(rank, world, split) -> dict:
    """Rank r: tokens [bounds[r], bounds[r+1]); state forward along the ranks, its gradient back."""
    import torch.distributed as dist

    args, kw, cot = sp_case(**SP_CFG)
    assert world == 2, "the sequence-parallel scenario splits each sequence in two"
    bounds = [0, split, SP["T"]]
    a, b = bounds[rank], bounds[rank + 1]
    seg_args, seg_kw = segment(args, kw, a, b)
    shape = (SP["B"], SP["H"], SP["Dk"], SP["Dv"])
    mom = SP_CFG["momentum"]
    state_in, received = None, []
    if rank > 0:  # wait for rank r-1's final state: offset, X, [P], [anchor when mid-chunk]
        offset = torch.empty(SP["B"], dtype=torch.int64)
        dist.recv(offset, src=rank - 1)
        parts = ["X"] + (["P"] if mom else []) + (["anchor"] if int(offset[0]) != 0 else [])
        recv = {}
        for name in parts:
            recv[name] = torch.empty(shape, dtype=torch.float64)
            dist.recv(recv[name], src=rank - 1)
            recv[name].requires_grad_()
        received = [recv[n] for n in parts]
        state_in = miras.MemoryState(X=recv["X"], P=recv.get("P"), anchor=recv.get("anchor"), offset=offset)
    o, state = continue_from(seg_args, seg_kw, state_in, SP["C"])
    last = rank == world - 1
    loss = segment_loss(o, cot, a, b, state if last else None)
    bytes_sent = 0
    if not last:  # send the final state on, then wait for its gradient
        off0 = int(state.offset[0])
        sent = [state.X] + ([state.P] if mom else []) + ([state.anchor] if off0 != 0 else [])
        dist.send(state.offset.contiguous(), dst=rank + 1)
        for t in sent:
            dist.send(t.detach().contiguous(), dst=rank + 1)
        bytes_sent = sum(t.numel() * t.element_size() for t in sent)
        grads_in = [torch.empty(shape, dtype=torch.float64) for _ in sent]
        for gbuf in grads_in:
            dist.recv(gbuf, src=rank + 1)
        torch.autograd.backward([loss] + sent, [torch.ones_like(loss)] + grads_in)
    else:
        loss.backward()
    for t in received:  # the gradient w.r.t. the received state flows back to rank r-1
        dist.send(t.grad.contiguous(), dst=rank - 1)
    return dict(range=(a, b), o=o.detach(), bytes_sent=bytes_sent,
                grads={n: t.grad for n, t in leaves(seg_args, seg_kw).items()})


def main(out_dir: str):
    import torch.distributed as dist

    torch.set_num_threads(1)  # two ranks share the test machine's cores
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    rank, world = dist.get_rank(), dist.get_world_size()
    res, t0 = {}, time.perf_counter()
    for name, fn in (("ddp", lambda: run_ddp(rank, world)), ("fsdp", lambda: run_fsdp(rank, world)),
                     ("sp", lambda: {s: run_sp(rank, world, s) for s in SP_SPLITS})):
        res[name] = fn()
        t1 = time.perf_counter()
        print(f"rank {rank}: {name} {t1 - t0:.2f} s", flush=True)
        t0 = t1
    torch.save(res, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
