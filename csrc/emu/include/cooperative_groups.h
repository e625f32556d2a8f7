// Emulator stand-in for <cooperative_groups.h> (see miras_emu/cg.h).
#pragma once
#include "miras_emu/cg.h"
