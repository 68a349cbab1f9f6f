// The kernels and launchers of csrc/*.cu as one host-compiled translation unit of the CPU-emulated
// extension (tests only; see cuda_emu.h). bindings.cpp is compiled beside it with -DCVF_EMULATE.
#include "../layer_norm.cu"
#include "../bias_gelu.cu"
#include "../token_assemble.cu"
#include "../cross_attention.cu"
