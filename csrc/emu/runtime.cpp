// csrc/emu/runtime.cpp — the kernel emulator's runtime (docs/emulator.md).
//
// A launch is split into units: one cluster (or one block when the launch has no clusters). A
// unit runs on one host thread as a set of fibers, one per CUDA thread, switched by a small
// context switch (x86-64 assembly; ucontext elsewhere). A fiber runs until it reaches a barrier
// or a warp collective, then yields to the unit's scheduler; a barrier releases its waiters once
// every live thread it names has arrived. Units of one launch run in parallel on a pool of host
// threads (MIRAS_EMU_THREADS, default: the host's cores).
//
// Scheduling is deterministic: fibers run in thread order (MIRAS_EMU_SCHEDULE=ordered, the
// default), reverse order, or a seeded random order re-drawn at every pass
// (MIRAS_EMU_SCHEDULE=shuffle:SEED). A kernel without shared-memory races gives bitwise the same
// results under every schedule; a race (a read of a value that another thread writes between the
// same two barriers) changes them.
//
// Memory: device allocations and dynamic shared memory are host heap blocks filled with 0xFF
// bytes (NaN in float16/bfloat16/float32), so reads of unwritten memory show up as NaN. In the
// checked build (-fsanitize=address,alignment, MIRAS_EMU_ASAN) every heap block has redzones,
// shared memory of an exited block is poisoned, and out-of-bounds or misaligned accesses are
// reported with the kernel, block and thread (the ASan/UBSan hooks below).
#include <cxxabi.h>
#include <dlfcn.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <map>
#include <mutex>
#include <random>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "miras_emu/runtime.h"
#include "miras_emu/wmma.h"

#if defined(__SANITIZE_ADDRESS__)
#define MIRAS_EMU_HAVE_ASAN 1
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#else
#define MIRAS_EMU_HAVE_ASAN 0
#endif

#if !defined(__x86_64__)
#include <ucontext.h>
#endif

