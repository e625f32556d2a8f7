/* tests/capi/miras_capi_test.c — links libmiras and runs its CPU path on fixed inputs, checking
 * the results against the float64 reference (miras.reference) values in a data file written by
 * tests/test_capi.py; then checks the error statuses. Plain C11: it also proves that miras.h is C.
 *
 *   miras_capi_test DATA_FILE
 *
 * Data file: a sequence of cases
 *   case NAME KIND            KIND: chunk (forward + backward) or step (prefill + steps)
 *   param KEY VALUE           scalars (config fields, tolerances, flags)
 *   array NAME DTYPE NDIM D0 .. Dn-1 V0 V1 ...    (DTYPE: miras_dtype code)
 *   end
 * Inputs carry their names (q, k, ...); expected outputs are named "ref_<output>".
 * Prints one line per check and "SUMMARY checks=N failures=M"; exits 1 on any failure.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "miras.h"

#define MAX_ARRAYS 64
#define MAX_PARAMS 64

typedef struct {
  char name[64];
  int32_t dtype;
  int32_t ndim;
  int64_t shape[4];
  int64_t numel;
  double* vals;
} Array;

typedef struct {
  char name[64];
  char kind[16];
  Array arrays[MAX_ARRAYS];
  int narrays;
  char pkeys[MAX_PARAMS][64];
  double pvals[MAX_PARAMS];
  int nparams;
} Case;

/* A buffer in the dtype a tensor needs, with its descriptor. */
typedef struct {
  miras_tensor t;
  void* mem;
} Buf;

static int g_checks = 0, g_failures = 0;

static void die(const char* msg) {
  fprintf(stderr, "miras_capi_test: %s\n", msg);
  exit(2);
}

static void* xcalloc(size_t n, size_t size) {
  void* p = calloc(n ? n : 1, size);
  if (!p) die("out of memory");
  return p;
}

/* ---- data file --------------------------------------------------------------------------- */
static int read_case(FILE* f, Case* c) {
  char tok[64];
  memset(c, 0, sizeof(*c));
  if (fscanf(f, "%63s", tok) != 1) return 0;
  if (strcmp(tok, "case") != 0) die("expected 'case'");
  if (fscanf(f, "%63s %15s", c->name, c->kind) != 2) die("bad case header");
  for (;;) {
    if (fscanf(f, "%63s", tok) != 1) die("unexpected end of file");
    if (strcmp(tok, "end") == 0) return 1;
    if (strcmp(tok, "param") == 0) {
      if (c->nparams == MAX_PARAMS) die("too many params");
      if (fscanf(f, "%63s %lf", c->pkeys[c->nparams], &c->pvals[c->nparams]) != 2) die("bad param");
      c->nparams++;
    } else if (strcmp(tok, "array") == 0) {
      if (c->narrays == MAX_ARRAYS) die("too many arrays");
      Array* a = &c->arrays[c->narrays++];
      if (fscanf(f, "%63s %d %d", a->name, &a->dtype, &a->ndim) != 3 || a->ndim < 0 || a->ndim > 4)
        die("bad array header");
      a->numel = 1;
      for (int i = 0; i < a->ndim; ++i) {
        long long d;
        if (fscanf(f, "%lld", &d) != 1) die("bad array shape");
        a->shape[i] = d;
        a->numel *= d;
      }
      a->vals = (double*)xcalloc((size_t)a->numel, sizeof(double));
      for (int64_t i = 0; i < a->numel; ++i)
        if (fscanf(f, "%lf", &a->vals[i]) != 1) die("bad array value");
    } else {
      die("unknown record");
    }
  }
}

static void free_case(Case* c) {
  for (int i = 0; i < c->narrays; ++i) free(c->arrays[i].vals);
}

static const Array* find(const Case* c, const char* name) {
  for (int i = 0; i < c->narrays; ++i)
    if (strcmp(c->arrays[i].name, name) == 0) return &c->arrays[i];
  return NULL;
}

static double param(const Case* c, const char* key) {
  for (int i = 0; i < c->nparams; ++i)
    if (strcmp(c->pkeys[i], key) == 0) return c->pvals[i];
  fprintf(stderr, "case %s: missing param %s\n", c->name, key);
  exit(2);
}

/* ---- buffers ----------------------------------------------------------------------------- */
static size_t dtype_size(int32_t d) { return (d == MIRAS_FLOAT64 || d == MIRAS_INT64) ? 8 : 4; }

