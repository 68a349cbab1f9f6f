// Single translation unit of the CPU-emulated extension (tests only; see cuda_emu.h): the
// kernels and launchers of csrc/*.cu and the bindings, compiled by the host compiler with
// -DCVF_EMULATE.
#include "../layer_norm.cu"
#include "../bias_gelu.cu"
#include "../token_assemble.cu"
#include "../cross_attention.cu"
#include "../bindings.cpp"