namespace miras {
namespace emu {

thread_local ThreadCtx* t_ctx MIRAS_EMU_TLS = nullptr;

namespace {

// ---- configuration (environment, read once; tests change it through miras_emu_configure) ------
struct Config {
  int threads = 0;            // host worker threads (0: hardware concurrency)
  int schedule = 0;           // 0 ordered, 1 reverse, 2 shuffle
  uint64_t seed = 1;
  int layout = 0;             // wmma: 0 mma (hardware), 1 scrambled
  int mutation = 0;           // MIRAS_MUTANT(k) selector
  size_t stack_bytes = 256 * 1024;
  int smem_optin = 232448;    // cudaDevAttrMaxSharedMemoryPerBlockOptin (sm_90)
  bool quiet = false;         // no fault messages on stderr
};

Config& cfg() {
  static Config c = [] {
    Config x;
    if (const char* s = std::getenv("MIRAS_EMU_THREADS")) x.threads = std::atoi(s);
    if (const char* s = std::getenv("MIRAS_EMU_SCHEDULE")) {
      std::string v(s);
      if (v == "reverse") x.schedule = 1;
      else if (v.rfind("shuffle", 0) == 0) {
        x.schedule = 2;
        const size_t c = v.find(':');
        if (c != std::string::npos) x.seed = std::strtoull(v.c_str() + c + 1, nullptr, 10);
      }
    }
    if (const char* s = std::getenv("MIRAS_EMU_WMMA_LAYOUT")) x.layout = std::string(s) == "scrambled" ? 1 : 0;
    if (const char* s = std::getenv("MIRAS_EMU_MUTATION")) x.mutation = std::atoi(s);
    if (const char* s = std::getenv("MIRAS_EMU_STACK_KB")) x.stack_bytes = size_t(std::atoi(s)) * 1024;
    if (const char* s = std::getenv("MIRAS_EMU_SMEM_OPTIN")) x.smem_optin = std::atoi(s);
    if (const char* s = std::getenv("MIRAS_EMU_QUIET")) x.quiet = std::atoi(s) != 0;
    return x;
  }();
  return c;
}

// ---- context switch ------------------------------------------------------------------------------
#if defined(__x86_64__)
extern "C" void miras_emu_swap(void** save_sp, void* load_sp);
asm(R"(
  .text
  .p2align 4
  .globl miras_emu_swap
  .hidden miras_emu_swap
  .type miras_emu_swap,@function
miras_emu_swap:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size miras_emu_swap,.-miras_emu_swap
)");
#endif

enum class St : uint8_t { kReady, kWaitBlock, kWaitWarp, kWaitCluster, kDone };

struct Stack {
  unsigned char* base = nullptr;  // mmap'd, lowest page is a guard page
  size_t bytes = 0;
};

struct Unit;
struct Block;

struct Fiber {
  ThreadCtx ctx;
  Block* block = nullptr;
  int warp = 0;
  St st = St::kReady;
  void* sp = nullptr;
#if !defined(__x86_64__)
  ucontext_t uc;
#endif
  Stack stack;
  unsigned coll = 0;  // warp collectives done (double-buffer parity)
  const char* wfile = nullptr;  // where it waits
  int wline = 0;
  const char* wkind = nullptr;
  struct Pending {
    void* dst;
    unsigned char data[16];
    int bytes;
  };
  std::vector<Pending> pending;  // cp.async not yet waited for
  void* fake_stack = nullptr;    // ASan fiber bookkeeping
};

struct Warp {
  int lanes = 0;  // lanes that exist
  int live = 0;   // lanes that have not exited
  int arrived = 0;
  unsigned mask = 0;
  const char* kind = nullptr;
  const char* file = nullptr;
  int line = 0;
  uint64_t xbuf[2][32];
  int xsrc[2][32];  // collective sequence number of each deposit
  float mA[2][256], mB[2][256], mC[2][256];
  Fiber* lane_fiber[32];
};

struct Block {
  Unit* unit = nullptr;
  unsigned rank = 0;  // in the cluster
  uint3 bid{0, 0, 0};
  unsigned char* smem = nullptr;
  size_t smem_bytes = 0;
  int nthreads = 0, live = 0, arrived = 0;
  int count_acc = 0, count_op = 0;  // __syncthreads_count/and/or
  int count_result = 0;
  const char* file = nullptr;
  int line = 0;
  std::vector<Warp> warps;
  std::vector<Fiber*> fibers;
};

struct Worker;

struct Unit {
  const LaunchSpec* spec = nullptr;
  const char* kname = nullptr;
  std::vector<Block> blocks;
  std::vector<Fiber*> fibers;  // all threads of all blocks, block-major
  int cl_live = 0, cl_arrived = 0;
  const char* cl_file = nullptr;
  int cl_line = 0;
  bool fault = false;
  std::string fault_msg;
  Worker* worker = nullptr;
  std::mt19937_64 rng;  // shuffle schedule: seeded per (launch, unit), whichever worker runs it
};

struct Worker {
  void* sched_sp = nullptr;
#if !defined(__x86_64__)
  ucontext_t sched_uc;
#endif
  const void* sched_bottom = nullptr;  // ASan: the scheduler's stack
  size_t sched_size = 0;
  void* sched_fake = nullptr;
  std::vector<Stack> stacks;  // pool, reused across units
  std::vector<Fiber> fibers;
  Fiber* cur = nullptr;
  Unit* unit = nullptr;
};

thread_local Worker* t_worker MIRAS_EMU_TLS = nullptr;

Fiber* cur_fiber() {
  ThreadCtx* c = t_ctx;
  return c ? static_cast<Fiber*>(c->fiber) : nullptr;
}

// ---- kernel names --------------------------------------------------------------------------------
std::mutex g_names_mu;
std::map<const void*, std::string> g_names;

std::string base_name(const std::string& demangled) {
  // "void ns::name<T, 64>(args)" or "ns::name(args)" -> "name"
  std::string s = demangled;
  int depth = 0;
  size_t end = std::string::npos;
  for (size_t i = 0; i < s.size(); ++i) {  // first '(' or '<' at depth 0 ends the qualified name
    const char ch = s[i];
    if (ch == '(' || ch == '<') {
      end = i;
      break;
    }
    (void)depth;
  }
  std::string q = s.substr(0, end);
  const size_t sp = q.rfind(' ');
  if (sp != std::string::npos) q = q.substr(sp + 1);
  const size_t ns = q.rfind("::");
  if (ns != std::string::npos) q = q.substr(ns + 2);
  return q;
}

const char* kernel_name(const void* fn, const char* expr) {
  std::lock_guard<std::mutex> lk(g_names_mu);
  auto it = g_names.find(fn);
  if (it != g_names.end()) return it->second.c_str();
  std::string name;
  Dl_info info;
  if (dladdr(fn, &info) && info.dli_sname) {
    int status = 0;
    char* dem = abi::__cxa_demangle(info.dli_sname, nullptr, nullptr, &status);
    name = base_name(status == 0 && dem ? std::string(dem) : std::string(info.dli_sname));
    std::free(dem);
  } else if (expr) {
    name = expr;
  } else {
    char buf[64];
    std::snprintf(buf, sizeof(buf), "<kernel at %p>", fn);
    name = buf;
  }
  return g_names.emplace(fn, name).first->second.c_str();
}

// ---- statistics and logs (C API below) -----------------------------------------------------------
std::mutex g_stats_mu;
struct KStat {
  long long launches = 0, blocks = 0, threads = 0;
};
std::map<std::string, KStat> g_stats;
std::vector<std::string> g_nvtx_log;
std::vector<std::string> g_nvtx_stack;

// ---- errors ----------------------------------------------------------------------------------------
thread_local cudaError_t t_last_error = cudaSuccess;
thread_local std::string t_last_detail;  // the emulator's message for t_detail_code
thread_local cudaError_t t_detail_code = cudaSuccess;
thread_local std::string t_err_string;

cudaError_t set_error(cudaError_t e, const std::string& detail) {
  t_last_error = e;
  t_detail_code = e;
  t_last_detail = detail;
  if (!cfg().quiet) std::fprintf(stderr, "[miras emu] %s\n", detail.c_str());
  return e;
}

std::mutex g_fault_mu;

// ---- device memory -----------------------------------------------------------------------------------
std::mutex g_alloc_mu;
std::map<uintptr_t, size_t> g_allocs;

// ---- wmma layouts ------------------------------------------------------------------------------------
struct LayoutTable {
  unsigned char row[3][32][8], col[3][32][8];
};
LayoutTable make_layout(int mode, uint64_t seed) {
  LayoutTable t;
  for (int lane = 0; lane < 32; ++lane) {
    const int g = lane >> 2, q = lane & 3;
    for (int e = 0; e < 8; ++e) {
      const int hi = (e >> 1) & 1, half = e >> 2, lo = e & 1;
      // accumulator: (g + 8*hi, 2q + lo + 8*half)
      t.row[kUseAcc][lane][e] = static_cast<unsigned char>(g + 8 * hi);
      t.col[kUseAcc][lane][e] = static_cast<unsigned char>(2 * q + lo + 8 * half);
      // A: same as the accumulator pattern with k in place of the column
      t.row[kUseA][lane][e] = static_cast<unsigned char>(g + 8 * hi);
      t.col[kUseA][lane][e] = static_cast<unsigned char>(2 * q + lo + 8 * half);
      // B (k, n): k = 2q + lo + 8*hi, n = g + 8*half
      t.row[kUseB][lane][e] = static_cast<unsigned char>(2 * q + lo + 8 * hi);
      t.col[kUseB][lane][e] = static_cast<unsigned char>(g + 8 * half);
    }
  }
  if (mode == 1) {  // scrambled: a fixed random bijection (lane, e) -> (row, col) per use
    std::mt19937_64 rng(seed * 0x9E3779B97F4A7C15ull + 12345);
    for (int use = 0; use < 3; ++use) {
      std::vector<int> perm(256);
      for (int i = 0; i < 256; ++i) perm[i] = i;
      std::shuffle(perm.begin(), perm.end(), rng);
      for (int lane = 0; lane < 32; ++lane)
        for (int e = 0; e < 8; ++e) {
          const int pos = perm[lane * 8 + e];
          t.row[use][lane][e] = static_cast<unsigned char>(pos / 16);
          t.col[use][lane][e] = static_cast<unsigned char>(pos % 16);
        }
    }
  }
  return t;
}
LayoutTable& layout_table() {
  static LayoutTable t = make_layout(cfg().layout, 7);
  return t;
}

// ---- fibers ------------------------------------------------------------------------------------------
Stack get_stack(Worker& w, size_t i) {
  while (w.stacks.size() <= i) {
    Stack s;
    const long page = sysconf(_SC_PAGESIZE);
    s.bytes = (cfg().stack_bytes + page - 1) / page * page + page;
    void* p = mmap(nullptr, s.bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED) {
      std::fprintf(stderr, "[miras emu] cannot map a fiber stack\n");
      std::abort();
    }
    mprotect(p, page, PROT_NONE);  // guard page: a stack overflow faults instead of corrupting
    s.base = static_cast<unsigned char*>(p);
    w.stacks.push_back(s);
  }
  return w.stacks[i];
}

void switch_to_scheduler(Fiber* f, bool finished);
void fiber_exit(Fiber* f);

[[noreturn]] void fiber_entry() {
  Worker* w = t_worker;
  Fiber* f = w->cur;
#if MIRAS_EMU_HAVE_ASAN
  __sanitizer_finish_switch_fiber(nullptr, &w->sched_bottom, &w->sched_size);
#endif
  f->block->unit->spec->body(f->block->unit->spec->state);
  fiber_exit(f);
  __builtin_unreachable();
}

#if !defined(__x86_64__)
void fiber_entry_uc() { fiber_entry(); }
#endif

void init_fiber_stack(Fiber* f) {
  const long page = sysconf(_SC_PAGESIZE);
  unsigned char* lo = f->stack.base + page;
  const size_t usable = f->stack.bytes - page;
#if MIRAS_EMU_HAVE_ASAN
  __asan_unpoison_memory_region(lo, usable);  // frames abandoned by an earlier fault
#endif
#if defined(__x86_64__)
  uintptr_t top = (reinterpret_cast<uintptr_t>(lo) + usable) & ~uintptr_t(15);
  uint64_t* s = reinterpret_cast<uint64_t*>(top);
  *--s = 0;                                              // fake return address of fiber_entry
  *--s = reinterpret_cast<uint64_t>(&fiber_entry);       // popped by `ret`
  for (int i = 0; i < 6; ++i) *--s = 0;                  // rbp rbx r12 r13 r14 r15
  uint32_t mxcsr;
  uint16_t fpucw;
  asm volatile("stmxcsr %0" : "=m"(mxcsr));
  asm volatile("fnstcw %0" : "=m"(fpucw));
  *--s = uint64_t(mxcsr) | (uint64_t(fpucw) << 32);
  f->sp = s;
#else
  getcontext(&f->uc);
  f->uc.uc_stack.ss_sp = lo;
  f->uc.uc_stack.ss_size = usable;
  f->uc.uc_link = nullptr;
  makecontext(&f->uc, fiber_entry_uc, 0);
#endif
}

void resume(Worker& w, Fiber* f) {
  w.cur = f;
  t_ctx = &f->ctx;
#if MIRAS_EMU_HAVE_ASAN
  const long page = sysconf(_SC_PAGESIZE);
  __sanitizer_start_switch_fiber(&w.sched_fake, f->stack.base + page, f->stack.bytes - page);
#endif
#if defined(__x86_64__)
  miras_emu_swap(&w.sched_sp, f->sp);
#else
  swapcontext(&w.sched_uc, &f->uc);
#endif
#if MIRAS_EMU_HAVE_ASAN
  __sanitizer_finish_switch_fiber(w.sched_fake, nullptr, nullptr);
#endif
  t_ctx = nullptr;
  w.cur = nullptr;
}

void switch_to_scheduler(Fiber* f, bool finished) {
  Worker* w = t_worker;
#if MIRAS_EMU_HAVE_ASAN
  __sanitizer_start_switch_fiber(finished ? nullptr : &f->fake_stack, w->sched_bottom, w->sched_size);
#else
  (void)finished;
#endif
#if defined(__x86_64__)
  miras_emu_swap(&f->sp, w->sched_sp);
#else
  swapcontext(&f->uc, &w->sched_uc);
#endif
#if MIRAS_EMU_HAVE_ASAN
  __sanitizer_finish_switch_fiber(f->fake_stack, &w->sched_bottom, &w->sched_size);
#endif
}

void flush_pending(Fiber* f) {
  for (auto& p : f->pending) std::memcpy(p.dst, p.data, p.bytes);
  f->pending.clear();
}

std::string where(const Fiber* f) {
  char buf[160];
  std::snprintf(buf, sizeof(buf), "block (%u,%u,%u) thread (%u,%u,%u)", f->ctx.bid.x, f->ctx.bid.y, f->ctx.bid.z,
                f->ctx.tid.x, f->ctx.tid.y, f->ctx.tid.z);
  return buf;
}

// Marks the unit faulted and leaves the fiber (it is never resumed).
[[noreturn]] void fault_fiber(Fiber* f, const std::string& msg) {
  Unit* u = f->block->unit;
  if (!u->fault) {
    u->fault = true;
    u->fault_msg = std::string("kernel ") + u->kname + ", " + where(f) + ": " + msg;
  }
  f->st = St::kDone;
  switch_to_scheduler(f, true);
  __builtin_unreachable();
}

void release_block(Block* b) {
  for (Fiber* f : b->fibers)
    if (f->st == St::kWaitBlock) f->st = St::kReady;
  b->arrived = 0;
  b->count_result = b->count_acc;
  b->count_acc = 0;
  b->file = nullptr;
}

void release_warp(Block* b, int w) {
  Warp& wp = b->warps[w];
  for (int l = 0; l < wp.lanes; ++l) {
    Fiber* f = wp.lane_fiber[l];
    if (f->st == St::kWaitWarp) f->st = St::kReady;
  }
  wp.arrived = 0;
  wp.kind = nullptr;
}

void release_cluster(Unit* u) {
  for (Fiber* f : u->fibers)
    if (f->st == St::kWaitCluster) f->st = St::kReady;
  u->cl_arrived = 0;
  u->cl_file = nullptr;
}

void poison_smem(Block* b) {
  if (!b->smem) return;
  std::memset(b->smem, 0xFF, b->smem_bytes);
#if MIRAS_EMU_HAVE_ASAN
  ASAN_POISON_MEMORY_REGION(b->smem, b->smem_bytes);
#endif
}

void fiber_exit(Fiber* f) {
  flush_pending(f);
  Block* b = f->block;
  Unit* u = b->unit;
  Warp& wp = b->warps[f->warp];
  f->st = St::kDone;
  b->live--;
  wp.live--;
  u->cl_live--;
  // Exited lanes do not take part in later warp collectives; a shuffle that reads one faults.
  if (wp.arrived > 0 && wp.arrived == wp.live) release_warp(b, f->warp);
  if (b->arrived > 0 && b->arrived == b->live) release_block(b);
  if (u->cl_arrived > 0 && u->cl_arrived == u->cl_live) release_cluster(u);
  if (b->live == 0) poison_smem(b);  // a peer's DSMEM access after this point is a bug
  switch_to_scheduler(f, true);
}

std::string describe_waits(Unit* u) {
  // Group consecutive threads waiting at the same place.
  std::string out;
  const Fiber* first = nullptr;
  const Fiber* last = nullptr;
  int shown = 0;
  auto key = [](const Fiber* f) {
    return std::string(f->st == St::kWaitBlock ? "__syncthreads" : f->st == St::kWaitCluster ? "cluster.sync"
                                                                                               : f->wkind ? f->wkind : "?") +
           " at " + (f->wfile ? f->wfile : "?") + ":" + std::to_string(f->wline);
  };
  auto flush = [&]() {
    if (!first) return;
    if (shown++ < 6) {
      char buf[96];
      std::snprintf(buf, sizeof(buf), "%sblock %u threads %d..%d wait at ", out.empty() ? "" : "; ", first->block->rank,
                    first->ctx.linear, last->ctx.linear);
      out += buf + key(first);
    }
  };
  for (const Fiber* f : u->fibers) {
    if (f->st == St::kDone) continue;
    if (first && key(first) == key(f) && first->block == f->block && last->ctx.linear + 1 == f->ctx.linear) {
      last = f;
      continue;
    }
    flush();
    first = last = f;
  }
  flush();
  return out.empty() ? std::string("no thread waits") : out;
}

// Runs one unit to completion (or its first fault) on the calling worker.
void run_unit(Worker& w, Unit& u) {
  const LaunchSpec& s = *u.spec;
  const unsigned nblk = static_cast<unsigned>(u.blocks.size());
  const int nthr = static_cast<int>(s.block.x * s.block.y * s.block.z);
  const int nwarps = (nthr + 31) / 32;
  const size_t total = size_t(nblk) * nthr;
  w.fibers.resize(total);
  u.fibers.resize(total);
  u.cl_live = static_cast<int>(total);
  u.worker = &w;
  w.unit = &u;
  for (unsigned bi = 0; bi < nblk; ++bi) {
    Block& b = u.blocks[bi];
    b.unit = &u;
    b.nthreads = b.live = nthr;
    b.warps.assign(nwarps, Warp());
    b.fibers.resize(nthr);
    for (int wi = 0; wi < nwarps; ++wi) {
      b.warps[wi].lanes = std::min(32, nthr - 32 * wi);
      b.warps[wi].live = b.warps[wi].lanes;
      for (int l = 0; l < 32; ++l) b.warps[wi].xsrc[0][l] = b.warps[wi].xsrc[1][l] = -1;
    }
    if (s.smem > 0) {
      void* p = nullptr;
      if (posix_memalign(&p, 1024, s.smem) != 0) {
        std::fprintf(stderr, "[miras emu] out of host memory for shared memory\n");
        std::abort();
      }
      b.smem = static_cast<unsigned char*>(p);
      b.smem_bytes = s.smem;
      std::memset(b.smem, 0xFF, s.smem);
    }
    for (int t = 0; t < nthr; ++t) {
      Fiber& f = w.fibers[size_t(bi) * nthr + t];
      f = Fiber();
      f.block = &b;
      f.ctx.tid = uint3{unsigned(t % s.block.x), unsigned((t / s.block.x) % s.block.y),
                        unsigned(t / (s.block.x * s.block.y))};
      f.ctx.bid = b.bid;
      f.ctx.bdim = s.block;
      f.ctx.gdim = s.grid;
      f.ctx.linear = t;
      f.ctx.lane = t & 31;
      f.ctx.fiber = &f;
      f.warp = t >> 5;
      f.stack = get_stack(w, size_t(bi) * nthr + t);
      init_fiber_stack(&f);
      b.fibers[t] = &f;
      b.warps[f.warp].lane_fiber[f.ctx.lane] = &f;
      u.fibers[size_t(bi) * nthr + t] = &f;
    }
  }
  std::vector<Fiber*> order(u.fibers);
  if (cfg().schedule == 1) std::reverse(order.begin(), order.end());
  while (!u.fault) {
    if (cfg().schedule == 2) std::shuffle(order.begin(), order.end(), u.rng);
    bool progress = false, all_done = true;
    for (Fiber* f : order) {
      if (f->st == St::kReady) {
        resume(w, f);
        progress = true;
        if (u.fault) break;
      }
      if (f->st != St::kDone) all_done = false;
    }
    if (u.fault) break;
    if (all_done) {
      bool done = true;
      for (Fiber* f : u.fibers) done = done && f->st == St::kDone;
      if (done) break;
    }
    if (!progress) {
      u.fault = true;
      u.fault_msg = std::string("kernel ") + u.kname + ": deadlock: " + describe_waits(&u);
      break;
    }
  }
  for (Block& b : u.blocks) {
    std::free(b.smem);  // (unpoisoned by free under ASan)
    b.smem = nullptr;
  }
  w.unit = nullptr;
}

// ---- worker pool -------------------------------------------------------------------------------------
struct Pool {
  std::mutex mu;
  std::condition_variable cv, done_cv;
  std::vector<std::thread> threads;
  std::vector<Worker*> workers;
  std::function<void(Worker&)> job;
  uint64_t gen = 0;
  int running = 0;
  bool stop = false;

