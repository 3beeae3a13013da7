// Portable build of the CPU kernels (at::vec's generic vectors; the compiler auto-vectorises
// for the baseline instruction set).  Runs on any CPU.
#define CPU_CAPABILITY DEFAULT
#define CPU_CAPABILITY_DEFAULT
#include "kernels_impl.h"
