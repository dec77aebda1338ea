// dequant_nf4.cu: the 4-bit (NF4 / FP4 / INT4) dequantization kernel of minqlora (lesson 05).
//
// The format (lesson 04): two 4-bit indices per byte, element 0 in the HIGH nibble; one absmax
// per `blocksize` elements, stored either as float32 or, double quantized ("nested"), as a
// uint8 index into the 256-value dynamic code with one absmax2 per 256 absmaxes and an offset:
//
//     absmax[b] = dynamic_code[qabsmax[b]] * absmax2[b / 256] + offset      (float32)
//     out[i]    = code[nibble i] * absmax[i / blocksize]                     (float32, cast once)
//
// Launch geometry (minqlora/launch.py reads the two #defines below from this file):
//   * one thread owns BYTES_PER_THREAD consecutive packed bytes = 2 * BYTES_PER_THREAD outputs;
//     it reads them 16 bytes at a time (one uint4: a single 128-bit load instruction) and
//     writes its outputs 16 bytes at a time (float4 / uint4 stores);
//   * a block is THREADS_PER_BLOCK threads (8 warps), grid = ceil(n / elements per block).
//   With the defaults a block covers 256 * 32 = 8192 weights, so a 4096x4096 weight is a grid
//   of 2048 blocks: enough to keep every SM of an H100/H200 busy for a few waves, while each
//   thread has 16 bytes of loads and 64 (bf16) or 128 (fp32) bytes of stores in flight, which is
//   what a memory-bound kernel needs to reach the bandwidth of HBM. The loads of a warp are one
//   contiguous 512-byte run; its stores are 16-byte pieces 64 bytes apart that the L2 cache merges
//   into full lines (an interleaved layout would make each store instruction contiguous too).
//
// Where the tables live:
//   * the 16-entry code sits in shared memory: every thread looks up a *different* entry, and
//     shared memory serves 32 different addresses in 16 different banks in one cycle (constant
//     memory would serialise them, it is fast only when a warp reads one address);
//   * the 256-entry dynamic code and the absmaxes are read through the read-only cache (__ldg):
//     a thread needs one absmax per block of weights, not one per weight.
//
// The same text compiles for the CPU: kernels/emulate.cpp includes kernels/cuda_shim.h (which
// supplies threadIdx, blockIdx, __global__, __shared__, ...) and then this file, and runs every
// (block, thread) of the grid in loops. Only the two float -> 16-bit conversions below differ:
// on the GPU they are one PTX instruction, in the shim the same rounding written in C++.

#define THREADS_PER_BLOCK 256
#define BYTES_PER_THREAD 16          // a multiple of 16: one uint4 load per 16 bytes

#ifndef MINQLORA_EMULATE
// float32 -> bfloat16 / float16 bits, round to nearest even (what torch's .to() does).
__device__ __forceinline__ unsigned short float_to_bf16_rn(float x) {
    unsigned short h;
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(x));   // sm_80 and newer
    return h;
}
__device__ __forceinline__ unsigned short float_to_f16_rn(float x) {
    unsigned short h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(x));
    return h;
}
#endif

// The three output types. Each knows how to convert one float and how to store 8 outputs
// (8 x 4 bytes = two float4 stores for fp32, 8 x 2 bytes = one uint4 store for bf16 / fp16).
struct OutF32 {
    typedef float T;
    __device__ static T convert(float v) { return v; }
    __device__ static void store8(T* out, const float* v) {
        float4* o = reinterpret_cast<float4*>(out);
        o[0] = make_float4(v[0], v[1], v[2], v[3]);
        o[1] = make_float4(v[4], v[5], v[6], v[7]);
    }
};

template <bool BF16>
struct Out16 {                          // bf16 and fp16: the output holds the 16 raw bits
    typedef unsigned short T;
    __device__ static T convert(float v) { return BF16 ? float_to_bf16_rn(v) : float_to_f16_rn(v); }
    __device__ static void store8(T* out, const float* v) {
        // little-endian: the lower 16 bits of each word are the earlier element
        unsigned int w[4];
#pragma unroll
        for (int k = 0; k < 4; ++k)
            w[k] = (unsigned int)convert(v[2 * k]) | ((unsigned int)convert(v[2 * k + 1]) << 16);
        *reinterpret_cast<uint4*>(out) = make_uint4(w[0], w[1], w[2], w[3]);
    }
};
typedef Out16<true> OutBF16;
typedef Out16<false> OutF16;

// The absmax of block b: stored as float32, or double-dequantized. __fmul_rn / __fadd_rn round
// the product before adding (no fused multiply-add), exactly as the torch path does.
template <bool NESTED>
__device__ __forceinline__ float block_absmax(long long b, const float* absmax,
                                              const unsigned char* qabsmax, const float* code2,
                                              const float* absmax2, const float* offset,
                                              int log2_blocksize2) {
    if (!NESTED) return __ldg(absmax + b);
    float scaled = __fmul_rn(__ldg(code2 + __ldg(qabsmax + b)),             // DYNAMIC[qabsmax[b]]
                             __ldg(absmax2 + (b >> log2_blocksize2)));        // * absmax2[b / 256]
    return __fadd_rn(scaled, __ldg(offset));
}