  explicit Pool(int n) {
    for (int i = 0; i < n; ++i) workers.push_back(new Worker());
    for (int i = 1; i < n; ++i) threads.emplace_back([this, i] { loop(i); });
  }
  void loop(int i) {
    uint64_t seen = 0;
    for (;;) {
      std::function<void(Worker&)> j;
      {
        std::unique_lock<std::mutex> lk(mu);
        cv.wait(lk, [&] { return stop || gen != seen; });
        if (stop) return;
        seen = gen;
        j = job;
      }
      t_worker = workers[i];
      j(*workers[i]);
      t_worker = nullptr;
      std::lock_guard<std::mutex> lk(mu);
      if (--running == 0) done_cv.notify_all();
    }
  }
  // Runs job on every worker (the calling thread is worker 0) and waits for all.
  void run(const std::function<void(Worker&)>& j) {
    {
      std::lock_guard<std::mutex> lk(mu);
      job = j;
      running = static_cast<int>(threads.size());
      ++gen;
    }
    cv.notify_all();
    Worker* prev = t_worker;
    t_worker = workers[0];
    j(*workers[0]);
    t_worker = prev;
    std::unique_lock<std::mutex> lk(mu);
    done_cv.wait(lk, [&] { return running == 0; });
  }
  ~Pool() {
    {
      std::lock_guard<std::mutex> lk(mu);
      stop = true;
    }
    cv.notify_all();
    for (auto& t : threads) t.join();
  }
};

Pool& pool() {
  static Pool* p = [] {
    int n = cfg().threads > 0 ? cfg().threads : static_cast<int>(std::thread::hardware_concurrency());
    if (n < 1) n = 1;
    return new Pool(n);  // never destroyed: workers may outlive static destructors' order
  }();
  return *p;
}
std::mutex g_launch_mu;  // one launch at a time (launches from several host threads serialise)
uint64_t g_launch_seq = 0;

// ---- function attributes -------------------------------------------------------------------------
std::mutex g_attr_mu;
struct FuncAttr {
  int max_dyn_smem = 48 * 1024;
  bool nonportable_cluster = false;
};
std::map<const void*, FuncAttr> g_attrs;

}  // namespace

// =====================================================================================================
// device-side API (core.h)
// =====================================================================================================
void outside_kernel(const char* what) {
  std::fprintf(stderr, "[miras emu] %s used outside a kernel (host code)\n", what);
  std::abort();
}

void fault(const char* fmt, ...) {
  char buf[1024];
  va_list ap;
  va_start(ap, fmt);
  std::vsnprintf(buf, sizeof(buf), fmt, ap);
  va_end(ap);
  Fiber* f = cur_fiber();
  if (!f) {
    std::fprintf(stderr, "[miras emu] fault outside a kernel: %s\n", buf);
    std::abort();
  }
  fault_fiber(f, buf);
}

int mutation() { return cfg().mutation; }

namespace {
// Arrival at a block or cluster barrier: the last of `live` threads releases the waiters (and goes
// on); the others wait in state `wait`.
template <class Release>
void arrive(Fiber* f, int* arrived, int live, const char** bfile, int* bline, St wait, const char* file, int line,
            Release release) {
  if (*arrived == 0) {
    *bfile = file;
    *bline = line;
  }
  f->wfile = file;
  f->wline = line;
  if (++*arrived == live) {
    release();
    return;
  }
  f->st = wait;
  switch_to_scheduler(f, false);
}
}  // namespace

void block_barrier(const char* file, int line) {
  Fiber* f = cur_fiber();
  if (!f) outside_kernel("__syncthreads");
  Block* b = f->block;
  arrive(f, &b->arrived, b->live, &b->file, &b->line, St::kWaitBlock, file, line, [b] { release_block(b); });
}

int block_barrier_count(int pred, int op, const char* file, int line) {
  Fiber* f = cur_fiber();
  if (!f) outside_kernel("__syncthreads_count");
  Block* b = f->block;
  if (b->arrived == 0) {
    b->count_op = op;
    b->count_acc = op == 1 ? 1 : 0;
  }
  if (op == 0) b->count_acc += pred != 0;
  else if (op == 1) b->count_acc = b->count_acc && pred != 0;
  else b->count_acc = b->count_acc || pred != 0;
  block_barrier(file, line);
  return b->count_result;
}

namespace {
// Arrives at the warp barrier of a collective `kind`; returns once every live lane of the mask has
// arrived at the same kind of collective.
void warp_arrive(Fiber* f, unsigned mask, const char* kind, const char* file, int line) {
  Block* b = f->block;
  Warp& wp = b->warps[f->warp];
  const unsigned exist = wp.lanes == 32 ? 0xffffffffu : ((1u << wp.lanes) - 1u);
  if (!(mask & (1u << f->ctx.lane)))
    fault_fiber(f, std::string(kind) + ": the calling lane is not in the mask");
  if ((mask & exist) != exist)
    fault_fiber(f, std::string(kind) + ": partial-warp masks are not modelled by the emulator (mask 0x" +
                       [&] { char h[16]; std::snprintf(h, sizeof(h), "%08x", mask); return std::string(h); }() + ")");
  const int expected = wp.live;  // exited lanes do not take part (CUDA: "non-exited threads")
  if (wp.arrived == 0) {
    wp.kind = kind;
    wp.file = file;
    wp.line = line;
    wp.mask = mask;
  } else if (std::strcmp(wp.kind, kind) != 0 || wp.mask != mask) {
    fault_fiber(f, std::string("divergent warp collectives: lane ") + std::to_string(f->ctx.lane) + " at " + kind +
                       " (" + file + ":" + std::to_string(line) + ") while other lanes wait at " + wp.kind + " (" +
                       wp.file + ":" + std::to_string(wp.line) + ")");
  }
  f->wkind = kind;
  f->wfile = file;
  f->wline = line;
  wp.arrived++;
  if (wp.arrived == expected) {
    release_warp(b, f->warp);
    return;
  }
  f->st = St::kWaitWarp;
  switch_to_scheduler(f, false);
}
}  // namespace

void warp_barrier(unsigned mask, const char* kind, const char* file, int line) {
  Fiber* f = cur_fiber();
  if (!f) outside_kernel(kind);
  f->coll++;
  warp_arrive(f, mask, kind, file, line);
}

void warp_exchange(unsigned mask, const void* in, void* out, int bytes, int src, const char* kind, const char* file,
                   int line) {
  Fiber* f = cur_fiber();
  if (!f) outside_kernel(kind);
  Warp& wp = f->block->warps[f->warp];
  const int par = static_cast<int>(f->coll++ & 1u);
  const int seq = static_cast<int>(f->coll);
  uint64_t v = 0;
  std::memcpy(&v, in, bytes);
  wp.xbuf[par][f->ctx.lane] = v;
  wp.xsrc[par][f->ctx.lane] = seq;
  warp_arrive(f, mask, kind, file, line);
  if (src < 0 || src == f->ctx.lane) {
    std::memcpy(out, in, bytes);
    return;
  }
  if (src >= wp.lanes || wp.xsrc[par][src] != seq)
    fault_fiber(f, std::string(kind) + ": source lane " + std::to_string(src) + " does not exist or has exited");
  std::memcpy(out, &wp.xbuf[par][src], bytes);
}

unsigned warp_ballot(unsigned mask, int pred, const char* file, int line) {
  Fiber* f = cur_fiber();
  if (!f) outside_kernel("__ballot_sync");
  Warp& wp = f->block->warps[f->warp];
  const int par = static_cast<int>(f->coll++ & 1u);
  const int seq = static_cast<int>(f->coll);
  wp.xbuf[par][f->ctx.lane] = pred != 0;
  wp.xsrc[par][f->ctx.lane] = seq;
  warp_arrive(f, mask, "__ballot_sync", file, line);
  unsigned r = 0;
  for (int l = 0; l < wp.lanes; ++l)
    if ((mask & (1u << l)) && wp.xsrc[par][l] == seq && wp.xbuf[par][l]) r |= 1u << l;
  return r;
}

unsigned live_lanes() {
  Fiber* f = cur_fiber();
  if (!f) outside_kernel("__activemask");
  const Warp& wp = f->block->warps[f->warp];
  unsigned m = 0;
  for (int l = 0; l < wp.lanes; ++l)
    if (wp.lane_fiber[l]->st != St::kDone || wp.lane_fiber[l] == f) m |= 1u << l;
  return m;
}

void cluster_barrier(const char* file, int line) {
  Fiber* f = cur_fiber();
  if (!f) outside_kernel("cluster.sync");
  Unit* u = f->block->unit;
  arrive(f, &u->cl_arrived, u->cl_live, &u->cl_file, &u->cl_line, St::kWaitCluster, file, line,
         [u] { release_cluster(u); });
}

unsigned char* dynamic_smem(size_t align, const char* file, int line) {
  Fiber* f = cur_fiber();
  if (!f) outside_kernel("dynamic shared memory");
  Block* b = f->block;
  if (align > 1024) fault_fiber(f, std::string("dynamic shared memory alignment > 1024 requested at ") + file + ":" +
                                       std::to_string(line));
  return b->smem;  // nullptr when the launch asked for none: any access is a fault
}

size_t dynamic_smem_bytes() {
  Fiber* f = cur_fiber();
  if (!f) outside_kernel("dynamic shared memory");
  return f->block->smem_bytes;
}

size_t shared_offset(const void* p, const char* what) {
  Fiber* f = cur_fiber();
  if (!f) outside_kernel(what);
  Block* b = f->block;
  const auto* c = static_cast<const unsigned char*>(p);
  if (!b->smem || c < b->smem || c >= b->smem + b->smem_bytes)
    fault_fiber(f, std::string(what) + ": address is not in this block's shared memory");
  return static_cast<size_t>(c - b->smem);
}

void cp_async(void* dst, const void* src, int bytes, const char* file, int line) {
  Fiber* f = cur_fiber();
  if (!f) outside_kernel("cp.async");
  if (bytes != 4 && bytes != 8 && bytes != 16) fault_fiber(f, "cp.async: size must be 4, 8 or 16 bytes");
  const size_t off = shared_offset(dst, "cp.async destination");
  if (off + bytes > f->block->smem_bytes) fault_fiber(f, "cp.async: destination runs past the shared memory");
  if ((reinterpret_cast<uintptr_t>(dst) | reinterpret_cast<uintptr_t>(src)) % unsigned(bytes))
    fault_fiber(f, std::string("cp.async: misaligned address (") + file + ":" + std::to_string(line) + ")");
  Fiber::Pending p;
  p.dst = dst;
  p.bytes = bytes;
  std::memcpy(p.data, src, bytes);  // the source is read now (checked by ASan in the checked build)
  std::memset(dst, 0xFF, bytes);    // undefined until the wait: reads as NaN
  f->pending.push_back(p);
}

void cp_async_wait_all() {
  Fiber* f = cur_fiber();
  if (!f) outside_kernel("cp.async.wait_all");
  flush_pending(f);
}

unsigned cluster_rank() {
  Fiber* f = cur_fiber();
  if (!f) outside_kernel("cluster rank");
  return f->block->rank;
}
unsigned cluster_size() {
  Fiber* f = cur_fiber();
  if (!f) outside_kernel("cluster size");
  return static_cast<unsigned>(f->block->unit->blocks.size());
}

void* cluster_map_shared(const void* p, unsigned rank, const char* file, int line) {
  Fiber* f = cur_fiber();
  if (!f) outside_kernel("map_shared_rank");
  Unit* u = f->block->unit;
  if (rank >= u->blocks.size())
    fault_fiber(f, "map_shared_rank: rank " + std::to_string(rank) + " >= cluster size " +
                       std::to_string(u->blocks.size()) + " (" + file + ":" + std::to_string(line) + ")");
  const size_t off = shared_offset(p, "map_shared_rank");
  return u->blocks[rank].smem + off;
}

void frag_pos(int use, int lane, int e, int* row, int* col) {
  const LayoutTable& t = layout_table();
  *row = t.row[use][lane][e];
  *col = t.col[use][lane][e];
}

void check_wmma_ptr(const void* p, unsigned ldm, int elem_bytes, const char* what) {
  if (reinterpret_cast<uintptr_t>(p) % 32 != 0) fault("%s: pointer %p is not 32-byte aligned", what, p);
  if ((size_t(ldm) * elem_bytes) % 16 != 0)
    fault("%s: ldm %u is not a multiple of 16 bytes (%d-byte elements)", what, ldm, elem_bytes);
}

void wmma_exchange(const float* a8, const float* b8, const float* c8, const float** A, const float** B,
                   const float** Cm) {
  Fiber* f = cur_fiber();
  if (!f) outside_kernel("wmma::mma_sync");
  Warp& wp = f->block->warps[f->warp];
  const int par = static_cast<int>(f->coll++ & 1u);
  const LayoutTable& t = layout_table();
  const int lane = f->ctx.lane;
  for (int e = 0; e < 8; ++e) {
    wp.mA[par][t.row[kUseA][lane][e] * 16 + t.col[kUseA][lane][e]] = a8[e];
    wp.mB[par][t.row[kUseB][lane][e] * 16 + t.col[kUseB][lane][e]] = b8[e];
    wp.mC[par][t.row[kUseAcc][lane][e] * 16 + t.col[kUseAcc][lane][e]] = c8[e];
  }
  warp_arrive(f, 0xffffffffu, "wmma::mma_sync", "wmma.h", 0);
  *A = wp.mA[par];
  *B = wp.mB[par];
  *Cm = wp.mC[par];
}

void nvtx_push(const char* name) {
  std::lock_guard<std::mutex> lk(g_stats_mu);
  g_nvtx_stack.push_back(name);
  g_nvtx_log.push_back(name);
}
void nvtx_pop() {
  std::lock_guard<std::mutex> lk(g_stats_mu);
  if (!g_nvtx_stack.empty()) g_nvtx_stack.pop_back();
}

// =====================================================================================================
// launch
// =====================================================================================================
cudaError_t func_set_attribute(const void* fn, cudaFuncAttribute attr, int value) {
  std::lock_guard<std::mutex> lk(g_attr_mu);
  FuncAttr& a = g_attrs[fn];
  if (attr == cudaFuncAttributeMaxDynamicSharedMemorySize) {
    if (value < 0 || value > cfg().smem_optin)
      return set_error(cudaErrorInvalidValue, std::string("cudaFuncSetAttribute(MaxDynamicSharedMemorySize, ") +
                                                  std::to_string(value) + ") above the device's opt-in limit " +
                                                  std::to_string(cfg().smem_optin));
    a.max_dyn_smem = value;
  } else if (attr == cudaFuncAttributeNonPortableClusterSizeAllowed) {
    a.nonportable_cluster = value != 0;
  }
  return cudaSuccess;
}

cudaError_t launch(const LaunchSpec& s) {
  const char* name = kernel_name(s.fn, s.expr);
  t_last_detail.clear();  // miras_emu_last_fault() describes this launch from here on
  t_detail_code = cudaSuccess;
  auto bad = [&](cudaError_t e, const std::string& why) {
    return set_error(e, std::string("launch of ") + name + " refused: " + why);
  };
  const unsigned long long nthr = 1ull * s.block.x * s.block.y * s.block.z;
  if (s.block.x == 0 || s.block.y == 0 || s.block.z == 0 || s.block.x > 1024 || s.block.y > 1024 || s.block.z > 64 ||
      nthr > 1024)
    return bad(cudaErrorInvalidConfiguration, "block (" + std::to_string(s.block.x) + "," + std::to_string(s.block.y) +
                                                  "," + std::to_string(s.block.z) + ") exceeds 1024 threads or a block dimension limit");
  if (s.grid.x == 0 || s.grid.y == 0 || s.grid.z == 0 || s.grid.x > 0x7fffffffu || s.grid.y > 65535 ||
      s.grid.z > 65535)
    return bad(cudaErrorInvalidConfiguration, "grid (" + std::to_string(s.grid.x) + "," + std::to_string(s.grid.y) + "," +
                                                  std::to_string(s.grid.z) + ") is empty or exceeds the grid limits");
  if (s.param_bytes > 32764)
    return bad(cudaErrorInvalidValue, "kernel parameters take " + std::to_string(s.param_bytes) + " bytes (> 32764)");
  FuncAttr attr;
  {
    std::lock_guard<std::mutex> lk(g_attr_mu);
    auto it = g_attrs.find(s.fn);
    if (it != g_attrs.end()) attr = it->second;
  }
  if (s.smem > size_t(cfg().smem_optin))
    return bad(cudaErrorInvalidValue, std::to_string(s.smem) + " bytes of dynamic shared memory exceed the device's " +
                                          std::to_string(cfg().smem_optin));
  if (s.smem > size_t(attr.max_dyn_smem))
    return bad(cudaErrorInvalidValue, std::to_string(s.smem) + " bytes of dynamic shared memory without "
                                          "cudaFuncSetAttribute(MaxDynamicSharedMemorySize) >= that (set: " +
                                          std::to_string(attr.max_dyn_smem) + ")");
  const unsigned long long ncl = 1ull * s.cluster.x * s.cluster.y * s.cluster.z;
  if (ncl == 0 || ncl > (attr.nonportable_cluster ? 16u : 8u))
    return bad(cudaErrorInvalidConfiguration, "cluster of " + std::to_string(ncl) + " blocks (limit 8, 16 non-portable)");
  if (s.grid.x % s.cluster.x || s.grid.y % s.cluster.y || s.grid.z % s.cluster.z)
    return bad(cudaErrorInvalidConfiguration, "grid is not a multiple of the cluster dimensions");

  std::lock_guard<std::mutex> launch_lock(g_launch_mu);
  const uint64_t seq = ++g_launch_seq;
  {
    std::lock_guard<std::mutex> lk(g_stats_mu);
    KStat& k = g_stats[name];
    k.launches++;
    k.blocks += 1ll * s.grid.x * s.grid.y * s.grid.z;
    k.threads += 1ll * s.grid.x * s.grid.y * s.grid.z * nthr;
  }
  // Units: clusters in grid order (a cluster's blocks are consecutive along each dimension).
  const unsigned cx = s.grid.x / s.cluster.x, cy = s.grid.y / s.cluster.y, cz = s.grid.z / s.cluster.z;
  const unsigned long long nunits = 1ull * cx * cy * cz;
  std::atomic<unsigned long long> next{0};
  std::atomic<bool> stop{false};
  std::mutex fmu;
  unsigned long long fault_unit = ~0ull;
  std::string fault_msg;
  pool().run([&](Worker& w) {
    for (;;) {
      if (stop.load()) return;
      const unsigned long long ui = next.fetch_add(1);
      if (ui >= nunits) return;
      Unit u;
      u.spec = &s;
      u.kname = name;
      u.rng.seed(cfg().seed * 0x9E3779B97F4A7C15ull + seq * 1000003ull + ui);
      const unsigned ux = unsigned(ui % cx), uy = unsigned((ui / cx) % cy), uz = unsigned(ui / (1ull * cx * cy));
      u.blocks.resize(ncl);
      unsigned r = 0;
      for (unsigned z = 0; z < s.cluster.z; ++z)
        for (unsigned y = 0; y < s.cluster.y; ++y)
          for (unsigned x = 0; x < s.cluster.x; ++x, ++r) {
            u.blocks[r].rank = r;
            u.blocks[r].bid = uint3{ux * s.cluster.x + x, uy * s.cluster.y + y, uz * s.cluster.z + z};
          }
      run_unit(w, u);
      if (u.fault) {
        std::lock_guard<std::mutex> lk(fmu);
        if (ui < fault_unit) {
          fault_unit = ui;
          fault_msg = u.fault_msg;
        }
        stop.store(true);
      }
    }
  });
  if (fault_unit != ~0ull) return set_error(cudaErrorLaunchFailure, fault_msg);
  return cudaSuccess;
}

}  // namespace emu
}  // namespace miras

