/*
 * The vector inner loops of the sequence log-prob kernels, written once and
 * instantiated by logps.c for each vector width: it defines NAPO_SIMD_LANES
 * (4 or 8) and NAPO_SIMD(name) (a width suffix) before each inclusion, so this
 * file deliberately has no include guard. GCC/Clang vector extensions keep it
 * portable C: no intrinsics, and no -ffast-math, so NaN still propagates.
 */
#define VF NAPO_SIMD(vf)
#define VI NAPO_SIMD(vi)
#define VD NAPO_SIMD(vd)

typedef float VF __attribute__((vector_size(NAPO_SIMD_LANES * 4)));
typedef int32_t VI __attribute__((vector_size(NAPO_SIMD_LANES * 4)));
typedef double VD __attribute__((vector_size(NAPO_SIMD_LANES * 8)));

static inline VF NAPO_SIMD(splat)(float x) { return (VF){0} + x; }

static inline VF NAPO_SIMD(blend)(VI mask, VF if_true, VF if_false) {
  return (VF)((mask & (VI)if_true) | (~mask & (VI)if_false));
}

/* exp(x) to about 1 ulp for x in [-87.3, 88.3] (Cephes' minimax polynomial after
 * a Cody-Waite reduction by ln 2); 0 below, NaN stays NaN. */
