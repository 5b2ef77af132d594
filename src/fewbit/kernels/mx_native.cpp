// One-pass MX quantization on the CPU: block amax, E8M0 scale code, element rounding and (fake) dequantization or
// encoding, reading each element once and writing once. The general path is a transcription of the torch reference
// in fewbit/kernels/{e8m0,cast,quantize}.py, operation for operation, in 32-bit integer and IEEE float32
// arithmetic; the fast path (finite blocks under round-to-nearest-even, see plain_format) reaches the same results
// in fewer operations, argued where it is defined. Both equal the reference bit for bit (the tests compare them at
// atol=0 over every MX format, scale mode and rounding mode). Built and loaded by fewbit/kernels/native.py; no torch
// headers, plain C ABI.
//
// The tensor is seen as (outer, L, inner) float32, contiguous, with blocks of `block` elements along L (the last
// block zero-padded, which does not change an amax). inner == 1: each block is contiguous (blocks along the last
// axis); inner > 1: a block is `block` rows of a column, and the loops run across the columns, so blocking along a
// leading axis (the backward GEMMs' operands) needs no transposed copy. Outputs are in the same layout; the scale
// codes are (outer, ceil(L / block), inner).
//
// Compiled without -ffast-math and with -ffp-contract=off: every float operation is a single IEEE operation
// (multiplications by powers of two, one division in rceil, the fast path's additions), rounded to nearest even,
// the FPU's default mode, which torch keeps.

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <omp.h>
#ifdef __AVX2__
#include <immintrin.h>
#endif

