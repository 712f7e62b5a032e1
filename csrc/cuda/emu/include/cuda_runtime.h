/* Emulated build only (csrc/cuda/emu/include is on its include path, never on nvcc's). */
#include "../cuda_emu.h"
