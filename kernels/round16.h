// round16.h: float32 -> bfloat16 / float16 bits, round to nearest even (what torch's .to()
// does), with integer operations. On a GPU each is one PTX instruction (dequant_nf4.cu); the
// kernel's CPU emulation (cuda_shim.h) and the CPU decoder (dequant_cpu.cpp) use these.
#pragma once
#include <cstdint>
#include <cstring>

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
