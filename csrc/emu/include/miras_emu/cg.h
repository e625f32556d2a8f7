// miras_emu/cg.h — the part of cooperative_groups the kernels use: this_thread_block() and
// this_cluster() (sync, block_rank, num_blocks, map_shared_rank for distributed shared memory).
// An ordinary launch is a cluster of one block, as on sm_90. map_shared_rank checks that the
// address lies in this block's dynamic shared memory and that the rank exists; a peer block's
// shared memory is poisoned once that block has exited (touching it then is a bug on hardware).
#pragma once
#include "core.h"

namespace cooperative_groups {

class thread_block {
 public:
  void sync(const char* file = __builtin_FILE(), int line = __builtin_LINE()) const {
    ::miras::emu::block_barrier(file, line);
  }
  unsigned thread_rank() const { return static_cast<unsigned>(::miras::emu::ctx("thread_rank").linear); }
  unsigned size() const {
    const dim3 b = ::miras::emu::ctx("size").bdim;
    return b.x * b.y * b.z;
  }
  unsigned num_threads() const { return size(); }
  dim3 group_index() const { return dim3(::miras::emu::ctx("group_index").bid); }
  dim3 thread_index() const { return dim3(::miras::emu::ctx("thread_index").tid); }
};
inline thread_block this_thread_block() { return thread_block(); }

class cluster_group {
 public:
  void sync(const char* file = __builtin_FILE(), int line = __builtin_LINE()) const {
    ::miras::emu::cluster_barrier(file, line);
  }
  unsigned block_rank() const { return ::miras::emu::cluster_rank(); }
  unsigned num_blocks() const { return ::miras::emu::cluster_size(); }
  template <typename T>
  T* map_shared_rank(T* addr, unsigned rank, const char* file = __builtin_FILE(), int line = __builtin_LINE()) const {
    return static_cast<T*>(::miras::emu::cluster_map_shared(addr, rank, file, line));
  }
};
inline cluster_group this_cluster() { return cluster_group(); }

}  // namespace cooperative_groups
