/*
 * Conversions between float32 and the 16-bit float formats, bit-exact and
 * branch-free where they run in hot loops (so the compiler can vectorise the
 * loads). Shared by the CPU kernels and the C tests.
 */
#ifndef NAPO_DTYPE_H
#define NAPO_DTYPE_H

#include <stdint.h>
#include <string.h>

static inline float napo_bits_to_float(uint32_t bits) {
  float f;
  memcpy(&f, &bits, sizeof f);
  return f;
}

static inline uint32_t napo_float_to_bits(float f) {
  uint32_t bits;
  memcpy(&bits, &f, sizeof bits);
  return bits;
}

static inline float napo_bf16_to_float(uint16_t h) { return napo_bits_to_float((uint32_t)h << 16); }

/* Round to nearest even; NaN stays a (quiet) NaN. */
static inline uint16_t napo_float_to_bf16(float f) {
  const uint32_t bits = napo_float_to_bits(f);
  if ((bits & 0x7fffffffu) > 0x7f800000u) {
    return (uint16_t)((bits >> 16) | 0x0040u);
  }
  return (uint16_t)((bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16);
}

/* IEEE half to float: exponent and mantissa moved into place, rescaled by 2^112
 * (which also turns half subnormals into the right float normals); inf/NaN kept. */
static inline float napo_f16_to_float(uint16_t h) {
  const uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
  const uint32_t magnitude = (uint32_t)(h & 0x7fffu);
  const float scaled = napo_bits_to_float(magnitude << 13) * 0x1p112f;
  const uint32_t special = (magnitude << 13) | 0x7f800000u; /* inf or NaN payload */
  const uint32_t body = magnitude >= 0x7c00u ? special : napo_float_to_bits(scaled);
  return napo_bits_to_float(sign | body);
}

/* Float to IEEE half, round to nearest even, with overflow to inf and gradual underflow. */
static inline uint16_t napo_float_to_f16(float f) {
  const uint32_t bits = napo_float_to_bits(f);
  const uint16_t sign = (uint16_t)((bits >> 16) & 0x8000u);
  const uint32_t magnitude = bits & 0x7fffffffu;
  if (magnitude > 0x7f800000u) {
    return (uint16_t)(sign | 0x7e00u); /* NaN */
  }
  if (magnitude >= 0x477ff000u) {
    return (uint16_t)(sign | 0x7c00u); /* rounds to >= 65520: inf */
  }
  if (magnitude < 0x38800000u) {
    /* Below the smallest half normal (2^-14): a subnormal half, 2^-24 per step.
     * Adding 0.5 in float pushes the value into a fixed binade where float's own
     * round-to-nearest-even does the rounding. */
    const float shifted = napo_bits_to_float(magnitude) + 0.5f;
    return (uint16_t)(sign | (uint16_t)(napo_float_to_bits(shifted) - 0x3f000000u));
  }
  const uint32_t rounded = magnitude + 0xfffu + ((magnitude >> 13) & 1u) - 0x38000000u;
  return (uint16_t)(sign | (uint16_t)(rounded >> 13));
}

#endif /* NAPO_DTYPE_H */
