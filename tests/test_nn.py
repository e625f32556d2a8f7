"""miras.nn: layer shapes, gradients to every parameter, cached decoding == full forward (every
preset), varlen (no leaks across packed segments, conv included), MirasLM forward/generate."""
from __future__ import annotations

import math
import warnings

import pytest
import torch

miras = pytest.importorskip("miras")
from miras import reference as R  # noqa: E402
from miras.nn import (MIXERS, LinearAttention, Memora, MirasLayer, MirasLM, Moneta, ShortConvolution,  # noqa: E402
                      TitansLinear, Yaad, make_mixer)

PRESETS = ["moneta", "yaad", "memora", "titans", "linear_attention"]
F64 = torch.float64


@pytest.fixture(autouse=True)
def _mlp_runs_the_cpu_op():
    """memory='mlp' on CPU tensors runs the C++ op: no reference-fallback warning may appear."""
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=r"miras: memory='mlp' has no fused")
        yield


def _layer(name, D=16, H=2, Dk=4, chunk=3, seed=0, dtype=F64, **kw):
    torch.manual_seed(seed)
    m = make_mixer(name, D, H, Dk, chunk_size=chunk, **kw).to(dtype)
    # make the gates data-dependent enough that a mistake in their per-token plumbing shows
    with torch.no_grad():
        m.gate_up.weight.normal_(0, 0.5)
    return m