static Buf buf_new(int32_t dtype, int ndim, const int64_t* shape) {
  Buf b;
  memset(&b, 0, sizeof(b));
  int64_t n = 1;
  for (int i = 0; i < ndim; ++i) {
    b.t.shape[i] = shape[i];
    n *= shape[i];
  }
  b.t.ndim = ndim;
  b.t.dtype = dtype;
  b.mem = xcalloc((size_t)n, dtype_size(dtype));
  b.t.data = b.mem;
  return b;
}

static int64_t numel(const miras_tensor* t) {
  int64_t n = 1;
  for (int i = 0; i < t->ndim; ++i) n *= t->shape[i];
  return n;
}

static double get(const miras_tensor* t, int64_t i) {
  switch (t->dtype) {
    case MIRAS_FLOAT64: return ((const double*)t->data)[i];
    case MIRAS_FLOAT32: return ((const float*)t->data)[i];
    case MIRAS_INT64: return (double)((const int64_t*)t->data)[i];
    default: die("unsupported dtype in test"); return 0;
  }
}

static void set(miras_tensor* t, int64_t i, double v) {
  switch (t->dtype) {
    case MIRAS_FLOAT64: ((double*)t->data)[i] = v; break;
    case MIRAS_FLOAT32: ((float*)t->data)[i] = (float)v; break;
    case MIRAS_INT64: ((int64_t*)t->data)[i] = (int64_t)llround(v); break;
    default: die("unsupported dtype in test");
  }
}

/* An input from the data file (NULL when the case has none). Float arrays take `dtype`. */
static Buf* load(const Case* c, const char* name, int32_t dtype, Buf* storage) {
  const Array* a = find(c, name);
  if (!a) return NULL;
  *storage = buf_new(a->dtype == MIRAS_INT64 ? MIRAS_INT64 : dtype, a->ndim, a->shape);
  for (int64_t i = 0; i < a->numel; ++i) set(&storage->t, i, a->vals[i]);
  return storage;
}

/* An output with the shape of the expected "ref_<name>" (NULL when there is none). */
static Buf* out_like(const Case* c, const char* name, int32_t dtype, Buf* storage) {
  char key[80];
  snprintf(key, sizeof(key), "ref_%s", name);
  const Array* a = find(c, key);
  if (!a) return NULL;
  *storage = buf_new(a->dtype == MIRAS_INT64 ? MIRAS_INT64 : dtype, a->ndim, a->shape);
  /* poison: a value the library forgot to write fails the comparison */
  for (int64_t i = 0; i < a->numel; ++i) set(&storage->t, i, a->dtype == MIRAS_INT64 ? -7 : NAN);
  return storage;
}

static void buf_free(Buf* b) {
  if (b) free(b->mem);
}

static miras_tensor* T(Buf* b) { return b ? &b->t : NULL; }

/* ---- checks ------------------------------------------------------------------------------ */
static void check_close(const Case* c, const char* name, const miras_tensor* got, double tol) {
  char key[80];
  snprintf(key, sizeof(key), "ref_%s", name);
  const Array* ref = find(c, key);
  g_checks++;
  if (!ref || !got) {
    printf("FAIL %s/%s: missing %s\n", c->name, name, ref ? "output" : "reference");
    g_failures++;
    return;
  }
  if (numel(got) != ref->numel) {
    printf("FAIL %s/%s: %lld values, reference has %lld\n", c->name, name, (long long)numel(got),
           (long long)ref->numel);
    g_failures++;
    return;
  }
  double num = 0, den = 0;
  int finite = 1;
  for (int64_t i = 0; i < ref->numel; ++i) {
    const double a = get(got, i), b = ref->vals[i];
    if (!isfinite(a)) finite = 0;
    num += (a - b) * (a - b);
    den += b * b;
  }
  const double err = sqrt(num) / (sqrt(den) > 1e-30 ? sqrt(den) : 1e-30);
  const int ok = finite && err <= tol;
  printf("%s %s/%s rel_err=%.3e tol=%.1e%s\n", ok ? "PASS" : "FAIL", c->name, name, err, tol,
         finite ? "" : " (non-finite values)");
  if (!ok) g_failures++;
}

static int expect_ok(const char* what, miras_status s) {
  g_checks++;
  if (s == MIRAS_OK && miras_last_error()[0] == '\0') return 1;
  printf("FAIL %s: status %s, message '%s'\n", what, miras_status_string(s), miras_last_error());
  g_failures++;
  return 0;
}