// =========================================================================================================
// runtime API (runtime.h)
// =========================================================================================================
using miras::emu::cfg;
using miras::emu::set_error;

static const char* std_error_string(cudaError_t e) {
  switch (e) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorMemoryAllocation: return "out of memory";
    case cudaErrorInitializationError: return "initialization error";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    case cudaErrorInvalidDevicePointer: return "invalid device pointer";
    case cudaErrorInvalidDeviceFunction: return "invalid device function";
    case cudaErrorNoDevice: return "no CUDA-capable device is detected";
    case cudaErrorInvalidDevice: return "invalid device ordinal";
    case cudaErrorIllegalAddress: return "an illegal memory access was encountered";
    case cudaErrorLaunchOutOfResources: return "too many resources requested for launch";
    case cudaErrorAssert: return "device-side assert triggered";
    case cudaErrorMisalignedAddress: return "misaligned address";
    case cudaErrorLaunchFailure: return "unspecified launch failure";
    case cudaErrorNotSupported: return "operation not supported";
    default: return "unknown error";
  }
}

const char* cudaGetErrorString(cudaError_t e) {
  using namespace miras::emu;
  if (e != cudaSuccess && e == t_detail_code && !t_last_detail.empty()) {
    t_err_string = std::string(std_error_string(e)) + " [emulator: " + t_last_detail + "]";
    return t_err_string.c_str();
  }
  return std_error_string(e);
}
const char* cudaGetErrorName(cudaError_t e) { return std_error_string(e); }
cudaError_t cudaGetLastError() {
  const cudaError_t e = miras::emu::t_last_error;
  miras::emu::t_last_error = cudaSuccess;
  return e;
}
cudaError_t cudaPeekAtLastError() { return miras::emu::t_last_error; }
cudaError_t cudaGetDevice(int* dev) {
  if (!dev) return cudaErrorInvalidValue;
  *dev = 0;
  return cudaSuccess;
}
cudaError_t cudaSetDevice(int dev) { return dev == 0 ? cudaSuccess : cudaErrorInvalidDevice; }
cudaError_t cudaGetDeviceCount(int* n) {
  if (!n) return cudaErrorInvalidValue;
  *n = 1;
  return cudaSuccess;
}
cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int dev) {
  if (!value || dev != 0) return cudaErrorInvalidValue;
  switch (attr) {  // an sm_90 device (H100 SXM)
    case cudaDevAttrMaxThreadsPerBlock: *value = 1024; break;
    case cudaDevAttrMaxBlockDimX: *value = 1024; break;
    case cudaDevAttrMaxBlockDimY: *value = 1024; break;
    case cudaDevAttrMaxBlockDimZ: *value = 64; break;
    case cudaDevAttrMaxGridDimX: *value = 0x7fffffff; break;
    case cudaDevAttrMaxGridDimY: *value = 65535; break;
    case cudaDevAttrMaxGridDimZ: *value = 65535; break;
    case cudaDevAttrMaxSharedMemoryPerBlock: *value = 49152; break;
    case cudaDevAttrWarpSize: *value = 32; break;
    case cudaDevAttrMaxRegistersPerBlock: *value = 65536; break;
    case cudaDevAttrMultiProcessorCount: *value = 132; break;
    case cudaDevAttrComputeCapabilityMajor: *value = 9; break;
    case cudaDevAttrComputeCapabilityMinor: *value = 0; break;
    case cudaDevAttrMaxSharedMemoryPerMultiprocessor: *value = 233472; break;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin: *value = cfg().smem_optin; break;
    case cudaDevAttrClusterLaunch: *value = 1; break;
    default: return set_error(cudaErrorInvalidValue, "cudaDeviceGetAttribute: attribute not modelled");
  }
  return cudaSuccess;
}
cudaError_t cudaDeviceSynchronize() { return cudaSuccess; }
cudaError_t cudaStreamSynchronize(cudaStream_t) { return cudaSuccess; }

