// Emulator stand-in for <mma.h> (see miras_emu/wmma.h).
#pragma once
#include "miras_emu/wmma.h"
