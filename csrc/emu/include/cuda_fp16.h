// Emulator stand-in for <cuda_fp16.h> (see miras_emu/half.h).
#pragma once
#include "miras_emu/half.h"
