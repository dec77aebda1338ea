// dequant_cpu.cpp: the 4-bit format decoded by a loop written for a CPU (backend "cpp"; built
// and called by minqlora/cpu_decode.py). Same inputs, same definition, same bits as the GPU
// kernel dequant_nf4.cu:
//
//     absmax[b] = dynamic_code[qabsmax[b]] * absmax2[b / 256] + offset      (nested; float32)
//     out[i]    = code[nibble i] * absmax[i / blocksize]                     (float32, cast once)
//
// What differs is the order of the work. A GPU thread has no fast table it can index by a
// value, but it multiplies for free; a CPU core is the other way round. Inside one block the
// product has only 16 possible values, one per code entry, so the CPU computes them once:
//
//     out16[k] = cast(code[k] * absmax[b])        k = 0..15: 16 multiplies and roundings
//     out[i]   = out16[nibble i]                  every weight of block b: one table lookup
//
// Each out16[k] is the very product (and rounding) the definition makes for nibble k, so the
// bits are the same; at blocksize 64 that is 16 roundings per 64 weights instead of 64.
// Worked example: block absmax 2.0, NF4 -> out16[0] = -2.0, out16[7] = 0.0, out16[15] = 2.0;
// byte 0x0F decodes to (out16[0], out16[15]) = (-2.0, 2.0). Below 32 weights a block has
// fewer weights than a table has entries: those blocksizes multiply weight by weight.
//
// decode_blocks below is the readable reference: one lookup per weight, in C++ any CPU builds.
// On x86 the same table is looked up 16 or 32 weights per instruction (dequant_x86.h: AVX2,
// AVX-512), the path picked at run time from what the CPU reports (cpu_paths), or forced by
// the caller (`path`, to test each); ARM and other CPUs build and run the scalar loop alone.
//
// The blocks are split over n_workers CPU threads, each writing its own part of out. Built with
// -fopenmp, the threads are OpenMP's: the pool torch's own operations run on, already awake
// (the loader gives this library the libgomp torch loaded), so nothing is started per call and
// nobody competes for the cores. A compiler without OpenMP: a std::thread per extra worker.
#include "round16.h"

#include <thread>
#include <vector>

struct F32 { typedef float T; static T convert(float v) { return v; } };
struct BF16 { typedef unsigned short T; static T convert(float v) { return float_to_bf16_rn(v); } };
struct F16 { typedef unsigned short T; static T convert(float v) { return float_to_f16_rn(v); } };

struct Args {
    const unsigned char* packed; const float* code; const float* absmax;
    const unsigned char* qabsmax; const float* code2; const float* absmax2; const float* offset;
    void* out; long long n; int log2_blocksize, log2_blocksize2;
};

// absmax of block b, the product rounded before the offset is added (built with
// -ffp-contract=off: no fused multiply-add, as in the kernel and the torch path)
template <bool NESTED>
static float block_absmax(const Args& a, long long b) {
    if (!NESTED) return a.absmax[b];
    float scaled = a.code2[a.qabsmax[b]] * a.absmax2[b >> a.log2_blocksize2];
    return scaled + a.offset[0];
}

template <class Out, bool NESTED>
static void decode_blocks(const Args& a, long long first_block, long long last_block) {
    typedef typename Out::T T;
    T* out = static_cast<T*>(a.out);
    const long long blocksize = 1LL << a.log2_blocksize;
    for (long long b = first_block; b < last_block; ++b) {
        const float scale = block_absmax<NESTED>(a, b);
        const long long first = b * blocksize;                      // even: blocksize >= 2
        const long long last = first + blocksize < a.n ? first + blocksize : a.n;
        const unsigned char* bytes = a.packed + first / 2;
        if (blocksize < 32) {                                       // weight by weight
            for (long long i = first; i < last; ++i) {
                const unsigned int byte = bytes[(i - first) / 2];
                const unsigned int nibble = (i % 2 == 0) ? byte >> 4 : byte & 15;
                out[i] = Out::convert(a.code[nibble] * scale);
            }
            continue;
        }
        float products[16];                                         // the 16 possible outputs
        for (int k = 0; k < 16; ++k) products[k] = a.code[k] * scale;
        T out16[16];
        for (int k = 0; k < 16; ++k) out16[k] = Out::convert(products[k]);
        const long long pairs = (last - first) / 2;                 // whole bytes in range
        T* o = out + first;
        for (long long j = 0; j < pairs; ++j) {
            o[2 * j] = out16[bytes[j] >> 4];                        // element 0: the high nibble
            o[2 * j + 1] = out16[bytes[j] & 15];
        }
        if ((last - first) % 2)                                     // odd n: a last high nibble
            o[2 * pairs] = out16[bytes[pairs] >> 4];
    }
}

