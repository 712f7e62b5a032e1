/*
 * napo._C: the CPython binding of the C core.
 *
 * Each entry point is one row of the table near the end: its arguments in Python's order, the checks run on them
 * in order, and its kernel. One generic path (call_entry) parses the arguments, exports each array once through
 * DLPack (torch.Tensor, numpy.ndarray, ...), runs the checks, calls the kernel with the GIL released (CPU) or on
 * the caller's stream (CUDA), turns its status into an exception and releases the exports.
 *
 * Errors name the argument and the value: TypeError for types, ValueError for shapes and values, LookupError for
 * dtypes the core does not compute in (bf16/fp16 are upcast by the caller). Every shape and stride a kernel is
 * given passed these checks, and the core's own napo_check_* functions check them again. Outputs are passed in by
 * the caller, which owns the allocator (torch's caching allocator on CUDA).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <math.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "dlpack.h"
#include "napo.h"

#ifdef NAPO_WITH_CUDA
#define WITH_CUDA 1
#else /* no CUDA kernels (NAPO_CUDA=0, or no nvcc): what the binding calls of the CUDA runtime, stood in for */
#define WITH_CUDA 0
#define napo_cuda_available() 0
#define napo_cuda_set_debug(enabled) (void)(enabled)
#define napo_cuda_error_string(cuda_error) "unknown"
#endif

#define MAX_ARGS 8
#define MAX_CHECKS 12

/* An argument and, for an array, its export and what the checks learnt about it for the kernel. */
typedef struct {
  const char *name;  /* the Python argument name, for messages */
  PyObject *object;  /* an array as passed (borrowed); Py_None for an optional array not given */
  PyObject *capsule; /* owns the export; its destructor calls the producer's deleter */
  DLTensor *tensor;  /* NULL for a number, or an optional array not given */
  int f64;           /* FLOAT_DTYPE: float64, else float32 */
  napo_logits_dtype logits_dtype;
  napo_layout layout;        /* MARGINS, OUTPUT_LIKE */
  napo_logits_layout logits; /* LOGITS_LAYOUT; STANDALONE_LABELS: the labels' own shape */
  napo_labels labels;
  int64_t length, stride; /* VECTOR, MEANS; ROW_Q: q's stride per row */
} napo_arg;

/* Each check reads argument a, against reference argument b where it has one. */
typedef enum {
  END,
  FLOAT_DTYPE,       /* a is float32 or float64 */
  LOGITS_DTYPE,      /* a is float32, float64, bfloat16 or float16 */
  ON_DEVICE,         /* a is on the CPU or CUDA */
  MARGINS,           /* a is 1-D [batch] or 2-D [terms, batch] */
  ROW_Q,             /* a is q for margins b: 0-dim for 1-D, one value per row for 2-D */
  SAME,              /* a has b's dtype and device */
  SAME_SHAPE,        /* a has b's shape */
  OUTPUT_LIKE,       /* a has b's (1-D or 2-D) shape and is compact */
  VECTOR,            /* a is 1-D */
  SCALAR,            /* a holds one value */
  OUTPUT_VECTOR,     /* a is a compact vector of b's length */
  MEANS,             /* a is 0-dim or 1-D */
  OUTPUT_OF_MEANS,   /* a is a compact array shaped like means b */
  NONEMPTY,          /* a (a VECTOR) has an element; the entry's empty_hint says why */
  BETA,              /* the loss's beta */
  Q_PARAMS,          /* gamma, q_min, q_max */
  WEIGHT_PARAMS,     /* w_min, eps */
  LOGITS_LAYOUT,     /* a is 3-D [batch, time, vocab] */
  LABELS,            /* a is int64 [batch, time] on the device of logits b */
  TOKEN_BUFFER,      /* a is compact [batch, time] in logits b's accumulation dtype (float64 for float64) */
  LSE_BUFFER,        /* a is compact [batch, time] float64 (csrc/napo.h says why) */
  GRAD_MEMORY,       /* a (written) overlaps neither itself nor logits b, unless it is b */
  STANDALONE_LABELS, /* a is CPU int64 [batch, time], checked alone against `vocab` */
} check_op;

typedef struct {
  check_op op;
  int a, b;
} check;

typedef enum { ARG_ARRAY, ARG_OPTIONAL_ARRAY, ARG_REAL, ARG_INTEGER, ARG_STREAM } arg_kind;

typedef struct {
  const char *name;
  arg_kind kind;
  size_t value; /* ARG_REAL, ARG_INTEGER: offsetof the value in napo_call */
} arg_spec;

typedef struct entry_point entry_point;

/* One call: arrays by position, numbers by name. */
typedef struct {
  const entry_point *entry;
  napo_arg arg[MAX_ARGS];
  double beta, gamma, q_min, q_max, w_min, eps;
  long long ignore_index, num_threads, position_offset, vocab;
  unsigned long long stream;
  int cuda_error;       /* NAPO_ERR_CUDA: the cudaError_t */
  napo_label_error bad; /* NAPO_ERR_LABEL: where */
} napo_call;

struct entry_point {
  const char *name;
  int required;                                     /* the leading arguments without a default */
  napo_status (*run)(napo_call *call, int on_cuda); /* on the CPU it runs without the GIL */
  arg_spec args[MAX_ARGS];
  check checks[MAX_CHECKS];
  int device_arg;         /* the array whose device and dtype pick the kernel */
  const char *empty_hint; /* NONEMPTY's reason */
};

/* Raises `type` with the formatted message unless `ok`; nonzero when it raised, so that checks chain with ||. */
static int require(int ok, PyObject *type, const char *format, ...) {
  if (!ok) {
    va_list args;
    va_start(args, format);
    PyErr_FormatV(type, format, args);
    va_end(args);
  }
  return !ok;
}
#define fail(...) require(0, __VA_ARGS__) /* raises unconditionally */

/* The pending exception (normalised, with its traceback), taken off the thread state. */
static PyObject *take_exception(void) {
#if PY_VERSION_HEX >= 0x030C0000
  return PyErr_GetRaisedException();
#else
  PyObject *type = NULL, *value = NULL, *traceback = NULL;
  PyErr_Fetch(&type, &value, &traceback);
  PyErr_NormalizeException(&type, &value, &traceback);
  if (value != NULL && traceback != NULL) {
    PyException_SetTraceback(value, traceback);
  }
  Py_XDECREF(type);
  Py_XDECREF(traceback);
  return value;
#endif
}

