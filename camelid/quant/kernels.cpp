// camelid's CPU kernels for quantized weights: products with a few rows of activations (decode,
// batched decode, a speculative check) and dequantization (prefill).
//
// Decoding reads every weight once per token, so the codes must stream through the core with
// little work each: they are unpacked in registers and the weight is never dequantized into
// memory. Two forms:
// - float: each code widened to a float lane, multiplied into x, the group's scale (and, for
//   int4, minimum) applied once per group. Written with GCC/Clang vector extensions, which the
//   compiler maps to the CPU it builds on (AVX-512: one register; AVX2: two; NEON: four);
// - int4 with int8 activations, where the CPU has VNNI byte products (below). (int8 codes with
//   int8 activations on VNNI measured slower than the float form on these CPUs: docs/profile-decode.md.)
// Built once per machine with -march=native by kernels.py; registered as torch.ops.camelid.*.
//
// Layouts (blocks.py): int8 codes [out, in] with fp32 scales [out, in / g]; int4 codes
// [out, in / 2] bytes, where byte j of a group of g holds weight j in its low nibble and
// weight j + g/2 in its high one (ggml's Q4_0/Q4_1 order), fp16 scales and minimums [out, in / g].

#include <ATen/ATen.h>
#if defined(__linux__)
#include <sys/mman.h>
#endif
#include <cstdlib>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>
#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

namespace {

typedef float f32x16 __attribute__((vector_size(64)));
typedef int32_t i32x16 __attribute__((vector_size(64)));
typedef uint8_t u8x16 __attribute__((vector_size(16)));
typedef int8_t i8x16 __attribute__((vector_size(16)));

constexpr int kLanes = 16;
constexpr int kMaxRows = 4;  // activation rows sharing one pass over the weights

inline f32x16 load_f32(const float* p) {
  f32x16 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

inline float sum_lanes(f32x16 v) {
#if defined(__AVX512F__)
  return _mm512_reduce_add_ps((__m512)v);
#else
  float a[kLanes];  // pairwise, not a serial chain of 15 additions
  std::memcpy(a, &v, sizeof a);
  for (int width = kLanes / 2; width > 0; width /= 2)
    for (int i = 0; i < width; ++i) a[i] += a[i + width];
  return a[0];
#endif
}

// 16 bytes widened to 16 int32 lanes. GCC 12 compiles __builtin_convertvector from bytes one
// lane at a time, so x86 takes the one-instruction widening (vpmovzxbd / vpmovsxbd) directly.
template <bool Signed>
inline i32x16 widen(const void* p) {
#if defined(__AVX512F__)
  const __m128i b = _mm_loadu_si128(static_cast<const __m128i*>(p));
  return (i32x16)(Signed ? _mm512_cvtepi8_epi32(b) : _mm512_cvtepu8_epi32(b));
#elif defined(__AVX2__)
  const __m128i b0 = _mm_loadl_epi64(static_cast<const __m128i*>(p));
  const __m128i b1 = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(static_cast<const char*>(p) + 8));
  const __m256i halves[2] = {Signed ? _mm256_cvtepi8_epi32(b0) : _mm256_cvtepu8_epi32(b0),
                             Signed ? _mm256_cvtepi8_epi32(b1) : _mm256_cvtepu8_epi32(b1)};
  i32x16 v;
  std::memcpy(&v, halves, sizeof v);
  return v;
#else
  if constexpr (Signed) {
    i8x16 b;
    std::memcpy(&b, p, sizeof b);
    return __builtin_convertvector(b, i32x16);
  } else {
    u8x16 b;
    std::memcpy(&b, p, sizeof b);
    return __builtin_convertvector(b, i32x16);
  }
#endif
}

inline f32x16 int8_lanes(const int8_t* p) { return __builtin_convertvector(widen<true>(p), f32x16); }

// ---- int4 with int8 activations (x86 VNNI) ----------------------------------------------------
// llama.cpp's method: x is rounded to int8 in blocks of 32 columns (one scale each), so that a
// single vpdpbusd multiplies 32 nibbles by 32 activations and sums them in groups of four into
// 32-bit lanes; about half the instructions of widening every code to a float. Rounding x costs
// each activation an error of at most 1/254 of its block's largest, far below the int4 weights' own.
#if defined(__AVX512VNNI__) && defined(__AVX512VL__) && defined(__FMA__) && defined(__F16C__)
#define CAMELID_VNNI 1
inline __m256i dot_u8_s8(__m256i u, __m256i s) { return _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, s); }
#elif defined(__AVXVNNI__) && defined(__FMA__) && defined(__F16C__)
#define CAMELID_VNNI 1
inline __m256i dot_u8_s8(__m256i u, __m256i s) { return _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), u, s); }
#endif


#if defined(CAMELID_VNNI) && defined(__AVX512VNNI__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define CAMELID_VNNI_WIDE 1  // 64 codes per 512-bit register
#endif

// x's `in` columns rounded to int8 in blocks of 32, each with its scale (amax / 127)
void round_blocks(const float* xr, int64_t in, int8_t* xq, float* scale) {
  for (int64_t b = 0; b < in / 32; ++b) {
    float amax = 0.f;
    for (int k = 0; k < 32; ++k) amax = std::max(amax, std::abs(xr[b * 32 + k]));
    // (a block of denormals rounds to zero rather than overflow 127 / amax)
    const float inv = amax > 1e-30f ? 127.f / amax : 0.f;
    scale[b] = amax / 127.f;
    for (int k = 0; k < 32; ++k)
      xq[b * 32 + k] = static_cast<int8_t>(std::clamp(std::nearbyint(xr[b * 32 + k] * inv), -127.f, 127.f));
  }
}

// ---- what one call shares among its weights -----------------------------------------------------

// x [rows, in] and what the kernels derive from it once per call: per-group sums (for int4's
// minimums) and, on the VNNI paths, x rounded to int8 in blocks of 32 columns (llama.cpp's Q8
// block: one scale per 32, so that a weight group of 32 meets one activation scale), with the
// blocks' scales in column order (`dg`). The kernels read the rounded x in the order they
// unpack codes, each block's scale repeated over the four 32-bit lanes its products land in (`d`):
// - "wide" (AVX-512, a multiple of 64 columns): for each 32 bytes of a row's codes, the 32
//   activations of their low nibbles, then the 32 of their high nibbles (the order the bytes
//   unpack to in a 512-bit register without a shuffle), and 16 scales;
// - "units" (AVX-VNNI, or an odd number of groups of 32): the same for each 16 bytes, in 256 bits.
struct Activations {
  const float* x;
  int64_t rows, in, group;
  std::vector<float> xsum;     // [rows, in / group]
  std::vector<int8_t> q;       // [rows, in]
  std::vector<float> d;        // [rows, in / 4] (int4 order)
  std::vector<float> dg;       // [rows, in / 32]
  bool wide = false;

  Activations(const float* x_, int64_t rows_, int64_t in_, int64_t group_, bool sums, bool int8)
      : x(x_), rows(rows_), in(in_), group(group_) {
    if (sums) {
      xsum.assign(rows * (in / group), 0.f);
      for (int64_t r = 0; r < rows * (in / group); ++r)
        for (int64_t k = 0; k < group; ++k) xsum[r] += x[r * group + k];
    }
    if (!int8) return;
    q.resize(rows * in);
    dg.resize(rows * in / 32);
#ifdef CAMELID_VNNI_WIDE
    // a 64-column step must not straddle two groups: groups of 32 (two per step) or of 64k
    wide = in % 64 == 0 && (group == 32 || group % 64 == 0);
#endif
    d.resize(rows * in / 4);
    std::vector<int8_t> xq(in);
    for (int64_t r = 0; r < rows; ++r) {
      float* scale = &dg[r * in / 32];
      round_blocks(x + r * in, in, xq.data(), scale);
      int8_t* qr = &q[r * in];
      float* dr = &d[r * in / 4];
      // code byte b holds column (b / half) * group + b % half (low nibble), and half more (high);
      // 16 consecutive bytes hold 16 consecutive columns
      const int64_t half = group / 2, span = wide ? 32 : 16;
      int64_t i = 0;  // position in kernel order, 16 at a time
      for (int64_t chunk = 0; chunk < in / 2; chunk += span)
        for (int64_t nibble = 0; nibble < 2; ++nibble)
          for (int64_t b = chunk; b < chunk + span; b += 16, i += 16) {
            const int64_t column = b / half * group + nibble * half + b % half;
            std::memcpy(qr + i, &xq[column], 16);
            for (int k = 0; k < 4; ++k) dr[i / 4 + k] = scale[column / 32];
          }
    }
  }
};

