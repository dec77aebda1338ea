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
//     round-to-nearest-even written with integer operations.
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

inline uint32_t float_bits(float x) { uint32_t u; std::memcpy(&u, &x, 4); return u; }

// bfloat16 is the top half of a float32: add just under half a step of the kept part (0x7FFF,
// plus one if the kept part is odd, so that ties go to even), then drop the low half. NaN
// becomes the quiet NaN 0x7FC0 (NaN bits differ between torch's own code paths and the GPU;
// quantize_4bit never makes a NaN).
inline unsigned short float_to_bf16_rn(float x) {
    uint32_t u = float_bits(x);
    if ((u & 0x7FFFFFFFu) > 0x7F800000u) return 0x7FC0;
    return (unsigned short)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

// float16: 1 sign, 5 exponent (bias 15), 10 mantissa bits; subnormals below 2^-14,
// infinity from 65520 up (the rounding of 65504 + half a step).
inline unsigned short float_to_f16_rn(float x) {
    uint32_t u = float_bits(x);
    unsigned short sign = (unsigned short)((u >> 16) & 0x8000u);
    uint32_t a = u & 0x7FFFFFFFu;
    if (a > 0x7F800000u) return sign | 0x7E00u;                  // NaN
    if (a >= 0x477FF000u) return sign | 0x7C00u;                 // >= 65520: infinity
    if (a >= 0x38800000u) {                                      // normal float16 (>= 2^-14)
        uint32_t r = a + 0xFFFu + ((a >> 13) & 1u);              // round away the low 13 bits
        return sign | (unsigned short)((r - 0x38000000u) >> 13); // rebias 127 -> 15
    }
    if (a < 0x33000000u) return sign;                            // < 2^-25: rounds to zero
    // subnormal float16: value = m * 2^-24 with m = round(mantissa-with-hidden-bit >> shift)
    uint32_t e = a >> 23, m = (a & 0x7FFFFFu) | 0x800000u;
    uint32_t shift = 126 - e;                                     // 14 .. 24
    uint32_t half = 1u << (shift - 1), rest = m & ((1u << shift) - 1), q = m >> shift;
    if (rest > half || (rest == half && (q & 1u))) ++q;
    return sign | (unsigned short)q;
}