/* Re-raises the pending exception as `type`, prefixed with the argument name, keeping the original as __cause__. */
static int reraise_with_name(PyObject *type, const char *name, const char *what) {
  PyObject *cause = take_exception();
  PyErr_Format(type, "argument '%s' %s: %S", name, what, cause != NULL ? cause : Py_None);
  if (cause != NULL) {
    PyObject *raised = take_exception();
    PyException_SetCause(raised, cause); /* steals cause */
    PyErr_SetObject((PyObject *)Py_TYPE(raised), raised);
    Py_DECREF(raised);
  }
  return 1;
}

/* A producer's shape, checked before anything multiplies it: no negative extent, and an element count (the largest
 * product stride_of and check_scalar form) that fits in int64, so that no shape, however crafted, overflows here. */
static int check_extent(const napo_arg *arg) {
  const DLTensor *t = arg->tensor;
  int64_t count = 1;
  int overflow = t->ndim < 0 || (t->ndim > 0 && t->shape == NULL);
  for (int32_t d = 0; !overflow && d < t->ndim; ++d) {
    overflow = t->shape[d] < 0 || __builtin_mul_overflow(count, t->shape[d], &count);
  }
  return require(!overflow, PyExc_ValueError,
                 "argument '%s' has a malformed shape (%d dimensions, a negative extent or more than 2**63 elements)",
                 arg->name, (int)t->ndim);
}

/* Exports the array through DLPack; arg->capsule then owns the export until call_entry releases it. */
static int acquire(napo_arg *arg) {
  PyObject *obj = arg->object;
  if (PyCapsule_CheckExact(obj)) {
    /* A capsule from torch.utils.dlpack.to_dlpack (napo's own fast path: it skips two Python-level method calls
     * per tensor). Borrowed, not consumed: its producer's deleter still runs when the caller drops it. */
    DLManagedTensor *managed = PyCapsule_GetPointer(obj, "dltensor");
    if (managed == NULL) {
      PyErr_Clear();
      return fail(PyExc_TypeError, "argument '%s' is a capsule but not an unconsumed 'dltensor' capsule", arg->name);
    }
    arg->capsule = Py_NewRef(obj);
    arg->tensor = &managed->dl_tensor;
    return check_extent(arg);
  }
  if (require(PyObject_HasAttrString(obj, "__dlpack__") && PyObject_HasAttrString(obj, "__dlpack_device__"),
              PyExc_TypeError,
              "argument '%s' must be an array that supports DLPack (torch.Tensor, numpy.ndarray, ...), got %s",
              arg->name, Py_TYPE(obj)->tp_name)) {
    return 1;
  }
  PyObject *device = PyObject_CallMethod(obj, "__dlpack_device__", NULL);
  if (device == NULL) {
    return reraise_with_name(PyExc_TypeError, arg->name, "has no usable __dlpack_device__");
  }
  const long device_type =
      PyTuple_Check(device) && PyTuple_GET_SIZE(device) == 2 ? PyLong_AsLong(PyTuple_GET_ITEM(device, 0)) : -1;
  Py_DECREF(device);
  if (device_type == -1 && PyErr_Occurred()) {
    return reraise_with_name(PyExc_TypeError, arg->name, "has a malformed __dlpack_device__");
  }
  /* CUDA: stream=-1, no cross-stream synchronisation; the kernel is launched on the stream the caller passes,
   * which is the stream producing these tensors. */
  PyObject *kwargs = device_type == kDLCUDA ? Py_BuildValue("{s:i}", "stream", -1) : NULL;
  PyObject *method = device_type != kDLCUDA || kwargs != NULL ? PyObject_GetAttrString(obj, "__dlpack__") : NULL;
  arg->capsule = method != NULL ? PyObject_VectorcallDict(method, NULL, 0, kwargs) : NULL;
  Py_XDECREF(method);
  Py_XDECREF(kwargs);
  if (arg->capsule == NULL) {
    return reraise_with_name(PyExc_TypeError, arg->name, "could not be exported through DLPack");
  }
  DLManagedTensor *managed = PyCapsule_GetPointer(arg->capsule, "dltensor");
  if (managed == NULL) {
    Py_CLEAR(arg->capsule);
    PyErr_Clear();
    return fail(PyExc_TypeError, "argument '%s': __dlpack__ did not return an unconsumed 'dltensor' capsule",
                arg->name);
  }
  arg->tensor = &managed->dl_tensor;
  return check_extent(arg);
}

static const char *dtype_name(DLDataType dtype) {
  static const char *const names[] = {[kDLInt] = "int",         [kDLUInt] = "uint",       [kDLFloat] = "float",
                                      [kDLBfloat] = "bfloat16", [kDLComplex] = "complex", [kDLBool] = "bool"};
  if (dtype.code == kDLFloat && (dtype.bits == 16 || dtype.bits == 32 || dtype.bits == 64)) {
    return dtype.bits == 16 ? "float16" : dtype.bits == 32 ? "float32" : "float64";
  }
  return dtype.code < sizeof names / sizeof *names && names[dtype.code] != NULL ? names[dtype.code]
                                                                                : "an unknown dtype";
}

static int is_cuda(const napo_arg *arg) { return arg->tensor->device.device_type == kDLCUDA; }

static void *data_of(const napo_arg *arg) { return (char *)arg->tensor->data + arg->tensor->byte_offset; }

/* Element stride of dimension d (DLPack's NULL strides mean compact, row-major). */
static int64_t stride_of(const DLTensor *t, int32_t d) {
  int64_t stride = 1;
  for (int32_t later = d + 1; t->strides == NULL && later < t->ndim; ++later) {
    stride *= t->shape[later];
  }
  return t->strides != NULL ? t->strides[d] : stride;
}

static int check_device_supported(const napo_arg *arg) {
  const int32_t type = arg->tensor->device.device_type;
  return require(type == kDLCPU || type == kDLCUDAHost || type == kDLCUDA, PyExc_ValueError,
                 "argument '%s' lives on DLPack device type %d; napo supports CPU and CUDA", arg->name, (int)type);
}

static int check_same_device(const napo_arg *arg, const napo_arg *ref) {
  return require(is_cuda(arg) == is_cuda(ref) && arg->tensor->device.device_id == ref->tensor->device.device_id,
                 PyExc_ValueError, "argument '%s' is not on the device of '%s'", arg->name, ref->name);
}

/* A 1-D array: its length and element stride. */
static int vector_of(napo_arg *arg) {
  const DLTensor *t = arg->tensor;
  if (require(t->ndim == 1, PyExc_ValueError, "argument '%s' must be 1-D, got %d dimensions", arg->name,
              (int)t->ndim)) {
    return 1;
  }
  arg->length = t->shape[0];
  arg->stride = stride_of(t, 0);
  return 0;
}