namespace {

#define ALWAYS_INLINE inline __attribute__((always_inline))

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
ALWAYS_INLINE int32_t scale_code(int32_t amax_bits, const Params& p) {
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

ALWAYS_INLINE float e8m0_reciprocal(int32_t code) {  // 2^(127 - code)
  int32_t bits = code == 254 ? (1 << 22) : (254 - code) << 23;
  return as_float(code == 255 ? QNAN : bits);
}

ALWAYS_INLINE float e8m0_value(int32_t code) {  // 2^(code - 127)
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
inline vf splatf(float v) { return vf{v, v, v, v, v, v, v, v}; }
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

// The low bytes of eight lanes (each 0..255) to memory. GCC's generic narrowing goes through scalar registers; with
// AVX2, two unsigned saturating packs do it (exact here: every lane is already in 0..255).
ALWAYS_INLINE void store_bytes(uint8_t* to, vi lanes) {
#ifdef __AVX2__
  __m256i v = (__m256i)lanes;
  __m128i words = _mm_packus_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  _mm_storel_epi64(reinterpret_cast<__m128i*>(to), _mm_packus_epi16(words, words));
#else
  vb narrow = __builtin_convertvector(lanes, vb);
  std::memcpy(to, &narrow, sizeof narrow);
#endif
}

// The low bytes of 32 lanes (each 0..255) to memory: three packs and one lane permutation with AVX2.
ALWAYS_INLINE void store_bytes32(uint8_t* to, vi a, vi b, vi c, vi d) {
#ifdef __AVX2__
  __m256i ab = _mm256_packus_epi32((__m256i)a, (__m256i)b);  // per 128-bit lane: a0-3 b0-3 | a4-7 b4-7
  __m256i cd = _mm256_packus_epi32((__m256i)c, (__m256i)d);
  __m256i abcd = _mm256_packus_epi16(ab, cd);                // 4-byte groups: a0-3 b0-3 c0-3 d0-3 a4-7 b4-7 c4-7 d4-7
  abcd = _mm256_permutevar8x32_epi32(abcd, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(to), abcd);
#else
  store_bytes(to, a);
  store_bytes(to + 8, b);
  store_bytes(to + 16, c);
  store_bytes(to + 24, d);
#endif
}

ALWAYS_INLINE vi load(const float* x) {
  vi v;
  std::memcpy(&v, x, sizeof v);
  return v;
}

// The largest of eight lanes.
ALWAYS_INLINE int32_t hmax(vi v) {
#ifdef __AVX2__
  __m128i m = _mm_max_epi32(_mm256_castsi256_si128((__m256i)v), _mm256_extracti128_si256((__m256i)v, 1));
  m = _mm_max_epi32(m, _mm_shuffle_epi32(m, 0x4E));
  m = _mm_max_epi32(m, _mm_shuffle_epi32(m, 0xB1));
  return _mm_cvtsi128_si32(m);
#else
  int32_t r = v[0];
  for (int i = 1; i < W; ++i) r = std::max(r, v[i]);
  return r;
#endif
}

// The largest |x| pattern of n elements (NaN patterns above INF).
ALWAYS_INLINE int32_t block_amax(const float* x, int64_t n) {
  vi m{};
  int64_t j = 0;
  for (; j + W <= n; j += W) m = vmax(m, load(x + j) & ABS);
  int32_t r = hmax(m);
  for (; j < n; ++j) r = std::max(r, as_int(x[j]) & ABS);
  return r;
}

// Eight block maxima from eight vectors of lane maxima: lane k of the result is the largest lane of v[k].
ALWAYS_INLINE vi hmax8(const vi* v) {
#ifdef __AVX2__
  auto pairs = [](vi a, vi b) {
    __m256i x = (__m256i)a, y = (__m256i)b;
    return (vi)_mm256_max_epi32(_mm256_unpacklo_epi32(x, y), _mm256_unpackhi_epi32(x, y));
  };
  auto quads = [](vi a, vi b) {
    __m256i x = (__m256i)a, y = (__m256i)b;
    return (vi)_mm256_max_epi32(_mm256_unpacklo_epi64(x, y), _mm256_unpackhi_epi64(x, y));
  };
  // Per 128-bit half: lane k of u0 is the largest of v[k]'s four lanes in that half (k < 4); u1 likewise for v[4..7].
  __m256i u0 = (__m256i)quads(pairs(v[0], v[1]), pairs(v[2], v[3]));
  __m256i u1 = (__m256i)quads(pairs(v[4], v[5]), pairs(v[6], v[7]));
  return (vi)_mm256_max_epi32(_mm256_permute2x128_si256(u0, u1, 0x20), _mm256_permute2x128_si256(u0, u1, 0x31));
#else
  vi r;
  for (int k = 0; k < W; ++k) r[k] = hmax(v[k]);
  return r;
#endif
}

// scale_code, e8m0_reciprocal and e8m0_value on eight lanes (eight blocks), operation for operation.
ALWAYS_INLINE vi scale_codes(vi amax, const Params& p) {
  vi unbiased;
  if (p.scale_mode == RCEIL) {
    vf descale = (vf)amax / splatf(as_float(p.elem_max_bits));
    vi d = (vi)descale;
    vi exp_field = d >> 23, mantissa = d & 0x7FFFFF;
    vi normal = exp_field - 127 - (mantissa != 0);  // a true comparison is -1
    vi ceil_log2 = exp_field > 0 ? normal : (mantissa > (1 << 22) ? splat(-126) : splat(-127));
    ceil_log2 = descale == splatf(0.0f) ? splat(-127) : ceil_log2;
    unbiased = vmin(vmax(ceil_log2, splat(-127)), splat(127));
  } else {
    vi bits = amax;
    if (p.scale_mode == EVEN) bits = (vi)(((vu)bits + (1u << (23 - p.elem_mbits - 1))) & 0x7F800000u);
    vi log2 = ((bits >> 23) & 0xFF) - 127;
    if (p.scale_mode == CEIL) log2 -= (bits & 0x7FFFFF) > 0;
    unbiased = vmin(vmax(log2 - p.emax, splat(-127)), splat(128));
  }
  return amax > INF ? splat(255) : unbiased + 127;
}

ALWAYS_INLINE vf e8m0_reciprocals(vi code) {
  vi bits = code == 254 ? splat(1 << 22) : (vi)((vu)(254 - code) << 23);
  return (vf)(code == 255 ? splat(QNAN) : bits);
}

ALWAYS_INLINE vf e8m0_values(vi code) {
  vi bits = code == 0 ? splat(1 << 22) : code << 23;
  return (vf)(code == 255 ? splat(QNAN) : bits);
}

// Lane k of v in every lane.
ALWAYS_INLINE vf lane(vf v, int k) {
#ifdef __AVX2__
  return (vf)_mm256_permutevar8x32_ps((__m256)v, _mm256_set1_epi32(k));
#else
  return splatf(v[k]);
#endif
}

// Whether any lane is set (a comparison mask).
ALWAYS_INLINE bool any(vi mask) {
#ifdef __AVX2__
  return _mm256_movemask_ps((__m256)mask) != 0;
#else
  for (int k = 0; k < W; ++k)
    if (mask[k]) return true;
  return false;
#endif
}

// Eight elements of quantize.mx_apply / mx_elements, the general path: x * 2^-scale [* 2^fixed_point] (exact),
// rounded onto the grid by round_bits, then dequantized (FAKE) or encoded. A NaN x always lies in a block of the NaN
// scale code (its amax is NaN), whose reciprocal is the positive quiet NaN; the reference's product is then that
// NaN, whatever x's sign, and so it is here, independently of which NaN operand the hardware returns.
template <int R, bool FAKE>
inline void elements(const float* x, vf reciprocal, float fixed, vf scale, const int32_t* random, const Params& p,
                     float* out, uint8_t* codes) {
  vi sbits = (vi)((vf)load(x) * reciprocal * fixed);
  sbits = (((vi)reciprocal & ABS) > INF) ? splat(QNAN) : sbits;  // only the sign of a NaN matters to round_bits
  vi rnd{};
  if (R == STOCHASTIC) std::memcpy(&rnd, random, sizeof rnd);
  vi rounded = round_bits<R>(sbits, p, rnd);
  if (FAKE) {
    vi value = (vi)((vf)rounded * scale);
    value = (rounded & ABS) > INF ? rounded : value;
    std::memcpy(out, &value, sizeof value);
  } else {
    store_bytes(codes, encode(rounded, p, false) & 0xFF);  // & 0xFF: torch's int32 -> uint8 keeps the low byte
  }
}

// `n` (< W) elements through local buffers: the tail of a block or of a column chunk.
template <int R, bool FAKE>
inline void elements_tail(int64_t n, const float* x, vf reciprocal, float fixed, vf scale, const int32_t* random,
                          const Params& p, float* out, uint8_t* codes) {
  float xb[W] = {}, ob[W];
  int32_t rb[W] = {};
  uint8_t cb[W];
  std::memcpy(xb, x, n * sizeof(float));
  if (R == STOCHASTIC) std::memcpy(rb, random, n * sizeof(int32_t));
  elements<R, FAKE>(xb, reciprocal, fixed, scale, rb, p, ob, cb);
  if (FAKE) std::memcpy(out, ob, n * sizeof(float));
  else std::memcpy(codes, cb, n);
}

// The fast path: round-to-nearest-even of a finite block (no NaN, no inf, not the NaN scale code) of a "plain"
// format: it has zero, its smallest subnormal 2^(emin - m) is a normal float32, it is symmetric, 1 <= m <= 21. A
// finite block's scaled values have |s| < 2^(emax + 2), so nothing overflows float32, and cast.round_bits reduces to
// rounding |s| to a multiple of its quantum q = 2^(max(e, emin) - m) (e: the exponent of |s|), ties to even, which
// the FPU does in one addition: with M = q * 2^23, |s| + M lies in M's binade (|s| < 2^(e + 1) <= M / 2^(22 - m)),
// whose ulp is q, so the sum is |s| rounded to a multiple of q, and subtracting M again is exact. M's pattern is
// max(exponent field of |s|, that of 2^emin) + (23 - m) << 23: three integer operations. Below the smallest
// subnormal this gives 0 or the smallest subnormal, ties to 0, as the reference's tiny branch does; at the top of a
// binade it carries into the next one, as the reference's carry does. Then saturation at the largest magnitude, and
// a zero loses its sign where the format has no -0.
inline bool plain_format(const Params& p) {
  const int32_t emin = p.c - 150 + p.m;  // from C = emin + bias + mbits - m (ElementParams.as_tensor)
  return (p.flags & (F_NO_ZERO | F_UNSIGNED_NAN)) == 0 && p.m >= 1 && p.m <= 21 && p.minsub >= (1 << 23) &&
         p.minsub == (emin - p.m + 127) << 23 && p.maxpos == p.maxneg && p.maxpos < INF;
}

struct Fast {
  vi threshold, offset, maxpos;
  vf up;
  // Encoding (cast.encode_rounded of finite values on the grid).
  vi int_mask, rebias, min_normal, sign_code;
  vf sub_scale;
  int enc_shift;
  bool enc_is_int;
  // Codes straight from the rounding's sum (fast_codes): a float format with subnormals whose grid is the one
  // rounded onto (same mantissa bits, emin = 1 - bias).
  bool direct;
  vi max_code;
  int code_shift;

  explicit Fast(const Params& p) {
    const int32_t emin = p.c - 150 + p.m;
    threshold = splat((emin + 127) << 23);
    offset = splat((23 - p.m) << 23);
    maxpos = splat(p.maxpos);
    up = splatf(float(1 << p.fixed_point));
    int_mask = splat((1 << (p.enc_mag_bits + p.enc_signed)) - 1);
    enc_shift = 23 - p.enc_m;
    rebias = splat((127 - p.enc_bias) << p.enc_m);
    min_normal = splat(p.enc_sub_scale > 0 ? (127 - p.enc_bias + 1) << 23 : 0);
    sign_code = splat(p.enc_signed ? (1 << p.enc_mag_bits) : 0);
    sub_scale = splatf(float(p.enc_sub_scale));
    enc_is_int = p.enc_is_int != 0;
    direct = !enc_is_int && p.enc_m == p.m && p.enc_sub_scale > 0 && emin == 1 - p.enc_bias;
    max_code = splat((p.maxpos >> (23 - p.enc_m)) - ((127 - p.enc_bias) << p.enc_m));
    code_shift = 23 - p.m;
  }
};

// float -> int32 by truncation, for values known to be in range.
ALWAYS_INLINE vi truncate(vf v) {
#ifdef __AVX2__
  return (vi)_mm256_cvttps_epi32((__m256)v);
#else
  return to_int32(v);
#endif
}

// Eight elements scaled and rounded onto the grid (the float32 patterns of the grid values, sign included).
template <bool FIXED, bool SIGNED_ZERO>
ALWAYS_INLINE vi fast_round(const float* x, vf reciprocal, const Fast& f) {
  vf s = (vf)load(x) * reciprocal;
  if (FIXED) s = s * f.up;
  vi bits = (vi)s;
  vi a = bits & ABS;
  vi sign = bits ^ a;
  vf magic = (vf)(vmax(a & INF, f.threshold) + f.offset);
  vi r = vmin((vi)(((vf)a + magic) - magic), f.maxpos);
  if (!SIGNED_ZERO) sign = r == 0 ? vi{} : sign;
  return sign | r;
}

// cast.encode_rounded of finite grid values, & 0xFF (torch's int32 -> uint8 keeps the low byte).
ALWAYS_INLINE vi fast_encode(vi bits, const Fast& f) {
  if (f.enc_is_int) return truncate((vf)bits) & f.int_mask & 0xFF;
  vi magnitude = bits & ABS;
  vi normal = (magnitude >> f.enc_shift) - f.rebias;
  vi subnormal = truncate((vf)magnitude * f.sub_scale);  // out of range for the normal values, unused
  vi code = magnitude < f.min_normal ? subnormal : normal;
  return (code | ((bits < 0) & f.sign_code)) & 0xFF;
}

// The codes of eight elements (& 0xFF), for Fast::direct formats, without forming the rounded values: with M and the
// sum |s| + M of fast_round, the sum's pattern minus M's is k = (rounded |s|) / q, the multiple of the quantum
// (both lie in one binade of ulp q). Below 2^emin, k is the code (a count of smallest subnormals, 2^m for 2^emin
// itself); at or above, with q = 2^(e - m), the code is ((e + bias) << m) + k - 2^m = k + ((e - emin) << m), and
// (e - emin) << m is (M's pattern - that of 2^emin's M) >> (23 - m). A carry to k = 2^(m + 1) gives the next
// binade's first code, as encoding the carried value does. Codes grow with the value, so saturating at the largest
// value's code is saturating the value. The sign code is the scaled value's sign (formats without -0 drop it at 0).
template <bool FIXED, bool SZ>
ALWAYS_INLINE vi fast_codes(const float* x, vf reciprocal, const Fast& f) {
  vf s = (vf)load(x) * reciprocal;
  if (FIXED) s = s * f.up;
  vi bits = (vi)s;
  vi a = bits & ABS;
  vi m = vmax(a & INF, f.threshold) + f.offset;
  vi k = (vi)((vf)a + (vf)m) - m;
  vi code = vmin(k + ((m - (f.threshold + f.offset)) >> f.code_shift), f.max_code);
  vi sign = (bits < 0) & f.sign_code;
  if (!SZ) sign = code == 0 ? vi{} : sign;
  return code | sign;
}

template <bool FAKE, bool FIXED, bool SZ>
ALWAYS_INLINE void fast_elements(const float* x, vf reciprocal, vf scale, const Fast& f, float* out, uint8_t* codes) {
  if (FAKE) {
    vf value = (vf)fast_round<FIXED, SZ>(x, reciprocal, f) * scale;
    std::memcpy(out, &value, sizeof value);
  } else {
    store_bytes(codes, f.direct ? fast_codes<FIXED, SZ>(x, reciprocal, f)
                                : fast_encode(fast_round<FIXED, SZ>(x, reciprocal, f), f));
  }
}

template <bool FAKE, bool FIXED, bool SZ>
inline void fast_tail(int64_t n, const float* x, vf reciprocal, vf scale, const Fast& f, float* out,
                      uint8_t* codes) {
  float xb[W] = {}, ob[W];
  uint8_t cb[W];
  std::memcpy(xb, x, n * sizeof(float));
  fast_elements<FAKE, FIXED, SZ>(xb, reciprocal, scale, f, ob, cb);
  if (FAKE) std::memcpy(out, ob, n * sizeof(float));
  else std::memcpy(codes, cb, n);
}

// `n` contiguous elements of one finite block (or of finite blocks: per-lane reciprocals and scales are loaded by
// the caller in the column pass, which calls the 8-lane form).
template <bool FAKE, bool FIXED, bool SZ>
ALWAYS_INLINE void fast_run(int64_t n, const float* x, vf reciprocal, vf scale, const Fast& f, float* out, uint8_t* codes) {
  int64_t j = 0;
  if (FAKE) {
    for (; j + W <= n; j += W) fast_elements<FAKE, FIXED, SZ>(x + j, reciprocal, scale, f, out + j, nullptr);
  } else if (f.direct) {
    for (; j + 4 * W <= n; j += 4 * W)
      store_bytes32(codes + j, fast_codes<FIXED, SZ>(x + j, reciprocal, f), fast_codes<FIXED, SZ>(x + j + W, reciprocal, f),
                    fast_codes<FIXED, SZ>(x + j + 2 * W, reciprocal, f),
                    fast_codes<FIXED, SZ>(x + j + 3 * W, reciprocal, f));
    for (; j + W <= n; j += W) store_bytes(codes + j, fast_codes<FIXED, SZ>(x + j, reciprocal, f));
  } else {
    for (; j + 4 * W <= n; j += 4 * W)
      store_bytes32(codes + j, fast_encode(fast_round<FIXED, SZ>(x + j, reciprocal, f), f),
                    fast_encode(fast_round<FIXED, SZ>(x + j + W, reciprocal, f), f),
                    fast_encode(fast_round<FIXED, SZ>(x + j + 2 * W, reciprocal, f), f),
                    fast_encode(fast_round<FIXED, SZ>(x + j + 3 * W, reciprocal, f), f));
    for (; j + W <= n; j += W) fast_elements<FAKE, FIXED, SZ>(x + j, reciprocal, scale, f, nullptr, codes + j);
  }
  if (j < n)
    fast_tail<FAKE, FIXED, SZ>(n - j, x + j, reciprocal, scale, f, FAKE ? out + j : nullptr,
                               FAKE ? nullptr : codes + j);
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
ALWAYS_INLINE float block_scale(int32_t c, const Params& p) {
  return p.fixed_point ? e8m0_value(c) * fixed_point_down(p) : e8m0_value(c);
}

// f(begin, end) over [0, n) in one contiguous range per thread: each thread streams through memory in order, and
// the locals of f stay in registers (OpenMP's shared captures of an outer function's locals would not).
template <class F>
void parallel_ranges(int64_t n, int nthreads, const F& f) {
  if (nthreads <= 1 || n < 2) {
    f(int64_t(0), n);
    return;
  }
#pragma omp parallel num_threads(nthreads)
  {
    const int64_t t = omp_get_thread_num(), k = omp_get_num_threads();
    const int64_t begin = n * t / k, end = n * (t + 1) / k;
    if (begin < end) f(begin, end);
  }
}

// The fast path's variant: -1 none (general rounding only), else FIXED * 2 + SIGNED_ZERO.
constexpr int NO_FAST = -1;

// Blocks along the last axis: each block is `block` contiguous elements (fewer in the last, padded, block).
// Groups [g0, g1) in order.
template <int R, bool FAKE, int BS, int F>
void rows_range(const Pass& s, int64_t g0, int64_t g1) {
  constexpr bool FIXED = F >= 2, SZ = F == 1 || F == 3;
  // Local copies: stores through float* and uint8_t* could alias *s.p and s, and force reloads.
  const Params p = *s.p;
  const Fast f(p);
  const int64_t block = BS > 0 ? BS : s.block, L = s.L, nblocks = s.nblocks;
  const float* const X = s.x;
  float* const OUT = s.out;
  uint8_t* const CODES = s.codes;
  uint8_t* const SCALES = s.scales;
  const float up = fixed_point_up(p);
  const vf down = splatf(fixed_point_down(p));
  const int64_t full = L / block;  // full blocks per row
  int64_t o = g0 / nblocks, b = g0 - o * nblocks;
  for (int64_t g = g0; g < g1; ++g) {
    // Eight full, finite blocks of 32 at a time: their maxima, codes and scales on eight lanes.
    if (F != NO_FAST && BS == 32) {
      while (g + 8 <= g1 && b + 8 <= full) {
        const int64_t start = o * L + b * 32;
        const float* x = X + start;
        vi m[8];
        for (int k = 0; k < 8; ++k)
          m[k] = vmax(vmax(load(x + 32 * k) & ABS, load(x + 32 * k + 8) & ABS),
                      vmax(load(x + 32 * k + 16) & ABS, load(x + 32 * k + 24) & ABS));
        const vi amax = hmax8(m);
        const vi c = scale_codes(amax, p);
        if (any((amax >= INF) | (c == 255))) break;  // a block with inf or NaN among them: one at a time below
        const vf reciprocals = e8m0_reciprocals(c);
        const vf scales = p.fixed_point ? e8m0_values(c) * down : e8m0_values(c);
        if (!FAKE) store_bytes(SCALES + g, c);
        for (int k = 0; k < 8; ++k)
          fast_run<FAKE, FIXED, SZ>(32, x + 32 * k, lane(reciprocals, k), lane(scales, k), f,
                                    FAKE ? OUT + start + 32 * k : nullptr, FAKE ? nullptr : CODES + start + 32 * k);
        g += 8;
        b += 8;
        if (b == nblocks) b = 0, ++o;
      }
      if (g >= g1) break;
    }
    const int64_t start = o * L + b * block;
    const int64_t n = std::min(block, L - b * block);
    if (++b == nblocks) b = 0, ++o;
    const float* x = X + start;
    const int32_t amax = block_amax(x, BS > 0 && n == BS ? BS : n);
    const int32_t c = scale_code(amax, p);
    if (!FAKE) SCALES[g] = uint8_t(c);
    const vf reciprocal = splatf(e8m0_reciprocal(c));
    const vf scale = splatf(block_scale(c, p));
    float* out = FAKE ? OUT + start : nullptr;
    uint8_t* codes = FAKE ? nullptr : CODES + start;
    if (F != NO_FAST && amax < INF && c != 255) {
      if (BS > 0 && n == BS) fast_run<FAKE, FIXED, SZ>(BS, x, reciprocal, scale, f, out, codes);
      else fast_run<FAKE, FIXED, SZ>(n, x, reciprocal, scale, f, out, codes);
      continue;
    }
    const int32_t* rnd = s.random ? s.random + start : nullptr;
    int64_t j = 0;
    for (; j + W <= n; j += W)
      elements<R, FAKE>(x + j, reciprocal, up, scale, rnd ? rnd + j : nullptr, p, out ? out + j : nullptr,
                        codes ? codes + j : nullptr);
    if (j < n)
      elements_tail<R, FAKE>(n - j, x + j, reciprocal, up, scale, rnd ? rnd + j : nullptr, p,
                             out ? out + j : nullptr, codes ? codes + j : nullptr);
  }
}

// Blocks along a leading axis: a block is `block` rows of each column; the work runs across column chunks.
constexpr int64_t CHUNK = 256;

template <int R, bool FAKE, int F>
void columns_range(const Pass& s, int64_t t0, int64_t t1) {
  constexpr bool FIXED = F >= 2, SZ = F == 1 || F == 3;
  const Params p = *s.p;
  const Fast f(p);
  const int64_t chunks = (s.inner + CHUNK - 1) / CHUNK;
  const float up = fixed_point_up(p);
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t ob = t / chunks, k = t - ob * chunks;
    const int64_t o = ob / s.nblocks, b = ob - o * s.nblocks;
    const int64_t c0 = k * CHUNK, width = std::min(CHUNK, s.inner - c0);
    const int64_t l0 = b * s.block, l1 = std::min(s.L, l0 + s.block);
    alignas(32) int32_t amax[CHUNK + W];
    alignas(32) float reciprocal[CHUNK + W], scale[CHUNK + W];
    const float* X = s.x + o * s.L * s.inner + c0;
    int64_t i = 0;
    for (; i + 8 * W <= width; i += 8 * W) {  // 64 columns' maxima in registers over the block's rows
      vi m[8] = {};
      for (int64_t l = l0; l < l1; ++l) {
        const float* xr = X + l * s.inner + i;
        for (int q = 0; q < 8; ++q) m[q] = vmax(m[q], load(xr + q * W) & ABS);
      }
      std::memcpy(amax + i, m, sizeof m);
    }
    for (int64_t j = i; j < width + W; ++j) amax[j] = 0;
    for (int64_t l = l0; l < l1; ++l) {
      const int32_t* xi = reinterpret_cast<const int32_t*>(X + l * s.inner);
#pragma omp simd
      for (int64_t j = i; j < width; ++j) amax[j] = std::max(amax[j], xi[j] & ABS);
    }
    uint8_t* scales = FAKE ? nullptr : s.scales + ob * s.inner + c0;
    vi nonfinite{};
    const vf down = splatf(fixed_point_down(p));
    for (i = 0; i < width; i += W) {  // eight columns' codes at a time (past `width`: amax 0, dropped)
      vi a;
      std::memcpy(&a, amax + i, sizeof a);
      const vi c = scale_codes(a, p);
      nonfinite |= (a >= INF) | (c == 255);
      const vf r = e8m0_reciprocals(c), v = p.fixed_point ? e8m0_values(c) * down : e8m0_values(c);
      std::memcpy(reciprocal + i, &r, sizeof r);
      std::memcpy(scale + i, &v, sizeof v);
      if (!FAKE) {
        if (i + W <= width) {
          store_bytes(scales + i, c);
        } else {
          uint8_t cb[W];
          store_bytes(cb, c);
          std::memcpy(scales + i, cb, width - i);
        }
      }
    }
    const bool finite = !any(nonfinite);
    for (int64_t i = width; i < width + W; ++i) reciprocal[i] = scale[i] = 1.0f;  // the dropped tail lanes
    for (int64_t l = l0; l < l1; ++l) {
      const int64_t start = (o * s.L + l) * s.inner + c0;
      const float* x = s.x + start;
      const int32_t* rnd = s.random ? s.random + start : nullptr;
      float* out = FAKE ? s.out + start : nullptr;
      uint8_t* codes = FAKE ? nullptr : s.codes + start;
      for (int64_t i = 0; i < width; i += W) {
        vf r, sc;
        std::memcpy(&r, reciprocal + i, sizeof r);  // past `width` only in the tail, whose extra lanes are dropped
        std::memcpy(&sc, scale + i, sizeof sc);
        const bool full = i + W <= width;
        if (F != NO_FAST && finite) {
          if (full) fast_elements<FAKE, FIXED, SZ>(x + i, r, sc, f, out ? out + i : nullptr, codes ? codes + i : nullptr);
          else fast_tail<FAKE, FIXED, SZ>(width - i, x + i, r, sc, f, out ? out + i : nullptr,
                                          codes ? codes + i : nullptr);
        } else if (full) {
          elements<R, FAKE>(x + i, r, up, sc, rnd ? rnd + i : nullptr, p, out ? out + i : nullptr,
                            codes ? codes + i : nullptr);
        } else {
          elements_tail<R, FAKE>(width - i, x + i, r, up, sc, rnd ? rnd + i : nullptr, p, out ? out + i : nullptr,
                                 codes ? codes + i : nullptr);
        }
      }
    }
  }
}

template <int R, bool FAKE, int F>
void run_variant(const Pass& s, int nthreads) {
  if (s.inner == 1) {
    if (s.block == 32)
      parallel_ranges(s.outer * s.nblocks, nthreads,
                      [&](int64_t a, int64_t b) { rows_range<R, FAKE, 32, F>(s, a, b); });
    else
      parallel_ranges(s.outer * s.nblocks, nthreads, [&](int64_t a, int64_t b) { rows_range<R, FAKE, 0, F>(s, a, b); });
  } else {
    const int64_t tasks = s.outer * s.nblocks * ((s.inner + CHUNK - 1) / CHUNK);
    parallel_ranges(tasks, nthreads, [&](int64_t a, int64_t b) { columns_range<R, FAKE, F>(s, a, b); });
  }
}

template <int R, bool FAKE>
void run(const Pass& s, int nthreads) {
  const Params& p = *s.p;
  if (R != NEAREST_EVEN || !plain_format(p)) return run_variant<R, FAKE, NO_FAST>(s, nthreads);
  const bool fixed = p.fixed_point != 0, signed_zero = (p.flags & F_SIGNED_ZERO) != 0;
  switch (int(fixed) * 2 + int(signed_zero)) {
    case 0: return run_variant<R, FAKE, 0>(s, nthreads);
    case 1: return run_variant<R, FAKE, 1>(s, nthreads);
    case 2: return run_variant<R, FAKE, 2>(s, nthreads);
    default: return run_variant<R, FAKE, 3>(s, nthreads);
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

// 1 when the n bytes at a and b are equal, else 0: memcmp over one contiguous range per thread, in 1 MiB pieces, each
// thread stopping once any has found a difference. (The eval weight cache's exact staleness check.)
int fewbit_same_bytes(const uint8_t* a, const uint8_t* b, int64_t n, int nthreads) {
  constexpr int64_t PIECE = 1 << 20;
  if (n <= 0) return 1;
  std::atomic<bool> differ{false};
  parallel_ranges((n + PIECE - 1) / PIECE, std::max(nthreads, 1), [&](int64_t p0, int64_t p1) {
    for (int64_t i = p0; i < p1 && !differ.load(std::memory_order_relaxed); ++i) {
      const int64_t start = i * PIECE, len = std::min(PIECE, n - start);
      if (std::memcmp(a + start, b + start, len) != 0) differ.store(true, std::memory_order_relaxed);
    }
  });
  return differ.load() ? 0 : 1;
}

}  // extern "C"
