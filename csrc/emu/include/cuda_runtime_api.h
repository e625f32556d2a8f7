// Emulator stand-in for <cuda_runtime.h> (see miras_emu/runtime.h).
#pragma once
#include "miras_emu/runtime.h"