// One weight of a call: codes, scales (and minimums), and where its outputs go.
struct Weight {
  const void* codes;
  const void* scales;
  const at::Half* mins;
  int64_t out;
  float* y;  // [rows, out]
};

// ---- kernels: y[m, o] for activation rows m0 .. m0 + M - 1 and outputs [begin, end) ----------

template <int M>
void int8_rows(const Activations& a, const Weight& w, int64_t m0, int64_t begin, int64_t end) {
  const int64_t in = a.in, group = a.group, groups = in / group;
  const float* x = a.x + m0 * in;
  const int8_t* codes = static_cast<const int8_t*>(w.codes);
  const float* scales = static_cast<const float*>(w.scales);
  for (int64_t o = begin; o < end; ++o) {
    f32x16 acc[M] = {};
    for (int64_t g = 0; g < groups; ++g) {
      f32x16 t[M] = {};
      for (int64_t j = g * group; j < (g + 1) * group; j += kLanes) {
        const f32x16 wf = int8_lanes(codes + o * in + j);
        for (int m = 0; m < M; ++m) t[m] += wf * load_f32(x + m * in + j);
      }
      const float s = scales[o * groups + g];
      for (int m = 0; m < M; ++m) acc[m] += t[m] * s;
    }
    for (int m = 0; m < M; ++m) w.y[(m0 + m) * w.out + o] = sum_lanes(acc[m]);
  }
}

// int4: w = q * scale + min, so sum_k x_k w_k = sum_groups (scale * sum x q + min * sum x).
template <int M>
void int4_rows(const Activations& a, const Weight& w, int64_t m0, int64_t begin, int64_t end) {
  const int64_t in = a.in, group = a.group, groups = in / group, half = group / 2;
  const float* x = a.x + m0 * in;
  const float* xsum = a.xsum.data() + m0 * groups;
  const uint8_t* codes = static_cast<const uint8_t*>(w.codes);
  const at::Half* scales = static_cast<const at::Half*>(w.scales);
  for (int64_t o = begin; o < end; ++o) {
    const uint8_t* row = codes + o * (in / 2);
    f32x16 acc[M] = {};
    float offset[M] = {};
    for (int64_t g = 0; g < groups; ++g) {
      f32x16 t[M] = {};
      for (int64_t j = 0; j < half; j += kLanes) {
        const i32x16 q = widen<false>(row + g * half + j);
        const f32x16 lo = __builtin_convertvector(q & 15, f32x16);
        const f32x16 hi = __builtin_convertvector(q >> 4, f32x16);
        for (int m = 0; m < M; ++m)
          t[m] += lo * load_f32(x + m * in + g * group + j) + hi * load_f32(x + m * in + g * group + half + j);
      }
      const float s = static_cast<float>(scales[o * groups + g]);
      const float mn = static_cast<float>(w.mins[o * groups + g]);
      for (int m = 0; m < M; ++m) {
        acc[m] += t[m] * s;
        offset[m] += mn * xsum[m * groups + g];
      }
    }
    for (int m = 0; m < M; ++m) w.y[(m0 + m) * w.out + o] = sum_lanes(acc[m]) + offset[m];
  }
}

#ifdef CAMELID_VNNI
inline float sum8(__m256 v) {
  const __m128 h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 q = _mm_add_ps(h, _mm_movehl_ps(h, h));
  return _mm_cvtss_f32(_mm_add_ss(q, _mm_movehdup_ps(q)));
}

// Any group size, 32 codes per 256-bit step ("units" layout).
template <int M>
void int4_rows_vnni(const Activations& a, const Weight& w, int64_t m0, int64_t begin, int64_t end) {
  const int64_t in = a.in, groups = in / a.group, units = a.group / 32;
  const float* xsum = a.xsum.data() + m0 * groups;
  const uint8_t* codes = static_cast<const uint8_t*>(w.codes);
  const at::Half* scales = static_cast<const at::Half*>(w.scales);
  const __m256i low4 = _mm256_set1_epi8(0x0F);
  for (int64_t o = begin; o < end; ++o) {
    const uint8_t* row = codes + o * (in / 2);
    __m256 acc[M];
    float offset[M] = {};
    for (int m = 0; m < M; ++m) acc[m] = _mm256_setzero_ps();
    for (int64_t g = 0, unit = 0; g < groups; ++g) {
      __m256 t[M];
      for (int m = 0; m < M; ++m) t[m] = _mm256_setzero_ps();
      for (int64_t u = 0; u < units; ++u, ++unit) {
        const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(row + unit * 16));
        const __m256i q = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(b, 4), b), low4);  // low | high
        for (int m = 0; m < M; ++m) {
          const int8_t* xq = &a.q[(m0 + m) * in + unit * 32];
          const __m256 dot = _mm256_cvtepi32_ps(dot_u8_s8(q, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq))));
          t[m] = _mm256_fmadd_ps(dot, _mm256_loadu_ps(&a.d[(m0 + m) * in / 4 + unit * 8]), t[m]);
        }
      }
      const __m256 s = _mm256_set1_ps(static_cast<float>(scales[o * groups + g]));
      const float mn = static_cast<float>(w.mins[o * groups + g]);
      for (int m = 0; m < M; ++m) {
        acc[m] = _mm256_fmadd_ps(t[m], s, acc[m]);
        offset[m] += mn * xsum[m * groups + g];
      }
    }
    for (int m = 0; m < M; ++m) w.y[(m0 + m) * w.out + o] = sum8(acc[m]) + offset[m];
  }
}
#endif

#ifdef CAMELID_VNNI_WIDE
// 32 bytes of codes as 64 nibbles in a 512-bit register: the low nibbles in the lower half, the
// high ones in the upper (one broadcast load, one shift of the upper half, one mask).
inline __m512i nibbles(const uint8_t* p) {
  const __m512i b = _mm512_broadcast_i64x4(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  const __m512i shift = _mm512_inserti64x4(_mm512_setzero_si512(), _mm256_set1_epi16(4), 1);
  return _mm512_and_si512(_mm512_srlv_epi16(b, shift), _mm512_set1_epi8(0x0F));
}

// 64 codes (32 bytes) per 512-bit step ("wide" layout). With groups of 32 a step covers two
// groups, A and B: lanes 0-3 and 8-11 hold A's sums, 4-7 and 12-15 B's; larger groups span
// whole steps. Groups of 32 (GGUF's Q4_0/Q4_1) take the product of their weight and activation
// scales 16 groups (8 steps) at a time, one multiply, and each step picks its two with a
// permutation: a third fewer instructions per step than building the scales step by step.
template <int M>
void int4_rows_vnni_wide(const Activations& a, const Weight& w, int64_t m0, int64_t begin, int64_t end) {
  const int64_t in = a.in, group = a.group, groups = in / group, steps = in / 64;
  const float* xsum = a.xsum.data() + m0 * groups;
  const uint8_t* codes = static_cast<const uint8_t*>(w.codes);
  const at::Half* scales = static_cast<const at::Half*>(w.scales);
  const __m512i spread = _mm512_set_epi32(1, 1, 1, 1, 0, 0, 0, 0, 1, 1, 1, 1, 0, 0, 0, 0);
  const __m512i two = _mm512_set1_epi32(2);
  for (int64_t o = begin; o < end; ++o) {
    const uint8_t* row = codes + o * (in / 2);
    const at::Half* so = scales + o * groups;
    __m512 acc[M];
    for (int m = 0; m < M; ++m) acc[m] = _mm512_setzero_ps();
    if (group == 32) {
      for (int64_t p8 = 0; p8 < steps; p8 += 8) {
        const int64_t g0 = 2 * p8, n = std::min<int64_t>(16, groups - g0);
        const __mmask16 lanes = n == 16 ? 0xFFFF : static_cast<__mmask16>((1u << n) - 1);
        const __m512 s16 = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(lanes, so + g0));
        __m512 ds[M];
        for (int m = 0; m < M; ++m) ds[m] = _mm512_mul_ps(s16, _mm512_maskz_loadu_ps(lanes, &a.dg[(m0 + m) * groups + g0]));
        __m512i pick = spread;
        for (int64_t p = p8; p < std::min(steps, p8 + 8); ++p, pick = _mm512_add_epi32(pick, two)) {
          const __m512i q = nibbles(row + p * 32);
          for (int m = 0; m < M; ++m) {
            const __m512i xq = _mm512_loadu_si512(&a.q[(m0 + m) * in + p * 64]);
            const __m512 dot = _mm512_cvtepi32_ps(_mm512_dpbusd_epi32(_mm512_setzero_si512(), q, xq));
            acc[m] = _mm512_fmadd_ps(dot, _mm512_permutexvar_ps(pick, ds[m]), acc[m]);
          }
        }
      }
    } else {
      for (int64_t p = 0; p < steps; ++p) {
        const __m512i q = nibbles(row + p * 32);
        const __m512 s = _mm512_set1_ps(static_cast<float>(so[p * 64 / group]));
        for (int m = 0; m < M; ++m) {
          const __m512i xq = _mm512_loadu_si512(&a.q[(m0 + m) * in + p * 64]);
          const __m512 dot = _mm512_cvtepi32_ps(_mm512_dpbusd_epi32(_mm512_setzero_si512(), q, xq));
          acc[m] = _mm512_fmadd_ps(dot, _mm512_mul_ps(_mm512_loadu_ps(&a.d[(m0 + m) * in / 4 + p * 16]), s), acc[m]);
        }
      }
    }
    // the minimums' term, sum_g min_g * sum x_g, 16 groups at a time
    const at::Half* mo = w.mins + o * groups;
    for (int64_t g = 0; g < groups; g += 16) {
      const __mmask16 lanes = groups - g >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (groups - g)) - 1);
      const __m512 mn = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(lanes, mo + g));
      for (int m = 0; m < M; ++m)
        acc[m] = _mm512_fmadd_ps(mn, _mm512_maskz_loadu_ps(lanes, xsum + m * groups + g), acc[m]);
    }
    for (int m = 0; m < M; ++m) w.y[(m0 + m) * w.out + o] = _mm512_reduce_add_ps(acc[m]);
  }
}

