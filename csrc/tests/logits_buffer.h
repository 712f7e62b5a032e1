/* Reading and writing one element of a logits buffer of any napo_logits_dtype, as a double: the C tests
 * (test_logps.c) and the emulated-CUDA driver (test_cuda_emu.cpp) build their inputs and read their outputs
 * with these. */
#ifndef NAPO_TESTS_LOGITS_BUFFER_H
#define NAPO_TESTS_LOGITS_BUFFER_H

#include <math.h>
#include <stddef.h>
#include <stdint.h>

#include "napo.h"
#include "napo_dtype.h"

static inline size_t item_size(napo_logits_dtype dtype) {
  return dtype == NAPO_LOGITS_F64 ? 8 : dtype == NAPO_LOGITS_F32 ? 4 : 2;
}

static inline void put(void *base, napo_logits_dtype dtype, int64_t i, double value) {
  switch (dtype) {
  case NAPO_LOGITS_F32:
    ((float *)base)[i] = (float)value;
    break;
  case NAPO_LOGITS_F64:
    ((double *)base)[i] = value;
    break;
  case NAPO_LOGITS_BF16:
    ((uint16_t *)base)[i] = napo_float_to_bf16((float)value);
    break;
  case NAPO_LOGITS_F16:
    ((uint16_t *)base)[i] = napo_float_to_f16((float)value);
    break;
  }
}

static inline double get(const void *base, napo_logits_dtype dtype, int64_t i) {
  switch (dtype) {
  case NAPO_LOGITS_F32:
    return ((const float *)base)[i];
  case NAPO_LOGITS_F64:
    return ((const double *)base)[i];
  case NAPO_LOGITS_BF16:
    return napo_bf16_to_float(((const uint16_t *)base)[i]);
  case NAPO_LOGITS_F16:
    return napo_f16_to_float(((const uint16_t *)base)[i]);
  }
  return NAN;
}

#endif /* NAPO_TESTS_LOGITS_BUFFER_H */
