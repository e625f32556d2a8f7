// Emulator stand-in for <nvtx3/nvToolsExt.h>: ranges are recorded (miras_emu_nvtx_log) so that
// tests can check the names the dispatcher gives them.
#pragma once
namespace miras {
namespace emu {
void nvtx_push(const char* name);
void nvtx_pop();
}  // namespace emu
}  // namespace miras
inline int nvtxRangePushA(const char* name) {
  ::miras::emu::nvtx_push(name);
  return 0;
}
inline int nvtxRangePop() {
  ::miras::emu::nvtx_pop();
  return 0;
}
