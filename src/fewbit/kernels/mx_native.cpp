// One-pass MX quantization on the CPU: block amax, E8M0 scale code, element rounding and (fake) dequantization or
// encoding, reading each element once and writing once. A transcription of the torch reference in
// fewbit/kernels/{e8m0,cast,quantize}.py, operation for operation, in 32-bit integer and IEEE float32 arithmetic,
// so that its results equal the reference's bit for bit (the tests compare them at atol=0 over every MX format,
// scale mode and rounding mode). Built and loaded by fewbit/kernels/native.py; no torch headers, plain C ABI.
//
// The tensor is seen as (outer, L, inner) float32, contiguous, with blocks of `block` elements along L (the last
// block zero-padded, which does not change an amax). inner == 1: each block is contiguous (blocks along the last
// axis); inner > 1: a block is `block` rows of a column, and the loops run across the columns, so blocking along a
// leading axis (the backward GEMMs' operands) needs no transposed copy. Outputs are in the same layout; the scale
// codes are (outer, ceil(L / block), inner).
//
// Compiled without -ffast-math and with -ffp-contract=off: every float operation is the single IEEE operation of
// the reference (multiplications by powers of two, one division in rceil), rounded to nearest even.

#include <algorithm>
#include <cstdint>
#include <cstring>
#ifdef __AVX2__
#include <immintrin.h>
#endif

