// miras_emu/half.h — __half and __nv_bfloat16 for the emulator: 16-bit storage, bit-exact
// round-to-nearest-even conversions (as the CUDA intrinsics), implicit float conversions as in a
// CUDA build with -U__CUDA_NO_HALF_CONVERSIONS__ (setup.py's flags). Arithmetic operators on the
// 16-bit types are not provided: code that uses them fails to build here (add them when needed).
#pragma once
#include <cstdint>
#include <cstring>

namespace miras {
namespace emu {

inline uint32_t f32_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
inline float bits_f32(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// float -> IEEE binary16, round to nearest even (overflow -> inf, subnormals exact, NaN quiet).
inline uint16_t f32_to_f16_rn(float f) {
  const uint32_t x = f32_bits(f);
  const uint32_t sign = (x >> 16) & 0x8000u;
  const uint32_t ax = x & 0x7fffffffu;
  if (ax > 0x7f800000u) return static_cast<uint16_t>(sign | 0x7e00u | ((ax >> 13) & 0x3ffu));  // NaN
  if (ax >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);  // >= 65520: inf
  if (ax < 0x38800000u) {  // |f| < 2^-14: subnormal half (or zero); unit 2^-24
    if (ax < 0x33000000u) return static_cast<uint16_t>(sign);  // < 2^-25: rounds to 0 (ties too)
    const uint32_t e = ax >> 23;            // biased exponent, 102..112
    const uint32_t m = (ax & 0x7fffffu) | 0x800000u;
    const uint32_t shift = 126u - e;        // value = m * 2^(e-150); in units of 2^-24: m >> (126 - e)
    uint32_t q = m >> shift;
    const uint32_t rem = m & ((1u << shift) - 1u), half = 1u << (shift - 1u);
    if (rem > half || (rem == half && (q & 1u))) ++q;
    return static_cast<uint16_t>(sign | q);
  }
  // normal: rebias exponent (127 -> 15), round the 13 dropped mantissa bits
  uint32_t h = ((ax >> 13) - (112u << 10));
  const uint32_t rem = ax & 0x1fffu;
  if (rem > 0x1000u || (rem == 0x1000u && (h & 1u))) ++h;  // may carry into the exponent: correct
  return static_cast<uint16_t>(sign | h);
}

inline float f16_to_f32(uint16_t h) {
  const uint32_t sign = (uint32_t(h) & 0x8000u) << 16;
  const uint32_t e = (h >> 10) & 0x1fu, m = h & 0x3ffu;
  if (e == 0) {
    const float v = static_cast<float>(m) * 5.9604644775390625e-08f;  // m * 2^-24, exact
    return sign ? -v : v;
  }
  if (e == 31) return bits_f32(sign | 0x7f800000u | (m << 13));
  return bits_f32(sign | ((e + 112u) << 23) | (m << 13));
}

// float -> bfloat16, round to nearest even (NaN stays a quiet NaN).
inline uint16_t f32_to_bf16_rn(float f) {
  uint32_t x = f32_bits(f);
  if ((x & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((x >> 16) | 0x40u);
  x += 0x7fffu + ((x >> 16) & 1u);
  return static_cast<uint16_t>(x >> 16);
}
inline float bf16_to_f32(uint16_t b) { return bits_f32(uint32_t(b) << 16); }

}  // namespace emu
}  // namespace miras

struct __half {
  uint16_t __x;
  __half() = default;
  __half(float f) : __x(::miras::emu::f32_to_f16_rn(f)) {}
  __half(double d) : __x(::miras::emu::f32_to_f16_rn(static_cast<float>(d))) {}
  __half(int i) : __x(::miras::emu::f32_to_f16_rn(static_cast<float>(i))) {}
  operator float() const { return ::miras::emu::f16_to_f32(__x); }
};

struct __nv_bfloat16 {
  uint16_t __x;
  __nv_bfloat16() = default;
  __nv_bfloat16(float f) : __x(::miras::emu::f32_to_bf16_rn(f)) {}
  __nv_bfloat16(double d) : __x(::miras::emu::f32_to_bf16_rn(static_cast<float>(d))) {}
  __nv_bfloat16(int i) : __x(::miras::emu::f32_to_bf16_rn(static_cast<float>(i))) {}
  operator float() const { return ::miras::emu::bf16_to_f32(__x); }
};
static_assert(sizeof(__half) == 2 && sizeof(__nv_bfloat16) == 2, "16-bit storage");

inline __half __float2half(float f) { return __half(f); }
inline __half __float2half_rn(float f) { return __half(f); }
inline float __half2float(__half h) { return ::miras::emu::f16_to_f32(h.__x); }
inline __nv_bfloat16 __float2bfloat16(float f) { return __nv_bfloat16(f); }
inline __nv_bfloat16 __float2bfloat16_rn(float f) { return __nv_bfloat16(f); }
inline float __bfloat162float(__nv_bfloat16 b) { return ::miras::emu::bf16_to_f32(b.__x); }
inline __half __ushort_as_half(unsigned short u) {
  __half h;
  h.__x = u;
  return h;
}
inline unsigned short __half_as_ushort(__half h) { return h.__x; }
inline __nv_bfloat16 __ushort_as_bfloat16(unsigned short u) {
  __nv_bfloat16 b;
  b.__x = u;
  return b;
}
inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 b) { return b.__x; }
