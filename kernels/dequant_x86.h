// dequant_x86.h: dequant_cpu.cpp's lookup with x86 SIMD, 32 weights at a time (included by
// dequant_cpu.cpp, which picks a path at run time from what the CPU reports). Per block the
// same table, out16[k] = cast(code[k] * absmax[b]), 8 or 16 products at a time; then the lookup
// out[i] = out16[nibble i] is a shuffle: one instruction looks up a 16-entry table for many
// nibbles at once.
//
//   AVX2, bf16/fp16: vpshufb looks up bytes, so out16 is split into a table of its low bytes and
//       one of its high bytes; both are looked up for 16 nibbles, and the two results are
//       interleaved (unpacklo/hi_epi8) into 16 outputs of 2 bytes, little-endian.
//   AVX2, float32: vpermps looks up 8 floats; one for entries 0-7, one for 8-15, and bit 3 of
//       the nibble picks (blendv).
//   AVX-512: the whole table fits one register; vpermw (bf16/fp16) and vpermps (float32) look
//       up 32 / 16 outputs at once.
//
// Worked example (bf16): out16[15] = 2.0 = 0x4000, so low[15] = 0x00 and high[15] = 0x40; the
// nibble 15 looks up 0x00 and 0x40, interleaved: bytes 00 40, the bf16 0x4000.
// Nibble order as in the format: the high nibble of byte j is weight 2j, the low one 2j + 1.
// The products are the scalar loop's (a float multiply, no fused add) and the roundings are
// round16.h's (NaN made quiet the same way), so every path gives the same bits.
#pragma once
#include <cpuid.h>
#include <immintrin.h>

#define AVX2 __attribute__((target("avx2,f16c")))
#define AVX512 __attribute__((target("avx2,f16c,avx512f,avx512bw")))

// Which paths this CPU runs: bit 0 the scalar loop, bit 1 AVX2 (+ F16C), bit 2 AVX-512 (F, BW),
// asked of the CPU itself (cpuid) and of the OS (xgetbv: it saves the wide registers), with no
// help from a compiler's runtime library.
static int x86_paths() {
    unsigned int a, b, c, d, xcr0, xcr0_high;
    if (!__get_cpuid(1, &a, &b, &c, &d) || !(c & bit_OSXSAVE) || !(c & bit_AVX) ||
        !(c & bit_F16C) || !__get_cpuid_count(7, 0, &a, &b, &c, &d) || !(b & bit_AVX2))
        return 1;
    __asm__("xgetbv" : "=a"(xcr0), "=d"(xcr0_high) : "c"(0));
    if ((xcr0 & 0x6) != 0x6) return 1;                         // XMM and YMM state saved
    const bool avx512 = (b & bit_AVX512F) && (b & bit_AVX512BW) && (xcr0 & 0xE0) == 0xE0;
    return avx512 ? 7 : 3;                                     // + opmask, ZMM state saved
}

// 16 packed bytes -> their 32 nibbles in weight order (the high nibble first), one per byte.
AVX2 static inline void nibbles(const unsigned char* bytes, __m128i n[2]) {
    const __m128i x = _mm_loadu_si128((const __m128i*)bytes), low4 = _mm_set1_epi8(15);
    const __m128i high = _mm_and_si128(_mm_srli_epi16(x, 4), low4), low = _mm_and_si128(x, low4);
    n[0] = _mm_unpacklo_epi8(high, low);                    // weights 0..15
    n[1] = _mm_unpackhi_epi8(high, low);                    // weights 16..31
}

// ---- AVX2: the table in two halves of 8, code[8h .. 8h+7] * scale (h = 0, 1) ----------------
AVX2 static inline __m256 products8(const float* code, int h, float scale) {
    return _mm256_mul_ps(_mm256_loadu_ps(code + 8 * h), _mm256_set1_ps(scale));
}