static inline VF NAPO_SIMD(exp)(VF x) {
  const VI underflow = x < NAPO_SIMD(splat)(-87.3365448f);
  x = NAPO_SIMD(blend)(underflow, NAPO_SIMD(splat)(-87.3365448f), x);
  VF n = x * 1.44269504088896341f + 12582912.0f; /* round to the nearest integer */
  n = n - 12582912.0f;
  n = NAPO_SIMD(blend)(n != n, NAPO_SIMD(splat)(0.0f), n); /* NaN input: keep the integer conversion defined */
  const VF r = (x - n * 0.693359375f) + n * 2.12194440e-4f;
  VF p = NAPO_SIMD(splat)(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const VI exponent = (__builtin_convertvector(n, VI) + 127) << 23;
  const VF result = p * (VF)exponent;
  return (VF)((VI)result & ~underflow);
}

static inline VF NAPO_SIMD(load)(const float *p) {
  VF v;
  memcpy(&v, p, sizeof v);
  return v;
}

static inline void NAPO_SIMD(store)(float *p, VF v) { memcpy(p, &v, sizeof v); }

/* n contiguous logits of a 32/16-bit dtype into buf as float32, padded with -inf to whole vectors. */
static int64_t NAPO_SIMD(load_chunk)(const void *row, napo_logits_dtype dtype, int64_t start, int64_t n, float *buf) {
  switch (dtype) {
  case NAPO_LOGITS_F32:
    memcpy(buf, (const float *)row + start, (size_t)n * sizeof(float));
    break;
  case NAPO_LOGITS_BF16: {
    const uint16_t *src = (const uint16_t *)row + start;
    for (int64_t i = 0; i < n; ++i) {
      buf[i] = napo_bf16_to_float(src[i]);
    }
    break;
  }
  case NAPO_LOGITS_F16: {
    const uint16_t *src = (const uint16_t *)row + start;
    for (int64_t i = 0; i < n; ++i) {
      buf[i] = napo_f16_to_float(src[i]);
    }
    break;
  }
  case NAPO_LOGITS_F64:
    break; /* never on the fast path */
  }
  const int64_t padded = (n + NAPO_SIMD_LANES - 1) / NAPO_SIMD_LANES * NAPO_SIMD_LANES;
  for (int64_t i = n; i < padded; ++i) {
    buf[i] = -INFINITY;
  }
  return padded;
}

static void NAPO_SIMD(store_chunk)(void *row, napo_logits_dtype dtype, int64_t start, int64_t n, const float *buf) {
  switch (dtype) {
  case NAPO_LOGITS_F32:
    memcpy((float *)row + start, buf, (size_t)n * sizeof(float));
    break;
  case NAPO_LOGITS_BF16: {
    uint16_t *dst = (uint16_t *)row + start;
    for (int64_t i = 0; i < n; ++i) {
      dst[i] = napo_float_to_bf16(buf[i]);
    }
    break;
  }
  case NAPO_LOGITS_F16: {
    uint16_t *dst = (uint16_t *)row + start;
    for (int64_t i = 0; i < n; ++i) {
      dst[i] = napo_float_to_f16(buf[i]);
    }
    break;
  }
  case NAPO_LOGITS_F64:
    break;
  }
}

/* log-sum-exp of a row as (max, log of the shifted sum): kept apart so that a
 * token's log-prob, (x - max) - log_sum, keeps its precision for huge logits.
 * Online over chunks: the logits are read once. Each chunk's (max, sum) is
 * folded into the running pair by napo_lse_merge, which keeps a chunk of NaN
 * logits (whose max is NaN here) from being skipped as "all -inf". */
static double NAPO_SIMD(row_lse)(const void *row, napo_logits_dtype dtype, int64_t vocab, float *buf, double *max_out) {
  double running_max = -INFINITY, running_sum = 0.0;
  for (int64_t start = 0; start < vocab; start += CHUNK) {
    const int64_t n = vocab - start < CHUNK ? vocab - start : CHUNK;
    const int64_t padded = NAPO_SIMD(load_chunk)(row, dtype, start, n, buf);
    /* NaN-sticky maximum: a NaN lane wins and stays (x > NaN is false, NaN != NaN is true). */
    VF lanes_max = NAPO_SIMD(splat)(-INFINITY);
    for (int64_t i = 0; i < padded; i += NAPO_SIMD_LANES) {
      const VF x = NAPO_SIMD(load)(buf + i);
      lanes_max = NAPO_SIMD(blend)((x > lanes_max) | (x != x), x, lanes_max);
    }
    float chunk_max = lanes_max[0];
    for (int lane = 1; lane < NAPO_SIMD_LANES; ++lane) {
      const float m = lanes_max[lane];
      chunk_max = m > chunk_max || m != m ? m : chunk_max;
    }
    if (chunk_max != chunk_max || chunk_max == -INFINITY) { /* (NaN, NaN) or the empty (-inf, 0) */
      napo_lse_merge(&running_max, &running_sum, chunk_max, chunk_max != chunk_max ? NAN : 0.0);
      continue;
    }
    /* Four float32 accumulators (independent add chains) of SUM_BLOCK vectors each, flushed into
     * double lanes: one float32 sum over a whole chunk (128 terms a lane) drifts by several ulps
     * of the lse, and every gradient with it. */
    VD lanes_sum = {0};
    const VF shift = NAPO_SIMD(splat)(chunk_max);
    const int64_t block = 4 * SUM_BLOCK * NAPO_SIMD_LANES;
    int64_t i = 0;
    for (; i + block <= padded; i += block) {
      VF acc0 = NAPO_SIMD(splat)(0.0f), acc1 = acc0, acc2 = acc0, acc3 = acc0;
      for (int64_t j = i; j < i + block; j += 4 * NAPO_SIMD_LANES) {
        acc0 += NAPO_SIMD(exp)(NAPO_SIMD(load)(buf + j) - shift);
        acc1 += NAPO_SIMD(exp)(NAPO_SIMD(load)(buf + j + NAPO_SIMD_LANES) - shift);
        acc2 += NAPO_SIMD(exp)(NAPO_SIMD(load)(buf + j + 2 * NAPO_SIMD_LANES) - shift);
        acc3 += NAPO_SIMD(exp)(NAPO_SIMD(load)(buf + j + 3 * NAPO_SIMD_LANES) - shift);
      }
      lanes_sum += __builtin_convertvector(acc0, VD) + __builtin_convertvector(acc1, VD);
      lanes_sum += __builtin_convertvector(acc2, VD) + __builtin_convertvector(acc3, VD);
    }
    for (; i < padded; i += NAPO_SIMD_LANES) { /* the tail: fewer than `block` */
      lanes_sum += __builtin_convertvector(NAPO_SIMD(exp)(NAPO_SIMD(load)(buf + i) - shift), VD);
    }
    double chunk_sum = 0.0;
    for (int lane = 0; lane < NAPO_SIMD_LANES; ++lane) {
      chunk_sum += lanes_sum[lane];
    }
    napo_lse_merge(&running_max, &running_sum, chunk_max, chunk_sum);
  }
  *max_out = running_max;
  return log(running_sum);
}

/* grad_row = -grad * exp(logits_row - lse) for the whole row (0 when grad is 0: ignored rows).
 * Each chunk is read into buf before it is written back, so grad_row may be logits_row. */
static void NAPO_SIMD(row_grad)(const void *logits_row, void *grad_row, napo_logits_dtype dtype, int64_t vocab,
                                double grad, double lse, float *buf) {
  /* lse = shift_hi + shift_lo to ~2^-48: (x - shift_hi) is exact near the top of the row (Sterbenz),
   * so the probabilities that matter see no rounding of the lse (float32 alone: up to 0.5 ulp of
   * |lse| in the exponent, several ulps in the result). */
  const float neg_grad = (float)-grad, shift_hi = (float)lse;
  const float shift_lo = isfinite(shift_hi) ? (float)(lse - (double)shift_hi) : 0.0f;
  for (int64_t start = 0; start < vocab; start += CHUNK) {
    const int64_t n = vocab - start < CHUNK ? vocab - start : CHUNK;
    if (grad == 0.0) {
      memset(buf, 0, (size_t)n * sizeof(float));
    } else {
      const int64_t padded = NAPO_SIMD(load_chunk)(logits_row, dtype, start, n, buf);
      for (int64_t i = 0; i < padded; i += NAPO_SIMD_LANES) {
        NAPO_SIMD(store)(buf + i, neg_grad * NAPO_SIMD(exp)((NAPO_SIMD(load)(buf + i) - shift_hi) - shift_lo));
      }
    }
    NAPO_SIMD(store_chunk)(grad_row, dtype, start, n, buf);
  }
}

#undef VF
#undef VI
#undef VD