static int check_scalar(const napo_arg *arg) {
  int64_t n = 1;
  for (int32_t d = 0; d < arg->tensor->ndim; ++d) {
    n *= arg->tensor->shape[d];
  }
  return require(n == 1 && arg->tensor->ndim <= 1, PyExc_ValueError,
                 "argument '%s' must hold exactly one value (0-dim), got %d dimensions and %lld elements", arg->name,
                 (int)arg->tensor->ndim, (long long)n);
}

/* Margins of the loss: a 1-D vector is one term (one row), a 2-D array one term per row. */
static int margins_layout_of(napo_arg *arg) {
  const DLTensor *t = arg->tensor;
  if (require(t->ndim == 1 || t->ndim == 2, PyExc_ValueError,
              "argument '%s' must be 1-D [batch] or 2-D [terms, batch], got %d dimensions", arg->name, (int)t->ndim)) {
    return 1;
  }
  const napo_layout vector = {1, t->shape[0], 0, stride_of(t, 0)};
  const napo_layout rows = {t->shape[0], t->shape[t->ndim - 1], stride_of(t, 0), stride_of(t, t->ndim - 1)};
  arg->layout = t->ndim == 1 ? vector : rows;
  return 0;
}

/* "(3, 4)"-style text of a shape, truncated safely to the buffer. */
static void shape_repr(const DLTensor *t, char *buffer, size_t size) {
  size_t used = (size_t)snprintf(buffer, size, "(");
  for (int32_t d = 0; d < t->ndim && used < size; ++d) {
    used += (size_t)snprintf(buffer + used, size - used, d == 0 ? "%lld" : ", %lld", (long long)t->shape[d]);
  }
  if (used < size) {
    snprintf(buffer + used, size - used, t->ndim == 1 ? ",)" : ")");
  }
}

static int check_same_shape(const napo_arg *arg, const napo_arg *ref) {
  int same = arg->tensor->ndim == ref->tensor->ndim;
  for (int32_t d = 0; same && d < ref->tensor->ndim; ++d) {
    same = arg->tensor->shape[d] == ref->tensor->shape[d];
  }
  char want[64] = "", got[64] = "";
  if (!same) { /* the texts only for the message */
    shape_repr(ref->tensor, want, sizeof want);
    shape_repr(arg->tensor, got, sizeof got);
  }
  return require(same, PyExc_ValueError, "argument '%s' must have the shape of '%s' %s, got %s", arg->name, ref->name,
                 want, got);
}

static int check_output_vector(napo_arg *out, int64_t length) {
  return vector_of(out) ||
         require(out->length == length, PyExc_ValueError, "argument '%s' must have length %lld, got %lld", out->name,
                 (long long)length, (long long)out->length) ||
         require(out->length <= 1 || out->stride == 1, PyExc_ValueError,
                 "argument '%s' must be contiguous, got stride %lld", out->name, (long long)out->stride);
}

/* A float parameter's check; `requirement` is what `ok` means, for the message. */
static int require_parameter(int ok, const char *name, double value, const char *requirement) {
  PyObject *boxed = ok ? NULL : PyFloat_FromDouble(value);
  if (boxed != NULL) {
    PyErr_Format(PyExc_ValueError, "%s must be %s, got %R", name, requirement, boxed);
    Py_DECREF(boxed);
  }
  return !ok;
}

static int labels_of(napo_arg *arg, const napo_arg *logits) {
  const DLTensor *t = arg->tensor;
  const napo_logits_layout want = logits->logits;
  if (require(t->dtype.code == kDLInt && t->dtype.bits == 64 && t->dtype.lanes == 1, PyExc_TypeError,
              "argument '%s' must be int64, got %s with %d bits", arg->name, dtype_name(t->dtype),
              (int)t->dtype.bits) ||
      require(t->ndim == 2 && t->shape[0] == want.batch && t->shape[1] == want.time, PyExc_ValueError,
              "argument '%s' must have shape [batch, time] = (%lld, %lld) like '%s'", arg->name, (long long)want.batch,
              (long long)want.time, logits->name) ||
      check_same_device(arg, logits)) {
    return 1;
  }
  const napo_labels labels = {(const int64_t *)data_of(arg), stride_of(t, 0), stride_of(t, 1)};
  arg->labels = labels;
  return 0;
}

/* A compact [batch, time] float buffer of `bits` bits on the logits' device. */
static int check_row_buffer(const napo_arg *arg, const napo_arg *logits, int bits) {
  const DLTensor *t = arg->tensor;
  const napo_logits_layout want = logits->logits;
  return require(t->dtype.code == kDLFloat && t->dtype.bits == bits && t->dtype.lanes == 1, PyExc_LookupError,
                 "argument '%s' must be float%d (for %s logits), got %s", arg->name, bits,
                 dtype_name(logits->tensor->dtype), dtype_name(t->dtype)) ||
         require(t->ndim == 2 && t->shape[0] == want.batch && t->shape[1] == want.time, PyExc_ValueError,
                 "argument '%s' must have shape (%lld, %lld)", arg->name, (long long)want.batch,
                 (long long)want.time) ||
         require(want.batch * want.time == 0 ||
                     ((want.time <= 1 || stride_of(t, 1) == 1) && (want.batch <= 1 || stride_of(t, 0) == want.time)),
                 PyExc_ValueError, "argument '%s' must be contiguous", arg->name) ||
         check_same_device(arg, logits);
}

/* The bytes [first, end) that a layout checked by napo_check_logits_layout reaches from the array's data. */
static void byte_range(const napo_arg *arg, napo_logits_layout layout, uintptr_t *first, uintptr_t *end) {
  const int64_t sizes[3] = {layout.batch, layout.time, layout.vocab};
  const int64_t strides[3] = {layout.stride_b, layout.stride_t, layout.stride_v};
  int64_t lowest = 0, highest = 0;
  for (int d = 0; d < 3; ++d) {
    const int64_t reach = sizes[d] > 1 ? strides[d] * (sizes[d] - 1) : 0;
    lowest += reach < 0 ? reach : 0;
    highest += reach > 0 ? reach : 0;
  }
  const uintptr_t item = (uintptr_t)(arg->tensor->dtype.bits / 8);
  /* Unsigned arithmetic wraps a negative offset correctly. */
  *first = (uintptr_t)data_of(arg) + (uintptr_t)lowest * item;
  *end = (uintptr_t)data_of(arg) + (uintptr_t)(highest + 1) * item;
}

/* grad_out is written, by several threads at once: no two of its elements may share memory (an expanded array
 * would get the sum of races), and it may share memory with the logits only by being them (the in-place backward
 * reads each row before writing it). Layouts the kernel's own checks refuse are left to them. */