#endif

// ---- tiles: 16 output rows interleaved, for decoding (AVX-512 VNNI) ------------------------------
// The layouts above keep a row's codes together, so a row's dot product ends in a horizontal sum
// and every group's scale is applied per row: about ten vector operations per 64 codes, which is
// what bounds those kernels on this class of CPU (docs/profile-decode.md). The tiles (llama.cpp's
// repacked Q4_0/Q8_0 "interleaved" formats do the same) put 4 consecutive code bytes of each of 16
// rows in one 64-byte line, so one vpdpbusd with 4 activations broadcast adds a 4-term dot product
// to each of 16 rows at once, each lane of the accumulator is one output, and a group's scales are
// one vector for 16 rows: 2-3 operations per 64 codes.
// - codes [out / 16, in / 4 (int8) or in / 8 (int4), 16, 4] bytes: line j of tile t holds bytes
//   4j .. 4j+3 of the stored rows 16t .. 16t+15 (int4: the stored nibble order, so a byte still
//   holds column c in its low nibble and c + g/2 in its high one); int8 codes are stored plus
//   128 (the sign bit flipped: vpdpbusd multiplies unsigned by signed bytes), which adds
//   128 * sum(x) to each product, taken back out per block of 32 activations;
// - scales (and int4's minimums) [out / 16, in / g, 16], in the layers' float32 (int8) or float16 (int4).
// Activations are rounded to int8 in blocks of 32 columns, as the int4 kernels above do.
struct Tiles {
  const uint8_t* codes;
  const void* scales;     // float16 (int4; int8 where that is exact) or float32 (int8)
  const at::Half* mins;   // int4 only
  int64_t out;
  float* y;  // [rows, out]
  bool half_scales;
};

#ifdef CAMELID_VNNI_WIDE
struct TileActivations {
  int64_t rows, in, group;
  std::vector<int8_t> q;      // [rows, in]
  std::vector<float> d;       // [rows, in / 32]: each block's scale
  std::vector<int32_t> bias;  // [rows, in / 32]: 128 * the block's sum of q (int8 codes)
  std::vector<float> xsum;    // [rows, in / group]: sum of x per group (int4's minimums)

  TileActivations(const float* x, int64_t rows_, int64_t in_, int64_t group_, bool int4)
      : rows(rows_), in(in_), group(group_), q(rows_ * in_), d(rows_ * in_ / 32), bias(rows_ * in_ / 32) {
    for (int64_t r = 0; r < rows; ++r) round_blocks(x + r * in, in, &q[r * in], &d[r * in / 32]);
    for (int64_t b = 0; b < rows * in / 32; ++b) {
      int32_t sum = 0;
      for (int k = 0; k < 32; ++k) sum += q[b * 32 + k];
      bias[b] = 128 * sum;
    }
    if (!int4) return;
    xsum.assign(rows * (in / group), 0.f);
    for (int64_t g = 0; g < rows * (in / group); ++g)
      for (int64_t k = 0; k < group; ++k) xsum[g] += x[g * group + k];
  }

  // 4 activations of row m from column c, as one 32-bit lane to broadcast
  __m512i four(int64_t m, int64_t c) const {
    int32_t v;
    std::memcpy(&v, &q[m * in + c], 4);
    return _mm512_set1_epi32(v);
  }
};

inline __m512 half16(const at::Half* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}

template <int M>
void int8_tiles(const TileActivations& a, const Tiles& w, int64_t m0, int64_t begin, int64_t end) {
  const int64_t in = a.in, blocks = in / 32, per_group = a.group / 32, groups = in / a.group;
  for (int64_t t = begin; t < end; ++t) {
    const uint8_t* lines = w.codes + t * (in / 4) * 64;
    __m512 acc[M], part[M];
    for (int m = 0; m < M; ++m) acc[m] = part[m] = _mm512_setzero_ps();
    for (int64_t b = 0; b < blocks; ++b) {
      __m512i even[M], odd[M];  // two chains, so that each product need not wait for the last
      for (int m = 0; m < M; ++m) even[m] = odd[m] = _mm512_setzero_si512();
      for (int j = 0; j < 8; j += 2) {
        const __m512i w0 = _mm512_loadu_si512(lines + (b * 8 + j) * 64);
        const __m512i w1 = _mm512_loadu_si512(lines + (b * 8 + j + 1) * 64);
        for (int m = 0; m < M; ++m) {
          even[m] = _mm512_dpbusd_epi32(even[m], w0, a.four(m0 + m, b * 32 + 4 * j));
          odd[m] = _mm512_dpbusd_epi32(odd[m], w1, a.four(m0 + m, b * 32 + 4 * j + 4));
        }
      }
      for (int m = 0; m < M; ++m) {
        const int64_t mb = (m0 + m) * blocks + b;
        const __m512i sum = _mm512_sub_epi32(_mm512_add_epi32(even[m], odd[m]), _mm512_set1_epi32(a.bias[mb]));
        part[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum), _mm512_set1_ps(a.d[mb]), part[m]);
      }
      if ((b + 1) % per_group == 0) {
        const int64_t at = (t * groups + b / per_group) * 16;
        const __m512 s = w.half_scales ? half16(static_cast<const at::Half*>(w.scales) + at)
                                       : _mm512_loadu_ps(static_cast<const float*>(w.scales) + at);
        for (int m = 0; m < M; ++m) {
          acc[m] = _mm512_fmadd_ps(part[m], s, acc[m]);
          part[m] = _mm512_setzero_ps();
        }
      }
    }
    for (int m = 0; m < M; ++m) _mm512_storeu_ps(w.y + (m0 + m) * w.out + t * 16, acc[m]);
  }
}