AVX2 static inline __m128i round8(__m256 p, BF16) {        // float_to_bf16_rn, 8 at a time
    const __m256i u = _mm256_castps_si256(p), one = _mm256_set1_epi32(1);
    const __m256i r = _mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7FFF)),
                                       _mm256_and_si256(_mm256_srli_epi32(u, 16), one));
    const __m256i nan = _mm256_cmpgt_epi32(_mm256_and_si256(u, _mm256_set1_epi32(0x7FFFFFFF)),
                                           _mm256_set1_epi32(0x7F800000));
    const __m256i b = _mm256_blendv_epi8(_mm256_srli_epi32(r, 16), _mm256_set1_epi32(0x7FC0), nan);
    return _mm_packus_epi32(_mm256_castsi256_si128(b), _mm256_extracti128_si256(b, 1));
}

AVX2 static inline __m128i round8(__m256 p, F16) {         // float_to_f16_rn: F16C's rounding,
    const __m256 nan = _mm256_cmp_ps(p, p, _CMP_UNORD_Q);  // a NaN made sign | 0x7E00 first
    const __m256 quiet = _mm256_or_ps(_mm256_and_ps(p, _mm256_set1_ps(-0.0f)),
                                      _mm256_castsi256_ps(_mm256_set1_epi32(0x7FC00000)));
    return _mm256_cvtps_ph(_mm256_blendv_ps(p, quiet, nan),
                           _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
}

template <class Out> struct Avx2Table {                    // bf16, fp16: low and high bytes
    __m128i low, high;
    AVX2 Avx2Table(const float* code, float scale, unsigned short* out16) {
        const __m256i t = _mm256_set_m128i(round8(products8(code, 1, scale), Out()),
                                           round8(products8(code, 0, scale), Out()));
        _mm256_storeu_si256((__m256i*)out16, t);
        const __m256i split = _mm256_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13,
                                               15, 0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11,
                                               13, 15);    // per half: 8 low bytes, 8 high bytes
        const __m256i s = _mm256_permute4x64_epi64(_mm256_shuffle_epi8(t, split), 0xD8);
        low = _mm256_castsi256_si128(s);                   // low bytes of out16[0..15]
        high = _mm256_extracti128_si256(s, 1);             // their high bytes
    }
    AVX2 void lookup32(const unsigned char* bytes, unsigned short* out) const {
        __m128i n[2];
        nibbles(bytes, n);
        for (int h = 0; h < 2; ++h) {
            const __m128i lo = _mm_shuffle_epi8(low, n[h]), hi = _mm_shuffle_epi8(high, n[h]);
            _mm_storeu_si128((__m128i*)(out + 16 * h), _mm_unpacklo_epi8(lo, hi));
            _mm_storeu_si128((__m128i*)(out + 16 * h + 8), _mm_unpackhi_epi8(lo, hi));
        }
    }
};
template <> struct Avx2Table<F32> {                        // entries 0-7, 8-15
    __m256 t[2];
    AVX2 Avx2Table(const float* code, float scale, float* out16) {
        for (int h = 0; h < 2; ++h)
            _mm256_storeu_ps(out16 + 8 * h, t[h] = products8(code, h, scale));
    }
    AVX2 void lookup32(const unsigned char* bytes, float* out) const {
        __m128i n[2];
        nibbles(bytes, n);
        for (int q = 0; q < 4; ++q) {                      // 8 nibbles -> 8 int32 indices k
            const __m256i k = _mm256_cvtepu8_epi32(q % 2 ? _mm_srli_si128(n[q / 2], 8) : n[q / 2]);
            const __m256 upper = _mm256_castsi256_ps(_mm256_slli_epi32(k, 28));  // bit 3: sign
            const __m256 from0 = _mm256_permutevar8x32_ps(t[0], k);     // index k mod 8
            const __m256 from8 = _mm256_permutevar8x32_ps(t[1], k);
            _mm256_storeu_ps(out + 8 * q, _mm256_blendv_ps(from0, from8, upper));
        }
    }
};

// ---- AVX-512: the 16 products and roundings in one register (AVX2's formulas, 16 wide) -------
AVX512 static inline __m512 products16(const float* code, float scale) {
    return _mm512_mul_ps(_mm512_loadu_ps(code), _mm512_set1_ps(scale));
}