cudaError_t cudaMalloc(void** p, size_t bytes) {
  if (!p) return cudaErrorInvalidValue;
  void* q = nullptr;
  if (posix_memalign(&q, 256, bytes ? bytes : 1) != 0) return cudaErrorMemoryAllocation;
  std::memset(q, 0xFF, bytes);  // device memory starts as garbage: NaN bytes
  {
    std::lock_guard<std::mutex> lk(miras::emu::g_alloc_mu);
    miras::emu::g_allocs[reinterpret_cast<uintptr_t>(q)] = bytes;
  }
  *p = q;
  return cudaSuccess;
}
cudaError_t cudaFree(void* p) {
  if (!p) return cudaSuccess;
  {
    std::lock_guard<std::mutex> lk(miras::emu::g_alloc_mu);
    auto it = miras::emu::g_allocs.find(reinterpret_cast<uintptr_t>(p));
    if (it == miras::emu::g_allocs.end())
      return set_error(cudaErrorInvalidDevicePointer, "cudaFree of a pointer cudaMalloc did not return");
    miras::emu::g_allocs.erase(it);
  }
  std::free(p);
  return cudaSuccess;
}
cudaError_t cudaMemcpy(void* dst, const void* src, size_t bytes, cudaMemcpyKind) {
  if (bytes && (!dst || !src)) return cudaErrorInvalidValue;
  std::memmove(dst, src, bytes);
  return cudaSuccess;
}
cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t bytes, cudaMemcpyKind k, cudaStream_t) {
  return cudaMemcpy(dst, src, bytes, k);
}
cudaError_t cudaMemset(void* dst, int value, size_t bytes) {
  if (bytes && !dst) return cudaErrorInvalidValue;
  std::memset(dst, value, bytes);
  return cudaSuccess;
}
cudaError_t cudaMemsetAsync(void* dst, int value, size_t bytes, cudaStream_t) { return cudaMemset(dst, value, bytes); }