// int4: a group's line j holds columns 4j.. (low nibbles) and g/2 + 4j.. (high); each run of up
// to 8 lines covers one block of 32 activations with its low nibbles and one with its high ones
// (the same block when g = 32).
template <int M>
void int4_tiles(const TileActivations& a, const Tiles& w, int64_t m0, int64_t begin, int64_t end) {
  const int64_t in = a.in, group = a.group, groups = in / group, blocks = in / 32, run = std::min<int64_t>(8, group / 8);
  const __m512i low4 = _mm512_set1_epi8(0x0F);
  for (int64_t t = begin; t < end; ++t) {
    const uint8_t* lines = w.codes + t * (in / 8) * 64;
    __m512 acc[M];
    for (int m = 0; m < M; ++m) acc[m] = _mm512_setzero_ps();
    for (int64_t g = 0; g < groups; ++g) {
      __m512 part[M];
      for (int m = 0; m < M; ++m) part[m] = _mm512_setzero_ps();
      for (int64_t j0 = 0; j0 < group / 8; j0 += run) {
        const int64_t lo = g * group + 4 * j0, hi = lo + group / 2;
        __m512i sum_lo[M], sum_hi[M];
        for (int m = 0; m < M; ++m) sum_lo[m] = sum_hi[m] = _mm512_setzero_si512();
        for (int64_t j = 0; j < run; ++j) {
          const __m512i v = _mm512_loadu_si512(lines + (g * group / 8 + j0 + j) * 64);
          const __m512i vl = _mm512_and_si512(v, low4), vh = _mm512_and_si512(_mm512_srli_epi16(v, 4), low4);
          for (int m = 0; m < M; ++m) {
            sum_lo[m] = _mm512_dpbusd_epi32(sum_lo[m], vl, a.four(m0 + m, lo + 4 * j));
            sum_hi[m] = _mm512_dpbusd_epi32(sum_hi[m], vh, a.four(m0 + m, hi + 4 * j));
          }
        }
        for (int m = 0; m < M; ++m) {
          const float* d = &a.d[(m0 + m) * blocks];
          if (lo / 32 == hi / 32) {
            part[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(sum_lo[m], sum_hi[m])),
                                      _mm512_set1_ps(d[lo / 32]), part[m]);
          } else {
            part[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum_lo[m]), _mm512_set1_ps(d[lo / 32]), part[m]);
            part[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum_hi[m]), _mm512_set1_ps(d[hi / 32]), part[m]);
          }
        }
      }
      const __m512 s = half16(static_cast<const at::Half*>(w.scales) + (t * groups + g) * 16);
      const __m512 mn = half16(w.mins + (t * groups + g) * 16);
      for (int m = 0; m < M; ++m) {
        acc[m] = _mm512_fmadd_ps(part[m], s, acc[m]);
        acc[m] = _mm512_fmadd_ps(mn, _mm512_set1_ps(a.xsum[(m0 + m) * groups + g]), acc[m]);
      }
    }
    for (int m = 0; m < M; ++m) _mm512_storeu_ps(w.y + (m0 + m) * w.out + t * 16, acc[m]);
  }
}

// y = W x for each weight in tiles, x [rows, in] float; the tiles of all the weights of a call
// form one range split among threads, as in `run` below.
void run_tiles(const float* x, int64_t rows, int64_t in, int64_t group, const std::vector<Tiles>& weights, bool int4) {
  const TileActivations a(x, rows, in, group, int4);
  int64_t total = 0;
  for (const Tiles& w : weights) total += w.out / 16;
  const int64_t grain = std::max<int64_t>(1, total / (4 * at::get_num_threads()));
  for (int64_t m0 = 0; m0 < rows; m0 += kMaxRows) {
    const int64_t block = std::min<int64_t>(kMaxRows, rows - m0);
    at::parallel_for(0, total, grain, [&](int64_t begin, int64_t end) {
      int64_t first = 0;
      for (const Tiles& w : weights) {
        const int64_t lo = std::max(begin, first) - first, hi = std::min(end, first + w.out / 16) - first;
        first += w.out / 16;
        if (lo >= hi) continue;
        auto go = [&](auto M) {
          constexpr int n = decltype(M)::value;
          int4 ? int4_tiles<n>(a, w, m0, lo, hi) : int8_tiles<n>(a, w, m0, lo, hi);
        };
        switch (block) {
          case 1: go(std::integral_constant<int, 1>{}); break;
          case 2: go(std::integral_constant<int, 2>{}); break;
          case 3: go(std::integral_constant<int, 3>{}); break;
          default: go(std::integral_constant<int, 4>{}); break;
        }
      }
    });
  }
}
#endif

// ---- driving a call ------------------------------------------------------------------------------

// Activation rows in blocks of up to kMaxRows, each block one pass over the weights. The outputs
// of all the weights of a call (q, k and v of a layer, say) form one range split among threads
// (at::parallel_for follows torch.set_num_threads), so a small projection does not leave a
// thread idle and one call replaces several.
template <typename Kernel>
void run(const Activations& a, const std::vector<Weight>& weights, Kernel kernel) {
  int64_t total = 0;
  for (const Weight& w : weights) total += w.out;
  const int64_t grain = std::max<int64_t>(16, total / (4 * at::get_num_threads()));
  for (int64_t m0 = 0; m0 < a.rows; m0 += kMaxRows) {
    const int64_t block = std::min<int64_t>(kMaxRows, a.rows - m0);
    at::parallel_for(0, total, grain, [&](int64_t begin, int64_t end) {
      int64_t first = 0;
      for (const Weight& w : weights) {
        const int64_t lo = std::max(begin, first) - first, hi = std::min(end, first + w.out) - first;
        first += w.out;
        if (lo >= hi) continue;
        switch (block) {
          case 1: kernel(std::integral_constant<int, 1>{}, w, m0, lo, hi); break;
          case 2: kernel(std::integral_constant<int, 2>{}, w, m0, lo, hi); break;
          case 3: kernel(std::integral_constant<int, 3>{}, w, m0, lo, hi); break;
          default: kernel(std::integral_constant<int, 4>{}, w, m0, lo, hi); break;
        }
      }
    });
  }
}

// y = W x for each weight, x [rows, in] float: the kernels for the CPU (checks are the caller's)
void run_int8(const float* x, int64_t rows, int64_t in, int64_t group, const std::vector<Weight>& weights) {
  const Activations a(x, rows, in, group, false, false);
  run(a, weights, [&](auto M, const Weight& w, int64_t m0, int64_t lo, int64_t hi) {
    int8_rows<decltype(M)::value>(a, w, m0, lo, hi);
  });
}

void run_int4(const float* x, int64_t rows, int64_t in, int64_t group, const std::vector<Weight>& weights,
              bool int8_activations) {
#ifdef CAMELID_VNNI
  const bool int8 = int8_activations;
#else
  const bool int8 = false;
#endif
  const Activations a(x, rows, in, group, true, int8);
  run(a, weights, [&](auto M, const Weight& w, int64_t m0, int64_t lo, int64_t hi) {
    constexpr int rows = decltype(M)::value;
#ifdef CAMELID_VNNI_WIDE
    if (a.wide) return int4_rows_vnni_wide<rows>(a, w, m0, lo, hi);
#endif
#ifdef CAMELID_VNNI
    if (int8) return int4_rows_vnni<rows>(a, w, m0, lo, hi);
#endif
    int4_rows<rows>(a, w, m0, lo, hi);
  });
}

// Each conversion is skipped when the tensor already is as stored: a decode step makes these
// calls hundreds of times per token, and every dispatched no-op costs a fraction of a microsecond.
at::Tensor as(const at::Tensor& t, at::ScalarType type) {
  return t.scalar_type() == type && t.is_contiguous() ? t : t.to(type).contiguous();
}

// The kernels index scales and minimums as [out, groups]: a mismatch would read past them.
void check_group_shapes(const at::Tensor& codes, const at::Tensor& scales, const at::Tensor* mins, int64_t groups) {
  for (const at::Tensor* t : {&scales, mins}) {
    if (t == nullptr) continue;
    TORCH_CHECK(t->dim() == 2 && t->size(0) == codes.size(0) && t->size(1) == groups, "scales and minimums must be [",
                codes.size(0), ", ", groups, "] for ", codes.size(0), " outputs in groups; got ", t->sizes());
  }
}

// Checks, float copies where needed, and an output [rows, out] per weight.
struct Call {
  at::Tensor x;  // [rows, in], float
  std::vector<at::Tensor> keep, outputs;
  std::vector<Weight> weights;

  int64_t group_;