namespace {

constexpr int32_t SIGN = INT32_MIN;
constexpr int32_t ABS = 0x7FFFFFFF;
constexpr int32_t INF = 0x7F800000;
constexpr int32_t QNAN = 0x7FC00000;

// Rounding modes, as fewbit.choices.Rounding is numbered by native.py.
constexpr int NEAREST_EVEN = 0, NEAREST_AWAY = 1, TOWARD_ZERO = 2, STOCHASTIC = 3;
// Scale modes (fewbit.choices.ScaleMode).
constexpr int FLOOR = 0, CEIL = 1, EVEN = 2, RCEIL = 3;
// ElementParams flags (fewbit/kernels/cast.py).
constexpr int32_t F_SIGNED_ZERO = 1, F_NO_ZERO = 2, F_UNSIGNED_NAN = 4;

// The parameter vector native.py lays out (int32; elem_max as its float32 bits).
struct Params {
  int32_t scale_mode, emax, elem_mbits, fixed_point, elem_max_bits;
  int32_t m, c, minsub, maxpos, maxneg, over_value, flags;                   // ElementParams.as_tensor order
  int32_t enc_m, enc_bias, enc_sub_scale, enc_mag_bits, enc_nan, enc_inf, enc_is_int, enc_signed;  // EncodingParams
};
constexpr int N_PARAMS = sizeof(Params) / sizeof(int32_t);

inline float as_float(int32_t b) { return __builtin_bit_cast(float, b); }
inline int32_t as_int(float f) { return __builtin_bit_cast(int32_t, f); }

// e8m0.mx_scale_codes for one block maximum (the bits of a non-negative float32, NaN patterns above INF).
inline int32_t scale_code(int32_t amax_bits, const Params& p) {
  int32_t unbiased;
  if (p.scale_mode == RCEIL) {
    float descale = as_float(amax_bits) / as_float(p.elem_max_bits);
    int32_t d = as_int(descale);
    int32_t exp_field = d >> 23, mantissa = d & 0x7FFFFF;
    int32_t ceil_log2 = exp_field > 0 ? exp_field - 127 + (mantissa != 0) : (mantissa > (1 << 22) ? -126 : -127);
    ceil_log2 = descale == 0.0f ? -127 : ceil_log2;
    unbiased = std::min(std::max(ceil_log2, -127), 127);
  } else {
    int32_t bits = amax_bits;
    if (p.scale_mode == EVEN)  // wraps for NaN patterns as the reference's int32 does; NaN is decided below
      bits = int32_t((uint32_t(bits) + (1u << (23 - p.elem_mbits - 1))) & 0x7F800000u);
    int32_t log2 = ((bits >> 23) & 0xFF) - 127;
    if (p.scale_mode == CEIL) log2 += (bits & 0x7FFFFF) > 0;
    unbiased = std::min(std::max(log2 - p.emax, -127), 128);
  }
  return amax_bits > INF ? 255 : unbiased + 127;
}

inline float e8m0_reciprocal(int32_t code) {  // 2^(127 - code)
  int32_t bits = code == 254 ? (1 << 22) : (254 - code) << 23;
  return as_float(code == 255 ? QNAN : bits);
}

inline float e8m0_value(int32_t code) {  // 2^(code - 127)
  int32_t bits = code == 0 ? (1 << 22) : code << 23;
  return as_float(code == 255 ? QNAN : bits);
}

// Eight lanes at a time, in GCC's portable vector extension (AVX2 instructions where built with -mavx2, pairs of
// SSE instructions otherwise). Comparisons give lane masks (-1 or 0); `mask ? a : b` selects per lane; casts between
// vector types of one size reinterpret the bits.
constexpr int W = 8;
typedef int32_t vi __attribute__((vector_size(32)));
typedef uint32_t vu __attribute__((vector_size(32)));
typedef float vf __attribute__((vector_size(32)));
typedef uint8_t vb __attribute__((vector_size(8)));

inline vi splat(int32_t v) { return vi{} + v; }
inline vf splatf(float v) { return vf{} + v; }
inline vi vmin(vi a, vi b) { return a < b ? a : b; }
inline vi vmax(vi a, vi b) { return a > b ? a : b; }

// cast.round_bits for a float32 source, saturating (MX elements saturate).
template <int R>
inline vi round_bits(vi bits, const Params& p, vi random) {
  const vi one = splat(1);
  vi sign = bits & SIGN;
  vi a = bits & ABS;
  vi is_inf = a == INF;
  vi exp_field = a >> 23;
  vi unclamped_shift = p.c - vmax(exp_field, one);
  vi shift = vmin(vmax(unclamped_shift, splat(23 - p.m)), splat(24));
  vi significand = (a & 0x7FFFFF) | ((exp_field > 0) & (1 << 23));
  vi increment;
  if (R == NEAREST_EVEN) increment = ((one << shift) >> 1) - 1 + ((significand >> shift) & 1);
  else if (R == NEAREST_AWAY) increment = (one << shift) >> 1;
  else if (R == TOWARD_ZERO) increment = vi{};
  else increment = random & ((one << vmin(shift, splat(23))) - 1);
  // Unsigned: a NaN pattern may wrap (as the reference's int32 does); NaN results are replaced below.
  vu ushift = (vu)shift;
  vi rounded = (vi)((((vu)a + (vu)vmax(increment, vi{})) >> ushift) << ushift);

  const int32_t minsub = p.minsub;
  vi tiny = (a < minsub) & (minsub >= (1 << 23) ? -1 : 0);
  const int32_t half_minsub = minsub - (1 << 23);
  vi up;
  if (R == NEAREST_EVEN) up = a > half_minsub;
  else if (R == NEAREST_AWAY) up = a >= half_minsub;
  else if (R == TOWARD_ZERO) up = vi{};
  else up = random < (significand >> vmin(vmax(unclamped_shift - 23, vi{}), splat(24)));
  rounded = tiny ? (up & minsub) : rounded;
  if (p.flags & F_NO_ZERO) rounded = rounded < minsub ? splat(minsub) : rounded;

  vi limit = sign != 0 ? splat(p.maxneg) : splat(p.maxpos);
  vi over = (rounded > limit) | is_inf;
  rounded = over ? limit : rounded;

  vi nan_out = a > INF;
  if (p.flags & F_UNSIGNED_NAN) nan_out |= (sign != 0) | (a == 0);
  if (!(p.flags & F_SIGNED_ZERO)) sign = rounded == 0 ? vi{} : sign;
  return nan_out ? ((bits & SIGN) | QNAN) : (sign | rounded);
}

// float -> int32 as torch's .to(torch.int32) does on x86 (truncation; NaN and out of range give INT32_MIN).
inline vi to_int32(vf v) {
  vi in_range = (v >= -2147483648.0f) & (v < 2147483648.0f);
  return in_range ? __builtin_convertvector(v, vi) : splat(INT32_MIN);
}

// cast.encode_rounded: the codes of values already on the element grid. `plain`: the finite values of a finite block
// (at most the element's max), where no value is NaN or inf and integers convert without a range check.
inline vi encode(vi bits, const Params& p, bool plain) {
  vi magnitude = bits & ABS;
  const int32_t int_mask = (1 << (p.enc_mag_bits + p.enc_signed)) - 1;
  if (p.enc_is_int) return (plain ? __builtin_convertvector((vf)bits, vi) : to_int32((vf)bits)) & int_mask;
  vi normal = (magnitude >> (23 - p.enc_m)) - ((127 - p.enc_bias) << p.enc_m);
  vi subnormal = to_int32((vf)magnitude * float(p.enc_sub_scale));  // out of range for the normal values, unused
  const int32_t min_normal_bits = p.enc_sub_scale > 0 ? (127 - p.enc_bias + 1) << 23 : 0;
  vi code = magnitude < min_normal_bits ? subnormal : normal;
  if (!plain) code = magnitude > INF ? splat(p.enc_nan) : (magnitude == INF ? splat(p.enc_inf) : code);
  vi sign = (bits < 0) & (p.enc_signed ? (1 << p.enc_mag_bits) : 0);
  return code | sign;
}

// round_bits<NEAREST_EVEN> for the usual case, in half the operations: a finite block (no NaN, no inf, not the NaN
// scale code) of a format with zero and a normal smallest subnormal. Then |s| < 2^(emax + 2) and rounding the
// value to the grid is one IEEE addition: y = |s| / quantum is exact (a power of two; y < 2^(m + 2) <= 2^23), and
// (y + 2^23) - 2^23 is y rounded to an integer, ties to even, by the FPU. Below the smallest subnormal this gives 0
// or one quantum (ties to 0, the even one), as the reference's tiny branch does. The tests hold it to the reference.
inline bool plain_format(const Params& p) {
  return (p.flags & (F_NO_ZERO | F_UNSIGNED_NAN)) == 0 && p.minsub >= (1 << 23) && p.m <= 21;
}

inline vi round_nearest_even_plain(vi bits, const Params& p) {
  const int32_t emin = p.c - 150 + p.m;  // from C = emin + bias + mbits - m (ElementParams.as_tensor)
  vi sign = bits & SIGN;
  vi a = bits & ABS;
  vi e = vmax((a >> 23) - 127, splat(emin));          // the exponent of the value's quantum, plus m
  vf up = (vf)((p.m + 127 - e) << 23);                  // 2^(m - e): 1 / quantum
  vf down = (vf)((e - p.m + 127) << 23);                // 2^(e - m): the quantum
  vf y = (vf)a * up;
  vi rounded = (vi)(((y + 8388608.0f) - 8388608.0f) * down);
  vi limit = sign != 0 ? splat(p.maxneg) : splat(p.maxpos);
  rounded = rounded > limit ? limit : rounded;
  if (!(p.flags & F_SIGNED_ZERO)) sign = rounded == 0 ? vi{} : sign;
  return sign | rounded;
}

// The low bytes of eight lanes (each 0..255) to memory. GCC's generic narrowing goes through scalar registers; with
// AVX2, two unsigned saturating packs do it (exact here: every lane is already in 0..255).
inline void store_bytes(uint8_t* to, vi lanes) {
#ifdef __AVX2__
  __m256i v = (__m256i)lanes;
  __m128i words = _mm_packus_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  _mm_storel_epi64(reinterpret_cast<__m128i*>(to), _mm_packus_epi16(words, words));
#else
  vb narrow = __builtin_convertvector(lanes, vb);
  std::memcpy(to, &narrow, sizeof narrow);
#endif
}

// Eight elements of quantize.mx_apply / mx_elements: x * 2^-scale [* 2^fixed_point] (exact), rounded onto the grid,
// then dequantized (FAKE) or encoded. A NaN x always lies in a block of the NaN scale code (its amax is NaN), whose
// reciprocal is the positive quiet NaN; the reference's product is then that NaN, whatever x's sign, and so it is
// here, independently of which NaN operand the hardware returns.
// `plain`: every lane's block is finite and plain_format holds (round_nearest_even_plain applies).
template <int R, bool FAKE>
inline void elements(const float* x, vf reciprocal, float fixed, vf scale, const int32_t* random, const Params& p,
                     bool plain, float* out, uint8_t* codes) {
  vf xv;
  std::memcpy(&xv, x, sizeof xv);
  vi sbits = (vi)(xv * reciprocal * fixed);
  vi rounded;
  if (R == NEAREST_EVEN && plain) {
    rounded = round_nearest_even_plain(sbits, p);
  } else {
    sbits = (((vi)reciprocal & ABS) > INF) ? splat(QNAN) : sbits;  // only the sign of a NaN matters to round_bits
    vi rnd{};
    if (R == STOCHASTIC) std::memcpy(&rnd, random, sizeof rnd);
    rounded = round_bits<R>(sbits, p, rnd);
  }
  if (FAKE) {
    vi value = (vi)((vf)rounded * scale);
    if (!plain) value = (rounded & ABS) > INF ? rounded : value;
    std::memcpy(out, &value, sizeof value);
  } else {
    store_bytes(codes, encode(rounded, p, plain) & 0xFF);  // & 0xFF: torch's int32 -> uint8 keeps the low byte
  }
}

// `n` (< W) elements through local buffers: the tail of a block or of a column chunk.
template <int R, bool FAKE>
inline void elements_tail(int64_t n, const float* x, vf reciprocal, float fixed, vf scale, const int32_t* random,
                          const Params& p, bool plain, float* out, uint8_t* codes) {
  float xb[W] = {}, ob[W];
  int32_t rb[W] = {};
  uint8_t cb[W];
  std::memcpy(xb, x, n * sizeof(float));
  if (R == STOCHASTIC) std::memcpy(rb, random, n * sizeof(int32_t));
  elements<R, FAKE>(xb, reciprocal, fixed, scale, rb, p, plain, ob, cb);
  if (FAKE) std::memcpy(out, ob, n * sizeof(float));
  else std::memcpy(codes, cb, n);
}

struct Pass {
  const float* x;
  int64_t outer, L, inner, block, nblocks;
  const Params* p;
  const int32_t* random;  // stochastic rounding only, in x's layout
  float* out;             // FAKE
  uint8_t* codes;         // !FAKE
  uint8_t* scales;        // !FAKE
};

inline float fixed_point_up(const Params& p) { return float(1 << p.fixed_point); }
inline float fixed_point_down(const Params& p) { return 1.0f / float(1 << p.fixed_point); }

// Blocks along the last axis: each block is `block` contiguous elements (fewer in the last, padded, block).
template <int R, bool FAKE, int BS>
void rows_pass(const Pass& s, int nthreads) {
  const Params p = *s.p;  // a local copy: stores through uint8_t* could alias *s.p and force reloads
  const int64_t block = BS > 0 ? BS : s.block;
  const int64_t groups = s.outer * s.nblocks;
  const float up = fixed_point_up(p), down = fixed_point_down(p);
  const bool plain_ok = plain_format(p);
#pragma omp parallel for num_threads(nthreads) schedule(static)
  for (int64_t g = 0; g < groups; ++g) {
    const int64_t o = g / s.nblocks, b = g - o * s.nblocks;
    const int64_t start = o * s.L + b * block;
    const int64_t n = std::min(block, s.L - b * block);
    const int32_t* xi = reinterpret_cast<const int32_t*>(s.x + start);
    int32_t amax = 0;
    if (BS > 0 && n == BS) {
#pragma omp simd reduction(max : amax)
      for (int64_t j = 0; j < BS; ++j) amax = std::max(amax, xi[j] & ABS);
    } else {
      for (int64_t j = 0; j < n; ++j) amax = std::max(amax, xi[j] & ABS);
    }
    const int32_t c = scale_code(amax, p);
    const bool plain = plain_ok & (amax < INF) & (c != 255);
    const vf reciprocal = splatf(e8m0_reciprocal(c));
    const vf scale = splatf(p.fixed_point ? e8m0_value(c) * down : e8m0_value(c));
    const float* x = s.x + start;
    const int32_t* rnd = s.random ? s.random + start : nullptr;
    float* out = FAKE ? s.out + start : nullptr;
    uint8_t* codes = FAKE ? nullptr : s.codes + start;
    if (!FAKE) s.scales[g] = uint8_t(c);
    int64_t j = 0;
    for (; j + W <= n; j += W)
      elements<R, FAKE>(x + j, reciprocal, up, scale, rnd ? rnd + j : nullptr, p, plain, out ? out + j : nullptr,
                        codes ? codes + j : nullptr);
    if (j < n)
      elements_tail<R, FAKE>(n - j, x + j, reciprocal, up, scale, rnd ? rnd + j : nullptr, p, plain,
                             out ? out + j : nullptr, codes ? codes + j : nullptr);
  }
}

// Blocks along a leading axis: a block is `block` rows of each column; the work runs across column chunks.
constexpr int64_t CHUNK = 256;

template <int R, bool FAKE>
void columns_pass(const Pass& s, int nthreads) {
  const Params p = *s.p;  // a local copy: stores through uint8_t* could alias *s.p and force reloads
  const int64_t chunks = (s.inner + CHUNK - 1) / CHUNK;
  const int64_t tasks = s.outer * s.nblocks * chunks;
  const float up = fixed_point_up(p), down = fixed_point_down(p);
  const bool plain_ok = plain_format(p);
#pragma omp parallel for num_threads(nthreads) schedule(static)
  for (int64_t t = 0; t < tasks; ++t) {
    const int64_t ob = t / chunks, k = t - ob * chunks;
    const int64_t o = ob / s.nblocks, b = ob - o * s.nblocks;
    const int64_t c0 = k * CHUNK, width = std::min(CHUNK, s.inner - c0);
    const int64_t l0 = b * s.block, l1 = std::min(s.L, l0 + s.block);
    int32_t amax[CHUNK];
    alignas(32) float reciprocal[CHUNK + W], scale[CHUNK + W];
    for (int64_t i = 0; i < width; ++i) amax[i] = 0;
    for (int64_t l = l0; l < l1; ++l) {
      const int32_t* xi = reinterpret_cast<const int32_t*>(s.x + (o * s.L + l) * s.inner + c0);
#pragma omp simd
      for (int64_t i = 0; i < width; ++i) amax[i] = std::max(amax[i], xi[i] & ABS);
    }
    uint8_t* scales = FAKE ? nullptr : s.scales + ob * s.inner + c0;
    bool plain = plain_ok;
    for (int64_t i = 0; i < width; ++i) {
      const int32_t c = scale_code(amax[i], p);
      plain &= (amax[i] < INF) & (c != 255);
      reciprocal[i] = e8m0_reciprocal(c);
      scale[i] = p.fixed_point ? e8m0_value(c) * down : e8m0_value(c);
      if (!FAKE) scales[i] = uint8_t(c);
    }
    for (int64_t l = l0; l < l1; ++l) {
      const int64_t start = (o * s.L + l) * s.inner + c0;
      const float* x = s.x + start;
      const int32_t* rnd = s.random ? s.random + start : nullptr;
      float* out = FAKE ? s.out + start : nullptr;
      uint8_t* codes = FAKE ? nullptr : s.codes + start;
      int64_t i = 0;
      for (; i < width; i += W) {
        vf r, sc;
        std::memcpy(&r, reciprocal + i, sizeof r);  // past `width` only in the tail, whose extra lanes are dropped
        std::memcpy(&sc, scale + i, sizeof sc);
        if (i + W <= width)
          elements<R, FAKE>(x + i, r, up, sc, rnd ? rnd + i : nullptr, p, plain, out ? out + i : nullptr,
                            codes ? codes + i : nullptr);
        else
          elements_tail<R, FAKE>(width - i, x + i, r, up, sc, rnd ? rnd + i : nullptr, p, plain,
                                 out ? out + i : nullptr, codes ? codes + i : nullptr);
      }
    }
  }
}

template <int R, bool FAKE>
void run(const Pass& s, int nthreads) {
  if (s.inner == 1) {
    if (s.block == 32) rows_pass<R, FAKE, 32>(s, nthreads);
    else rows_pass<R, FAKE, 0>(s, nthreads);
  } else {
    columns_pass<R, FAKE>(s, nthreads);
  }
}

template <bool FAKE>
int dispatch(int rounding, const Pass& s, int nthreads) {
  switch (rounding) {
    case NEAREST_EVEN: run<NEAREST_EVEN, FAKE>(s, nthreads); return 0;
    case NEAREST_AWAY: run<NEAREST_AWAY, FAKE>(s, nthreads); return 0;
    case TOWARD_ZERO: run<TOWARD_ZERO, FAKE>(s, nthreads); return 0;
    case STOCHASTIC: return s.random ? (run<STOCHASTIC, FAKE>(s, nthreads), 0) : 2;
    default: return 1;
  }
}

}  // namespace

extern "C" {

int fewbit_mx_n_params() { return N_PARAMS; }

// Returns 0, or 1 for an unknown rounding mode, 2 for stochastic rounding without random bits, 3 for bad sizes.
int fewbit_mx_pass(const float* x, int64_t outer, int64_t L, int64_t inner, int64_t block, const int32_t* params,
                   int rounding, int fake, const int32_t* random, float* out, uint8_t* codes, uint8_t* scales,
                   int nthreads) {
  if (outer < 0 || L < 0 || inner < 1 || block < 1 || nthreads < 1) return 3;
  Params p;
  std::memcpy(&p, params, sizeof(Params));
  Pass s{x, outer, L, inner, block, (L + block - 1) / block, &p, random, out, codes, scales};
  return fake ? dispatch<true>(rounding, s, nthreads) : dispatch<false>(rounding, s, nthreads);
}

}  // extern "C"