// One thread: BYTES_PER_THREAD packed bytes -> 2 * BYTES_PER_THREAD outputs.
template <class Out, bool NESTED>
__device__ void dequant_4bit(const unsigned char* __restrict__ packed,   // ceil(n / 2) bytes
                             const float* __restrict__ code,             // 16 floats
                             const float* __restrict__ absmax,           // n_blocks floats (plain)
                             const unsigned char* __restrict__ qabsmax,  // n_blocks bytes (nested)
                             const float* __restrict__ code2,            // 256 floats (nested)
                             const float* __restrict__ absmax2,          // n_blocks / 256 (nested)
                             const float* __restrict__ offset,           // 1 float (nested)
                             typename Out::T* __restrict__ out,          // n outputs
                             long long n, int log2_blocksize, int log2_blocksize2) {
    // 1. The 16 code values into shared memory. Thread 0 copies all 16 and the barrier makes
    //    every thread of the block wait for it. (Thread 0 rather than threads 0..15: the CPU
    //    emulation runs the threads of a block one after another, so whatever a barrier guards
    //    must be written by thread 0, which runs first.)
    __shared__ float table[16];
    if (threadIdx.x == 0)
        for (int k = 0; k < 16; ++k) table[k] = code[k];
    __syncthreads();

    // 2. Which outputs are mine: first = 2 * BYTES_PER_THREAD * (global thread index).
    const long long thread = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    const long long first = thread * (2 * BYTES_PER_THREAD);
    if (first >= n) return;
    // A chunk is 32 weights starting at a multiple of 32. Blocksizes are powers of two, so a new
    // absmax block starts every `group` weights inside it: every blocksize weights when the
    // blocksize is below 32, else only at the chunk's first weight (group = 32).
    const int group = log2_blocksize < 5 ? (1 << log2_blocksize) : 32;

    if (first + 2 * BYTES_PER_THREAD <= n) {
        // 3. The hot loop: every thread but the last one takes this path (no divergence).
#pragma unroll
        for (int c = 0; c < BYTES_PER_THREAD / 16; ++c) {
            const long long e0 = first + 32 * c;                 // first of this chunk's 32 outputs
            const uint4 bytes = *reinterpret_cast<const uint4*>(packed + e0 / 2);  // 16 bytes
            const unsigned int words[4] = {bytes.x, bytes.y, bytes.z, bytes.w};
            float v[32];                                         // this chunk in float32
            float scale = 0.0f;
#pragma unroll
            for (int j = 0; j < 32; j += 2) {
                if ((j & (group - 1)) == 0)                      // a new absmax block starts
                    scale = block_absmax<NESTED>((e0 + j) >> log2_blocksize, absmax, qabsmax,
                                                 code2, absmax2, offset, log2_blocksize2);
                // byte j / 2 of the 16: word j / 8, shifted by 8 bits per byte before it in the
                // word (little-endian: a word's first byte is its lowest 8 bits)
                const unsigned int byte = (words[j / 8] >> (8 * ((j / 2) % 4))) & 0xFF;
                v[j] = __fmul_rn(table[byte >> 4], scale);       // element 0: the high nibble
                v[j + 1] = __fmul_rn(table[byte & 0xF], scale);  // element 1: the low nibble
            }
#pragma unroll
            for (int k = 0; k < 4; ++k) Out::store8(out + e0 + 8 * k, v + 8 * k);
        }
    } else {
        // 4. The tail (the last thread only): one output at a time, stopping at n.
        for (long long i = first; i < n; ++i) {
            const unsigned int byte = packed[i / 2];
            const unsigned int nibble = (i % 2 == 0) ? (byte >> 4) : (byte & 0xF);
            const float scale = block_absmax<NESTED>(i >> log2_blocksize, absmax, qabsmax, code2,
                                                     absmax2, offset, log2_blocksize2);
            out[i] = Out::convert(__fmul_rn(table[nibble], scale));
        }
    }
}

// The six kernels Python launches: {fp32, bf16, fp16} x {plain absmax, nested}. One signature
// for all six; a plain kernel ignores qabsmax, code2, absmax2 and offset (pass null pointers).
#define DEQUANT_KERNEL(name, Out, NESTED)                                                       \
    extern "C" __global__ void __launch_bounds__(THREADS_PER_BLOCK) name(                       \
        const unsigned char* packed, const float* code, const float* absmax,                    \
        const unsigned char* qabsmax, const float* code2, const float* absmax2,                 \
        const float* offset, Out::T* out, long long n, int log2_blocksize, int log2_blocksize2) { \
        dequant_4bit<Out, NESTED>(packed, code, absmax, qabsmax, code2, absmax2, offset, out,    \
                                  n, log2_blocksize, log2_blocksize2);                          \
    }

DEQUANT_KERNEL(dequant_4bit_f32, OutF32, false)
DEQUANT_KERNEL(dequant_4bit_bf16, OutBF16, false)
DEQUANT_KERNEL(dequant_4bit_f16, OutF16, false)
DEQUANT_KERNEL(dequant_4bit_f32_nested, OutF32, true)
DEQUANT_KERNEL(dequant_4bit_bf16_nested, OutBF16, true)
DEQUANT_KERNEL(dequant_4bit_f16_nested, OutF16, true)