  Call(const at::Tensor& x_, int64_t in, int64_t group, int64_t multiple) : group_(group) {
    TORCH_CHECK(x_.device().is_cpu(), "camelid's quantized kernels run on CPU tensors");
    TORCH_CHECK(x_.is_floating_point(), "the input must be floating point, not ", x_.scalar_type());
    TORCH_CHECK(x_.size(-1) == in, "input has ", x_.size(-1), " features, the weight ", in);
    TORCH_CHECK(group > 0 && in % group == 0 && group % multiple == 0,
                "group size ", group, " must divide ", in, " and be a multiple of ", multiple);
    x = as(x_, at::kFloat).view({-1, in});
  }

  void add(const at::Tensor& codes, const at::Tensor& scales, const at::Tensor* mins, at::ScalarType code_type,
           at::ScalarType scale_type, int64_t in) {
    TORCH_CHECK(codes.device().is_cpu() && codes.scalar_type() == code_type, "codes of type ", code_type,
                " on the CPU expected, got ", codes.scalar_type());
    TORCH_CHECK(codes.size(1) * (mins ? 2 : 1) == in, "a weight of ", codes.size(1) * (mins ? 2 : 1),
                " columns for an input of ", in);
    check_group_shapes(codes, scales, mins, in / group_);
    const at::Tensor c = as(codes, code_type), s = as(scales, scale_type);
    const at::Tensor mn = mins ? as(*mins, at::kHalf) : at::Tensor();
    at::Tensor y = at::empty({x.size(0), codes.size(0)}, x.options());
    weights.push_back({c.data_ptr(), s.data_ptr(), mins ? mn.data_ptr<at::Half>() : nullptr, codes.size(0),
                       y.data_ptr<float>()});
    keep.insert(keep.end(), {c, s, mn});
    outputs.push_back(y);
  }

  // outputs [..., out] in the input's dtype
  std::vector<at::Tensor> results(const at::Tensor& x_) const {
    std::vector<at::Tensor> out;
    for (const at::Tensor& y : outputs) {
      auto shape = x_.sizes().vec();
      shape.back() = y.size(1);
      const at::Tensor v = y.view(shape);
      out.push_back(x_.scalar_type() == at::kFloat ? v : v.to(x_.scalar_type()));
    }
    return out;
  }
};

std::vector<at::Tensor> int8_gemv_many(const at::Tensor& x, at::TensorList codes, at::TensorList scales,
                                       int64_t group) {
  TORCH_CHECK(!codes.empty() && codes.size() == scales.size(), "one scales tensor per codes tensor");
  for (const at::Tensor& c : codes) TORCH_CHECK(c.dim() == 2, "codes must be [out, in], got ", c.sizes());
  const int64_t in = codes[0].size(1);
  Call call(x, in, group, kLanes);
  for (size_t i = 0; i < codes.size(); ++i) call.add(codes[i], scales[i], nullptr, at::kChar, at::kFloat, in);
  run_int8(call.x.data_ptr<float>(), call.x.size(0), in, group, call.weights);
  return call.results(x);
}

std::vector<at::Tensor> int4_gemv_many(const at::Tensor& x, at::TensorList codes, at::TensorList scales,
                                       at::TensorList mins, int64_t group, bool int8_activations) {
  TORCH_CHECK(!codes.empty() && codes.size() == scales.size() && codes.size() == mins.size(),
              "one scales and one mins tensor per codes tensor");
  for (const at::Tensor& c : codes) TORCH_CHECK(c.dim() == 2, "codes must be [out, in / 2], got ", c.sizes());
  const int64_t in = codes[0].size(1) * 2;
  Call call(x, in, group, 2 * kLanes);
  for (size_t i = 0; i < codes.size(); ++i) call.add(codes[i], scales[i], &mins[i], at::kByte, at::kHalf, in);
  run_int4(call.x.data_ptr<float>(), call.x.size(0), in, group, call.weights, int8_activations);
  return call.results(x);
}

at::Tensor int8_gemv(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scales, int64_t group) {
  return int8_gemv_many(x, {codes}, {scales}, group)[0];
}

at::Tensor int4_gemv(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scales, const at::Tensor& mins,
                     int64_t group, bool int8_activations) {
  return int4_gemv_many(x, {codes}, {scales}, {mins}, group, int8_activations)[0];
}

// The checks for tiles as `tile` in camelid/quant/tiles.py makes them: codes [out/16, in/4 or
// in/8, 16, 4] uint8; scales [out/16, in/g, 16] in float16 (int4, with its minimums alike; int8
// where its scales are exact in float16, as GGUF's Q8_0 are) or float32 (int8).
Tiles checked_tiles(const at::Tensor& codes, const at::Tensor& scales, const at::Tensor* mins, int64_t group,
                    int64_t in) {
  const bool int4 = mins != nullptr;
  TORCH_CHECK(codes.dim() == 4 && codes.scalar_type() == at::kByte && codes.is_contiguous() && codes.size(2) == 16 &&
                  codes.size(3) == 4 && codes.size(1) * (int4 ? 8 : 4) == in,
              "tiles of codes [out/16, ", in / (int4 ? 8 : 4), ", 16, 4] uint8 expected, got ", codes.sizes());
  // int4: a run of a group's lines meets whole blocks of 32 activations only for 32 or 64k
  TORCH_CHECK(group > 0 && in % group == 0 && (int4 ? group == 32 || group % 64 == 0 : group % 32 == 0),
              "tiles need groups dividing ", in, " of 32 or a multiple of ", int4 ? 64 : 32, ", not ", group);
  for (const at::Tensor* t : {&scales, mins})
    if (t)
      TORCH_CHECK((t->scalar_type() == at::kHalf || (!int4 && t->scalar_type() == at::kFloat)) && t->is_contiguous() &&
                      t->dim() == 3 && t->size(0) == codes.size(0) && t->size(1) == in / group && t->size(2) == 16,
                  "tiles' scales and minimums must be ", int4 ? "float16" : "float16 or float32", " [", codes.size(0),
                  ", ", in / group, ", 16], got ", t->scalar_type(), " ", t->sizes());
  return {codes.data_ptr<uint8_t>(), scales.data_ptr(), int4 ? mins->data_ptr<at::Half>() : nullptr,
          codes.size(0) * 16, nullptr, scales.scalar_type() == at::kHalf};
}

bool has_tiles() {
#ifdef CAMELID_VNNI_WIDE
  return true;
#else
  return false;
#endif
}

at::Tensor gemv_tiles(const at::Tensor& x_, const at::Tensor& codes, const at::Tensor& scales,
                      const std::optional<at::Tensor>& mins, int64_t group) {
  TORCH_CHECK(has_tiles(), "this CPU has no AVX-512 VNNI: tiles are not used here");
  const int64_t in = x_.size(-1);
  Tiles w = checked_tiles(codes, scales, mins ? &*mins : nullptr, group, in);
  TORCH_CHECK(x_.device().is_cpu() && x_.is_floating_point(), "the input must be a floating-point CPU tensor");
  const at::Tensor x = as(x_, at::kFloat).view({-1, in});
  at::Tensor y = at::empty({x.size(0), w.out}, x.options());
  w.y = y.data_ptr<float>();
#ifdef CAMELID_VNNI_WIDE
  run_tiles(x.data_ptr<float>(), x.size(0), in, group, {w}, mins.has_value());
#endif
  auto shape = x_.sizes().vec();
  shape.back() = w.out;
  return x_.scalar_type() == at::kFloat ? y.view(shape) : y.view(shape).to(x_.scalar_type());
}

// `bytes` of memory for weights that every decode step streams through, on 2 MiB pages where
// the kernel gives them (Linux's transparent huge pages in "madvise" mode, the common default):
// with 4 KiB pages the CPU's prefetchers stop at every page boundary and each page costs a TLB
// miss, which measured as a quarter to a third of the products' read speed
// (docs/profile-decode.md). Elsewhere, ordinary memory.
at::Tensor empty_huge(int64_t bytes) {
#if defined(__linux__)
  constexpr int64_t kHuge = 2 << 20;
  const int64_t size = std::max<int64_t>(kHuge, (bytes + kHuge - 1) / kHuge * kHuge);
  void* p = nullptr;
  if (posix_memalign(&p, kHuge, size) == 0) {
#ifdef MADV_HUGEPAGE
    madvise(p, size, MADV_HUGEPAGE);  // advice: a kernel without it keeps small pages
#endif
    return at::from_blob(p, {bytes}, [](void* q) { std::free(q); }, at::TensorOptions().dtype(at::kByte));
  }
#endif
  return at::empty({bytes}, at::TensorOptions().dtype(at::kByte));
}