// -DMINQLORA_SCALAR_ONLY builds what ARM builds (tests/test_cpu_decode.py does, on x86)
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && \
    !defined(MINQLORA_SCALAR_ONLY)
#define X86_SIMD 1
#include "dequant_x86.h"                              // the lookup with AVX2 / AVX-512
#else
static int x86_paths() { return 1; }                  // ARM and others: the scalar loop
#endif

// The paths this library can run on this CPU: bit 0 scalar, bit 1 AVX2, bit 2 AVX-512.
extern "C" int cpu_paths() {
    static const int paths = x86_paths();
    return paths;
}

// A second wall behind Python's state check (quant_state.check_state): sizes that would make
// a shift or an index undefined are refused here too, with -1 and nothing written.
template <class Out, bool NESTED>
static int decode(int n_workers, int path, const Args& a) {
    if (a.n < 0 || a.n > (1LL << 62) || a.log2_blocksize < 1 || a.log2_blocksize > 62 ||
        (NESTED && (a.log2_blocksize2 < 0 || a.log2_blocksize2 > 62)))
        return -1;
    void (*blocks)(const Args&, long long, long long) = decode_blocks<Out, NESTED>;  // path 0
#ifdef X86_SIMD
    if (path == 2 && (cpu_paths() & 4)) blocks = decode_blocks_avx512<Out, NESTED>;
    if (path == 1 && (cpu_paths() & 2)) blocks = decode_blocks_avx2<Out, NESTED>;
#endif
    const long long n_blocks = a.n ? ((a.n - 1) >> a.log2_blocksize) + 1 : 0;
    if (n_workers < 1) n_workers = 1;
    if (n_workers > n_blocks) n_workers = (int)(n_blocks > 0 ? n_blocks : 1);
#ifdef _OPENMP
#pragma omp parallel for num_threads(n_workers) schedule(static, 1)
    for (int w = 0; w < n_workers; ++w)
        blocks(a, n_blocks * w / n_workers, n_blocks * (w + 1) / n_workers);
#else
    std::vector<std::thread> workers;                 // workers 1..: new threads; 0: this one
    for (int w = 1; w < n_workers; ++w)
        workers.emplace_back(blocks, a, n_blocks * w / n_workers, n_blocks * (w + 1) / n_workers);
    blocks(a, 0, n_blocks / n_workers);
    for (auto& t : workers) t.join();
#endif
    return 0;
}

extern "C" int uses_openmp() {                        // which of the two splits was built
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}

// The six entry points, named and ordered like the kernels' parameters (launch.kernel_args).
#define EXPORT(suffix, Out, NESTED)                                                             \
    extern "C" int decode_4bit_##suffix(int n_workers, int path, const unsigned char* packed,  \
                                         const float* code, const float* absmax,                \
                                         const unsigned char* qabsmax, const float* code2,      \
                                         const float* absmax2, const float* offset, void* out,  \
                                         long long n, int log2_blocksize, int log2_blocksize2) { \
        return decode<Out, NESTED>(n_workers, path, Args{packed, code, absmax, qabsmax, code2,         \
                                                  absmax2, offset, out, n, log2_blocksize,      \
                                                  log2_blocksize2});                            \
    }

EXPORT(f32, F32, false)
EXPORT(bf16, BF16, false)
EXPORT(f16, F16, false)
EXPORT(f32_nested, F32, true)
EXPORT(bf16_nested, BF16, true)
EXPORT(f16_nested, F16, true)
