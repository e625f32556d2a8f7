"""Experiment (not a product option yet): one demo cell with the lq read map replaced by the mirror map
of an lq regulariser, W = sign(A)|A|^(q-1) / ||A||_q^(q-2) (degree 1 in A), instead of Eq. 24's
A / ||A||_q^(q-2) (degree 3 - q). Patches miras.reference._phi and the layers' initial-state inverse
in-process, so it only acts where the reference runs: use map_schedule=chunk with the MLP memory
(Moneta), which the torch ops route to miras.reference.

    .venv/bin/python bench/exp_lq_mirror.py moneta mqar SEED map_schedule=chunk

Arguments as bench/demo_point.py. bench/RESULTS.md §3 has the 5-seed table.
"""
import os
import sys

sys.path = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]
import runpy  # noqa: E402

import torch  # noqa: E402
import miras.nn.layers as L  # noqa: E402
import miras.reference as R  # noqa: E402

_orig = R._phi
def phi(X, cfg):
    if cfg.retention == "lq":
        q = cfg.q_norm
        n = X.abs().pow(q).sum((-2, -1), keepdim=True).clamp_min(cfg.eps_q ** q).pow(1.0 / q)
        return torch.sign(X) * X.abs().pow(q - 1) / n.pow(q - 2)
    return _orig(X, cfg)
R._phi = phi
_raw = L.MirasLayer._raw_from_weights
def raw(self, W):
    if self.retention == "lq":
        q = float(self.op_kwargs.get("q_norm", 4.0))
        A0 = torch.sign(W) * W.abs().pow(1.0 / (q - 1))
        n0 = A0.abs().pow(q).sum((-2, -1), keepdim=True).pow(1.0 / q)
        return A0 * n0.pow(q - 2)
    return _raw(self, W)
L.MirasLayer._raw_from_weights = raw
sys.argv = ["demo_point.py"] + sys.argv[1:]
runpy.run_path(os.path.join(os.path.dirname(os.path.abspath(__file__)), "demo_point.py"), run_name="__main__")