// ---- dequantization, for products of many rows (prefill) ---------------------------------------

// 16 floats to bfloat16, rounding to nearest even (the weights are finite: no NaN case).
inline void store_bf16(at::BFloat16* out, f32x16 v) {
#if defined(__AVX512BF16__) && defined(__AVX512VL__)
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), (__m256i)_mm512_cvtneps_pbh((__m512)v));
#else
  i32x16 bits;
  std::memcpy(&bits, &v, sizeof bits);
  bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16;
  uint16_t halves[kLanes];
  for (int i = 0; i < kLanes; ++i) halves[i] = static_cast<uint16_t>(bits[i]);
  std::memcpy(out, halves, sizeof halves);
#endif
}

inline void store(float* out, f32x16 v) { std::memcpy(out, &v, sizeof v); }
inline void store(at::BFloat16* out, f32x16 v) { store_bf16(out, v); }

// w [out, in] in float or bfloat16 from int8 (mins undefined) or int4 codes, rows split among threads.
template <typename T>
void dequantize_rows(const at::Tensor& codes, const at::Tensor& scales, const at::Tensor& mins, int64_t group,
                     T* w, int64_t out, int64_t in) {
  const int64_t groups = in / group;
  const bool int4 = mins.defined();
  const void* cp = codes.data_ptr();
  const void* sp = scales.data_ptr();
  const at::Half* mp = int4 ? mins.data_ptr<at::Half>() : nullptr;
  at::parallel_for(0, out, 16, [&](int64_t begin, int64_t end) {
    for (int64_t o = begin; o < end; ++o) {
      for (int64_t g = 0; g < groups; ++g) {
        T* wg = w + o * in + g * group;
        if (int4) {
          const uint8_t* c = static_cast<const uint8_t*>(cp) + o * (in / 2) + g * (group / 2);
          const float s = static_cast<float>(static_cast<const at::Half*>(sp)[o * groups + g]);
          const float mn = static_cast<float>(mp[o * groups + g]);
          for (int64_t j = 0; j < group / 2; j += kLanes) {
            const i32x16 q = widen<false>(c + j);
            store(wg + j, __builtin_convertvector(q & 15, f32x16) * s + mn);
            store(wg + group / 2 + j, __builtin_convertvector(q >> 4, f32x16) * s + mn);
          }
        } else {
          const int8_t* c = static_cast<const int8_t*>(cp) + o * in + g * group;
          const float s = static_cast<const float*>(sp)[o * groups + g];
          for (int64_t j = 0; j < group; j += kLanes) store(wg + j, int8_lanes(c + j) * s);
        }
      }
    }
  });
}

at::Tensor dequantize(const at::Tensor& codes, const at::Tensor& scales, const std::optional<at::Tensor>& mins,
                      int64_t group, at::ScalarType dtype) {
  const bool int4 = mins.has_value();
  TORCH_CHECK(codes.device().is_cpu() && codes.dim() == 2, "codes must be a 2-D CPU tensor");
  TORCH_CHECK(codes.scalar_type() == (int4 ? at::kByte : at::kChar), int4 ? "int4 codes must be uint8" : "int8 codes must be int8");
  const int64_t out = codes.size(0), in = codes.size(1) * (int4 ? 2 : 1);
  TORCH_CHECK(group > 0 && in % group == 0 && group % (int4 ? 2 * kLanes : kLanes) == 0, "group size ", group,
              " does not suit ", in, " columns");
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16, "dequantize to float32 or bfloat16, not ", dtype);
  check_group_shapes(codes, scales, int4 ? &*mins : nullptr, in / group);
  const at::Tensor c = as(codes, int4 ? at::kByte : at::kChar), s = as(scales, int4 ? at::kHalf : at::kFloat);
  const at::Tensor mn = int4 ? as(*mins, at::kHalf) : at::Tensor();
  at::Tensor w = at::empty({out, in}, codes.options().dtype(dtype));
  if (dtype == at::kFloat)
    dequantize_rows(c, s, mn, group, w.data_ptr<float>(), out, in);
  else
    dequantize_rows(c, s, mn, group, w.data_ptr<at::BFloat16>(), out, in);
  return w;
}


// ---- a whole decoder block for a few rows (decode) ----------------------------------------------
// One call per layer instead of a compiled graph's dozen (norms, products, RoPE, the cache write,
// attention, SwiGLU, residuals): the fixed cost of each call from the graph's wrapper is what the
// decode step's profile showed as its largest share outside the products (docs/profile-decode.md).
// The attention reads only the slots up to each row's position, where the compiled graph's
// static shape reads the whole cache. The same math as camelid/model/transformer.py, in fp32:
// RMSNorm, rotation of adjacent pairs, softmax over the positions seen, SwiGLU.

// y [rows, dim]: x normalised (RMSNorm) and scaled by the gain
void rms_norm(const float* x, const float* gain, float eps, int64_t rows, int64_t dim, float* y) {
  for (int64_t r = 0; r < rows; ++r) {
    float ss = 0.f;
    for (int64_t i = 0; i < dim; ++i) ss += x[r * dim + i] * x[r * dim + i];
    const float inv = 1.f / std::sqrt(ss / dim + eps);
    for (int64_t i = 0; i < dim; ++i) y[r * dim + i] = x[r * dim + i] * inv * gain[i];
  }
}

// e^x for 16 lanes, to a few units in the last place of float32: x = n ln 2 + r with |r| <= ln 2 / 2,
// e^r by its Taylor series to r^7 (relative error under 2e-7), times 2^n through the exponent bits.
// Scalar expf in a loop is what the softmax and SwiGLU of a block otherwise spend most of their time on.
inline f32x16 exp16(f32x16 x) {
  const f32x16 lo = f32x16{} - 87.f, hi = f32x16{} + 88.f;
  x = x < lo ? lo : (x > hi ? hi : x);
  const f32x16 t = x * 1.44269504f;
  const i32x16 n = __builtin_convertvector(t + (t >= 0 ? 0.5f : -0.5f), i32x16);
  const f32x16 nf = __builtin_convertvector(n, f32x16);
  const f32x16 r = x - nf * 0.693145752f - nf * 1.42860677e-6f;
  f32x16 p = f32x16{} + 1.f / 5040;
  for (float c : {1.f / 720, 1.f / 120, 1.f / 24, 1.f / 6, 0.5f, 1.f, 1.f}) p = p * r + c;
  i32x16 bits;
  std::memcpy(&bits, &p, sizeof bits);
  bits += n << 23;
  std::memcpy(&p, &bits, sizeof p);
  return p;
}

// Vectors of kLanes with a scalar tail.
inline float dot(const float* a, const float* b, int64_t n) {
  f32x16 acc = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) acc += load_f32(a + i) * load_f32(b + i);
  float total = sum_lanes(acc);
  for (; i < n; ++i) total += a[i] * b[i];
  return total;
}

// w[i] = e^(w[i] - top) for i < n, returning their sum (w has room for kLanes more)
inline float exp_shifted(float* w, int64_t n, float top) {
  f32x16 sum = {};
  for (int64_t i = 0; i < n; i += kLanes) {
    f32x16 e = exp16(load_f32(w + i) - top);
    for (int64_t k = n - i; k < kLanes; ++k) e[k] = 0.f;  // lanes past the end
    std::memcpy(w + i, &e, sizeof e);
    sum += e;
  }
  return sum_lanes(sum);
}

// gate = silu(gate) * up
inline void swiglu(float* gate, const float* up, int64_t n) {
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    const f32x16 g = load_f32(gate + i);
    const f32x16 y = g / (1.f + exp16(-g)) * load_f32(up + i);
    std::memcpy(gate + i, &y, sizeof y);
  }
  for (; i < n; ++i) gate[i] = gate[i] / (1.f + std::exp(-gate[i])) * up[i];
}