// =========================================================================================================
// AddressSanitizer hook (checked build): a report inside a kernel fails that launch, naming the kernel,
// block and thread (the runtime is preloaded, so a weak __asan_on_error here would not be called)
// =========================================================================================================
#if MIRAS_EMU_HAVE_ASAN
namespace {
void on_asan_report(const char* report) {
  miras::emu::Fiber* f = miras::emu::cur_fiber();
  if (!f) return;
  miras::emu::Unit* u = f->block->unit;
  std::string first(report ? report : "");
  const size_t a = first.find("ERROR: AddressSanitizer");
  if (a != std::string::npos) first = first.substr(a);
  const size_t nl = first.find('\n');
  if (nl != std::string::npos) first = first.substr(0, nl);
  std::fprintf(stderr, "[miras emu] the report above is from kernel %s, %s\n", u->kname, miras::emu::where(f).c_str());
  if (!u->fault) {
    u->fault = true;
    u->fault_msg = std::string("kernel ") + u->kname + ", " + miras::emu::where(f) + ": " + first;
  }
}
struct RegisterAsanHook {
  RegisterAsanHook() { __asan_set_error_report_callback(on_asan_report); }
} g_register_asan_hook;
}  // namespace
#endif

// =========================================================================================================
// control API for the tests (C linkage, exported)
// =========================================================================================================
extern "C" {

__attribute__((visibility("default"))) int miras_emu_is_emulator(void) { return 1; }
__attribute__((visibility("default"))) int miras_emu_has_asan(void) { return MIRAS_EMU_HAVE_ASAN; }

// Changes a setting at run time: "schedule" (0 ordered, 1 reverse, 2 shuffle), "seed", "mutation",
// "smem_optin", "quiet", "wmma_layout" (0 mma, 1 scrambled). Returns 0, or -1 for an unknown key.
__attribute__((visibility("default"))) int miras_emu_configure(const char* key, long long value) {
  using namespace miras::emu;
  std::lock_guard<std::mutex> lk(g_launch_mu);
  std::string k(key);
  if (k == "schedule") cfg().schedule = int(value);
  else if (k == "seed") cfg().seed = uint64_t(value);
  else if (k == "mutation") cfg().mutation = int(value);
  else if (k == "smem_optin") cfg().smem_optin = int(value);
  else if (k == "quiet") cfg().quiet = value != 0;
  else if (k == "wmma_layout") {
    cfg().layout = int(value);
    layout_table() = make_layout(cfg().layout, 7);
  } else return -1;
  return 0;
}

// "name launches blocks threads\n" per kernel launched since the last reset. Returns the length
// needed (writes at most n bytes, NUL-terminated).
__attribute__((visibility("default"))) size_t miras_emu_kernel_stats(char* buf, size_t n) {
  using namespace miras::emu;
  std::lock_guard<std::mutex> lk(g_stats_mu);
  std::string s;
  for (auto& kv : g_stats)
    s += kv.first + " " + std::to_string(kv.second.launches) + " " + std::to_string(kv.second.blocks) + " " +
         std::to_string(kv.second.threads) + "\n";
  if (buf && n) {
    std::strncpy(buf, s.c_str(), n - 1);
    buf[n - 1] = 0;
  }
  return s.size() + 1;
}

// The NVTX ranges opened since the last reset, one per line.
__attribute__((visibility("default"))) size_t miras_emu_nvtx_log(char* buf, size_t n) {
  using namespace miras::emu;
  std::lock_guard<std::mutex> lk(g_stats_mu);
  std::string s;
  for (auto& r : g_nvtx_log) s += r + "\n";
  if (buf && n) {
    std::strncpy(buf, s.c_str(), n - 1);
    buf[n - 1] = 0;
  }
  return s.size() + 1;
}

__attribute__((visibility("default"))) void miras_emu_reset_stats(void) {
  using namespace miras::emu;
  std::lock_guard<std::mutex> lk(g_stats_mu);
  g_stats.clear();
  g_nvtx_log.clear();
  g_launch_seq = 0;  // shuffle schedules are reproducible from here
}

// The emulator's message of the calling thread's last failed launch or API call.
__attribute__((visibility("default"))) const char* miras_emu_last_fault(void) {
  return miras::emu::t_last_detail.c_str();
}

__attribute__((visibility("default"))) void* miras_emu_malloc(size_t bytes) {
  void* p = nullptr;
  return cudaMalloc(&p, bytes) == cudaSuccess ? p : nullptr;
}
__attribute__((visibility("default"))) int miras_emu_free(void* p) { return cudaFree(p) == cudaSuccess ? 0 : -1; }

__attribute__((visibility("default"))) unsigned short miras_emu_f32_to_f16(float f) {
  return miras::emu::f32_to_f16_rn(f);
}
__attribute__((visibility("default"))) unsigned short miras_emu_f32_to_bf16(float f) {
  return miras::emu::f32_to_bf16_rn(f);
}
__attribute__((visibility("default"))) float miras_emu_f16_to_f32(unsigned short h) { return miras::emu::f16_to_f32(h); }

}  // extern "C"