def _x(B, T, D, seed=1, dtype=F64):
    return torch.randn(B, T, D, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _maxerr(a, b):
    return float((a - b).detach().abs().max())


def _relmax(a, b):
    """max |a - b| relative to the scale max |b| of the values."""
    return _maxerr(a, b) / max(float(b.detach().abs().max()), 1e-300)


# ---- presets are the paper's points of the design space ----------------------------------------
def test_presets_configuration():
    cases = {
        "moneta": ("mlp", "lp", "lq", False),
        "yaad": ("mlp", "huber", "l2", False),
        "memora": ("mlp", "l2", "kl", False),
        "titans": ("linear", "l2", "l2", True),
        "linear_attention": ("linear", "dot", "l2", False),
    }
    for name, (mem, bias, ret, mom) in cases.items():
        m = make_mixer(name, 16, 2, 4)
        assert (m.memory, m.bias, m.retention, m.use_momentum) == (mem, bias, ret, mom), name
    assert isinstance(make_mixer("moneta", 16, 2), Moneta) and MIXERS["yaad"] is Yaad
    assert Moneta(16, 2).op_kwargs == {"p": 3.0, "q_norm": 4.0}
    assert Memora(16, 2, memory="linear").memory == "linear"      # the memory axis stays open
    with pytest.raises(ValueError):
        make_mixer("nope", 16, 2)
    with pytest.raises(ValueError):
        MirasLayer(16, 2, memory="conv")
    with pytest.raises(ValueError):
        Yaad(16, 2, delta=1.0)                                       # δ is a learned gate


# ---- shapes and gradients ------------------------------------------------------------------------
@pytest.mark.parametrize("name", PRESETS)
def test_shapes_and_gradients_reach_every_parameter(name):
    m = _layer(name, dtype=torch.float32)
    x = _x(2, 7, 16, dtype=torch.float32).requires_grad_(True)
    y, cache = m(x)
    assert y.shape == (2, 7, 16) and y.dtype == torch.float32 and cache is None
    assert torch.isfinite(y).all()
    (y * _x(2, 7, 16, seed=5, dtype=torch.float32)).sum().backward()
    missing = [n for n, p in m.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()
               or float(p.grad.abs().sum()) == 0.0]
    assert not missing, f"{name}: no (finite, nonzero) gradient for {missing}"
    assert x.grad is not None and float(x.grad.abs().sum()) > 0


def test_gates_stay_in_their_ranges():
    m = MirasLayer(16, 2, 4, memory="linear", bias="huber", momentum=True, lr_max=0.5).double()
    with torch.no_grad():
        m.gate_up.bias.mul_(50.0)                  # saturate the sigmoids both ways
        m.gate_up.weight.normal_(0, 20.0)
    g = m._gates(_x(2, 9, 16) * 10)
    assert set(g) == {"lr", "alpha", "momentum", "delta"}
    assert (g["lr"] >= 0).all() and (g["lr"] <= 0.5).all()
    assert (g["alpha"] > 0).all() and (g["alpha"] <= 1).all()
    assert (g["momentum"] >= 0).all() and (g["momentum"] < 1).all()
    assert (g["delta"] > 0).all()
    y, _ = m(_x(2, 9, 16))                          # the op's range checks pass
    assert torch.isfinite(y).all()


@pytest.mark.parametrize("retention", ["l2", "kl", "lq", "elastic_net"])
def test_mlp_initial_memory_reads_at_fan_in_scale(retention):
    m = MirasLayer(32, 2, 8, memory="mlp", retention=retention)
    st = m.initial_state(3)
    W1, W2 = st.X
    assert W1.shape == (3, 2, 8, 32) and W2.shape == (3, 2, 32, 8)
    cfg = R._Cfg("mlp", "l2", retention, 3.0, 1e-6, "yaad", 1.0, 4.0, 1e-6, None, None)
    R1 = R._phi(m.mem_W1.detach().double(), cfg)
    R2 = R._phi(m.mem_W2.detach().double(), cfg)
    if retention in ("l2", "elastic_net", "lq"):    # φ(raw) is the intended read weight
        assert 0.5 < float(R1.std()) < 2.0
        assert 0.5 / math.sqrt(32) < float(R2.std()) < 2.0 / math.sqrt(32)
    else:                                            # KL: softmax columns, not uniform
        assert torch.allclose(R1.sum(-2), torch.ones_like(R1.sum(-2)))
        assert float(R1.std()) > 0.2 / 8


# ---- cached decoding reproduces the full forward ----------------------------------------------------
@pytest.mark.parametrize("name", PRESETS)
def test_decoding_with_cache_equals_full_forward(name):
    m = _layer(name, chunk=3)
    T = 8
    x = _x(2, T, 16)
    with torch.no_grad():
        y_full, c_full = m(x, use_cache=True)
        # token by token from an empty cache
        cache, outs = None, []
        for t in range(T):
            y_t, cache = m(x[:, t:t + 1], cache=cache, use_cache=True)
            outs.append(y_t)
        y_steps = torch.cat(outs, 1)
        # prefill 4 (mid-chunk), 3 tokens at once (steps to the boundary, then chunked), 1 step
        y1, c1 = m(x[:, :4], use_cache=True)
        y2, c2 = m(x[:, 4:7], cache=c1)
        y3, c3 = m(x[:, 7:], cache=c2)
    assert _maxerr(y_steps, y_full) < 1e-10
    assert _maxerr(torch.cat([y1, y2, y3], 1), y_full) < 1e-10
    for c in (cache, c3):
        assert int(c.memory.offset[0]) == T % 3
        # conv caches q/k/v projections: torch's BLAS (nn.Linear) runs [2, 1|3|4, 16] vs [2, 8, 16]: not bitwise
        assert _relmax(c.conv, c_full.conv) < 1e-12
        Xa = c.memory.X if isinstance(c.memory.X, tuple) else (c.memory.X,)
        Xb = c_full.memory.X if isinstance(c_full.memory.X, tuple) else (c_full.memory.X,)
        for a, b in zip(Xa, Xb):
            assert _maxerr(a, b) < 1e-10


def test_decoding_float32_close():
    m = _layer("titans", chunk=4, dtype=torch.float32)
    x = _x(2, 9, 16, dtype=torch.float32)
    with torch.no_grad():
        y_full, _ = m(x)
        y1, c = m(x[:, :5], use_cache=True)
        outs = [y1]
        for t in range(5, 9):
            y_t, c = m(x[:, t:t + 1], cache=c)
            outs.append(y_t)
    assert _maxerr(torch.cat(outs, 1), y_full) < 1e-5


# ---- varlen ---------------------------------------------------------------------------------------
def test_short_conv_resets_at_segment_starts():
    conv = ShortConvolution(6, 4).double()
    lens = [3, 1, 6, 2]
    xs = [_x(1, L, 6, seed=10 + i) for i, L in enumerate(lens)]
    cu = torch.tensor([0, 3, 4, 10, 12])
    y, st = conv(torch.cat(xs, 1), cu_seqlens=cu, output_state=True)
    ref = [conv(x, output_state=True) for x in xs]
    assert _maxerr(y, torch.cat([r[0] for r in ref], 1)) < 1e-14
    assert _maxerr(st, torch.cat([r[1] for r in ref], 0)) < 1e-14
    # a segment's first outputs do not depend on the previous segment at all
    x = torch.cat(xs, 1).requires_grad_(True)
    y, _ = conv(x, cu_seqlens=cu)
    y[0, 4].sum().backward()                                     # first token of segment 3
    assert float(x.grad[0, :4].abs().sum()) == 0.0


@pytest.mark.parametrize("name", ["yaad", "titans"])
def test_varlen_equals_separate_sequences_and_decodes_as_batch(name):
    m = _layer(name, chunk=3)
    lens = [5, 1, 7]
    xs = [_x(1, L, 16, seed=20 + i) for i, L in enumerate(lens)]
    cu = torch.tensor([0, 5, 6, 13], dtype=torch.int32)
    with torch.no_grad():
        y, cache = m(torch.cat(xs, 1), cu_seqlens=cu, use_cache=True)
        ref = [m(x)[0] for x in xs]
        assert _maxerr(y, torch.cat(ref, 1)) < 1e-12
        # the packed prefill's per-sequence states continue as a decoding batch of 3
        nxt = _x(3, 1, 16, seed=30)
        y_next, _ = m(nxt, cache=cache)
        expect = torch.cat([m(torch.cat([xs[i], nxt[i:i + 1]], 1))[0][:, -1:] for i in range(3)], 0)
    assert _maxerr(y_next, expect) < 1e-12
    with pytest.raises(NotImplementedError):
        m(torch.cat(xs, 1), cache=cache, cu_seqlens=cu)


# ---- the generic layer: other corners of the design space run -------------------------------------
@pytest.mark.parametrize("kw", [
    dict(memory="linear", bias="huber", retention="kl", momentum=True),
    dict(memory="linear", bias="robust", retention="elastic_net", gamma=1e-3, robust_delta=0.5),
    dict(memory="mlp", bias="l2", retention="l2", momentum=True),
])
def test_generic_layer_variants(kw):
    torch.manual_seed(0)
    m = MirasLayer(16, 2, 4, chunk_size=4, **kw).double()
    x = _x(1, 6, 16)
    y, c = m(x, use_cache=True)
    y.sum().backward()
    assert torch.isfinite(y).all() and all(p.grad is not None for p in m.parameters())
    with torch.no_grad():
        y1, c1 = m(x[:, :3], use_cache=True)
        y2, _ = m(x[:, 3:], cache=c1)
    assert _maxerr(torch.cat([y1, y2], 1), y) < 1e-10


# ---- the LM -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("mixer", ["linear_attention", "yaad"])
def test_lm_forward_and_greedy_generate(mixer):
    torch.manual_seed(0)
    lm = MirasLM(50, hidden_size=16, num_layers=2, num_heads=2, mixer=mixer, chunk_size=3).double()
    ids = torch.randint(0, 50, (2, 5), generator=torch.Generator().manual_seed(3))
    logits = lm(ids)
    assert logits.shape == (2, 5, 50)
    loss = lm.loss(ids)
    loss.backward()
    assert all(p.grad is not None for p in lm.parameters())
    assert lm.lm_head.weight is lm.embed.weight                   # tied by default
    out = lm.generate(ids, max_new_tokens=4)
    assert out.shape == (2, 9) and torch.equal(out[:, :5], ids)
    # greedy decoding with the cache == re-running the full forward for every new token
    ref = ids
    with torch.no_grad():
        for _ in range(4):
            ref = torch.cat([ref, lm(ref)[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(out, ref)
    # sampling runs and keeps the prompt
    s = lm.generate(ids, 3, temperature=1.0, top_k=5, generator=torch.Generator().manual_seed(0))
    assert s.shape == (2, 8) and torch.equal(s[:, :5], ids)


def test_lm_untied_and_cache_api():
    torch.manual_seed(0)
    lm = MirasLM(30, hidden_size=16, num_layers=1, num_heads=2, mixer="titans", tie_embeddings=False,
                 chunk_size=4)
    assert lm.lm_head.weight is not lm.embed.weight
    ids = torch.randint(0, 30, (1, 6))
    logits, cache = lm(ids, use_cache=True)
    assert len(cache) == 1 and logits.shape == (1, 6, 30)
    l2, cache = lm(ids[:, :1], cache=cache)
    assert l2.shape == (1, 1, 30) and int(cache[0].memory.offset[0]) == 7 % 4