// Rotate adjacent pairs of each head of t [rows, heads * D] by rotation [rows or 1, D / 2, 2].
void rotate(float* t, const float* rotation, bool shared, int64_t rows, int64_t heads, int64_t D) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* cs = rotation + (shared ? 0 : r) * D;
    for (int64_t h = 0; h < heads; ++h) {
      float* v = t + (r * heads + h) * D;
      for (int64_t i = 0; i < D / 2; ++i) {
        const float a = v[2 * i], b = v[2 * i + 1], c = cs[2 * i], s = cs[2 * i + 1];
        v[2 * i] = a * c - b * s;
        v[2 * i + 1] = a * s + b * c;
      }
    }
  }
}

// The seven products of a block (wq, wk, wv, wo, w1, w3, w2), checked once per call: codes as
// the layers store them, or as tiles (camelid/quant/tiles.py) where the CPU has them.
struct BlockWeights {
  Weight w[7];
  Tiles tiles[7];
  int64_t in[7], group[7];
  bool int4, tiled;

  BlockWeights(at::TensorList codes, at::TensorList scales, at::TensorList mins, at::IntArrayRef groups) {
    TORCH_CHECK(codes.size() == 7 && scales.size() == 7 && groups.size() == 7 && (mins.empty() || mins.size() == 7),
                "decode_block: wq, wk, wv, wo, w1, w3, w2");
    int4 = !mins.empty();
    tiled = codes[0].dim() == 4;
    TORCH_CHECK(!tiled || has_tiles(), "decode_block: this CPU has no AVX-512 VNNI for tiles");
    for (int i = 0; i < 7; ++i) {
      const at::Tensor &c = codes[i], &s = scales[i];
      group[i] = groups[i];
      if (tiled) {
        in[i] = c.size(1) * (int4 ? 8 : 4);
        tiles[i] = checked_tiles(c, s, int4 ? &mins[i] : nullptr, group[i], in[i]);
        w[i].out = tiles[i].out;
        continue;
      }
      TORCH_CHECK(c.dim() == 2 && c.is_contiguous() && c.scalar_type() == (int4 ? at::kByte : at::kChar) &&
                      s.is_contiguous() && s.scalar_type() == (int4 ? at::kHalf : at::kFloat),
                  "decode_block: contiguous codes and scales as the layers store them, or tiles of all seven");
      in[i] = c.size(1) * (int4 ? 2 : 1);
      TORCH_CHECK(group[i] > 0 && in[i] % group[i] == 0 && group[i] % (int4 ? 2 * kLanes : kLanes) == 0,
                  "decode_block: group size ", group[i], " does not suit ", in[i], " columns");
      check_group_shapes(c, s, int4 ? &mins[i] : nullptr, in[i] / group[i]);
      if (int4) TORCH_CHECK(mins[i].is_contiguous() && mins[i].scalar_type() == at::kHalf, "decode_block: fp16 mins");
      w[i] = {c.data_ptr(), s.data_ptr(), int4 ? mins[i].data_ptr<at::Half>() : nullptr, c.size(0), nullptr};
    }
  }

  // y_i = W_i x for the weights `which` (sharing an input, so one group size), into `outs`
  void products(const float* x, int64_t rows, std::initializer_list<int> which, std::initializer_list<float*> outs,
                bool int8_activations) const {
    const int first = *which.begin();
    auto out = outs.begin();
#ifdef CAMELID_VNNI_WIDE
    if (tiled) {
      std::vector<Tiles> ts;
      for (int i : which) {
        ts.push_back(tiles[i]);
        ts.back().y = *out++;
      }
      return run_tiles(x, rows, in[first], group[first], ts, int4);
    }
#endif
    std::vector<Weight> ws;
    for (int i : which) {
      ws.push_back(w[i]);
      ws.back().y = *out++;
    }
    if (int4)
      run_int4(x, rows, in[first], group[first], ws, int8_activations);
    else
      run_int8(x, rows, in[first], group[first], ws);
  }
};

// Where a row's key (or value) of a kv head at a slot lies, in floats from the cache's start: a
// static cache [rows, K, slots, D] (strides as they are), or a paged one's pools [blocks,
// block_size, K, D] through the rows' block table [rows, n] (camelid/model/kv_cache.py).
struct CacheSlots {
  int64_t K, D, slots, s0 = 0, s1 = 0, s2 = 0;
  const int64_t* table = nullptr;
  int64_t t0 = 0, t1 = 0, block = 1;

  CacheSlots(const at::Tensor& cache_k, const at::Tensor& cache_v, const std::optional<at::Tensor>& table_, int64_t rows) {
    TORCH_CHECK(cache_k.scalar_type() == at::kFloat && cache_v.scalar_type() == at::kFloat && cache_k.dim() == 4 &&
                cache_k.sizes() == cache_v.sizes() && cache_k.strides() == cache_v.strides() && cache_k.stride(3) == 1,
                "decode_block: float32 caches, [rows, kv heads, slots, head dim] or pools of blocks");
    D = cache_k.size(3);
    if (!table_) {
      K = cache_k.size(1), slots = cache_k.size(2);
      s0 = cache_k.stride(0), s1 = cache_k.stride(1), s2 = cache_k.stride(2);
      TORCH_CHECK(cache_k.size(0) >= rows, "decode_block: a cache of ", cache_k.size(0), " rows for ", rows);
      return;
    }
    const at::Tensor& t = *table_;
    TORCH_CHECK(cache_k.is_contiguous() && t.scalar_type() == at::kLong && t.dim() == 2 && t.size(0) >= rows,
                "decode_block: contiguous pools [blocks, block size, kv heads, head dim] and an int64 block table "
                "[rows, blocks]");
    K = cache_k.size(2), block = cache_k.size(1), slots = t.size(1) * block;
    table = t.data_ptr<int64_t>(), t0 = t.stride(0), t1 = t.stride(1);
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t b = 0; b < t.size(1); ++b)
        TORCH_CHECK(table[r * t0 + b * t1] >= 0 && table[r * t0 + b * t1] < cache_k.size(0),
                    "decode_block: the block table names a block outside the pool's ", cache_k.size(0));
  }

  int64_t at(int64_t r, int64_t kh, int64_t s) const {
    if (table == nullptr) return r * s0 + kh * s1 + s * s2;
    return ((table[r * t0 + s / block * t1] * block + s % block) * K + kh) * D;
  }
};

