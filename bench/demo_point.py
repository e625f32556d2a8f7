"""One demo cell with one mixer keyword changed: the harness of bench/RESULTS.md §3 ("map_schedule").

    .venv/bin/python bench/demo_point.py MODEL TASK SEED [key=value,key=value]
    .venv/bin/python bench/demo_point.py memora mqar 0 map_schedule=chunk
    .venv/bin/python bench/demo_point.py moneta mqar 1 q_norm=2.0,chunk_size=4,_steps=250

Runs ``miras.demo.run_one`` with the demo's defaults (d_model 64, 2 layers, 4 heads, chunk 16, 250
steps, lengths 16/32/64, one thread) and the given keywords passed to the mixer (``chunk_size`` to
the model, ``_steps`` to the training loop); prints one JSON line (accuracy per length, final loss,
seconds). Until ``python -m miras demo --models`` accepts design-space points (issue 14), this is
how single ablation cells are run.
"""
import os
import sys

# bench/ holds a profile.py of ours; keep it from shadowing the standard library's (torch imports cProfile)
sys.path = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]
import json, time, torch, warnings
warnings.filterwarnings("ignore")
from types import SimpleNamespace
import miras.demo as D
from miras.nn import MirasLM
name, task, seed = sys.argv[1], sys.argv[2], int(sys.argv[3])
def _val(x):
    for f in (int, float):
        try:
            return f(x)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(x, x)
extra = dict((kv.split("=")[0], _val(kv.split("=")[1])) for kv in sys.argv[4].split(",") if kv) if len(sys.argv) > 4 else {}
steps = int(extra.pop("_steps", 250))
cfg = SimpleNamespace(**dict(D.DEFAULTS, seed=seed, steps=steps))
cs = extra.pop("chunk_size", cfg.chunk_size)
cfg.chunk_size = cs
def build_model(n, vocab, cfg, device):
    return MirasLM(vocab.size, hidden_size=cfg.d_model, num_layers=cfg.num_layers, num_heads=cfg.num_heads,
                   head_dim=cfg.head_dim, mixer=n, chunk_size=cfg.chunk_size, **extra).to(device)
D.build_model = build_model
torch.set_num_threads(1)
vocab = D.Vocab(cfg.num_keys, cfg.num_values)
t = time.time()
r = D.run_one(name, task, vocab, [16, 32, 64], cfg, torch.device("cpu"))
print(json.dumps(dict(name=name, task=task, seed=seed, extra=sys.argv[4] if len(sys.argv) > 4 else "", acc=r["accuracy"], loss=r["final_loss"], secs=round(time.time() - t))))