static int check_grad_memory(const napo_arg *grad, const napo_arg *logits) {
  const napo_logits_layout g = grad->logits, l = logits->logits;
  if (g.batch * g.time == 0 || napo_check_logits_layout(data_of(grad), g) != NAPO_OK ||
      napo_check_logits_layout(data_of(logits), l) != NAPO_OK) {
    return 0;
  }
  /* Sorted by |stride|, each dimension must step past all that the smaller ones span: enough to prove that no two
   * elements meet, and true of any contiguous, sliced or permuted array. Dimensions of size 1 take no step. */
  const int64_t sizes[3] = {g.batch, g.time, g.vocab}, strides[3] = {g.stride_b, g.stride_t, g.stride_v};
  struct {
    int64_t step, size;
  } dims[3], swap;
  for (int d = 0; d < 3; ++d) { /* |stride| only where the checked reach bounds it (not INT64_MIN) */
    dims[d].step = sizes[d] > 1 ? llabs(strides[d]) : 0;
    dims[d].size = sizes[d];
  }
  for (int sorted = 0; sorted < 2; ++sorted) {
    for (int d = 0; d < 2 - sorted; ++d) {
      if (dims[d].step > dims[d + 1].step) {
        swap = dims[d], dims[d] = dims[d + 1], dims[d + 1] = swap;
      }
    }
  }
  int64_t span = 0;
  for (int d = 0; d < 3; ++d) {
    if (require(dims[d].size <= 1 || dims[d].step > span, PyExc_ValueError,
                "argument '%s' overlaps itself (shape (%lld, %lld, %lld), strides (%lld, %lld, %lld)): it is "
                "written, so every element needs memory of its own",
                grad->name, (long long)g.batch, (long long)g.time, (long long)g.vocab, (long long)g.stride_b,
                (long long)g.stride_t, (long long)g.stride_v)) {
      return 1;
    }
    span += dims[d].size > 1 ? dims[d].step * (dims[d].size - 1) : 0;
  }
  const int same = data_of(grad) == data_of(logits) && g.stride_b == l.stride_b && g.stride_t == l.stride_t &&
                   g.stride_v == l.stride_v;
  uintptr_t g_first, g_end, l_first, l_end;
  byte_range(grad, g, &g_first, &g_end);
  byte_range(logits, l, &l_first, &l_end);
  return require(same || g_end <= l_first || l_end <= g_first, PyExc_ValueError,
                 "argument '%s' overlaps '%s' without being the same array: pass a separate buffer, or the logits "
                 "themselves for an in-place backward",
                 grad->name, logits->name);
}

/* Runs one check of the table; nonzero when it raised. What a check learns goes into its argument. */
static int run_check(napo_call *c, check s) {
  napo_arg *a = &c->arg[s.a], *b = &c->arg[s.b];
  const DLTensor *t = a->tensor; /* argument 0, always an array, for the parameter checks */
  const DLDataType dtype = t->dtype;
  switch (s.op) {
  case FLOAT_DTYPE:
    a->f64 = dtype.bits == 64;
    return require(dtype.lanes == 1 && (dtype.code == kDLFloat || dtype.code == kDLBfloat), PyExc_TypeError,
                   "argument '%s' must be a floating-point array, got dtype %s", a->name, dtype_name(dtype)) ||
           require(dtype.code == kDLFloat && (dtype.bits == 32 || dtype.bits == 64), PyExc_LookupError,
                   "argument '%s' has dtype %s; napo's C core computes in float32 or float64 (upcast first)", a->name,
                   dtype_name(dtype));
  case LOGITS_DTYPE:
    a->logits_dtype = dtype.bits == 32 ? NAPO_LOGITS_F32 : dtype.bits == 64 ? NAPO_LOGITS_F64 : NAPO_LOGITS_F16;
    a->logits_dtype = dtype.code == kDLBfloat ? NAPO_LOGITS_BF16 : a->logits_dtype;
    return require(dtype.lanes == 1 &&
                       ((dtype.code == kDLFloat && (dtype.bits == 16 || dtype.bits == 32 || dtype.bits == 64)) ||
                        (dtype.code == kDLBfloat && dtype.bits == 16)),
                   PyExc_TypeError, "argument '%s' must be float32, float64, bfloat16 or float16, got %s", a->name,
                   dtype_name(dtype));
  case ON_DEVICE:
    return check_device_supported(a);
  case MARGINS:
    return margins_layout_of(a);
  case ROW_Q:
    a->stride = b->tensor->ndim == 1 || t->ndim != 1 ? 0 : stride_of(t, 0);
    return b->tensor->ndim == 1 ? check_scalar(a)
                                : require(t->ndim == 1 && t->shape[0] == b->layout.rows, PyExc_ValueError,
                                          "argument '%s' must be 1-D with one value per row of '%s' (%lld), got %d "
                                          "dimensions",
                                          a->name, b->name, (long long)b->layout.rows, (int)t->ndim);
  case SAME: {
    const DLDataType want = b->tensor->dtype;
    const DLDevice device = t->device, want_device = b->tensor->device;
    return require(want.code == dtype.code && want.bits == dtype.bits && want.lanes == dtype.lanes, PyExc_LookupError,
                   "argument '%s' has dtype %s but '%s' has dtype %s; they must match", a->name, dtype_name(dtype),
                   b->name, dtype_name(want)) ||
           require(is_cuda(a) == is_cuda(b) && (!is_cuda(b) || device.device_id == want_device.device_id),
                   PyExc_ValueError, "argument '%s' is on device (%d, %d) but '%s' is on device (%d, %d)", a->name,
                   (int)device.device_type, (int)device.device_id, b->name, (int)want_device.device_type,
                   (int)want_device.device_id);
  }
  case SAME_SHAPE:
    return check_same_shape(a, b);
  case OUTPUT_LIKE: {
    if (check_same_shape(a, b) || margins_layout_of(a)) {
      return 1;
    }
    /* An empty output has nothing to write: producers give it arbitrary strides. */
    const napo_layout out = a->layout;
    return require(
        out.rows == 0 || out.cols == 0 ||
            ((out.cols <= 1 || out.col_stride == 1) && (t->ndim == 1 || out.rows <= 1 || out.row_stride == out.cols)),
        PyExc_ValueError, "argument '%s' must be contiguous", a->name);
  }
  case VECTOR:
    return vector_of(a);
  case SCALAR:
    return check_scalar(a);
  case OUTPUT_VECTOR:
    return check_output_vector(a, b->length);
  case MEANS:
    a->length = 1;
    a->stride = 0;
    return require(t->ndim <= 1, PyExc_ValueError, "argument '%s' must be 0-dim or 1-D, got %d dimensions", a->name,
                   (int)t->ndim) ||
           (t->ndim == 1 && vector_of(a));
  case OUTPUT_OF_MEANS:
    return b->tensor->ndim == 1 ? check_output_vector(a, b->length) : check_scalar(a);
  case NONEMPTY:
    return require(a->length != 0, PyExc_ValueError, "argument '%s' is empty; %s", a->name, c->entry->empty_hint);
  case BETA:
    return require_parameter(napo_check_loss_params(c->beta) == NAPO_OK, "beta", c->beta, "a finite number > 0");
  case Q_PARAMS:
    return require_parameter(isfinite(c->gamma) && c->gamma > 0.0, "gamma", c->gamma, "a finite number > 0") ||
           require_parameter(c->q_min >= 0.0 && c->q_min <= 1.0, "q_min", c->q_min, "in [0, 1]") ||
           require_parameter(c->q_max >= c->q_min && c->q_max <= 1.0, "q_max", c->q_max, "in [q_min, 1]");
  case WEIGHT_PARAMS:
    return require_parameter(c->w_min >= 0.0 && c->w_min <= 1.0, "w_min", c->w_min, "in [0, 1]") ||
           require_parameter(isfinite(c->eps) && c->eps >= 0.0, "eps", c->eps, "a finite number >= 0");
  case LOGITS_LAYOUT: {
    if (require(t->ndim == 3, PyExc_ValueError, "argument '%s' must be 3-D [batch, time, vocab], got %d dimensions",
                a->name, (int)t->ndim)) {
      return 1;
    }
    const napo_logits_layout layout = {t->shape[0],     t->shape[1],     t->shape[2],
                                       stride_of(t, 0), stride_of(t, 1), stride_of(t, 2)};
    a->logits = layout;
    return require(layout.vocab >= 1, PyExc_ValueError, "argument '%s' has an empty vocabulary dimension", a->name);
  }
  case LABELS:
    return labels_of(a, b);
  case TOKEN_BUFFER:
    return check_row_buffer(a, b, b->logits_dtype == NAPO_LOGITS_F64 ? 64 : 32);
  case LSE_BUFFER:
    return check_row_buffer(a, b, 64);
  case GRAD_MEMORY:
    return check_grad_memory(a, b);
  case STANDALONE_LABELS: {
    if (require(t->ndim == 2, PyExc_ValueError, "argument '%s' must be 2-D [batch, time], got %d dimensions", a->name,
                (int)t->ndim) ||
        check_device_supported(a) ||
        require(!is_cuda(a), PyExc_ValueError, "argument '%s' must be on the CPU for check_labels", a->name)) {
      return 1;
    }
    const napo_logits_layout shape = {t->shape[0], t->shape[1], c->vocab, 0, 0, 0};
    a->logits = shape;
    return labels_of(a, a); /* the labels are their own reference */
  }
  case END:
    break;
  }
  return 0;
}