at::Tensor decode_block(const at::Tensor& x_, const at::Tensor& attention_norm, const at::Tensor& ffn_norm, double eps_,
                        at::TensorList codes, at::TensorList scales, at::TensorList mins, at::IntArrayRef groups,
                        bool int8_activations, const at::Tensor& rotation, const at::Tensor& cache_k,
                        const at::Tensor& cache_v, const at::Tensor& positions, int64_t n_heads,
                        const std::optional<at::Tensor>& table) {
  const BlockWeights weights(codes, scales, mins, groups);
  const int64_t rows = x_.size(0), dim = x_.size(-1);
  const CacheSlots cache(cache_k, cache_v, table, rows);
  const int64_t K = cache.K, slots = cache.slots, D = cache.D;
  const int64_t H = n_heads, per_kv = H / K, ffn = weights.w[4].out;
  TORCH_CHECK(x_.scalar_type() == at::kFloat && x_.is_contiguous() && x_.numel() == rows * dim,
              "decode_block: one contiguous float32 token per row");
  for (const at::Tensor* t : {&attention_norm, &ffn_norm, &rotation})
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous(), "decode_block: contiguous float32 norms and rotation");
  TORCH_CHECK(attention_norm.numel() == dim && ffn_norm.numel() == dim, "decode_block: norms of ", dim);
  TORCH_CHECK(H % K == 0 && D % 2 == 0 && weights.w[0].out == H * D &&
              weights.w[1].out == K * D && weights.in[0] == dim && weights.in[3] == H * D && weights.in[6] == ffn,
              "decode_block: the cache, heads and weights do not fit");
  TORCH_CHECK(positions.scalar_type() == at::kLong && positions.is_contiguous() &&
              (positions.numel() == rows || positions.numel() == 1), "decode_block: one int64 position per row");
  TORCH_CHECK(rotation.numel() == positions.numel() * D, "decode_block: one rotation per position");
  const int64_t* pos = positions.data_ptr<int64_t>();
  auto position = [&](int64_t r) { return pos[positions.numel() == 1 ? 0 : r]; };
  for (int64_t r = 0; r < rows; ++r)
    TORCH_CHECK(position(r) >= 0 && position(r) < slots, "decode_block: position ", position(r), " outside the cache's ",
                slots, " slots");
  const float eps = static_cast<float>(eps_);

  // every intermediate in one allocation: the normed input, q, k, v, the attention's output, w1 x, w3 x
  at::Tensor out = at::empty_like(x_);
  at::Tensor scratch = at::empty({rows * (dim + 2 * H * D + 2 * K * D + 2 * ffn)}, x_.options());
  float* normed = scratch.data_ptr<float>();
  float* q = normed + rows * dim;
  float* k = q + rows * H * D;
  float* v = k + rows * K * D;
  float* attended = v + rows * K * D;
  float* gate = attended + rows * H * D;
  float* up = gate + rows * ffn;
  const float* x = x_.data_ptr<float>();
  float* h = out.data_ptr<float>();

  // attention
  rms_norm(x, attention_norm.data_ptr<float>(), eps, rows, dim, normed);
  weights.products(normed, rows, {0, 1, 2}, {q, k, v}, int8_activations);
  const bool shared = positions.numel() == 1;
  rotate(q, rotation.data_ptr<float>(), shared, rows, H, D);
  rotate(k, rotation.data_ptr<float>(), shared, rows, K, D);
  float* ck = cache_k.data_ptr<float>();
  float* cv = cache_v.data_ptr<float>();
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t kh = 0; kh < K; ++kh) {
      const int64_t slot = cache.at(r, kh, position(r));
      std::memcpy(ck + slot, k + (r * K + kh) * D, D * sizeof(float));
      std::memcpy(cv + slot, v + (r * K + kh) * D, D * sizeof(float));
    }
  const float scale = 1.f / std::sqrt(static_cast<float>(D));
  at::parallel_for(0, rows * H, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> w(slots + kLanes);
    for (int64_t rh = begin; rh < end; ++rh) {
      const int64_t r = rh / H, seen = position(r) + 1;
      const float* qh = q + rh * D;
      const int64_t kh = rh % H / per_kv;
      float top = -INFINITY;
      for (int64_t s = 0; s < seen; ++s) {
        w[s] = dot(qh, ck + cache.at(r, kh, s), D) * scale;
        top = std::max(top, w[s]);
      }
      const float total = exp_shifted(w.data(), seen, top);
      float* o = attended + rh * D;
      std::fill(o, o + D, 0.f);
      for (int64_t s = 0; s < seen; ++s) {
        const float ws = w[s] / total;
        const float* vs = cv + cache.at(r, kh, s);
        for (int64_t d = 0; d < D; ++d) o[d] += ws * vs[d];
      }
    }
  });
  weights.products(attended, rows, {3}, {h}, int8_activations);
  for (int64_t i = 0; i < rows * dim; ++i) h[i] += x[i];

  // feed-forward (SwiGLU)
  rms_norm(h, ffn_norm.data_ptr<float>(), eps, rows, dim, normed);
  weights.products(normed, rows, {4, 5}, {gate, up}, int8_activations);
  swiglu(gate, up, rows * ffn);
  weights.products(gate, rows, {6}, {normed}, int8_activations);
  for (int64_t i = 0; i < rows * dim; ++i) h[i] += normed[i];
  return out;
}

// Every block of a model, one after another, in one call: a step that is nothing but its blocks
// pays the operator call's fixed cost (parsing its arguments from Python) once, not per layer.
// Per layer l: norms[2l], norms[2l+1] (attention, feed-forward), the seven products from 7l on
// in each list, cache_k[l] and cache_v[l].
at::Tensor decode_blocks(const at::Tensor& x, at::TensorList norms, double eps, at::TensorList codes,
                         at::TensorList scales, at::TensorList mins, at::IntArrayRef groups, bool int8_activations,
                         const at::Tensor& rotation, at::TensorList cache_k, at::TensorList cache_v,
                         const at::Tensor& positions, int64_t n_heads, const std::optional<at::Tensor>& table) {
  const size_t layers = cache_k.size();
  TORCH_CHECK(layers > 0 && cache_v.size() == layers && norms.size() == 2 * layers && codes.size() == 7 * layers &&
                  scales.size() == 7 * layers && groups.size() == 7 * layers && (mins.empty() || mins.size() == 7 * layers),
              "decode_blocks: per layer two norms, seven products and a cache");
  at::Tensor h = x;
  for (size_t l = 0; l < layers; ++l)
    h = decode_block(h, norms[2 * l], norms[2 * l + 1], eps, codes.slice(7 * l, 7), scales.slice(7 * l, 7),
                     mins.empty() ? mins : mins.slice(7 * l, 7), groups.slice(7 * l, 7), int8_activations, rotation,
                     cache_k[l], cache_v[l], positions, n_heads, table);
  return h;
}

bool has_int8_activations() {
#ifdef CAMELID_VNNI
  return true;
#else
  return false;
#endif
}

}  // namespace

TORCH_LIBRARY(camelid, m) {
  m.def("int8_gemv(Tensor x, Tensor codes, Tensor scales, int group_size) -> Tensor");
  // int8_activations: round x to int8 first where the CPU multiplies bytes fast (VNNI); ignored
  // elsewhere (has_int8_activations says which)
  m.def("int4_gemv(Tensor x, Tensor codes, Tensor scales, Tensor mins, int group_size, bool int8_activations) -> Tensor");
  // several weights over the same input in one call: what the compiled decode step's graph pass
  // (fuse.py) makes of a layer's q, k, v and of its w1, w3
  m.def("int8_gemv_many(Tensor x, Tensor[] codes, Tensor[] scales, int group_size) -> Tensor[]");
  m.def("int4_gemv_many(Tensor x, Tensor[] codes, Tensor[] scales, Tensor[] mins, int group_size, "
        "bool int8_activations) -> Tensor[]");
  m.def("has_int8_activations() -> bool");
  // y = W x with W as tiles (camelid/quant/tiles.py; mins for int4), where has_tiles()
  m.def("gemv_tiles(Tensor x, Tensor codes, Tensor scales, Tensor? mins, int group_size) -> Tensor");
  m.def("has_tiles() -> bool");
  // uninitialised bytes on huge pages where the OS gives them, for tiles
  m.def("empty_huge(int bytes) -> Tensor");
  // a transformer block for one new token per row over a float32 cache (written at the rows'
  // positions): static, or a paged cache's pools with its block table; the compiled decode
  // step's one call per layer (camelid/quant/block.py); weights in the order wq, wk, wv, wo, w1,
  // w3, w2 (as stored or as tiles: tiles always round the activations to int8), mins empty for int8
  m.def("decode_block(Tensor x, Tensor attention_norm, Tensor ffn_norm, float eps, Tensor[] codes, Tensor[] scales, "
        "Tensor[] mins, int[] group_sizes, bool int8_activations, Tensor rotation, Tensor(a!) cache_k, "
        "Tensor(b!) cache_v, Tensor positions, int n_heads, Tensor? table=None) -> Tensor");
  // decode_block for every layer in turn (per-layer lists flattened in layer order)
  m.def("decode_blocks(Tensor x, Tensor[] norms, float eps, Tensor[] codes, Tensor[] scales, Tensor[] mins, "
        "int[] group_sizes, bool int8_activations, Tensor rotation, Tensor(a!)[] cache_k, Tensor(b!)[] cache_v, "
        "Tensor positions, int n_heads, Tensor? table=None) -> Tensor");
  // the float32 or bfloat16 weight of int8 (no mins) or int4 codes
  m.def("dequantize(Tensor codes, Tensor scales, Tensor? mins, int group_size, ScalarType dtype) -> Tensor");
}

TORCH_LIBRARY_IMPL(camelid, CPU, m) {
  m.impl("int8_gemv", &int8_gemv);
  m.impl("int4_gemv", &int4_gemv);
  m.impl("int8_gemv_many", &int8_gemv_many);
  m.impl("int4_gemv_many", &int4_gemv_many);
  m.impl("dequantize", &dequantize);
  m.impl("decode_block", &decode_block);
  m.impl("gemv_tiles", &gemv_tiles);
  m.impl("decode_blocks", &decode_blocks);
}

TORCH_LIBRARY_IMPL(camelid, CompositeExplicitAutograd, m) {
  m.impl("has_int8_activations", &has_int8_activations);
  m.impl("has_tiles", &has_tiles);
  m.impl("empty_huge", &empty_huge);
}
