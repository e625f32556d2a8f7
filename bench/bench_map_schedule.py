"""map_schedule="chunk" vs "token" on the CPU (SPEC §5b): median of 8 timed calls after one warm-up,
the issue's shape (B=2, T=1024, H=4, D=64, float32, lp bias, chunk 64), torch's default threads.

    .venv/bin/python bench/bench_map_schedule.py

With retention l2 both schedules run the C++ op (one computation); kl and lq in the chunk schedule
run the C++ op's dual form from phi(X) per chunk (target: within 1.5x of the l2 row); elastic_net's
chunk schedule runs through the PyTorch reference (miras.reference; a per-token Python scan).
"""
import time, torch, warnings, statistics
warnings.filterwarnings("ignore")
import miras
torch.manual_seed(0)
B,T,H,D=2,1024,4,64
q=torch.randn(B,T,H,D); k=torch.nn.functional.normalize(torch.randn(B,T,H,D),dim=-1); v=torch.randn(B,T,H,D)
lr=torch.rand(B,T,H)*0.05; al=0.9+0.1*torch.rand(B,T,H)
def run(ret, sched, bwd):
    ts=[]
    for i in range(9):
        xs=[t.clone().requires_grad_(bwd) for t in (q,k,v,lr,al)]
        t0=time.perf_counter()
        o,_=miras.memory_update(*xs, bias="lp", retention=ret, chunk_size=64, map_schedule=sched, gamma=1e-3)
        if bwd: o.sum().backward()
        ts.append(time.perf_counter()-t0)
    return statistics.median(ts[1:])*1e3
print(f"threads {torch.get_num_threads()}")
print("| retention | schedule | fwd ms | fwd+bwd ms |")
for ret, sched in [("l2","token"),("l2","chunk"),("kl","token"),("kl","chunk"),("lq","token"),("lq","chunk"),("elastic_net","token"),("elastic_net","chunk")]:
    print(f"| {ret} | {sched} | {run(ret,sched,False):.1f} | {run(ret,sched,True):.1f} |")