/* ---- chunk case: forward with saved states, backward ------------------------------------- */
static void fill_config(const Case* c, miras_config* cfg) {
  miras_config_init(cfg, (int64_t)param(c, "Dk"));
  cfg->bias = (int32_t)param(c, "bias");
  cfg->retention = (int32_t)param(c, "retention");
  cfg->p = param(c, "p");
  cfg->eps = param(c, "eps");
  cfg->delta = param(c, "delta");
  cfg->robust_delta = param(c, "robust_delta");
  cfg->gamma = param(c, "gamma");
  cfg->kl_scale = param(c, "kl_scale");
  cfg->q_norm = param(c, "q_norm");
  cfg->eps_q = param(c, "eps_q");
  cfg->scale = param(c, "scale");
  cfg->chunk_size = (int64_t)param(c, "chunk_size");
}

typedef struct {
  Buf q, k, v, lr, al, mo, bp, rp, cu, X0, P0;
  miras_chunk_inputs in;
} Inputs;

static void load_inputs(const Case* c, const char* prefix, int32_t dt, Inputs* I) {
  char key[80];
#define LOAD(field, store)                         \
  snprintf(key, sizeof(key), "%s%s", prefix, #field); \
  I->in.field = T(load(c, key, dt, &I->store));
  memset(I, 0, sizeof(*I));
  LOAD(q, q) LOAD(k, k) LOAD(v, v) LOAD(lr, lr) LOAD(alpha, al) LOAD(momentum, mo) LOAD(bias_param, bp)
  LOAD(ret_param, rp) LOAD(cu_seqlens, cu) LOAD(X0, X0) LOAD(P0, P0)
#undef LOAD
}

static void free_inputs(Inputs* I) {
  const miras_tensor* ts[] = {I->in.q, I->in.k, I->in.v, I->in.lr, I->in.alpha, I->in.momentum,
                              I->in.bias_param, I->in.ret_param, I->in.cu_seqlens, I->in.X0, I->in.P0};
  for (size_t i = 0; i < sizeof(ts) / sizeof(ts[0]); ++i)
    if (ts[i]) free(ts[i]->data);
}

static void run_chunk_case(const Case* c) {
  const int32_t dt = (int32_t)param(c, "dtype");
  const double tol_f = param(c, "tol_fwd"), tol_b = param(c, "tol_bwd");
  miras_config cfg;
  fill_config(c, &cfg);
  Inputs I;
  load_inputs(c, "", dt, &I);
  const int mom = I.in.momentum != NULL;
  const int64_t H = (int64_t)param(c, "H"), Dk = (int64_t)param(c, "Dk"), Dv = (int64_t)param(c, "Dv");
  const int64_t N = (int64_t)param(c, "N"), Ttot = I.in.q->shape[1];
  const int64_t slots = miras_num_chunk_slots(N, Ttot, cfg.chunk_size, I.in.cu_seqlens != NULL);
  const int64_t sshape[4] = {slots, H, Dk, Dv};

  Buf o, XT, PT, AT, off, cX, cP;
  miras_fwd_outputs out;
  memset(&out, 0, sizeof(out));
  out.o = T(out_like(c, "o", dt, &o));
  out.XT = T(out_like(c, "XT", dt, &XT));
  out.PT = mom ? T(out_like(c, "PT", dt, &PT)) : NULL;
  out.AT = T(out_like(c, "AT", dt, &AT));
  out.final_offset = T(out_like(c, "final_offset", dt, &off));
  cX = buf_new(dt, 4, sshape);
  out.chunk_X = &cX.t;
  if (mom) {
    cP = buf_new(dt, 4, sshape);
    out.chunk_P = &cP.t;
  }
  miras_exec ex = {MIRAS_DEVICE_CPU, NULL, NULL, 0};
  size_t ws = 99;
  char what[160];
  snprintf(what, sizeof(what), "%s/fwd_workspace_size", c->name);
  if (expect_ok(what, miras_chunk_fwd_workspace_size(&cfg, &I.in, &out, MIRAS_DEVICE_CPU, &ws))) {
    g_checks++;
    if (ws != 0) {
      printf("FAIL %s: CPU workspace %zu, expected 0\n", what, ws);
      g_failures++;
    }
  }
  snprintf(what, sizeof(what), "%s/fwd", c->name);
  if (expect_ok(what, miras_chunk_fwd(&cfg, &I.in, &out, &ex))) {
    check_close(c, "o", out.o, tol_f);
    check_close(c, "XT", out.XT, tol_f);
    if (mom) check_close(c, "PT", out.PT, tol_f);
    check_close(c, "AT", out.AT, tol_f);
    check_close(c, "final_offset", out.final_offset, 0.0);
  }

  /* backward */
  Buf dO, dXT, dPT, dq, dk, dv, dlr, dal, dmo, dbp, drp, dX0, dP0;
  miras_bwd_inputs bin;
  memset(&bin, 0, sizeof(bin));
  bin.chunk_X = &cX.t;
  bin.chunk_P = mom ? &cP.t : NULL;
  bin.dO = T(load(c, "dO", dt, &dO));
  bin.dXT = T(load(c, "dXT", dt, &dXT));
  bin.dPT = mom ? T(load(c, "dPT", dt, &dPT)) : NULL;
  miras_bwd_outputs g;
  memset(&g, 0, sizeof(g));
  g.dq = T(out_like(c, "dq", dt, &dq));
  g.dk = T(out_like(c, "dk", dt, &dk));
  g.dv = T(out_like(c, "dv", dt, &dv));
  g.dlr = T(out_like(c, "dlr", dt, &dlr));
  g.dalpha = T(out_like(c, "dalpha", dt, &dal));
  g.dmomentum = mom ? T(out_like(c, "dmomentum", dt, &dmo)) : NULL;
  g.dbias_param = I.in.bias_param ? T(out_like(c, "dbias_param", dt, &dbp)) : NULL;
  g.dret_param = I.in.ret_param ? T(out_like(c, "dret_param", dt, &drp)) : NULL;
  g.dX0 = T(out_like(c, "dX0", dt, &dX0));
  g.dP0 = mom ? T(out_like(c, "dP0", dt, &dP0)) : NULL;
  snprintf(what, sizeof(what), "%s/bwd", c->name);
  if (expect_ok(what, miras_chunk_bwd(&cfg, &I.in, &bin, &g, &ex))) {
    check_close(c, "dq", g.dq, tol_b);
    check_close(c, "dk", g.dk, tol_b);
    check_close(c, "dv", g.dv, tol_b);
    check_close(c, "dlr", g.dlr, tol_b);
    check_close(c, "dalpha", g.dalpha, tol_b);
    if (mom) check_close(c, "dmomentum", g.dmomentum, tol_b);
    if (g.dbias_param) check_close(c, "dbias_param", g.dbias_param, tol_b);
    if (g.dret_param) check_close(c, "dret_param", g.dret_param, tol_b);
    check_close(c, "dX0", g.dX0, tol_b);
    if (mom) check_close(c, "dP0", g.dP0, tol_b);
  }
  miras_tensor* all[] = {out.o, out.XT, out.PT, out.AT, out.final_offset, out.chunk_X, out.chunk_P,
                         (miras_tensor*)bin.dO, (miras_tensor*)bin.dXT, (miras_tensor*)bin.dPT,
                         g.dq, g.dk, g.dv, g.dlr, g.dalpha, g.dmomentum, g.dbias_param, g.dret_param, g.dX0, g.dP0};
  for (size_t i = 0; i < sizeof(all) / sizeof(all[0]); ++i)
    if (all[i]) free(all[i]->data);
  free_inputs(&I);
}

/* ---- step case: prefill with the chunked forward, then token-by-token steps --------------- */
/* Slice s of a [S, ...] array into a tensor of shape [...]. */
static void take_step(const Array* a, int64_t s, Buf* b) {
  const int64_t per = a->numel / a->shape[0];
  for (int64_t i = 0; i < per; ++i) set(&b->t, i, a->vals[s * per + i]);
}

static void run_step_case(const Case* c) {
  const int32_t dt = (int32_t)param(c, "dtype");
  const double tol = param(c, "tol_fwd");
  miras_config cfg;
  fill_config(c, &cfg);
  Inputs I;
  load_inputs(c, "", dt, &I); /* the prefill */
  const int mom = I.in.momentum != NULL;
  const int64_t H = (int64_t)param(c, "H"), Dk = (int64_t)param(c, "Dk"), Dv = (int64_t)param(c, "Dv");
  const int64_t N = (int64_t)param(c, "N");
  const int64_t st[4] = {N, H, Dk, Dv}, n1[1] = {N};
  /* two state buffers per state, swapped after each step; the anchor and offset in place */
  Buf X[2], P[2], A = buf_new(dt, 4, st), off = buf_new(MIRAS_INT64, 1, n1);
  for (int i = 0; i < 2; ++i) {
    X[i] = buf_new(dt, 4, st);
    if (mom) P[i] = buf_new(dt, 4, st);
  }
  const int64_t pshape[4] = {I.in.q->shape[0], I.in.q->shape[1], H, Dv};
  Buf po = buf_new(dt, 4, pshape);
  miras_fwd_outputs out;
  memset(&out, 0, sizeof(out));
  out.o = &po.t;
  out.XT = &X[0].t;
  out.PT = mom ? &P[0].t : NULL;
  out.AT = &A.t;
  out.final_offset = &off.t;
  miras_exec ex = {MIRAS_DEVICE_CPU, NULL, NULL, 0};
  char what[160];
  snprintf(what, sizeof(what), "%s/prefill", c->name);
  if (!expect_ok(what, miras_chunk_fwd(&cfg, &I.in, &out, &ex))) return;

  const Array *sq = find(c, "step_q"), *sk = find(c, "step_k"), *sv = find(c, "step_v"), *slr = find(c, "step_lr"),
              *sal = find(c, "step_alpha"), *smo = find(c, "step_momentum"), *sbp = find(c, "step_bias_param"),
              *srp = find(c, "step_ret_param");
  if (!sq || !sk || !sv || !slr || !sal) die("step case without step_* arrays");
  const int64_t S = sq->shape[0];
  const int64_t kshape[3] = {N, H, Dk}, vshape[3] = {N, H, Dv}, gshape[2] = {N, H};
  Buf q = buf_new(dt, 3, kshape), k = buf_new(dt, 3, kshape), v = buf_new(dt, 3, vshape);
  Buf lr = buf_new(dt, 2, gshape), al = buf_new(dt, 2, gshape), mo = buf_new(dt, 2, gshape);
  Buf bp = buf_new(dt, 2, gshape), rp = buf_new(dt, 2, gshape), o = buf_new(dt, 3, vshape);
  const int64_t oshape[4] = {S, N, H, Dv};
  Buf os = buf_new(dt, 4, oshape); /* every step's o */
  int cur = 0;
  for (int64_t s = 0; s < S; ++s) {
    take_step(sq, s, &q);
    take_step(sk, s, &k);
    take_step(sv, s, &v);
    take_step(slr, s, &lr);
    take_step(sal, s, &al);
    if (smo) take_step(smo, s, &mo);
    if (sbp) take_step(sbp, s, &bp);
    if (srp) take_step(srp, s, &rp);
    miras_step_args a;
    memset(&a, 0, sizeof(a));
    a.q = &q.t, a.k = &k.t, a.v = &v.t, a.lr = &lr.t, a.alpha = &al.t;
    a.momentum = smo ? &mo.t : NULL;
    a.bias_param = sbp ? &bp.t : NULL;
    a.ret_param = srp ? &rp.t : NULL;
    a.X = &X[cur].t, a.P = mom ? &P[cur].t : NULL, a.anchor = &A.t, a.offset = &off.t;
    a.o = &o.t, a.X_out = &X[1 - cur].t, a.P_out = mom ? &P[1 - cur].t : NULL;
    a.anchor_out = &A.t, a.offset_out = &off.t; /* in place */
    snprintf(what, sizeof(what), "%s/step%lld", c->name, (long long)s);
    if (!expect_ok(what, miras_step(&cfg, &a, &ex))) return;
    const int64_t per = numel(&o.t);
    for (int64_t i = 0; i < per; ++i) set(&os.t, s * per + i, get(&o.t, i));
    cur = 1 - cur;
  }
  check_close(c, "step_o", &os.t, tol);
  check_close(c, "X", &X[cur].t, tol);
  if (mom) check_close(c, "P", &P[cur].t, tol);
  check_close(c, "anchor", &A.t, tol);
  check_close(c, "offset", &off.t, 0.0);
  Buf* bufs[] = {&X[0], &X[1], &A, &off, &po, &q, &k, &v, &lr, &al, &mo, &bp, &rp, &o, &os};
  for (size_t i = 0; i < sizeof(bufs) / sizeof(bufs[0]); ++i) buf_free(bufs[i]);
  if (mom) {
    buf_free(&P[0]);
    buf_free(&P[1]);
  }
  free_inputs(&I);
}

/* ---- error statuses ---------------------------------------------------------------------- */
static void expect_error(const char* what, miras_status got, miras_status want, const char* needle) {
  g_checks++;
  const char* msg = miras_last_error();
  const int ok = got == want && msg && msg[0] != '\0' && strstr(msg, needle) != NULL;
  printf("%s error/%s: %s '%s'\n", ok ? "PASS" : "FAIL", what, miras_status_string(got), msg ? msg : "(null)");
  if (!ok) {
    printf("     expected %s with a message containing '%s'\n", miras_status_string(want), needle);
    g_failures++;
  }
}

static void run_error_checks(void) {
  /* a small valid float64 problem: B=1, T=5, H=2, Dk=3, Dv=2, momentum, chunk 2 */
  enum { B = 1, TT = 5, H = 2, DK = 3, DV = 2 };
  const int64_t sk[4] = {B, TT, H, DK}, sv[4] = {B, TT, H, DV}, sg[3] = {B, TT, H}, ss[4] = {B, H, DK, DV};
  Buf q = buf_new(MIRAS_FLOAT64, 4, sk), k = buf_new(MIRAS_FLOAT64, 4, sk), v = buf_new(MIRAS_FLOAT64, 4, sv);
  Buf lr = buf_new(MIRAS_FLOAT64, 3, sg), al = buf_new(MIRAS_FLOAT64, 3, sg), mo = buf_new(MIRAS_FLOAT64, 3, sg);
  Buf o = buf_new(MIRAS_FLOAT64, 4, sv), XT = buf_new(MIRAS_FLOAT64, 4, ss), P0 = buf_new(MIRAS_FLOAT64, 4, ss);
  for (int64_t i = 0; i < numel(&q.t); ++i) {
    set(&q.t, i, 0.1 * (double)(i % 7) - 0.3);
    set(&k.t, i, 0.05 * (double)(i % 5));
  }
  for (int64_t i = 0; i < numel(&v.t); ++i) set(&v.t, i, 0.2 * (double)(i % 3) - 0.1);
  for (int64_t i = 0; i < numel(&lr.t); ++i) set(&lr.t, i, 0.3), set(&al.t, i, 0.9), set(&mo.t, i, 0.5);
  miras_config cfg;
  miras_config_init(&cfg, DK);
  cfg.chunk_size = 2;
  miras_chunk_inputs in;
  memset(&in, 0, sizeof(in));
  in.q = &q.t, in.k = &k.t, in.v = &v.t, in.lr = &lr.t, in.alpha = &al.t, in.momentum = &mo.t;
  miras_fwd_outputs out;
  memset(&out, 0, sizeof(out));
  out.o = &o.t, out.XT = &XT.t;
  miras_exec ex = {MIRAS_DEVICE_CPU, NULL, NULL, 0};
#define FWD() miras_chunk_fwd(&cfg, &in, &out, &ex)
  expect_ok("error/baseline", FWD());

  /* dtype */
  q.t.dtype = MIRAS_FLOAT16;
  expect_error("q_float16_on_cpu", FWD(), MIRAS_ERROR_DTYPE, "q must be float32 or float64");
  q.t.dtype = 42;
  expect_error("q_unknown_dtype", FWD(), MIRAS_ERROR_DTYPE, "q must be");
  q.t.dtype = MIRAS_FLOAT64;
  k.t.dtype = MIRAS_FLOAT32;
  expect_error("k_dtype_mismatch", FWD(), MIRAS_ERROR_DTYPE, "k must be float64");
  k.t.dtype = MIRAS_FLOAT64;
  /* shape and layout */
  k.t.shape[3] = DK + 1;
  expect_error("k_shape", FWD(), MIRAS_ERROR_SHAPE, "k must have shape [B, T, H, Dk]");
  k.t.shape[3] = DK;
  lr.t.shape[1] = TT - 1;
  expect_error("lr_shape", FWD(), MIRAS_ERROR_SHAPE, "lr must have shape [B, T, H]");
  lr.t.shape[1] = TT;
  q.t.ndim = 3;
  expect_error("q_ndim", FWD(), MIRAS_ERROR_SHAPE, "q must be 4-D");
  q.t.ndim = 4;
  const int64_t bad_strides[4] = {TT * H * DV, 1, TT * DV, TT}; /* a transposed view */
  v.t.strides = bad_strides;
  expect_error("v_strides", FWD(), MIRAS_ERROR_SHAPE, "v must be contiguous");
  const int64_t good_strides[4] = {TT * H * DV, H * DV, DV, 1};
  v.t.strides = good_strides;
  expect_ok("error/explicit_contiguous_strides", FWD());
  v.t.strides = NULL;
  /* NULL pointers */
  in.q = NULL;
  expect_error("q_null", FWD(), MIRAS_ERROR_NULL_POINTER, "q is required");
  in.q = &q.t;
  lr.t.data = NULL;
  expect_error("lr_data_null", FWD(), MIRAS_ERROR_NULL_POINTER, "lr->data is NULL");
  lr.t.data = lr.mem;
  out.o = NULL;
  expect_error("o_null", FWD(), MIRAS_ERROR_NULL_POINTER, "o is required");
  out.o = &o.t;
  expect_error("config_null", miras_chunk_fwd(NULL, &in, &out, &ex), MIRAS_ERROR_NULL_POINTER, "config is required");
  expect_error("exec_null", miras_chunk_fwd(&cfg, &in, &out, NULL), MIRAS_ERROR_NULL_POINTER, "exec is required");
  expect_error("inputs_null", miras_chunk_fwd(&cfg, NULL, &out, &ex), MIRAS_ERROR_NULL_POINTER, "inputs are required");
  /* devices */
  ex.device = 7;
  expect_error("unknown_device", FWD(), MIRAS_ERROR_DEVICE, "unknown device code 7");
  ex.device = MIRAS_DEVICE_CUDA;
  if (!miras_has_cuda())
    expect_error("cuda_not_built", FWD(), MIRAS_ERROR_NOT_BUILT, "-DMIRAS_WITH_CUDA=ON");
  else /* built with CUDA: float64 is refused on CUDA before anything touches the (host) pointers */
    expect_error("cuda_float64", FWD(), MIRAS_ERROR_DTYPE, "CPU only");
  ex.device = MIRAS_DEVICE_CPU;
  /* config */
  cfg.chunk_size = 0;
  expect_error("chunk_size_0", FWD(), MIRAS_ERROR_INVALID_ARGUMENT, "chunk_size must be >= 1");
  cfg.chunk_size = 2;
  cfg.bias = 42;
  expect_error("bias_42", FWD(), MIRAS_ERROR_INVALID_ARGUMENT, "bias: unknown kind 42");
  cfg.bias = MIRAS_BIAS_L2;
  cfg.retention = MIRAS_RETENTION_LQ;
  cfg.q_norm = 1.5;
  expect_error("lq_q_norm", FWD(), MIRAS_ERROR_INVALID_ARGUMENT, "q (lq retention) must be >= 2");
  cfg.retention = MIRAS_RETENTION_L2;
  cfg.q_norm = 4.0;
  cfg.retention = MIRAS_RETENTION_ELASTIC_NET;
  cfg.map_schedule = 1;
  expect_error("chunk_schedule_en", FWD(), MIRAS_ERROR_INVALID_ARGUMENT,
               "map_schedule='chunk' with retention elastic_net is not implemented");
  cfg.retention = MIRAS_RETENTION_L2;
  cfg.map_schedule = 3;
  expect_error("map_schedule_3", FWD(), MIRAS_ERROR_INVALID_ARGUMENT, "map_schedule: unknown code 3");
  cfg.map_schedule = 0;
  cfg.bias = MIRAS_BIAS_HUBER_YAAD;
  cfg.delta = 0.0;
  expect_error("huber_delta_0", FWD(), MIRAS_ERROR_INVALID_ARGUMENT, "delta (huber bias) must be > 0");
  cfg.bias = MIRAS_BIAS_L2;
  cfg.delta = 1.0;
  /* momentum state without momentum */
  in.momentum = NULL;
  in.P0 = &P0.t;
  expect_error("P0_without_momentum", FWD(), MIRAS_ERROR_INVALID_ARGUMENT, "P0 must be NULL");
  in.P0 = NULL;
  in.momentum = &mo.t;
  /* varlen: cu_seqlens must end at T (checked by the CPU backend) */
  const int64_t cush[1] = {3};
  Buf cu = buf_new(MIRAS_INT64, 1, cush);
  ((int64_t*)cu.mem)[0] = 0, ((int64_t*)cu.mem)[1] = 2, ((int64_t*)cu.mem)[2] = TT - 1;
  in.cu_seqlens = &cu.t;
  Buf XT2 = buf_new(MIRAS_FLOAT64, 4, (const int64_t[4]){2, H, DK, DV});
  out.XT = &XT2.t;
  expect_error("cu_seqlens_end", FWD(), MIRAS_ERROR_INVALID_ARGUMENT, "cu_seqlens must end at T");
  cu.t.dtype = MIRAS_FLOAT64;
  expect_error("cu_seqlens_dtype", FWD(), MIRAS_ERROR_DTYPE, "cu_seqlens must be int64");
  cu.t.dtype = MIRAS_INT64;
  ((int64_t*)cu.mem)[2] = TT;
  expect_ok("error/varlen_ok", FWD());
  in.cu_seqlens = NULL;
  out.XT = &XT.t;
  /* backward without the saved states */
  miras_bwd_inputs bin;
  memset(&bin, 0, sizeof(bin));
  bin.dO = &o.t;
  miras_bwd_outputs g;
  memset(&g, 0, sizeof(g));
  expect_error("bwd_chunk_X_null", miras_chunk_bwd(&cfg, &in, &bin, &g, &ex), MIRAS_ERROR_NULL_POINTER,
               "chunk_X is required");
  /* step: offset out of range, output aliasing an input */
  const int64_t tk[3] = {B, H, DK}, tv[3] = {B, H, DV}, tg[2] = {B, H}, n1[1] = {B};
  Buf sq = buf_new(MIRAS_FLOAT64, 3, tk), skk = buf_new(MIRAS_FLOAT64, 3, tk), svv = buf_new(MIRAS_FLOAT64, 3, tv);
  Buf slr = buf_new(MIRAS_FLOAT64, 2, tg), sal = buf_new(MIRAS_FLOAT64, 2, tg), so = buf_new(MIRAS_FLOAT64, 3, tv);
  Buf X = buf_new(MIRAS_FLOAT64, 4, ss), Xo = buf_new(MIRAS_FLOAT64, 4, ss), A = buf_new(MIRAS_FLOAT64, 4, ss);
  Buf off = buf_new(MIRAS_INT64, 1, n1);
  set(&slr.t, 0, 0.2), set(&slr.t, 1, 0.2), set(&sal.t, 0, 0.9), set(&sal.t, 1, 0.9);
  miras_step_args a;
  memset(&a, 0, sizeof(a));
  a.q = &sq.t, a.k = &skk.t, a.v = &svv.t, a.lr = &slr.t, a.alpha = &sal.t, a.X = &X.t, a.anchor = &A.t;
  a.offset = &off.t, a.o = &so.t, a.X_out = &Xo.t, a.anchor_out = &A.t, a.offset_out = &off.t;
  expect_ok("error/step_ok", miras_step(&cfg, &a, &ex));
  ((int64_t*)off.mem)[0] = 2; /* = chunk_size */
  expect_error("step_offset", miras_step(&cfg, &a, &ex), MIRAS_ERROR_INVALID_ARGUMENT,
               "offset[0] = 2 must lie in [0, chunk_size = 2)");
  ((int64_t*)off.mem)[0] = 0;
  a.X_out = &X.t;
  expect_error("step_inplace_X", miras_step(&cfg, &a, &ex), MIRAS_ERROR_INVALID_ARGUMENT,
               "X_out may not be the same buffer as X");
  a.X_out = &Xo.t;
  sq.t.shape[0] = 4;
  expect_error("step_q_batch", miras_step(&cfg, &a, &ex), MIRAS_ERROR_SHAPE, "k must have shape [B, H, Dk]");
  sq.t.shape[0] = B;
  /* status strings and the message reset */
  expect_ok("error/recovered", FWD());
  g_checks++;
  if (strcmp(miras_status_string(MIRAS_ERROR_SHAPE), "MIRAS_ERROR_SHAPE") != 0 ||
      miras_abi_version() != MIRAS_ABI_VERSION) {
    printf("FAIL error/status_string\n");
    g_failures++;
  }
  Buf* bufs[] = {&q,  &k,   &v,   &lr,  &al,  &mo, &o, &XT, &P0, &cu, &XT2,
                 &sq, &skk, &svv, &slr, &sal, &so, &X, &Xo, &A,  &off};
  for (size_t i = 0; i < sizeof(bufs) / sizeof(bufs[0]); ++i) buf_free(bufs[i]);
#undef FWD
}

int main(int argc, char** argv) {
  if (argc != 2) die("usage: miras_capi_test DATA_FILE");
  FILE* f = fopen(argv[1], "r");
  if (!f) die("cannot open the data file");
  static Case c;
  int ncases = 0;
  while (read_case(f, &c)) {
    if (strcmp(c.kind, "chunk") == 0) run_chunk_case(&c);
    else if (strcmp(c.kind, "step") == 0) run_step_case(&c);
    else die("unknown case kind");
    free_case(&c);
    ncases++;
  }
  fclose(f);
  run_error_checks();
  printf("SUMMARY cases=%d checks=%d failures=%d\n", ncases, g_checks, g_failures);
  return g_failures == 0 && ncases > 0 ? 0 : 1;
}
