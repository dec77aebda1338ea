// cuda_shim.h: just enough CUDA for the host C++ compiler to compile kernels/dequant_nf4.cu.
//
// A CUDA kernel is a function that every thread of a grid runs, each reading its own
// threadIdx / blockIdx. On the CPU we keep the function and replace the hardware:
//   * threadIdx, blockIdx, blockDim, gridDim are thread_local variables that the launcher in
//     kernels/emulate.cpp sets before each call, looping over every (block, thread) of the grid;
//   * __global__, __device__, __forceinline__, __launch_bounds__ vanish; __shared__ becomes a
//     static thread_local variable (one copy per CPU thread; a CPU thread runs whole blocks);
//   * __syncthreads() does nothing: the threads of a block run one after another, in threadIdx
//     order, so a barrier is honoured only for values thread 0 writes before it (the contract
//     dequant_nf4.cu keeps). A kernel whose threads wait on each other needs real threads;
//   * the vector types (uint4, float4) are 16-byte aligned structs, __ldg is a plain load,
//     __fmul_rn / __fadd_rn are plain float operations (emulate.cpp is compiled with
//     -ffp-contract=off, so no multiply-add is fused, as on the GPU with these intrinsics);
//   * float_to_bf16_rn / float_to_f16_rn (one PTX instruction each on the GPU) are the same
//     round-to-nearest-even written with integer operations (round16.h).
#pragma once
#include <cstdint>
#include <cstring>

#define MINQLORA_EMULATE 1
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(n)
#define __shared__ static thread_local
#define __restrict__ __restrict

struct uint3 { unsigned int x, y, z; };
struct dim3 { unsigned int x, y, z; };
static thread_local uint3 threadIdx, blockIdx;
static thread_local dim3 blockDim, gridDim;

inline void __syncthreads() {}

struct alignas(16) uint4 { unsigned int x, y, z, w; };
struct alignas(16) float4 { float x, y, z, w; };
inline uint4 make_uint4(unsigned int x, unsigned int y, unsigned int z, unsigned int w) {
    return {x, y, z, w};
}
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }

template <class T> inline T __ldg(const T* p) { return *p; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }

#include "round16.h"   // float_to_bf16_rn, float_to_f16_rn: shared with dequant_cpu.cpp
