// emulate.cpp: run the CUDA kernels of dequant_nf4.cu on the CPU (minqlora/emulate.py builds
// this with the host C++ compiler and calls the launch_* functions through ctypes).
//
// A launch of grid x block threads becomes two loops: over blocks, and inside a block over its
// threads, one after another. Blocks are independent (no thread waits on another block), so the
// blocks are split across n_workers CPU threads, each running whole blocks.
#include "cuda_shim.h"
#include "dequant_nf4.cu"

#include <thread>
#include <vector>

template <class... Args>
static void launch(void (*kernel)(Args...), long long grid, int block, int n_workers,
                   Args... args) {
    auto run_blocks = [=](long long first, long long last) {
        blockDim = {(unsigned int)block, 1, 1};
        gridDim = {(unsigned int)grid, 1, 1};
        for (long long b = first; b < last; ++b) {
            blockIdx = {(unsigned int)b, 0, 0};
            for (int t = 0; t < block; ++t) {
                threadIdx = {(unsigned int)t, 0, 0};
                kernel(args...);
            }
        }
    };
    if (n_workers < 1) n_workers = 1;
    if (n_workers > grid) n_workers = (int)(grid > 0 ? grid : 1);
    std::vector<std::thread> workers;
    for (int w = 1; w < n_workers; ++w)          // workers 1.. run their share on new threads
        workers.emplace_back(run_blocks, grid * w / n_workers, grid * (w + 1) / n_workers);
    run_blocks(0, grid / n_workers);             // worker 0 is the calling thread
    for (auto& t : workers) t.join();
}

#define EXPORT(name, T)                                                                         \
    extern "C" void launch_##name(long long grid, int block, int n_workers,                     \
                                  const unsigned char* packed, const float* code,               \
                                  const float* absmax, const unsigned char* qabsmax,            \
                                  const float* code2, const float* absmax2, const float* offset, \
                                  T* out, long long n, int log2_blocksize, int log2_blocksize2) { \
        launch(name, grid, block, n_workers, packed, code, absmax, qabsmax, code2, absmax2,      \
               offset, out, n, log2_blocksize, log2_blocksize2);                                 \
    }

EXPORT(dequant_4bit_f32, float)
EXPORT(dequant_4bit_bf16, unsigned short)
EXPORT(dequant_4bit_f16, unsigned short)
EXPORT(dequant_4bit_f32_nested, float)
EXPORT(dequant_4bit_bf16_nested, unsigned short)
EXPORT(dequant_4bit_f16_nested, unsigned short)
