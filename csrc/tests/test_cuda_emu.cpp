/*
 * napo's CUDA kernels, run on the CPU emulation of CUDA (csrc/cuda/emu) through their own C entry
 * points (napo_*_cuda, host code included) and compared with the C CPU kernels on the cases the CPU
 * kernels are tested with. `make test-cuda-emu` builds it under ASan+UBSan and again under TSan.
 *
 * Tolerances, per output dtype (relative to max(1, |expected|)):
 *  - log-probs of float32/bfloat16/float16 logits: 2e-5 (the kernel sums exp in float32 over up to
 *    151936 logits, the CPU reference in float64), 2e-12 for float64 logits;
 *  - their gradients: 1e-6 absolute + 1 ulp of the logits' dtype relative (both round one value);
 *  - objective kernels (double arithmetic, stored in float32 or float64): 1e-12 float64, 1 ulp
 *    float32 (2.4e-7) -- only the parallel sums' order differs from the CPU.
 * NaN must meet NaN and an infinity the same infinity.
 */
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "cuda_emu.h"

extern "C" {
#include "logits_buffer.h"
#include "napo.h"
#include "napo_dtype.h"
}

namespace {

int failures = 0, checks = 0;

#define EXPECT(cond, ...)                                                                                              \
  do {                                                                                                                 \
    ++checks;                                                                                                          \
    if (!(cond)) {                                                                                                     \
      if (++failures <= 20) {                                                                                          \
        std::fprintf(stderr, "%s:%d: FAILED %s: ", __FILE__, __LINE__, #cond);                                         \
        std::fprintf(stderr, __VA_ARGS__);                                                                             \
        std::fprintf(stderr, "\n");                                                                                    \
      }                                                                                                                \
    }                                                                                                                  \
  } while (0)

uint64_t rng = 0x2545F4914F6CDD1Dull;
double uniform() { /* xorshift64*, in [0, 1) */
  rng ^= rng >> 12;
  rng ^= rng << 25;
  rng ^= rng >> 27;
  return (double)((rng * 0x2545F4914F6CDD1Dull) >> 11) / 9007199254740992.0;
}

bool close(double got, double want, double tol) {
  if (std::isnan(want) || std::isnan(got)) {
    return std::isnan(want) && std::isnan(got);
  }
  if (std::isinf(want) || std::isinf(got)) {
    return got == want;
  }
  return std::fabs(got - want) <= tol * std::fmax(1.0, std::fabs(want));
}

const char *dtype_name(napo_logits_dtype d) {
  return d == NAPO_LOGITS_F32 ? "f32" : d == NAPO_LOGITS_F64 ? "f64" : d == NAPO_LOGITS_BF16 ? "bf16" : "f16";
}
double acc(const void *base, napo_logits_dtype d, int64_t i) {
  return d == NAPO_LOGITS_F64 ? ((const double *)base)[i] : ((const float *)base)[i];
}
double ulp_of(napo_logits_dtype d) {
  return d == NAPO_LOGITS_F64 ? 0x1p-52 : d == NAPO_LOGITS_F32 ? 0x1p-23 : d == NAPO_LOGITS_BF16 ? 0x1p-7 : 0x1p-10;
}

enum layout_kind { CONTIGUOUS, TRANSPOSED, VOCAB_STRIDED };
enum special_kind { PLAIN, NAN_LOGIT, POS_INF_LOGIT, NEG_INF_LOGITS, ALL_IGNORED };

/* One log-prob case: forward and backward (out of place and in place) against the CPU serial kernels. */
void logps_case(napo_logits_dtype d, int64_t batch, int64_t time, int64_t vocab, layout_kind kind,
                special_kind special) {
  const int64_t ignore = -100, rows = batch * time, spread = kind == VOCAB_STRIDED ? 2 : 1;
  napo_logits_layout layout = {batch, time, vocab, time * vocab * spread, vocab * spread, spread};
  if (kind == TRANSPOSED) { /* memory [time, batch, vocab] viewed as [batch, time, vocab] */
    layout.stride_b = vocab;
    layout.stride_t = batch * vocab;
  }
  const int64_t elements = rows * vocab * spread;
  std::vector<unsigned char> logits((size_t)elements * item_size(d)), copy;
  for (int64_t i = 0; i < elements; ++i) {
    put(logits.data(), d, i, 8.0 * uniform() - 4.0);
  }
  std::vector<int64_t> labels((size_t)rows); /* stored [time, batch] when transposed */
  napo_labels lab = {labels.data(), kind == TRANSPOSED ? 1 : time, kind == TRANSPOSED ? batch : 1};
  for (int64_t b = 0; b < batch; ++b) {
    for (int64_t t = 0; t < time; ++t) {
      const int64_t r = b * time + t;
      int64_t label = (int64_t)(uniform() * (double)vocab);
      label = r % 4 == 0 ? 0 : r % 4 == 1 ? vocab - 1 : label;
      if (special == ALL_IGNORED || (r % 3 == 2 && rows > 1)) {
        label = ignore;
      }
      labels[(size_t)(b * lab.stride_b + t * lab.stride_t)] = label;
      const int64_t base = b * layout.stride_b + t * layout.stride_t;
      if (special == NAN_LOGIT && r % 2 == 0) {
        put(logits.data(), d, base + (vocab / 2) * layout.stride_v, NAN);
      } else if (special == POS_INF_LOGIT && r % 2 == 0) {
        put(logits.data(), d, base, INFINITY);
      } else if (special == NEG_INF_LOGITS) {
        for (int64_t v = 0; v < vocab; v += (r % 2 == 0 ? 1 : 2)) { /* even rows: all -inf */
          put(logits.data(), d, base + v * layout.stride_v, -INFINITY);
        }
      }
    }
  }
  const size_t acc_size = d == NAPO_LOGITS_F64 ? 8 : 4;
  std::vector<unsigned char> token_cpu((size_t)rows * acc_size), token_gpu((size_t)rows * acc_size);
  std::vector<double> lse_cpu((size_t)rows), lse_gpu((size_t)rows, 7.0);
  napo_label_error bad;
  napo_status st =
      napo_token_logps_serial(logits.data(), layout, d, lab, ignore, token_cpu.data(), lse_cpu.data(), &bad);
  EXPECT(st == NAPO_OK, "cpu status %d", (int)st);
  int cuda_error = 0;
  st = napo_token_logps_cuda(logits.data(), layout, d, lab, ignore, token_gpu.data(), lse_gpu.data(), 0, nullptr,
                             &cuda_error);
  EXPECT(st == NAPO_OK, "cuda status %d (%d)", (int)st, cuda_error);
  const double tol = d == NAPO_LOGITS_F64 ? 2e-12 : 2e-5;
  for (int64_t r = 0; r < rows; ++r) {
    EXPECT(close(acc(token_gpu.data(), d, r), acc(token_cpu.data(), d, r), tol) &&
               close(lse_gpu[(size_t)r], lse_cpu[(size_t)r], tol),
           "%s B=%lld T=%lld V=%lld layout %d special %d row %lld: token %.17g vs %.17g, lse %.17g vs %.17g",
           dtype_name(d), (long long)batch, (long long)time, (long long)vocab, (int)kind, (int)special, (long long)r,
           acc(token_gpu.data(), d, r), acc(token_cpu.data(), d, r), lse_gpu[(size_t)r], lse_cpu[(size_t)r]);
  }
  /* Backward from the CPU lse, so the two kernels differentiate the same forward. */
  std::vector<unsigned char> grad_token((size_t)rows * acc_size);
  for (int64_t r = 0; r < rows; ++r) {
    if (d == NAPO_LOGITS_F64) {
      ((double *)grad_token.data())[r] = 2.0 * uniform() - 1.0;
    } else {
      ((float *)grad_token.data())[r] = (float)(2.0 * uniform() - 1.0);
    }
  }
  std::vector<unsigned char> grad_cpu(logits.size()), grad_gpu(logits.size());
  st = napo_token_logps_backward_serial(logits.data(), layout, d, lab, ignore, lse_cpu.data(), grad_token.data(),
                                        grad_cpu.data(), layout, &bad);
  EXPECT(st == NAPO_OK, "cpu backward status %d", (int)st);
  st = napo_token_logps_backward_cuda(logits.data(), layout, d, lab, ignore, lse_cpu.data(), grad_token.data(),
                                      grad_gpu.data(), layout, 0, nullptr, &cuda_error);
  EXPECT(st == NAPO_OK, "cuda backward status %d", (int)st);
  const double gtol = d == NAPO_LOGITS_F64 ? 1e-12 : 1e-6 + ulp_of(d);
  int shown = 0;
  for (int64_t b = 0; b < batch; ++b) {
    for (int64_t t = 0; t < time; ++t) {
      for (int64_t v = 0; v < vocab; ++v) {
        const int64_t i = b * layout.stride_b + t * layout.stride_t + v * layout.stride_v;
        const bool ok = close(get(grad_gpu.data(), d, i), get(grad_cpu.data(), d, i), gtol);
        if (!ok && shown++ < 3) {
          EXPECT(ok, "%s V=%lld grad[%lld,%lld,%lld] %.9g vs %.9g", dtype_name(d), (long long)vocab, (long long)b,
                 (long long)t, (long long)v, get(grad_gpu.data(), d, i), get(grad_cpu.data(), d, i));
        }
      }
    }
  }
  EXPECT(shown == 0, "%d gradient elements differ", shown);
  /* Both kernels round the gradient once to the logits' dtype (the GPU from float32, the CPU from
   * float64), so their 16-bit results are the same bits except where the two pre-rounding values
   * straddle a rounding boundary: rare. A conversion that truncates differs in about half. */
  if (item_size(d) == 2 && special == PLAIN) {
    int64_t differing = 0;
    for (int64_t i = 0; i < elements; ++i) {
      differing += ((const uint16_t *)grad_gpu.data())[i] != ((const uint16_t *)grad_cpu.data())[i];
    }
    EXPECT(differing <= 2 + elements / 100, "%s V=%lld: %lld of %lld gradient values not rounded as the CPU rounds",
           dtype_name(d), (long long)vocab, (long long)differing, (long long)elements);
  }
  /* In place: the gradient overwrites the logits and must equal the out-of-place result. */
  copy = logits;
  st = napo_token_logps_backward_cuda(copy.data(), layout, d, lab, ignore, lse_cpu.data(), grad_token.data(),
                                      copy.data(), layout, 0, nullptr, &cuda_error);
  EXPECT((st == NAPO_OK && std::memcmp(copy.data(), grad_gpu.data(), copy.size()) == 0) ||
             (spread == 2 /* the untouched odd elements differ */),
         "in-place backward differs from out-of-place (%s V=%lld)", dtype_name(d), (long long)vocab);
}

void test_logps() {
  const napo_logits_dtype dtypes[] = {NAPO_LOGITS_F32, NAPO_LOGITS_F64, NAPO_LOGITS_BF16, NAPO_LOGITS_F16};
  for (napo_logits_dtype d : dtypes) {
    for (int64_t vocab : {1, 2, 255, 256, 257, 32000}) {
      logps_case(d, 2, 3, vocab, CONTIGUOUS, PLAIN);
    }
    logps_case(d, 1, 2, 32064, CONTIGUOUS, PLAIN);
    logps_case(d, 1, 2, 151936, CONTIGUOUS, PLAIN);
    logps_case(d, 3, 2, 257, TRANSPOSED, PLAIN);
    logps_case(d, 2, 2, 300, VOCAB_STRIDED, PLAIN);
    logps_case(d, 2, 2, 257, CONTIGUOUS, NAN_LOGIT);
    logps_case(d, 2, 2, 257, CONTIGUOUS, POS_INF_LOGIT);
    logps_case(d, 2, 2, 257, CONTIGUOUS, NEG_INF_LOGITS);
    logps_case(d, 2, 2, 64, CONTIGUOUS, ALL_IGNORED);
  }
  logps_case(NAPO_LOGITS_F32, 4, 75, 3, CONTIGUOUS, PLAIN); /* 300 rows: more blocks than threads per block */
}

/* ---- the objective ---- */

template <typename T> double tol_of() { return sizeof(T) == 8 ? 1e-12 : 2.4e-7; }

template <typename T> struct objective_api;
template <> struct objective_api<float> {
  static constexpr auto loss_cpu = napo_loss_forward_f32;
  static constexpr auto loss_gpu = napo_loss_forward_f32_cuda;
  static constexpr auto back_cpu = napo_loss_backward_f32;
  static constexpr auto back_gpu = napo_loss_backward_f32_cuda;
  static constexpr auto q_cpu = napo_adaptive_q_f32;
  static constexpr auto q_gpu = napo_adaptive_q_f32_cuda;
  static constexpr auto mean_cpu = napo_q_from_mean_f32;
  static constexpr auto mean_gpu = napo_q_from_mean_f32_cuda;
  static constexpr auto w_cpu = napo_dynamic_weights_f32;
  static constexpr auto w_gpu = napo_dynamic_weights_f32_cuda;
};
template <> struct objective_api<double> {
  static constexpr auto loss_cpu = napo_loss_forward_f64;
  static constexpr auto loss_gpu = napo_loss_forward_f64_cuda;
  static constexpr auto back_cpu = napo_loss_backward_f64;
  static constexpr auto back_gpu = napo_loss_backward_f64_cuda;
  static constexpr auto q_cpu = napo_adaptive_q_f64;
  static constexpr auto q_gpu = napo_adaptive_q_f64_cuda;
  static constexpr auto mean_cpu = napo_q_from_mean_f64;
  static constexpr auto mean_gpu = napo_q_from_mean_f64_cuda;
  static constexpr auto w_cpu = napo_dynamic_weights_f64;
  static constexpr auto w_gpu = napo_dynamic_weights_f64_cuda;
};

template <typename T>
void compare(const std::vector<T> &gpu, const std::vector<T> &cpu, const char *what, long long n) {
  int shown = 0;
  for (size_t i = 0; i < cpu.size(); ++i) {
    if (!close(gpu[i], cpu[i], tol_of<T>()) && shown++ < 3) {
      EXPECT(false, "%s (f%d, n=%lld)[%zu]: %.17g vs %.17g", what, (int)(8 * sizeof(T)), n, i, (double)gpu[i],
             (double)cpu[i]);
    }
  }
  ++checks;
}

template <typename T> void loss_case(int64_t rows, int64_t cols, bool transposed, int64_t q_stride) {
  using api = objective_api<T>;
  std::vector<T> margins((size_t)(rows * cols)), q((size_t)rows);
  for (T &m : margins) {
    m = (T)(20.0 * uniform() - 10.0);
  }
  for (size_t r = 0; r < q.size(); ++r) {
    q[r] = (T)(r % 3 == 0 ? 0.0 : r % 3 == 1 ? 1.0 : uniform());
  }
  if (!margins.empty()) {
    margins[0] = (T)NAN;
    margins[margins.size() - 1] = (T)-INFINITY;
  }
  const napo_layout layout = transposed ? napo_layout{rows, cols, 1, rows} : napo_layout{rows, cols, cols, 1};
  const size_t n = (size_t)(rows * cols);
  std::vector<T> loss_c(n), grad_c(n), loss_g(n), grad_g(n);
  int err = 0;
  EXPECT(api::loss_cpu(margins.data(), layout, q.data(), q_stride, 0.5, loss_c.data(), grad_c.data()) == NAPO_OK,
         "status");
  EXPECT(api::loss_gpu(margins.data(), layout, q.data(), q_stride, 0.5, loss_g.data(), grad_g.data(), 0, nullptr,
                       &err) == NAPO_OK,
         "status");
  compare(loss_g, loss_c, "loss", (long long)n);
  compare(grad_g, grad_c, "grad_factor", (long long)n);
  std::vector<T> upstream(n), back_c(n), back_g(n);
  for (T &u : upstream) {
    u = (T)uniform();
  }
  const napo_layout up = {rows, cols, cols, 1};
  EXPECT(api::back_cpu(upstream.data(), up, grad_c.data(), back_c.data()) == NAPO_OK, "status");
  EXPECT(api::back_gpu(upstream.data(), up, grad_c.data(), back_g.data(), 0, nullptr, &err) == NAPO_OK, "status");
  compare(back_g, back_c, "loss backward", (long long)n);
}

template <typename T> void reductions_case(std::vector<T> values, int64_t stride) {
  using api = objective_api<T>;
  const int64_t n = (int64_t)values.size() / stride;
  int err = 0;
  std::vector<T> q_c(1), q_g(1, (T)7);
  EXPECT(api::q_cpu(values.data(), stride, n, 0.7, 0.0, 1.0, q_c.data()) == NAPO_OK, "status");
  EXPECT(api::q_gpu(values.data(), stride, n, 0.7, 0.0, 1.0, q_g.data(), 0, nullptr, &err) == NAPO_OK, "status");
  compare(q_g, q_c, "adaptive_q", (long long)n);
  std::vector<T> m_c((size_t)n), m_g((size_t)n);
  EXPECT(api::mean_cpu(values.data(), n, stride, 0.7, 0.05, 0.95, m_c.data()) == NAPO_OK, "status");
  EXPECT(api::mean_gpu(values.data(), n, stride, 0.7, 0.05, 0.95, m_g.data(), 0, nullptr, &err) == NAPO_OK, "status");
  compare(m_g, m_c, "q_from_mean", (long long)n);
  std::vector<T> w_c((size_t)n), w_g((size_t)n);
  EXPECT(api::w_cpu(values.data(), stride, n, 0.01, 1e-8, w_c.data()) == NAPO_OK, "status");
  EXPECT(api::w_gpu(values.data(), stride, n, 0.01, 1e-8, w_g.data(), 0, nullptr, &err) == NAPO_OK, "status");
  compare(w_g, w_c, "dynamic_weights", (long long)n);
}

template <typename T> void test_objective() {
  for (int64_t rows : {1, 3}) {
    for (int64_t cols : {1, 255, 256, 257, 700}) {
      loss_case<T>(rows, cols, false, 1);
    }
  }
  loss_case<T>(3, 200, true, 1);
  loss_case<T>(2, 300, false, 0); /* one q for every row */
  loss_case<T>(0, 5, false, 1);
  for (int64_t n : {1, 2, 3, 255, 256, 257, 1000}) {
    std::vector<T> v((size_t)n);
    for (T &x : v) {
      x = (T)(4.0 * uniform() - 1.0);
    }
    reductions_case<T>(v, 1);
    reductions_case<T>(std::vector<T>((size_t)n, (T)0), 1);  /* step 0: all margins zero */
    reductions_case<T>(std::vector<T>((size_t)n, (T)-1), 1); /* sum R <= 0 */
  }
  std::vector<T> strided(600);
  for (T &x : strided) {
    x = (T)(uniform() + 0.1);
  }
  reductions_case<T>(strided, 2);
  const T big = sizeof(T) == 8 ? (T)1e308 : (T)3e38;
  reductions_case<T>({big, big, big / 2}, 1); /* the sum overflows: redone scaled */
  reductions_case<T>({(T)1, (T)NAN, (T)2}, 1);
  reductions_case<T>({(T)INFINITY, (T)1, (T)1}, 1);
  reductions_case<T>({(T)INFINITY, (T)-INFINITY, (T)1}, 1);
  reductions_case<T>({(T)INFINITY, (T)INFINITY, (T)1, (T)-2}, 1);
}

/* ---- host-side validation: the CUDA entry points refuse what the CPU ones refuse ---- */
void test_validation() {
  float margins[3] = {1, 2, 3}, q[3] = {0.5f, 0.5f, 0.5f}, loss[3], grad[3];
  const napo_layout three_rows = {3, 1, 1, 1};
  const int64_t huge = INT64_MAX / 2;
  int err = 0;
  EXPECT(napo_loss_forward_f32(margins, three_rows, q, huge, 1.0, loss, grad) == NAPO_ERR_SIZE, "cpu q_stride");
  EXPECT(napo_loss_forward_f32_cuda(margins, three_rows, q, huge, 1.0, loss, grad, 0, nullptr, &err) == NAPO_ERR_SIZE,
         "cuda q_stride: 3 rows with q_stride INT64_MAX/2 must be refused, not launched");
  EXPECT(napo_loss_forward_f64_cuda(nullptr, {3, 1, 1, 1}, nullptr, 1, 1.0, nullptr, nullptr, 0, nullptr, &err) ==
             NAPO_ERR_NULL_POINTER,
         "cuda null margins");
  float logits[8] = {0};
  int64_t labels[4] = {0, 1, 0, 1};
  const napo_logits_layout layout = {2, 2, 2, 4, 2, 1};
  const napo_labels bad_stride = {labels, huge, 1};
  float token[4];
  double lse[4];
  napo_label_error bad;
  EXPECT(napo_token_logps(logits, layout, NAPO_LOGITS_F32, bad_stride, -100, token, lse, 1, &bad) == NAPO_ERR_SIZE,
         "cpu label stride");
  EXPECT(napo_token_logps_cuda(logits, layout, NAPO_LOGITS_F32, bad_stride, -100, token, lse, 0, nullptr, &err) ==
             NAPO_ERR_SIZE,
         "cuda label stride: a label stride whose offsets overflow must be refused, not launched");
  EXPECT(napo_token_logps_backward_cuda(logits, layout, NAPO_LOGITS_F32, bad_stride, -100, lse, token, logits, layout,
                                        0, nullptr, &err) == NAPO_ERR_SIZE,
         "cuda backward label stride");
}

} // namespace

int main(int argc, char **argv) {
  const bool quick = argc > 1 && std::strcmp(argv[1], "--quick") == 0; /* the mutation test's subset */
  test_validation();
  test_objective<float>();
  test_objective<double>();
  if (quick) {
    logps_case(NAPO_LOGITS_F16, 2, 3, 257, CONTIGUOUS, PLAIN);
    logps_case(NAPO_LOGITS_F32, 2, 3, 1000, CONTIGUOUS, PLAIN);
    logps_case(NAPO_LOGITS_BF16, 2, 3, 257, CONTIGUOUS, PLAIN);
  } else {
    test_logps();
  }
  napo_emu::launch_count counts[16];
  const int kernels = napo_emu::launch_counts(counts, 16);
  std::printf("emulated CUDA launches per kernel:\n");
  for (int i = 0; i < kernels && i < 16; ++i) {
    std::printf("  %-22s %6lld\n", counts[i].kernel, counts[i].launches);
  }
  if (!quick && kernels != 7) {
    std::fprintf(stderr, "expected all 7 __global__ kernels to be launched, got %d\n", kernels);
    ++failures;
  }
  std::printf("%d checks, %d failed\n", checks, failures);
  return failures == 0 ? 0 : 1;
}