AVX512 static inline __m256i round16(__m512 p, BF16) {
    const __m512i u = _mm512_castps_si512(p);
    const __m512i r = _mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7FFF)),
                                       _mm512_and_si512(_mm512_srli_epi32(u, 16),
                                                        _mm512_set1_epi32(1)));
    const __mmask16 nan = _mm512_cmpgt_epu32_mask(
        _mm512_and_si512(u, _mm512_set1_epi32(0x7FFFFFFF)), _mm512_set1_epi32(0x7F800000));
    return _mm512_cvtepi32_epi16(_mm512_mask_mov_epi32(_mm512_srli_epi32(r, 16), nan,
                                                       _mm512_set1_epi32(0x7FC0)));
}

AVX512 static inline __m256i round16(__m512 p, F16) {
    const __mmask16 nan = _mm512_cmp_ps_mask(p, p, _CMP_UNORD_Q);
    const __m512i quiet = _mm512_or_si512(_mm512_and_si512(_mm512_castps_si512(p),
                                                           _mm512_set1_epi32(0x80000000)),
                                          _mm512_set1_epi32(0x7FC00000));
    return _mm512_cvtps_ph(_mm512_mask_mov_ps(p, nan, _mm512_castsi512_ps(quiet)),
                           _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
}

template <class Out> struct Avx512Table {                  // bf16, fp16
    __m512i t;                                             // entries 16-31 never looked up
    AVX512 Avx512Table(const float* code, float scale, unsigned short* out16) {
        const __m256i t16 = round16(products16(code, scale), Out());
        _mm256_storeu_si256((__m256i*)out16, t16);
        t = _mm512_castsi256_si512(t16);
    }
    AVX512 void lookup32(const unsigned char* bytes, unsigned short* out) const {
        // 16 bytes -> 16 int32 lanes b, each two 16-bit indices: b >> 4 (weight 2j, in the low
        // half) and b & 15 (weight 2j + 1, the high half): (b >> 4) | ((b << 16) & 0xF0000)
        const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)bytes));
        const __m512i k = _mm512_ternarylogic_epi32(_mm512_srli_epi32(b, 4),
                                                    _mm512_slli_epi32(b, 16),
                                                    _mm512_set1_epi32(0xF0000), 0xF8);  // x|y&z
        _mm512_storeu_si512(out, _mm512_permutexvar_epi16(k, t));
    }
};
template <> struct Avx512Table<F32> {
    __m512 t;
    AVX512 Avx512Table(const float* code, float scale, float* out16) {
        _mm512_storeu_ps(out16, t = products16(code, scale));
    }
    AVX512 void lookup32(const unsigned char* bytes, float* out) const {
        __m128i n[2];
        nibbles(bytes, n);
        for (int h = 0; h < 2; ++h)                        // 16 nibbles -> 16 int32 indices
            _mm512_storeu_ps(out + 16 * h, _mm512_permutexvar_ps(_mm512_cvtepu8_epi32(n[h]), t));
    }
};

// The block loop of both paths: blocks of 32 weights or more, 32 at a time, then the last
// block's tail (n not a multiple of 32) from out16; smaller blocks as the scalar loop does.
#define SIMD_BLOCKS(NAME, TARGET, TABLE)                                                        \
    template <class Out, bool NESTED>                                                           \
    TARGET static void NAME(const Args& a, long long first_block, long long last_block) {       \
        typedef typename Out::T T;                                                              \
        if (a.log2_blocksize < 5) return decode_blocks<Out, NESTED>(a, first_block, last_block);\
        T* out = static_cast<T*>(a.out);                                                        \
        const long long blocksize = 1LL << a.log2_blocksize;                                    \
        alignas(64) T out16[16];                                                                \
        for (long long b = first_block; b < last_block; ++b) {                                  \
            const TABLE<Out> table(a.code, block_absmax<NESTED>(a, b), out16);                  \
            const long long first = b * blocksize;                                              \
            const long long last = first + blocksize < a.n ? first + blocksize : a.n;           \
            long long i = first;                                                                \
            for (; i + 32 <= last; i += 32) table.lookup32(a.packed + i / 2, out + i);          \
            for (; i < last; ++i)                                                               \
                out[i] = out16[i % 2 ? a.packed[i / 2] & 15 : a.packed[i / 2] >> 4];            \
        }                                                                                       \
    }

SIMD_BLOCKS(decode_blocks_avx2, AVX2, Avx2Table)
SIMD_BLOCKS(decode_blocks_avx512, AVX512, Avx512Table)
