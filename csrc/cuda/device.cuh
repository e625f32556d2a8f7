// miras/cuda/device.cuh — the three hooks that let the kernel emulator (csrc/emu,
// docs/emulator.md) build the CUDA sources for the host. In a CUDA build they are the plain CUDA
// constructs; under MIRAS_EMU (the emulator's build defines it) they call the emulator.
//   MIRAS_DYNAMIC_SMEM(T, name, align)  the block's dynamic shared memory as `T* name`
//                                       (CUDA: extern __shared__ __align__(align) T name[])
//   MIRAS_LAUNCH(kernel, grid, block, smem, stream)(args...)
//                                       kernel<<<grid, block, smem, stream>>>(args...)
//   MIRAS_MUTANT(k)                     false; in the emulator true when mutation k is selected
//                                       (MIRAS_EMU_MUTATION=k): the mutation test's broken variants
// cp.async (chunk_l2_common.cuh) is the only other MIRAS_EMU branch: the emulator models it as a
// deferred copy instead of the PTX instruction.
#pragma once

#if defined(MIRAS_EMU)
#define MIRAS_DYNAMIC_SMEM(T, name, align) \
  T* const name = reinterpret_cast<T*>(::miras::emu::dynamic_smem((align), __FILE__, __LINE__))
#define MIRAS_LAUNCH(kernel, grid, block, smem, stream) \
  ::miras::emu::make_launcher(#kernel, kernel, grid, block, smem, stream)
#define MIRAS_MUTANT(k) (::miras::emu::mutation() == (k))
#else
#define MIRAS_DYNAMIC_SMEM(T, name, align) extern __shared__ __align__(align) T name[]
#define MIRAS_LAUNCH(kernel, grid, block, smem, stream) kernel<<<grid, block, smem, stream>>>
#define MIRAS_MUTANT(k) false
#endif
