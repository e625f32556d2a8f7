"""``python -m miras demo``: train small Miras LMs on synthetic recall tasks and compare them.

Models (one :class:`miras.nn.MirasLM` each, identical sizes, steps, optimiser and learning rate):
``moneta``, ``yaad``, ``memora`` (MLP memory, paper §5), ``titans`` (Titans-style linear memory
with momentum) and the ``linear_attention`` baseline (dot-product bias, linear memory).

Tasks (built in, generated on the fly, no downloads):

- ``mqar`` — multi-query associative recall (Zoology): ``L/4`` key–value pairs, then ``L/4``
  queries ``key value`` of keys seen before, in random order; the model must predict each queried
  value (accuracy over the query values). Longer sequences hold more pairs, so they are harder.
- ``niah`` — needle in a haystack with distractor noise: a haystack of random key and value tokens
  (so the needle keys also appear unmarked, followed by wrong values) with ``needles`` marked pairs
  ``MARK key value``; at the end ``QUERY key value`` for ``queries`` of the marked keys; the model
  must predict the marked value (accuracy over the query values).

Each model is trained on a mix of the ``--seq-lens`` (one length per batch, cycling) and evaluated
on fixed held-out batches at every length. Results: a table on stdout (accuracy per model and length,
training tokens/s), ``results.json`` and (when matplotlib is importable) ``accuracy.png`` in ``--out``
(default ``demo_out/``).

The default run (5 models × 2 tasks, 2-layer models with d_model 64, 250 steps of 32 sequences at
lengths 16/32/64) took 157 s wall on a 2-core CPU (2026-11-26, with the MLP memories on the C++ op;
bench/RESULTS.md §3): on a CPU it trains two models at a time in worker processes (``--jobs``), one
thread each. On CUDA the MLP memories still run through the PyTorch reference until their CUDA kernel
lands. The flags ``--steps``, ``--seq-lens``, ``--models``, ``--tasks``, ``--d-model`` scale the run.
Every model gets the same sizes, steps, data, optimiser and learning rate.

``--models`` entries may carry layer settings (``moneta:map_schedule=chunk``, ``memora:kl_scale=4``) or
name a design-space point of the generic layer (``miras:memory=mlp:bias=lp:retention=lq``);
``--seeds N`` trains every cell with N seeds and the table shows mean ± std (``results.json`` keeps
every run under ``results`` and the aggregates under ``summary``).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import sys
import time
import warnings
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F

ALL_MODELS = ["moneta", "yaad", "memora", "titans", "linear_attention"]
ALL_TASKS = ["mqar", "niah"]
IGNORE = -100

# Default run: well under 10 minutes on a 2-core CPU (157 s measured; see README / --help).
DEFAULTS = dict(models=",".join(ALL_MODELS), tasks=",".join(ALL_TASKS), seq_lens="16,32,64", steps=250,
                batch_size=32, d_model=64, num_layers=2, num_heads=4, head_dim=None, chunk_size=16, lr=1e-3,
                eval_batches=4, eval_batch_size=64, num_keys=16, num_values=16, needles=3, queries=2, seed=0)


# =============================================================================================
# tasks
# =============================================================================================
class Vocab:
    """Token layout shared by both tasks: 0 pad, 1 MARK, 2 QUERY, keys, values."""

    def __init__(self, num_keys: int, num_values: int):
        self.pad, self.mark, self.query = 0, 1, 2
        self.key0 = 3
        self.value0 = self.key0 + num_keys
        self.num_keys, self.num_values = num_keys, num_values
        self.size = self.value0 + num_values


def _rand_keys(g: torch.Generator, B: int, n: int, num_keys: int) -> torch.Tensor:
    """B rows of n distinct key indices in [0, num_keys)."""
    return torch.argsort(torch.rand(B, num_keys, generator=g), dim=1)[:, :n]


def make_mqar(g: torch.Generator, vocab: Vocab, B: int, L: int):
    """Multi-query associative recall: ``n = L/4`` pairs ``k v``, then ``n`` queries ``k v``."""
    n = max(1, L // 4)
    if n > vocab.num_keys:
        raise ValueError(f"mqar at length {L} needs {n} distinct keys; raise --num-keys (now {vocab.num_keys})")
    keys = _rand_keys(g, B, n, vocab.num_keys)
    vals = torch.randint(0, vocab.num_values, (B, n), generator=g)
    order = torch.argsort(torch.rand(B, n, generator=g), dim=1)
    qk, qv = keys.gather(1, order), vals.gather(1, order)
    ids = torch.full((B, L), vocab.pad, dtype=torch.long)
    ctx = torch.stack([keys + vocab.key0, vals + vocab.value0], dim=2).reshape(B, 2 * n)
    qry = torch.stack([qk + vocab.key0, qv + vocab.value0], dim=2).reshape(B, 2 * n)
    seq = torch.cat([ctx, qry], dim=1)[:, :L]
    ids[:, :seq.shape[1]] = seq
    labels = torch.full((B, L), IGNORE, dtype=torch.long)
    pos = 2 * n + 2 * torch.arange(n) + 1                     # value positions of the queries
    pos = pos[pos < L]
    labels[:, pos] = ids[:, pos]
    return ids, labels


def make_niah(g: torch.Generator, vocab: Vocab, B: int, L: int, needles: int = 4, queries: int = 2):
    """Needle in a haystack with distractors: random key/value noise, ``needles`` marked triples
    ``MARK k v`` at random non-overlapping places, then ``queries`` triples ``QUERY k v``."""
    queries = min(queries, needles)
    hay = L - 3 * queries
    if hay < 3 * needles + 1:
        raise ValueError(f"niah at length {L} is too short for {needles} needles and {queries} queries")
    noise_vocab = vocab.num_keys + vocab.num_values
    ids = torch.randint(0, noise_vocab, (B, L), generator=g) + vocab.key0       # keys and values as noise
    keys = _rand_keys(g, B, needles, vocab.num_keys)
    vals = torch.randint(0, vocab.num_values, (B, needles), generator=g)
    # needle starts: choose `needles` slots among the hay positions with gaps of >= 3
    free = hay - 3 * needles
    cuts = torch.sort(torch.randint(0, free + 1, (B, needles), generator=g), dim=1).values
    starts = cuts + 3 * torch.arange(needles)
    rows = torch.arange(B)[:, None]
    ids[rows, starts] = vocab.mark
    ids[rows, starts + 1] = keys + vocab.key0
    ids[rows, starts + 2] = vals + vocab.value0
    pick = torch.argsort(torch.rand(B, needles, generator=g), dim=1)[:, :queries]
    labels = torch.full((B, L), IGNORE, dtype=torch.long)
    for j in range(queries):
        s = hay + 3 * j
        ids[:, s] = vocab.query
        ids[:, s + 1] = keys.gather(1, pick[:, j:j + 1])[:, 0] + vocab.key0
        ids[:, s + 2] = vals.gather(1, pick[:, j:j + 1])[:, 0] + vocab.value0
        labels[:, s + 2] = ids[:, s + 2]
    return ids, labels


def make_batch(task: str, g, vocab: Vocab, B: int, L: int, cfg):
    if task == "mqar":
        return make_mqar(g, vocab, B, L)
    if task == "niah":
        return make_niah(g, vocab, B, L, cfg.needles, cfg.queries)
    raise ValueError(f"unknown task {task!r}; choose from {ALL_TASKS}")


# =============================================================================================
# training / evaluation
# =============================================================================================
class Progress:
    """Progress of every running job on one stderr line (no tqdm needed): ``update(job, text)``.

    On a terminal the line is redrawn in place (at most 5 times a second); otherwise (CI logs) one
    line is printed every 15 seconds and when a job ends."""

    def __init__(self, total_jobs: int, enabled: bool = True):
        self.enabled = enabled
        self.total = total_jobs
        self.done = 0
        self.status: Dict[str, str] = {}
        self.t0 = time.time()
        self.tty = sys.stderr.isatty()
        self.last = 0.0

    def update(self, job: str, text: Optional[str], force: bool = False):
        """``text`` None: the job finished."""
        now = time.time()
        if text is None:
            self.status.pop(job, None)
            self.done += 1
            if self.enabled and not self.tty:
                sys.stderr.write(f"[{self.done}/{self.total} done, {now - self.t0:4.0f}s] finished {job}\n")
                sys.stderr.flush()
                return
            force = True
        else:
            self.status[job] = text
        if not self.enabled or (not force and now - self.last < (0.2 if self.tty else 15.0)):
            return
        self.last = now
        line = f"[{self.done}/{self.total} done, {now - self.t0:4.0f}s] " + " | ".join(
            f"{j} {t}" for j, t in self.status.items())
        if self.tty:
            width = shutil.get_terminal_size((120, 20)).columns - 1
            sys.stderr.write("\r" + line[:width].ljust(width))
        else:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()

    def close(self):
        if self.enabled and self.tty:
            sys.stderr.write("\n")
            sys.stderr.flush()


def _loss(model, ids, labels):
    logits = model(ids)
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1),
                           ignore_index=IGNORE)


@torch.no_grad()
def evaluate(model, batches) -> float:
    model.eval()
    correct = total = 0
    for ids, labels in batches:
        logits = model(ids)
        pred = logits[:, :-1].argmax(-1)
        tgt = labels[:, 1:]
        mask = tgt != IGNORE
        correct += int((pred[mask] == tgt[mask]).sum())
        total += int(mask.sum())
    model.train()
    return correct / max(total, 1)


def _value(text: str):
    """A design-space value: int, float, true/false, or the string itself."""
    for conv in (int, float):
        try:
            return conv(text)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(text.lower(), text)


def parse_model(spec: str):
    """``name`` or ``name:key=value:key=value`` → (mixer name, keyword arguments of the mixer).

    ``moneta:map_schedule=chunk``, ``memora:kl_scale=4:chunk_size=4``, or a design-space point of the
    generic layer, ``miras:memory=mlp:bias=lp:retention=lq:momentum=true``. The keywords are those of
    :class:`miras.nn.MirasLayer` and its presets (``chunk_size`` included, which overrides
    ``--chunk-size``)."""
    name, *items = spec.strip().split(":")
    if name not in ALL_MODELS + ["miras"]:
        raise ValueError(f"unknown model {name!r} in {spec!r}; choose from {ALL_MODELS} or 'miras' (the generic "
                         f"layer), optionally followed by :key=value settings")
    kw = {}
    for item in items:
        key, eq, val = item.partition("=")
        if not eq or not key:
            raise ValueError(f"model {spec!r}: settings are key=value (separated by ':'), got {item!r}")
        kw[key.strip()] = _value(val.strip())
    return name, kw


def build_model(name: str, vocab: Vocab, cfg, device):
    from .nn import MirasLM

    mixer, kw = parse_model(name)
    kw.setdefault("chunk_size", cfg.chunk_size)
    return MirasLM(vocab.size, hidden_size=cfg.d_model, num_layers=cfg.num_layers, num_heads=cfg.num_heads,
                   head_dim=cfg.head_dim, mixer=mixer, **kw).to(device)


def eval_sets_for(task: str, vocab: Vocab, seq_lens: List[int], cfg):
    """Held-out batches per length, from their own seed: the same for every model."""
    ge = torch.Generator().manual_seed(cfg.seed + 12345)
    return {L: [make_batch(task, ge, vocab, cfg.eval_batch_size, L, cfg) for _ in range(cfg.eval_batches)]
            for L in seq_lens}


def run_one(name: str, task: str, vocab: Vocab, seq_lens: List[int], cfg, device, report=None) -> Dict:
    """Train one model on one task, evaluate it at every length. ``report(text)`` gets progress."""
    torch.manual_seed(cfg.seed)                      # the same init stream and data for every model
    model = build_model(name, vocab, cfg, device)
    n_params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.98), weight_decay=0.1)
    warm = max(1, cfg.steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / max(cfg.steps, 1)))))
    g = torch.Generator().manual_seed(cfg.seed + 1)
    tokens, t_train, losses = 0, 0.0, []
    for step in range(cfg.steps):
        L = seq_lens[step % len(seq_lens)]
        ids, labels = make_batch(task, g, vocab, cfg.batch_size, L, cfg)
        ids, labels = ids.to(device), labels.to(device)
        t0 = time.perf_counter()
        loss = _loss(model, ids, labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        t_train += time.perf_counter() - t0
        tokens += ids.numel()
        losses.append(loss.item())
        if report is not None:
            recent = losses[-10:]
            report(f"{step + 1}/{cfg.steps} loss {sum(recent) / len(recent):.2f}")
    if report is not None:
        report("eval")
    eval_sets = eval_sets_for(task, vocab, seq_lens, cfg)
    t0 = time.perf_counter()
    acc = {L: evaluate(model, [(i.to(device), l.to(device)) for i, l in eval_sets[L]]) for L in seq_lens}
    t_eval = time.perf_counter() - t0
    recent = losses[-10:] or [float("nan")]
    return dict(model=name, task=task, seed=cfg.seed, params=n_params, accuracy={str(L): a for L, a in acc.items()},
                train_tokens_per_s=tokens / max(t_train, 1e-9), train_seconds=t_train, eval_seconds=t_eval,
                final_loss=sum(recent) / len(recent))


# ---- running the jobs: in this process, or in worker processes on a multi-core CPU -------------
_WORKER_QUEUE = None


def _worker_init(queue, threads: int):
    global _WORKER_QUEUE
    _WORKER_QUEUE = queue
    torch.set_num_threads(threads)
    warnings.filterwarnings("ignore", message=r"miras: memory='mlp' has no fused CUDA kernel")
    warnings.filterwarnings("ignore", message=r"miras: map_schedule='chunk'")


def _worker_job(name, task, vocab, seq_lens, cfg, device_str):
    job = _job_name(name, task, cfg)
    report = (lambda text: _WORKER_QUEUE.put((job, text))) if _WORKER_QUEUE is not None else None
    return run_one(name, task, vocab, seq_lens, cfg, torch.device(device_str), report)


def _job_name(name, task, cfg):
    return f"{name}|{task}|s{cfg.seed}"


def _cost_rank(name: str) -> int:
    """Slowest first, so that parallel workers finish together (MLP memories with scans are slowest)."""
    return {"moneta": 0, "memora": 1, "yaad": 2}.get(name.split(":")[0], 3)


def run_jobs(jobs_list, vocab, seq_lens, cfg, device, n_jobs: int, progress: Progress) -> List[Dict]:
    """``jobs_list``: (model, task, cfg) triples (the cfg carries the job's seed)."""
    if n_jobs <= 1:
        out = []
        for name, task, jcfg in jobs_list:
            job = _job_name(name, task, jcfg)
            out.append(run_one(name, task, vocab, seq_lens, jcfg, device, lambda t, job=job: progress.update(job, t)))
            progress.update(job, None)
        return out
    import concurrent.futures as cf
    import multiprocessing as mp
    import queue as queue_mod

    # fork: workers inherit the imported package (no re-import; the parent has run no torch kernels
    # yet, so no OpenMP pool is forked). Elsewhere spawn.
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    q = ctx.Queue()
    threads = max(1, (os.cpu_count() or 1) // n_jobs)
    order = sorted(range(len(jobs_list)), key=lambda i: _cost_rank(jobs_list[i][0]))
    results: Dict[int, Dict] = {}
    finished = set()
    with cf.ProcessPoolExecutor(max_workers=n_jobs, mp_context=ctx, initializer=_worker_init,
                                initargs=(q, threads)) as ex:
        futs = {ex.submit(_worker_job, jobs_list[i][0], jobs_list[i][1], vocab, seq_lens, jobs_list[i][2],
                          str(device)): i for i in order}
        pending = set(futs)
        while pending:
            done, pending = cf.wait(pending, timeout=0.2, return_when=cf.FIRST_COMPLETED)
            while True:
                try:
                    job, text = q.get_nowait()
                except queue_mod.Empty:
                    break
                if job not in finished:             # a late message of a finished job is dropped
                    progress.update(job, text)
            for f in done:
                i = futs[f]
                results[i] = f.result()
                finished.add(_job_name(*jobs_list[i]))
                progress.update(_job_name(*jobs_list[i]), None)
    return [results[i] for i in range(len(jobs_list))]


# =============================================================================================
# report
# =============================================================================================
def summarize(results: List[Dict]) -> List[Dict]:
    """One row per (task, model): accuracy mean and standard deviation over the seeds (sample std,
    0 for one seed), mean tokens/s and final loss."""
    groups: Dict = {}
    for r in results:
        groups.setdefault((r["task"], r["model"]), []).append(r)
    out = []
    for (task, model), rs in groups.items():
        def stats(xs):
            m = sum(xs) / len(xs)
            sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0
            return m, sd
        acc = {L: stats([r["accuracy"][L] for r in rs]) for L in rs[0]["accuracy"]}
        out.append(dict(task=task, model=model, seeds=[r.get("seed") for r in rs],
                        accuracy={L: m for L, (m, _) in acc.items()}, accuracy_std={L: sd for L, (_, sd) in acc.items()},
                        train_tokens_per_s=stats([r["train_tokens_per_s"] for r in rs])[0],
                        final_loss=stats([r["final_loss"] for r in rs])[0]))
    return out


def format_table(results: List[Dict], seq_lens: List[int]) -> str:
    """Accuracy per model and length (mean ± std over the seeds when there are several)."""
    rows_all = summarize(results)
    multi = any(len(r["seeds"]) > 1 for r in rows_all)
    w = 14 if multi else 8
    name_w = max([22] + [len(r["model"]) + 2 for r in rows_all])
    lines = []
    for task in dict.fromkeys(r["task"] for r in rows_all):
        rows = [r for r in rows_all if r["task"] == task]
        seeds = f" (mean ± std over {len(rows[0]['seeds'])} seeds)" if multi else ""
        head = (f"{'task ' + task:<{name_w}}" + "".join(f"{'L=' + str(L):>{w}}" for L in seq_lens)
                + f"{'tok/s':>10}{'loss':>8}")
        lines.append(head + seeds)
        lines.append("-" * len(head))
        for r in rows:
            cells = "".join((f"{r['accuracy'][str(L)]:.3f} ± {r['accuracy_std'][str(L)]:.3f}" if multi
                             else f"{r['accuracy'][str(L)]:.3f}").rjust(w) for L in seq_lens)
            lines.append(f"{r['model']:<{name_w}}" + cells + f"{r['train_tokens_per_s']:>10.0f}{r['final_loss']:>8.3f}")
        lines.append("")
    return "\n".join(lines)


def plot(results: List[Dict], seq_lens: List[int], path: str) -> Optional[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:
        return None
    tasks = list(dict.fromkeys(r["task"] for r in results))
    fig, axes = plt.subplots(1, len(tasks), figsize=(5 * len(tasks), 3.8), squeeze=False)
    rows = summarize(results)
    for ax, task in zip(axes[0], tasks):
        for r in (r for r in rows if r["task"] == task):
            ax.plot(seq_lens, [r["accuracy"][str(L)] for L in seq_lens], marker="o", label=r["model"])
        ax.set_xscale("log", base=2)
        ax.set_xticks(seq_lens)
        ax.set_xticklabels([str(L) for L in seq_lens])
        ax.set_ylim(-0.02, 1.02)
        ax.set_xlabel("sequence length")
        ax.set_ylabel("accuracy")
        ax.set_title(task)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# =============================================================================================
# entry point
# =============================================================================================
def _ints(s: str) -> List[int]:
    return [int(x) for x in s.split(",") if x.strip()]


def parser() -> argparse.ArgumentParser:
    d = DEFAULTS
    p = argparse.ArgumentParser(
        prog="python -m miras demo",
        description="Train small Miras LMs (Moneta, Yaad, Memora, Titans-style, linear attention) on synthetic "
                    "recall tasks (MQAR, needle in a haystack) and report accuracy per sequence length.")
    p.add_argument("--models", default=d["models"],
                   help=f"comma list from {ALL_MODELS} (default: all), each optionally with settings of the layer, "
                        f"e.g. moneta:map_schedule=chunk, memora:kl_scale=4:chunk_size=4, or a design-space point "
                        f"of the generic layer, miras:memory=mlp:bias=lp:retention=lq")
    p.add_argument("--tasks", default=d["tasks"], help=f"comma list from {ALL_TASKS} (default: all)")
    p.add_argument("--seq-lens", default=d["seq_lens"], help="training/evaluation lengths (default %(default)s)")
    p.add_argument("--steps", type=int, default=d["steps"], help="training steps per model and task (%(default)s)")
    p.add_argument("--batch-size", type=int, default=d["batch_size"])
    p.add_argument("--d-model", type=int, default=d["d_model"])
    p.add_argument("--num-layers", type=int, default=d["num_layers"])
    p.add_argument("--num-heads", type=int, default=d["num_heads"])
    p.add_argument("--head-dim", type=int, default=d["head_dim"], help="default d_model / num_heads")
    p.add_argument("--chunk-size", type=int, default=d["chunk_size"])
    p.add_argument("--lr", type=float, default=d["lr"], help="AdamW learning rate, the same for every model")
    p.add_argument("--eval-batches", type=int, default=d["eval_batches"])
    p.add_argument("--eval-batch-size", type=int, default=d["eval_batch_size"])
    p.add_argument("--num-keys", type=int, default=d["num_keys"])
    p.add_argument("--num-values", type=int, default=d["num_values"])
    p.add_argument("--needles", type=int, default=d["needles"], help="niah: marked pairs per sequence")
    p.add_argument("--queries", type=int, default=d["queries"], help="niah: queried needles per sequence")
    p.add_argument("--seed", type=int, default=d["seed"])
    p.add_argument("--seeds", type=int, default=1,
                   help="train every cell with seeds seed, seed+1, ...; the table shows mean ± std (default 1)")
    p.add_argument("--device", default="auto", help="auto (cuda when present), cpu, cuda, cuda:1, ...")
    p.add_argument("--jobs", type=int, default=None,
                   help="models trained in parallel worker processes (default: 2 on a CPU with >= 2 cores, "
                        "1 on a GPU); each worker uses cores/jobs threads")
    p.add_argument("--out", default="demo_out", help="output folder for results.json and accuracy.png")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def main(argv: Optional[List[str]] = None) -> Dict:
    cfg = parser().parse_args(argv)
    models = [m.strip() for m in cfg.models.split(",") if m.strip()]
    tasks = [t.strip() for t in cfg.tasks.split(",") if t.strip()]
    seq_lens = _ints(cfg.seq_lens)
    if cfg.seeds < 1:
        raise SystemExit("--seeds must be >= 1")
    vocab = Vocab(cfg.num_keys, cfg.num_values)
    for m in models:                # fail early on a bad model or setting (on the meta device: no compute)
        try:
            with torch.device("meta"):
                build_model(m, vocab, cfg, torch.device("meta"))
        except (ValueError, TypeError) as exc:
            raise SystemExit(f"--models {m}: {exc}")
    for t in tasks:
        if t not in ALL_TASKS:
            raise SystemExit(f"unknown task {t!r}; choose from {ALL_TASKS}")
    if not seq_lens or cfg.steps < 0:
        raise SystemExit("need at least one sequence length and steps >= 0")
    if cfg.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(cfg.device)
    warnings.filterwarnings("ignore", message=r"miras: memory='mlp' has no fused CUDA kernel")
    warnings.filterwarnings("ignore", message=r"miras: map_schedule='chunk'")
    for task in tasks:                                   # fail early on impossible task sizes
        for L in seq_lens:
            make_batch(task, torch.Generator().manual_seed(0), vocab, 1, L, cfg)
    jobs_list = [(name, task, argparse.Namespace(**{**vars(cfg), "seed": cfg.seed + i}))
                 for task in tasks for name in models for i in range(cfg.seeds)]
    n_jobs = cfg.jobs
    if n_jobs is None:
        n_jobs = min(2, os.cpu_count() or 1) if device.type == "cpu" else 1
    n_jobs = max(1, min(n_jobs, len(jobs_list)))
    t_start = time.time()
    print(f"miras demo: models={models} tasks={tasks} seq_lens={seq_lens} steps={cfg.steps} "
          f"batch={cfg.batch_size} d_model={cfg.d_model} layers={cfg.num_layers} heads={cfg.num_heads} "
          f"chunk={cfg.chunk_size} lr={cfg.lr} seeds={cfg.seeds} device={device} jobs={n_jobs}", flush=True)
    progress = Progress(len(jobs_list), not cfg.quiet)
    results = run_jobs(jobs_list, vocab, seq_lens, cfg, device, n_jobs, progress)
    progress.close()
    wall = time.time() - t_start
    table = format_table(results, seq_lens)
    print()
    print(table)
    print(f"wall time {wall:.0f}s")
    os.makedirs(cfg.out, exist_ok=True)
    out = dict(config={k: v for k, v in vars(cfg).items()}, device=str(device), seq_lens=seq_lens,
               wall_seconds=wall, torch=torch.__version__, python=platform.python_version(),
               results=results, summary=summarize(results))
    with open(os.path.join(cfg.out, "results.json"), "w") as f:
        json.dump(out, f, indent=2)
    print(f"results: {os.path.join(cfg.out, 'results.json')}")
    if not cfg.no_plot:
        png = plot(results, seq_lens, os.path.join(cfg.out, "accuracy.png"))
        if png:
            print(f"plot: {png}")
            out["plot"] = png
        else:
            print("plot skipped: matplotlib is not installed (pip install matplotlib)")
    return out


if __name__ == "__main__":
    main()