/* Turns a kernel's status into the matching Python exception; nonzero when it raised. */
static int raise_status(const napo_call *c, napo_status status) {
  const napo_arg *q = NULL;
  const int cuda_error = c->cuda_error & ~NAPO_CUDA_FOREIGN_ERROR;
  switch (status) {
  case NAPO_OK:
    return 0;
  case NAPO_ERR_LABEL:
    return fail(PyExc_ValueError,
                "labels[%lld, %lld] = %lld is outside the vocabulary [0, %lld) and is not ignore_index (%lld)",
                (long long)c->bad.batch, (long long)c->bad.time + c->position_offset, (long long)c->bad.value,
                (long long)c->arg[c->entry->device_arg].logits.vocab, c->ignore_index);
  case NAPO_ERR_Q_RANGE:
    for (int i = 0; i < MAX_ARGS; ++i) {
      q = c->arg[i].tensor != NULL && strcmp(c->arg[i].name, "q") == 0 ? &c->arg[i] : q;
    }
    if (q == NULL || is_cuda(q)) { /* never dereference device memory on the host */
      return fail(PyExc_ValueError, "q must be in [0, 1]");
    }
    /* The first value out of range: q is 0-dim, or 1-D with one value per row at the stride ROW_Q found. */
    const int64_t count = q->tensor->ndim == 1 ? q->tensor->shape[0] : 1;
    double value = 0.0;
    for (int64_t k = 0; k < count; ++k) {
      const char *at = (const char *)data_of(q) + k * q->stride * (q->tensor->dtype.bits / 8);
      value = q->tensor->dtype.bits == 32 ? (double)*(const float *)at : *(const double *)at;
      if (!(value >= 0.0 && value <= 1.0)) {
        break;
      }
    }
    return require_parameter(0, "q", value, "in [0, 1]");
  case NAPO_ERR_CUDA:
    if (c->cuda_error & NAPO_CUDA_FOREIGN_ERROR) {
      return fail(PyExc_RuntimeError,
                  "a CUDA error was already pending before napo's kernel launch, left by earlier CUDA work (not by "
                  "napo; napo did not launch): %s (CUDA error %d). NAPO_CUDA_DEBUG=1 and CUDA_LAUNCH_BLOCKING=1 help "
                  "find its source.",
                  napo_cuda_error_string(cuda_error), cuda_error);
    }
    return fail(PyExc_RuntimeError, "napo CUDA kernel failed: %s (CUDA error %d)", napo_cuda_error_string(cuda_error),
                cuda_error);
  case NAPO_ERR_NO_CUDA:
    return fail(PyExc_RuntimeError,
                "napo was built without CUDA kernels; rebuild with nvcc on PATH (NAPO_CUDA=1) to use CUDA tensors");
  default:
    return fail(PyExc_ValueError, "napo: %s", napo_status_message(status));
  }
}

/* ---- the kernels, one per entry point: arrays by position, numbers by name ---- */

#define DATA(i) data_of(&c->arg[i])
#ifdef NAPO_WITH_CUDA
/* A CUDA kernel takes its CPU twin's arguments, then the device of the entry's device array, the caller's stream and
 * where to put a CUDA error. */
#define ON_CUDA(kernel, ...)                                                                                           \
  kernel##_cuda(__VA_ARGS__, (int)c->arg[c->entry->device_arg].tensor->device.device_id, (void *)(uintptr_t)c->stream, \
                &c->cuda_error)
#else
#define ON_CUDA(kernel, ...) NAPO_ERR_NO_CUDA
#endif
#define CPU_OR_CUDA(kernel, ...) (on_cuda ? ON_CUDA(kernel, __VA_ARGS__) : kernel(__VA_ARGS__))
/* The float32 or float64 kernel, as FLOAT_DTYPE found the entry's device array. */
#define FLOAT_KERNEL(kernel, ...)                                                                                      \
  (c->arg[c->entry->device_arg].f64 ? CPU_OR_CUDA(kernel##_f64, __VA_ARGS__) : CPU_OR_CUDA(kernel##_f32, __VA_ARGS__))

static int clamp_threads(long long requested) { return requested < 1 ? 1 : requested > 64 ? 64 : (int)requested; }

static napo_status run_loss_forward(napo_call *c, int on_cuda) {
  void *grad = c->arg[4].tensor != NULL ? DATA(4) : NULL; /* optional */
  return FLOAT_KERNEL(napo_loss_forward, DATA(0), c->arg[0].layout, DATA(1), c->arg[1].stride, c->beta, DATA(3), grad);
}

static napo_status run_loss_backward(napo_call *c, int on_cuda) {
  return FLOAT_KERNEL(napo_loss_backward, DATA(0), c->arg[0].layout, DATA(1), DATA(2));
}

static napo_status run_adaptive_q(napo_call *c, int on_cuda) {
  const napo_arg *m = &c->arg[0];
  return FLOAT_KERNEL(napo_adaptive_q, DATA(0), m->stride, m->length, c->gamma, c->q_min, c->q_max, DATA(4));
}

static napo_status run_q_from_mean(napo_call *c, int on_cuda) {
  const napo_arg *m = &c->arg[0];
  return FLOAT_KERNEL(napo_q_from_mean, DATA(0), m->length, m->stride, c->gamma, c->q_min, c->q_max, DATA(4));
}

static napo_status run_dynamic_weights(napo_call *c, int on_cuda) {
  const napo_arg *m = &c->arg[0];
  return FLOAT_KERNEL(napo_dynamic_weights, DATA(0), m->stride, m->length, c->w_min, c->eps, DATA(3));
}

/* The log-prob kernels' leading arguments (logits, labels, ignore_index). Only the CPU ones take a thread count and
 * report a bad label (a CUDA kernel gives NaN for one; csrc/napo.h). */
#define LOGPS_ARGS DATA(0), c->arg[0].logits, c->arg[0].logits_dtype, c->arg[1].labels, c->ignore_index
#define CPU_TAIL clamp_threads(c->num_threads), &c->bad

static napo_status run_token_logps(napo_call *c, int on_cuda) {
  return on_cuda ? ON_CUDA(napo_token_logps, LOGPS_ARGS, DATA(3), DATA(4))
                 : napo_token_logps(LOGPS_ARGS, DATA(3), DATA(4), CPU_TAIL);
}

static napo_status run_token_logps_backward(napo_call *c, int on_cuda) {
  return on_cuda ? ON_CUDA(napo_token_logps_backward, LOGPS_ARGS, DATA(3), DATA(4), DATA(5), c->arg[5].logits)
                 : napo_token_logps_backward(LOGPS_ARGS, DATA(3), DATA(4), DATA(5), c->arg[5].logits, CPU_TAIL);
}

static napo_status run_check_labels(napo_call *c, int on_cuda) {
  (void)on_cuda; /* STANDALONE_LABELS refuses CUDA labels */
  const napo_logits_layout shape = c->arg[0].logits;
  return napo_check_labels(c->arg[0].labels, shape.batch, shape.time, c->vocab, c->ignore_index, &c->bad);
}

/* ---- the table: each entry point's arguments (in Python's order), checks (in order) and kernel ---- */

#define ARRAY(name) {#name, ARG_ARRAY, 0}
#define OPTIONAL_ARRAY(name) {#name, ARG_OPTIONAL_ARRAY, 0}
#define REAL(field) {#field, ARG_REAL, offsetof(napo_call, field)}
#define INTEGER(field) {#field, ARG_INTEGER, offsetof(napo_call, field)}
#define STREAM {"stream", ARG_STREAM, 0}

// clang-format off
static const entry_point loss_forward_entry = {.name = "loss_forward", .required = 4, .run = run_loss_forward,
    .args = {ARRAY(margins), ARRAY(q), REAL(beta), ARRAY(out), OPTIONAL_ARRAY(grad_out), STREAM},
    .checks = {{FLOAT_DTYPE, 0, 0}, {ON_DEVICE, 0, 0}, {MARGINS, 0, 0}, {SAME, 1, 0}, {ROW_Q, 1, 0}, {SAME, 3, 0},
               {OUTPUT_LIKE, 3, 0}, {SAME, 4, 0}, {OUTPUT_LIKE, 4, 0}, {BETA, 0, 0}}};

static const entry_point loss_backward_entry = {.name = "loss_backward", .required = 3, .run = run_loss_backward,
    .args = {ARRAY(grad_loss), ARRAY(grad_factor), ARRAY(out), STREAM}, .device_arg = 1,
    .checks = {{FLOAT_DTYPE, 1, 0}, {ON_DEVICE, 1, 0}, {MARGINS, 1, 0}, {SAME, 0, 1}, {SAME_SHAPE, 0, 1},
               {MARGINS, 0, 0}, {OUTPUT_LIKE, 1, 1}, {SAME, 2, 1}, {OUTPUT_LIKE, 2, 1}}};

static const entry_point adaptive_q_entry = {.name = "adaptive_q", .required = 5, .run = run_adaptive_q,
    .args = {ARRAY(margins), REAL(gamma), REAL(q_min), REAL(q_max), ARRAY(out), STREAM},
    .checks = {{FLOAT_DTYPE, 0, 0}, {ON_DEVICE, 0, 0}, {VECTOR, 0, 0}, {SAME, 4, 0}, {SCALAR, 4, 0},
               {Q_PARAMS, 0, 0}, {NONEMPTY, 0, 0}},
    .empty_hint = "adaptive q needs the mean of at least one margin"};

static const entry_point q_from_mean_entry = {.name = "q_from_mean", .required = 5, .run = run_q_from_mean,
    .args = {ARRAY(means), REAL(gamma), REAL(q_min), REAL(q_max), ARRAY(out), STREAM},
    .checks = {{FLOAT_DTYPE, 0, 0}, {ON_DEVICE, 0, 0}, {SAME, 4, 0}, {Q_PARAMS, 0, 0}, {MEANS, 0, 0},
               {OUTPUT_OF_MEANS, 4, 0}}};

static const entry_point dynamic_weights_entry = {.name = "dynamic_weights", .required = 4, .run = run_dynamic_weights,
    .args = {ARRAY(reward_margins), REAL(w_min), REAL(eps), ARRAY(out), STREAM},
    .checks = {{FLOAT_DTYPE, 0, 0}, {ON_DEVICE, 0, 0}, {VECTOR, 0, 0}, {SAME, 3, 0}, {OUTPUT_VECTOR, 3, 0},
               {WEIGHT_PARAMS, 0, 0}, {NONEMPTY, 0, 0}},
    .empty_hint = "dynamic weights need K >= 1 loss terms"};

static const entry_point token_logps_entry = {.name = "token_logps", .required = 5, .run = run_token_logps,
    .args = {ARRAY(logits), ARRAY(labels), INTEGER(ignore_index), ARRAY(token_out), ARRAY(lse_out),
             INTEGER(num_threads), INTEGER(position_offset), STREAM},
    .checks = {{LOGITS_DTYPE, 0, 0}, {ON_DEVICE, 0, 0}, {LOGITS_LAYOUT, 0, 0}, {LABELS, 1, 0}, {TOKEN_BUFFER, 3, 0},
               {LSE_BUFFER, 4, 0}}};

static const entry_point token_logps_backward_entry = {.name = "token_logps_backward", .required = 6,
    .run = run_token_logps_backward,
    .args = {ARRAY(logits), ARRAY(labels), INTEGER(ignore_index), ARRAY(lse), ARRAY(grad_token), ARRAY(grad_out),
             INTEGER(num_threads), STREAM},
    .checks = {{LOGITS_DTYPE, 0, 0}, {ON_DEVICE, 0, 0}, {LOGITS_LAYOUT, 0, 0}, {LABELS, 1, 0}, {LSE_BUFFER, 3, 0},
               {TOKEN_BUFFER, 4, 0}, {LOGITS_DTYPE, 5, 0}, {SAME, 5, 0}, {SAME_SHAPE, 5, 0}, {LOGITS_LAYOUT, 5, 0},
               {GRAD_MEMORY, 5, 0}}};

static const entry_point check_labels_entry = {.name = "check_labels", .required = 3, .run = run_check_labels,
    .args = {ARRAY(labels), INTEGER(vocab), INTEGER(ignore_index), INTEGER(position_offset)},
    .checks = {{STANDALONE_LABELS, 0, 0}}};
// clang-format on

/* ---- the generic path ---- */

/* PyArg's "O&" converters, one per argument kind, each with the message of PyArg's own letter for that kind. */
typedef int (*converter)(PyObject *, void *);

static int to_object(PyObject *obj, void *out) {
  *(PyObject **)out = obj;
  return 1;
}

static int to_real(PyObject *obj, void *out) { /* "d" */
  *(double *)out = PyFloat_AsDouble(obj);
  return !(*(double *)out == -1.0 && PyErr_Occurred());
}

static int to_integer(PyObject *obj, void *out) { /* "L" */
  *(long long *)out = PyLong_AsLongLong(obj);
  return !(*(long long *)out == -1 && PyErr_Occurred());
}

static int to_stream(PyObject *obj, void *call) { /* "K": any int, masked to 64 bits; `call` names the function */
  napo_call *c = call;
  int position = 1;
  while (c->entry->args[position - 1].kind != ARG_STREAM) {
    ++position;
  }
  if (!PyLong_Check(obj)) {
    fail(PyExc_TypeError, "%.200s() argument %d must be int, not %.50s", c->entry->name, position,
         obj == Py_None ? "None" : Py_TYPE(obj)->tp_name);
    return 0;
  }
  c->stream = PyLong_AsUnsignedLongLongMask(obj);
  return 1;
}

/* Exports the arrays, then runs the row's checks in order (the first failure is the error the caller sees); an
 * optional array not given skips the checks that name it. */
static int validate(napo_call *c, int n) {
  const entry_point *e = c->entry;
  for (int i = 0; i < n; ++i) {
    const arg_kind kind = e->args[i].kind;
    if ((kind == ARG_ARRAY || (kind == ARG_OPTIONAL_ARRAY && c->arg[i].object != Py_None)) && acquire(&c->arg[i])) {
      return 1;
    }
  }
  for (int k = 0; k < MAX_CHECKS && e->checks[k].op != END; ++k) {
    const check s = e->checks[k];
    const int absent = (e->args[s.a].kind == ARG_OPTIONAL_ARRAY && c->arg[s.a].tensor == NULL) ||
                       (e->args[s.b].kind == ARG_OPTIONAL_ARRAY && c->arg[s.b].tensor == NULL);
    if (!absent && run_check(c, s)) {
      return 1;
    }
  }
  return 0;
}

static PyObject *call_entry(const entry_point *e, PyObject *args, PyObject *kwargs) {
  napo_call c = {.entry = e};
  /* PyArg's format ("O&O&|O&:name"), keywords and converters, from the row: with a converter for every argument,
   * the one call below serves every entry point with correctly typed variadic arguments. */
  char format[3 * MAX_ARGS + 32] = "";
  char *keywords[MAX_ARGS + 1] = {NULL};
  converter convert[MAX_ARGS] = {NULL};
  void *into[MAX_ARGS] = {NULL};
  size_t used = 0;
  int n = 0;
  for (; n < MAX_ARGS && e->args[n].name != NULL; ++n) {
    const arg_kind kind = e->args[n].kind;
    const int array = kind == ARG_ARRAY || kind == ARG_OPTIONAL_ARRAY;
    c.arg[n].name = keywords[n] = (char *)e->args[n].name;
    c.arg[n].object = Py_None;
    used += (size_t)snprintf(format + used, sizeof format - used, "%sO&", n == e->required ? "|" : "");
    convert[n] = array ? to_object : kind == ARG_REAL ? to_real : kind == ARG_INTEGER ? to_integer : to_stream;
    into[n] = array ? (void *)&c.arg[n].object : kind == ARG_STREAM ? (void *)&c : (char *)&c + e->args[n].value;
  }
  snprintf(format + used, sizeof format - used, ":%s", e->name);
  PyObject *result = NULL;
  if (PyArg_ParseTupleAndKeywords(args, kwargs, format, keywords, convert[0], into[0], convert[1], into[1], convert[2],
                                  into[2], convert[3], into[3], convert[4], into[4], convert[5], into[5], convert[6],
                                  into[6], convert[7], into[7]) &&
      !validate(&c, n)) {
    /* A CPU kernel's long loops run without the GIL; a CUDA kernel only enqueues work on the caller's stream. */
    const int on_cuda = is_cuda(&c.arg[e->device_arg]);
    PyThreadState *saved = on_cuda ? NULL : PyEval_SaveThread();
    const napo_status status = e->run(&c, on_cuda);
    if (saved != NULL) {
      PyEval_RestoreThread(saved);
    }
    result = raise_status(&c, status) ? NULL : Py_NewRef(Py_None);
  }
  for (int i = n; i-- > 0;) {
    Py_CLEAR(c.arg[i].capsule);
  }
  return result;
}

/* ---- the module ---- */

// clang-format off
#define ENTRY_POINTS(X) X(loss_forward) X(loss_backward) X(adaptive_q) X(q_from_mean) X(dynamic_weights) \
  X(token_logps) X(token_logps_backward) X(check_labels)
// clang-format on

#define WRAPPER(name)                                                                                                  \
  static PyObject *py_##name(PyObject *self, PyObject *args, PyObject *kwargs) {                                       \
    (void)self;                                                                                                        \
    return call_entry(&name##_entry, args, kwargs);                                                                    \
  }
ENTRY_POINTS(WRAPPER)

PyDoc_STRVAR(loss_forward_doc, "loss_forward(margins, q, beta, out, grad_out=None, stream=0)\n--\n\n"
                               "Per-pair NaPO loss into `out` and, if given, dL/dmargins into `grad_out`.\n"
                               "margins [B] with a 0-dim q, or [K, B] with q [K] (one loss term per row);\n"
                               "q == 0 is DPO.");
PyDoc_STRVAR(loss_backward_doc, "loss_backward(grad_loss, grad_factor, out, stream=0)\n--\n\n"
                                "out = grad_loss * grad_factor (the dL/dmargins saved by loss_forward).");
PyDoc_STRVAR(adaptive_q_doc, "adaptive_q(margins, gamma, q_min, q_max, out, stream=0)\n--\n\n"
                             "out = clip(2 * (1 - sigmoid(gamma * mean(margins))), q_min, q_max); out is 0-dim.");
PyDoc_STRVAR(q_from_mean_doc, "q_from_mean(means, gamma, q_min, q_max, out, stream=0)\n--\n\n"
                              "Adaptive q from already-reduced (e.g. all-reduced) mean margins, elementwise:\n"
                              "means is 0-dim or 1-D, out has its shape.");
PyDoc_STRVAR(dynamic_weights_doc, "dynamic_weights(reward_margins, w_min, eps, out, stream=0)\n--\n\n"
                                  "out[k] = clip(R_k / sum(R), w_min, 1), uniform 1/K when sum(R) <= eps.");
PyDoc_STRVAR(token_logps_doc,
             "token_logps(logits, labels, ignore_index, token_out, lse_out, num_threads=1, position_offset=0, "
             "stream=0)\n--\n\n"
             "Per-token log-probs of logits [B, T, V] (f32/f64/bf16/f16, any strides) at int64 labels [B, T]\n"
             "(already aligned with the logits) into token_out, compact [B, T] float32 (float64 for float64\n"
             "logits), and the log-sum-exp into lse_out, compact [B, T] float64. position_offset is added to the time\n"
             "index in error messages (the caller's shift).");
PyDoc_STRVAR(token_logps_backward_doc,
             "token_logps_backward(logits, labels, ignore_index, lse, grad_token, grad_out, num_threads=1, "
             "stream=0)\n--\n\n"
             "grad_out[b, t, v] = grad_token[b, t] * (1[v == label] - softmax(logits[b, t])[v]), 0 at ignored\n"
             "positions. grad_out has the logits' shape and dtype, any strides; it may be the logits itself.");
PyDoc_STRVAR(check_labels_doc, "check_labels(labels, vocab, ignore_index, position_offset=0)\n--\n\n"
                               "Raises ValueError naming the first int64 label of the CPU array labels [B, T]\n"
                               "outside [0, vocab) that is not ignore_index.");
PyDoc_STRVAR(cuda_runtime_info_doc,
             "cuda_runtime_info()\n--\n\n"
             "None without CUDA kernels; else a dict: runtime_version (the CUDA runtime napo links, e.g. 13000),\n"
             "driver_version (the newest CUDA the driver supports, 0 without a driver), device_count, and\n"
             "error (why the runtime cannot start, or None).");
PyDoc_STRVAR(set_cuda_debug_doc, "set_cuda_debug(enabled)\n--\n\n"
                                 "Debug mode: synchronise and check errors after every napo CUDA launch (a fault is\n"
                                 "then reported by the napo call that caused it). No effect without CUDA kernels.");

static PyObject *py_built_with_cuda(PyObject *self, PyObject *unused) {
  (void)self, (void)unused;
  return PyBool_FromLong(WITH_CUDA);
}

static PyObject *py_cuda_available(PyObject *self, PyObject *unused) {
  (void)self, (void)unused;
  return PyBool_FromLong(napo_cuda_available());
}

static PyObject *py_cuda_runtime_info(PyObject *self, PyObject *unused) {
  (void)self, (void)unused;
#ifdef NAPO_WITH_CUDA
  int cuda_error = 0;
  const int count = napo_cuda_device_count(&cuda_error);
  /* "s" turns a NULL error into None */
  return Py_BuildValue("{s:i,s:i,s:i,s:s}", "runtime_version", napo_cuda_runtime_version(), "driver_version",
                       napo_cuda_driver_version(), "device_count", count, "error",
                       cuda_error != 0 ? napo_cuda_error_string(cuda_error) : NULL);
#else
  Py_RETURN_NONE;
#endif
}

static PyObject *py_set_cuda_debug(PyObject *self, PyObject *arg) {
  (void)self;
  const int enabled = PyObject_IsTrue(arg);
  if (enabled < 0) {
    return NULL;
  }
  napo_cuda_set_debug(enabled);
  Py_RETURN_NONE;
}

#define METHOD(name) {#name, (PyCFunction)(void (*)(void))py_##name, METH_VARARGS | METH_KEYWORDS, name##_doc},

static PyMethodDef napo_methods[] = {
    ENTRY_POINTS(METHOD){"built_with_cuda", py_built_with_cuda, METH_NOARGS,
                         "True when the CUDA kernels were compiled in."},
    {"cuda_available", py_cuda_available, METH_NOARGS, "True when compiled with CUDA and a device is visible."},
    {"cuda_runtime_info", py_cuda_runtime_info, METH_NOARGS, cuda_runtime_info_doc},
    {"set_cuda_debug", py_set_cuda_debug, METH_O, set_cuda_debug_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef napo_module = {PyModuleDef_HEAD_INIT, .m_name = "napo._C",
                                         .m_doc = "napo's C core (NaPO objective kernels), called through DLPack.",
                                         .m_size = 0, .m_methods = napo_methods};

PyMODINIT_FUNC PyInit__C(void) {
  PyObject *module = PyModule_Create(&napo_module);
  if (module != NULL && PyModule_AddIntConstant(module, "ABI_VERSION", 2) != 0) {
    Py_CLEAR(module);
  }
  return module;
}
