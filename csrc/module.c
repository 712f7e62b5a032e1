/*
 * napo._C: the CPython binding of the C core.
 *
 * Each entry point is one row of the table below: its arguments, the checks run on them in order, and the
 * kernel to call. One generic path (call_entry) parses the arguments, exports each array once through DLPack
 * (torch.Tensor, numpy.ndarray, ...), runs the checks, calls the kernel with the GIL released (CPU) or on the
 * caller's stream (CUDA), turns its status into an exception and releases the exports. Errors name the
 * argument and the value: TypeError for types, ValueError for shapes and values, LookupError for dtypes the
 * core does not compute in (bf16/fp16 are upcast by the caller). Outputs are passed in by the caller, which
 * owns the allocator (torch's caching allocator on CUDA).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <math.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include "dlpack.h"
#include "napo.h"

#define MAX_ARGS 8
#define MAX_CHECKS 12

/* An exported array and what the checks learnt about it for the kernel. */
typedef struct {
  const char *name;  /* the Python argument name, for messages */
  PyObject *capsule; /* owns the export; its destructor calls the producer's deleter */
  DLTensor *tensor;  /* NULL for an optional array not given */
  int f64;           /* FLOAT_DTYPE: float64, else float32 */
  napo_logits_dtype logits_dtype;
  napo_layout layout;        /* MARGINS */
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
  size_t value; /* ARG_REAL, ARG_INTEGER, ARG_STREAM: offsetof the value in napo_call */
} arg_spec;

typedef struct entry_point entry_point;

/* One call: arrays by position, numbers by name. */
typedef struct {
  const entry_point *entry;
  PyObject *object[MAX_ARGS];
  napo_arg arg[MAX_ARGS];
  double beta, gamma, q_min, q_max, w_min, eps;
  long long ignore_index, num_threads, position_offset, vocab;
  unsigned long long stream;
  int cuda_error;
  napo_label_error bad;
} napo_call;

struct entry_point {
  const char *name;
  int required;                                     /* the leading arguments without a default */
  napo_status (*run)(napo_call *call, int on_cuda); /* on the CPU it runs without the GIL */
  arg_spec args[MAX_ARGS];
  check checks[MAX_CHECKS];
  int device_arg;                 /* the array whose device picks the kernel */
  const char *empty_hint;         /* NONEMPTY's reason */
  char format[3 * MAX_ARGS + 32]; /* PyArg's, filled by prepare() */
  char *keywords[MAX_ARGS + 1];
};

static int fail(PyObject *type, const char *format, ...) {
  va_list args;
  va_start(args, format);
  PyErr_FormatV(type, format, args);
  va_end(args);
  return -1;
}

/* Re-raise the pending exception as `type`, prefixed with the argument name,
 * keeping the original as __cause__. */
static int reraise_with_name(PyObject *type, const char *name, const char *what) {
#if PY_VERSION_HEX >= 0x030C0000
  PyObject *cause = PyErr_GetRaisedException();
#else
  PyObject *cause_type = NULL, *cause = NULL, *cause_tb = NULL;
  PyErr_Fetch(&cause_type, &cause, &cause_tb);
  PyErr_NormalizeException(&cause_type, &cause, &cause_tb);
  if (cause != NULL && cause_tb != NULL) {
    PyException_SetTraceback(cause, cause_tb);
  }
  Py_XDECREF(cause_type);
  Py_XDECREF(cause_tb);
#endif
  PyErr_Format(type, "argument '%s' %s: %S", name, what, cause != NULL ? cause : Py_None);
  if (cause == NULL) {
    return -1;
  }
#if PY_VERSION_HEX >= 0x030C0000
  PyObject *raised = PyErr_GetRaisedException();
  PyException_SetCause(raised, cause); /* steals cause */
  PyErr_SetRaisedException(raised);
#else
  PyObject *raised_type = NULL, *raised = NULL, *raised_tb = NULL;
  PyErr_Fetch(&raised_type, &raised, &raised_tb);
  PyErr_NormalizeException(&raised_type, &raised, &raised_tb);
  PyException_SetCause(raised, cause); /* steals cause */
  PyErr_Restore(raised_type, raised, raised_tb);
#endif
  return -1;
}

static int acquire(PyObject *obj, const char *name, napo_arg *arg) {
  arg->name = name;
  if (PyCapsule_CheckExact(obj)) {
    /* A capsule from torch.utils.dlpack.to_dlpack (napo's own fast path: it
     * skips two Python-level method calls per tensor). Borrowed, not consumed:
     * its producer's deleter still runs when the caller drops it. */
    DLManagedTensor *managed = (DLManagedTensor *)PyCapsule_GetPointer(obj, "dltensor");
    if (managed == NULL) {
      PyErr_Clear();
      return fail(PyExc_TypeError, "argument '%s' is a capsule but not an unconsumed 'dltensor' capsule", name);
    }
    arg->capsule = Py_NewRef(obj);
    arg->tensor = &managed->dl_tensor;
    return 0;
  }
  if (!PyObject_HasAttrString(obj, "__dlpack__") || !PyObject_HasAttrString(obj, "__dlpack_device__")) {
    return fail(PyExc_TypeError,
                "argument '%s' must be an array that supports DLPack (torch.Tensor, numpy.ndarray, ...), got %s", name,
                Py_TYPE(obj)->tp_name);
  }
  PyObject *device = PyObject_CallMethod(obj, "__dlpack_device__", NULL);
  if (device == NULL) {
    return reraise_with_name(PyExc_TypeError, name, "has no usable __dlpack_device__");
  }
  long device_type = -1;
  if (PyTuple_Check(device) && PyTuple_GET_SIZE(device) == 2) {
    device_type = PyLong_AsLong(PyTuple_GET_ITEM(device, 0));
  }
  Py_DECREF(device);
  if (device_type == -1 && PyErr_Occurred()) {
    return reraise_with_name(PyExc_TypeError, name, "has a malformed __dlpack_device__");
  }
  /* CUDA: stream=-1, no cross-stream synchronisation; the kernel is launched on the
   * stream the caller passes, which is the stream producing these tensors. */
  PyObject *kwargs = device_type == kDLCUDA ? Py_BuildValue("{s:i}", "stream", -1) : NULL;
  PyObject *method = device_type != kDLCUDA || kwargs != NULL ? PyObject_GetAttrString(obj, "__dlpack__") : NULL;
  PyObject *no_args = method != NULL ? PyTuple_New(0) : NULL;
  arg->capsule = no_args != NULL ? PyObject_Call(method, no_args, kwargs) : NULL;
  Py_XDECREF(no_args);
  Py_XDECREF(method);
  Py_XDECREF(kwargs);
  if (arg->capsule == NULL) {
    return reraise_with_name(PyExc_TypeError, name, "could not be exported through DLPack");
  }
  DLManagedTensor *managed = (DLManagedTensor *)PyCapsule_GetPointer(arg->capsule, "dltensor");
  if (managed == NULL) {
    Py_CLEAR(arg->capsule);
    PyErr_Clear();
    return fail(PyExc_TypeError, "argument '%s': __dlpack__ did not return an unconsumed 'dltensor' capsule", name);
  }
  arg->tensor = &managed->dl_tensor;
  return 0;
}

static const char *dtype_name(DLDataType dtype) {
  switch (dtype.code) {
  case kDLFloat:
    return dtype.bits == 16 ? "float16" : dtype.bits == 32 ? "float32" : dtype.bits == 64 ? "float64" : "float";
  case kDLBfloat:
    return "bfloat16";
  case kDLInt:
    return "int";
  case kDLUInt:
    return "uint";
  case kDLBool:
    return "bool";
  case kDLComplex:
    return "complex";
  default:
    return "an unknown dtype";
  }
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
  if (type == kDLCPU || type == kDLCUDAHost || type == kDLCUDA) {
    return 0;
  }
  return fail(PyExc_ValueError, "argument '%s' lives on DLPack device type %d; napo supports CPU and CUDA", arg->name,
              (int)type);
}

/* A 1-D array: its length and element stride. */
static int vector_of(napo_arg *arg) {
  if (arg->tensor->ndim != 1) {
    return fail(PyExc_ValueError, "argument '%s' must be 1-D, got %d dimensions", arg->name, (int)arg->tensor->ndim);
  }
  arg->length = arg->tensor->shape[0];
  arg->stride = stride_of(arg->tensor, 0);
  return 0;
}

static int check_scalar(const napo_arg *arg) {
  int64_t n = 1;
  for (int32_t d = 0; d < arg->tensor->ndim; ++d) {
    n *= arg->tensor->shape[d];
  }
  if (n != 1 || arg->tensor->ndim > 1) {
    return fail(PyExc_ValueError,
                "argument '%s' must hold exactly one value (0-dim), got %d dimensions and %lld elements", arg->name,
                (int)arg->tensor->ndim, (long long)n);
  }
  return 0;
}

/* Margins of the loss: a 1-D vector is one term (one row), a 2-D array one term per row. */
static int margins_layout_of(napo_arg *arg) {
  const DLTensor *t = arg->tensor;
  if (t->ndim != 1 && t->ndim != 2) {
    return fail(PyExc_ValueError, "argument '%s' must be 1-D [batch] or 2-D [terms, batch], got %d dimensions",
                arg->name, (int)t->ndim);
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

static int check_same_shape(const napo_arg *other, const napo_arg *ref) {
  int same = other->tensor->ndim == ref->tensor->ndim;
  for (int32_t d = 0; same && d < ref->tensor->ndim; ++d) {
    same = other->tensor->shape[d] == ref->tensor->shape[d];
  }
  if (!same) {
    char want[64], got[64];
    shape_repr(ref->tensor, want, sizeof want);
    shape_repr(other->tensor, got, sizeof got);
    return fail(PyExc_ValueError, "argument '%s' must have the shape of '%s' %s, got %s", other->name, ref->name, want,
                got);
  }
  return 0;
}

static int check_output_vector(napo_arg *out, int64_t expected_length) {
  if (vector_of(out) != 0) {
    return -1;
  }
  if (out->length != expected_length) {
    return fail(PyExc_ValueError, "argument '%s' must have length %lld, got %lld", out->name,
                (long long)expected_length, (long long)out->length);
  }
  if (out->length > 1 && out->stride != 1) {
    return fail(PyExc_ValueError, "argument '%s' must be contiguous, got stride %lld", out->name,
                (long long)out->stride);
  }
  return 0;
}

static int raise_parameter(const char *name, double value, const char *requirement) {
  PyObject *boxed = PyFloat_FromDouble(value);
  if (boxed != NULL) {
    PyErr_Format(PyExc_ValueError, "%s must be %s, got %R", name, requirement, boxed);
    Py_DECREF(boxed);
  }
  return -1;
}

static int labels_of(napo_arg *arg, const napo_arg *logits) {
  const DLTensor *t = arg->tensor;
  const napo_logits_layout layout = logits->logits;
  if (t->dtype.code != kDLInt || t->dtype.bits != 64 || t->dtype.lanes != 1) {
    return fail(PyExc_TypeError, "argument '%s' must be int64, got %s with %d bits", arg->name, dtype_name(t->dtype),
                (int)t->dtype.bits);
  }
  if (t->ndim != 2 || t->shape[0] != layout.batch || t->shape[1] != layout.time) {
    return fail(PyExc_ValueError, "argument '%s' must have shape [batch, time] = (%lld, %lld) like '%s'", arg->name,
                (long long)layout.batch, (long long)layout.time, logits->name);
  }
  if (is_cuda(arg) != is_cuda(logits) || arg->tensor->device.device_id != logits->tensor->device.device_id) {
    return fail(PyExc_ValueError, "argument '%s' is not on the device of '%s'", arg->name, logits->name);
  }
  const napo_labels labels = {(const int64_t *)data_of(arg), stride_of(t, 0), stride_of(t, 1)};
  arg->labels = labels;
  return 0;
}

/* A compact [batch, time] float buffer of `bits` bits on the logits' device. */
static int check_row_buffer(const napo_arg *arg, const napo_arg *logits, int bits) {
  const DLTensor *t = arg->tensor;
  const napo_logits_layout layout = logits->logits;
  if (t->dtype.code != kDLFloat || t->dtype.bits != bits || t->dtype.lanes != 1) {
    return fail(PyExc_LookupError, "argument '%s' must be float%d (for %s logits), got %s", arg->name, bits,
                dtype_name(logits->tensor->dtype), dtype_name(t->dtype));
  }
  if (t->ndim != 2 || t->shape[0] != layout.batch || t->shape[1] != layout.time) {
    return fail(PyExc_ValueError, "argument '%s' must have shape (%lld, %lld)", arg->name, (long long)layout.batch,
                (long long)layout.time);
  }
  if (layout.batch * layout.time != 0 &&
      ((layout.time > 1 && stride_of(t, 1) != 1) || (layout.batch > 1 && stride_of(t, 0) != layout.time))) {
    return fail(PyExc_ValueError, "argument '%s' must be contiguous", arg->name);
  }
  if (is_cuda(arg) != is_cuda(logits) || arg->tensor->device.device_id != logits->tensor->device.device_id) {
    return fail(PyExc_ValueError, "argument '%s' is not on the device of '%s'", arg->name, logits->name);
  }
  return 0;
}

/* The lowest and highest element offsets a (checked) layout reaches from its data pointer. */
static void offset_range(napo_logits_layout layout, int64_t *lowest, int64_t *highest) {
  const int64_t sizes[3] = {layout.batch, layout.time, layout.vocab};
  const int64_t strides[3] = {layout.stride_b, layout.stride_t, layout.stride_v};
  *lowest = *highest = 0;
  for (int d = 0; d < 3; ++d) {
    const int64_t reach = sizes[d] > 1 ? strides[d] * (sizes[d] - 1) : 0;
    *lowest += reach < 0 ? reach : 0;
    *highest += reach > 0 ? reach : 0;
  }
}

/* grad_out is written, by several threads at once: no two of its elements may share memory (an
 * expanded array would get the sum of races), and it may share memory with the logits only by
 * being them (the in-place backward reads each row before writing it). Layouts the kernel's own
 * checks refuse are left to them. */
static int check_grad_out_memory(const napo_arg *grad, const napo_arg *logits) {
  const napo_logits_layout g = grad->logits, l = logits->logits;
  if (g.batch * g.time == 0 || napo_check_logits_layout(data_of(grad), g) != NAPO_OK ||
      napo_check_logits_layout(data_of(logits), l) != NAPO_OK) {
    return 0;
  }
  /* Sorted by |stride|, each dimension must step past all that the smaller ones span: enough to
   * prove that no two elements meet, and true of any contiguous, sliced or permuted array. */
  int64_t dims[3][2];
  int n = 0;
  const int64_t sizes[3] = {g.batch, g.time, g.vocab}, strides[3] = {g.stride_b, g.stride_t, g.stride_v};
  for (int d = 0; d < 3; ++d) {
    if (sizes[d] > 1) {
      int i = n++;
      for (; i > 0 && dims[i - 1][0] > (strides[d] < 0 ? -strides[d] : strides[d]); --i) {
        dims[i][0] = dims[i - 1][0];
        dims[i][1] = dims[i - 1][1];
      }
      dims[i][0] = strides[d] < 0 ? -strides[d] : strides[d];
      dims[i][1] = sizes[d];
    }
  }
  int64_t span = 0;
  for (int i = 0; i < n; ++i) {
    if (dims[i][0] <= span) {
      return fail(PyExc_ValueError,
                  "argument '%s' overlaps itself (shape (%lld, %lld, %lld), strides (%lld, %lld, %lld)): it is "
                  "written, so every element needs memory of its own",
                  grad->name, (long long)g.batch, (long long)g.time, (long long)g.vocab, (long long)g.stride_b,
                  (long long)g.stride_t, (long long)g.stride_v);
    }
    span += dims[i][0] * (dims[i][1] - 1);
  }
  const int same = data_of(grad) == data_of(logits) && g.stride_b == l.stride_b && g.stride_t == l.stride_t &&
                   g.stride_v == l.stride_v;
  const uintptr_t item = (uintptr_t)(grad->tensor->dtype.bits / 8);
  int64_t g_low, g_high, l_low, l_high;
  offset_range(g, &g_low, &g_high);
  offset_range(l, &l_low, &l_high);
  /* Byte ranges [first, end); unsigned arithmetic wraps negative offsets correctly. */
  const uintptr_t g_first = (uintptr_t)data_of(grad) + (uintptr_t)g_low * item;
  const uintptr_t g_end = (uintptr_t)data_of(grad) + (uintptr_t)(g_high + 1) * item;
  const uintptr_t l_first = (uintptr_t)data_of(logits) + (uintptr_t)l_low * item;
  const uintptr_t l_end = (uintptr_t)data_of(logits) + (uintptr_t)(l_high + 1) * item;
  if (!same && g_first < l_end && l_first < g_end) {
    return fail(PyExc_ValueError,
                "argument '%s' overlaps '%s' without being the same array: pass a separate buffer, or the "
                "logits themselves for an in-place backward",
                grad->name, logits->name);
  }
  return 0;
}

static int run_check(napo_call *c, check s) {
  napo_arg *a = &c->arg[s.a], *b = &c->arg[s.b];
  const DLTensor *t = a->tensor; /* argument 0, always an array, for the parameter checks */
  const DLDataType dtype = t->dtype;
  switch (s.op) {
  case FLOAT_DTYPE:
    a->f64 = dtype.bits == 64;
    if (dtype.lanes == 1 && dtype.code == kDLFloat && (dtype.bits == 32 || dtype.bits == 64)) {
      return 0;
    }
    if (dtype.lanes == 1 && (dtype.code == kDLFloat || dtype.code == kDLBfloat)) {
      return fail(PyExc_LookupError,
                  "argument '%s' has dtype %s; napo's C core computes in float32 or float64 (upcast first)", a->name,
                  dtype_name(dtype));
    }
    return fail(PyExc_TypeError, "argument '%s' must be a floating-point array, got dtype %s", a->name,
                dtype_name(dtype));
  case LOGITS_DTYPE:
    a->logits_dtype = dtype.bits == 32 ? NAPO_LOGITS_F32 : dtype.bits == 64 ? NAPO_LOGITS_F64 : NAPO_LOGITS_F16;
    a->logits_dtype = dtype.code == kDLBfloat ? NAPO_LOGITS_BF16 : a->logits_dtype;
    if (dtype.lanes == 1 && ((dtype.code == kDLFloat && (dtype.bits == 32 || dtype.bits == 64 || dtype.bits == 16)) ||
                             (dtype.code == kDLBfloat && dtype.bits == 16))) {
      return 0;
    }
    return fail(PyExc_TypeError, "argument '%s' must be float32, float64, bfloat16 or float16, got %s", a->name,
                dtype_name(dtype));
  case ON_DEVICE:
    return check_device_supported(a);
  case MARGINS:
    return margins_layout_of(a);
  case ROW_Q:
    a->stride = b->tensor->ndim == 1 || t->ndim != 1 ? 0 : stride_of(t, 0);
    if (b->tensor->ndim == 1) {
      return check_scalar(a);
    }
    if (t->ndim != 1 || t->shape[0] != b->layout.rows) {
      return fail(PyExc_ValueError,
                  "argument '%s' must be 1-D with one value per row of '%s' (%lld), got %d dimensions", a->name,
                  b->name, (long long)b->layout.rows, (int)t->ndim);
    }
    return 0;
  case SAME: {
    const DLDataType want = b->tensor->dtype;
    const DLDevice da = b->tensor->device, db = t->device;
    if (want.code != dtype.code || want.bits != dtype.bits || want.lanes != dtype.lanes) {
      return fail(PyExc_LookupError, "argument '%s' has dtype %s but '%s' has dtype %s; they must match", a->name,
                  dtype_name(dtype), b->name, dtype_name(want));
    }
    if (is_cuda(b) != is_cuda(a) || (is_cuda(b) && da.device_id != db.device_id)) {
      return fail(PyExc_ValueError, "argument '%s' is on device (%d, %d) but '%s' is on device (%d, %d)", a->name,
                  (int)db.device_type, (int)db.device_id, b->name, (int)da.device_type, (int)da.device_id);
    }
    return 0;
  }
  case SAME_SHAPE:
    return check_same_shape(a, b);
  case OUTPUT_LIKE: {
    if (check_same_shape(a, b) != 0 || margins_layout_of(a) != 0) {
      return -1;
    }
    /* An empty output has nothing to write: producers give it arbitrary strides. */
    const napo_layout out = a->layout;
    const int compact =
        out.rows == 0 || out.cols == 0 ||
        ((out.cols <= 1 || out.col_stride == 1) && (t->ndim == 1 || out.rows <= 1 || out.row_stride == out.cols));
    return compact ? 0 : fail(PyExc_ValueError, "argument '%s' must be contiguous", a->name);
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
    if (t->ndim > 1) {
      return fail(PyExc_ValueError, "argument '%s' must be 0-dim or 1-D, got %d dimensions", a->name, (int)t->ndim);
    }
    return t->ndim == 1 ? vector_of(a) : 0;
  case OUTPUT_OF_MEANS:
    return b->tensor->ndim == 1 ? check_output_vector(a, b->length) : check_scalar(a);
  case NONEMPTY:
    return a->length != 0 ? 0 : fail(PyExc_ValueError, "argument '%s' is empty; %s", a->name, c->entry->empty_hint);
  case BETA:
    return napo_check_loss_params(c->beta) == NAPO_OK ? 0 : raise_parameter("beta", c->beta, "a finite number > 0");
  case Q_PARAMS:
    if (!(isfinite(c->gamma) && c->gamma > 0.0)) {
      return raise_parameter("gamma", c->gamma, "a finite number > 0");
    }
    if (!(c->q_min >= 0.0 && c->q_min <= 1.0)) {
      return raise_parameter("q_min", c->q_min, "in [0, 1]");
    }
    return c->q_max >= c->q_min && c->q_max <= 1.0 ? 0 : raise_parameter("q_max", c->q_max, "in [q_min, 1]");
  case WEIGHT_PARAMS:
    if (!(c->w_min >= 0.0 && c->w_min <= 1.0)) {
      return raise_parameter("w_min", c->w_min, "in [0, 1]");
    }
    return isfinite(c->eps) && c->eps >= 0.0 ? 0 : raise_parameter("eps", c->eps, "a finite number >= 0");
  case LOGITS_LAYOUT: {
    if (t->ndim != 3) {
      return fail(PyExc_ValueError, "argument '%s' must be 3-D [batch, time, vocab], got %d dimensions", a->name,
                  (int)t->ndim);
    }
    const napo_logits_layout layout = {t->shape[0],     t->shape[1],     t->shape[2],
                                       stride_of(t, 0), stride_of(t, 1), stride_of(t, 2)};
    a->logits = layout;
    return layout.vocab >= 1 ? 0 : fail(PyExc_ValueError, "argument '%s' has an empty vocabulary dimension", a->name);
  }
  case LABELS:
    return labels_of(a, b);
  case TOKEN_BUFFER:
    return check_row_buffer(a, b, b->logits_dtype == NAPO_LOGITS_F64 ? 64 : 32);
  case LSE_BUFFER:
    return check_row_buffer(a, b, 64);
  case GRAD_MEMORY:
    return check_grad_out_memory(a, b);
  case STANDALONE_LABELS: {
    if (t->ndim != 2) {
      return fail(PyExc_ValueError, "argument '%s' must be 2-D [batch, time], got %d dimensions", a->name,
                  (int)t->ndim);
    }
    if (is_cuda(a) || check_device_supported(a)) {
      return PyErr_Occurred() ? -1
                              : fail(PyExc_ValueError, "argument '%s' must be on the CPU for check_labels", a->name);
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

/* Turns a kernel status into the matching Python exception; 0 when ok. */
static int raise_status(const napo_call *c, napo_status status) {
  const napo_arg *q = NULL;
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
      PyErr_SetString(PyExc_ValueError, "q must be in [0, 1]");
      return -1;
    }
    return raise_parameter(
        "q", q->tensor->dtype.bits == 32 ? (double)*(const float *)data_of(q) : *(const double *)data_of(q),
        "in [0, 1]");
  case NAPO_ERR_CUDA: {
    const int code = c->cuda_error & ~NAPO_CUDA_FOREIGN_ERROR;
#ifdef NAPO_WITH_CUDA
    const char *what = napo_cuda_error_string(code);
#else
    const char *what = "unknown";
#endif
    if (c->cuda_error & NAPO_CUDA_FOREIGN_ERROR) {
      return fail(PyExc_RuntimeError,
                  "a CUDA error was already pending before napo's kernel launch, left by earlier CUDA work (not by "
                  "napo; napo did not launch): %s (CUDA error %d). NAPO_CUDA_DEBUG=1 and CUDA_LAUNCH_BLOCKING=1 help "
                  "find its source.",
                  what, code);
    }
    return fail(PyExc_RuntimeError, "napo CUDA kernel failed: %s (CUDA error %d)", what, code);
  }
  case NAPO_ERR_NO_CUDA:
    return fail(PyExc_RuntimeError,
                "napo was built without CUDA kernels; rebuild with nvcc on PATH (NAPO_CUDA=1) to use CUDA tensors");
  default:
    return fail(PyExc_ValueError, "napo: %s", napo_status_message(status));
  }
}

/* ---- the kernels, one per entry point; arguments by position ---- */

#define CPU_KERNEL(arg, kernel, ...) ((arg)->f64 ? kernel##_f64(__VA_ARGS__) : kernel##_f32(__VA_ARGS__))
#ifdef NAPO_WITH_CUDA
#define CUDA_KERNEL(arg, kernel, ...) ((arg)->f64 ? kernel##_f64_cuda(__VA_ARGS__) : kernel##_f32_cuda(__VA_ARGS__))
#define CUDA_CALL(call) (call)
#else
#define CUDA_KERNEL(arg, kernel, ...) NAPO_ERR_NO_CUDA
#define CUDA_CALL(call) NAPO_ERR_NO_CUDA
#endif
#define CUDA_ARGS(arg) (int)(arg)->tensor->device.device_id, (void *)(uintptr_t)c->stream, &c->cuda_error
#define DATA(i) data_of(&c->arg[i])

static int clamp_threads(long long requested) { return requested < 1 ? 1 : requested > 64 ? 64 : (int)requested; }

static napo_status run_loss_forward(napo_call *c, int on_cuda) {
  const napo_arg *m = &c->arg[0];
  void *grad = c->arg[4].tensor != NULL ? DATA(4) : NULL;
  return on_cuda
             ? CUDA_KERNEL(m, napo_loss_forward, DATA(0), m->layout, DATA(1), c->arg[1].stride, c->beta, DATA(3), grad,
                           CUDA_ARGS(m))
             : CPU_KERNEL(m, napo_loss_forward, DATA(0), m->layout, DATA(1), c->arg[1].stride, c->beta, DATA(3), grad);
}

static napo_status run_loss_backward(napo_call *c, int on_cuda) {
  const napo_arg *factor = &c->arg[1];
  return on_cuda
             ? CUDA_KERNEL(factor, napo_loss_backward, DATA(0), c->arg[0].layout, DATA(1), DATA(2), CUDA_ARGS(factor))
             : CPU_KERNEL(factor, napo_loss_backward, DATA(0), c->arg[0].layout, DATA(1), DATA(2));
}

static napo_status run_adaptive_q(napo_call *c, int on_cuda) {
  const napo_arg *m = &c->arg[0];
  return on_cuda ? CUDA_KERNEL(m, napo_adaptive_q, DATA(0), m->stride, m->length, c->gamma, c->q_min, c->q_max, DATA(4),
                               CUDA_ARGS(m))
                 : CPU_KERNEL(m, napo_adaptive_q, DATA(0), m->stride, m->length, c->gamma, c->q_min, c->q_max, DATA(4));
}

static napo_status run_q_from_mean(napo_call *c, int on_cuda) {
  const napo_arg *m = &c->arg[0];
  return on_cuda
             ? CUDA_KERNEL(m, napo_q_from_mean, DATA(0), m->length, m->stride, c->gamma, c->q_min, c->q_max, DATA(4),
                           CUDA_ARGS(m))
             : CPU_KERNEL(m, napo_q_from_mean, DATA(0), m->length, m->stride, c->gamma, c->q_min, c->q_max, DATA(4));
}

static napo_status run_dynamic_weights(napo_call *c, int on_cuda) {
  const napo_arg *m = &c->arg[0];
  return on_cuda ? CUDA_KERNEL(m, napo_dynamic_weights, DATA(0), m->stride, m->length, c->w_min, c->eps, DATA(3),
                               CUDA_ARGS(m))
                 : CPU_KERNEL(m, napo_dynamic_weights, DATA(0), m->stride, m->length, c->w_min, c->eps, DATA(3));
}

static napo_status run_token_logps(napo_call *c, int on_cuda) {
  const napo_arg *l = &c->arg[0];
  return on_cuda ? CUDA_CALL(napo_token_logps_cuda(DATA(0), l->logits, l->logits_dtype, c->arg[1].labels,
                                                   c->ignore_index, DATA(3), DATA(4), CUDA_ARGS(l)))
                 : napo_token_logps(DATA(0), l->logits, l->logits_dtype, c->arg[1].labels, c->ignore_index, DATA(3),
                                    DATA(4), clamp_threads(c->num_threads), &c->bad);
}

static napo_status run_token_logps_backward(napo_call *c, int on_cuda) {
  const napo_arg *l = &c->arg[0];
  return on_cuda ? CUDA_CALL(napo_token_logps_backward_cuda(DATA(0), l->logits, l->logits_dtype, c->arg[1].labels,
                                                            c->ignore_index, DATA(3), DATA(4), DATA(5),
                                                            c->arg[5].logits, CUDA_ARGS(l)))
                 : napo_token_logps_backward(DATA(0), l->logits, l->logits_dtype, c->arg[1].labels, c->ignore_index,
                                             DATA(3), DATA(4), DATA(5), c->arg[5].logits, clamp_threads(c->num_threads),
                                             &c->bad);
}

static napo_status run_check_labels(napo_call *c, int on_cuda) {
  (void)on_cuda; /* STANDALONE_LABELS refuses CUDA labels */
  const napo_logits_layout shape = c->arg[0].logits;
  return napo_check_labels(c->arg[0].labels, shape.batch, shape.time, c->vocab, c->ignore_index, &c->bad);
}

/* ---- the table: each entry point's arguments (in Python's order), checks (in order) and kernel ---- */

#define ARRAY(name) {name, ARG_ARRAY, 0}
#define OPTIONAL_ARRAY(name) {name, ARG_OPTIONAL_ARRAY, 0}
#define REAL(field) {#field, ARG_REAL, offsetof(napo_call, field)}
#define INTEGER(field) {#field, ARG_INTEGER, offsetof(napo_call, field)}
#define STREAM {"stream", ARG_STREAM, offsetof(napo_call, stream)}

// clang-format off
static entry_point loss_forward_entry = {.name = "loss_forward", .required = 4, .run = run_loss_forward,
    .args = {ARRAY("margins"), ARRAY("q"), REAL(beta), ARRAY("out"), OPTIONAL_ARRAY("grad_out"), STREAM},
    .checks = {{FLOAT_DTYPE, 0, 0}, {ON_DEVICE, 0, 0}, {MARGINS, 0, 0}, {SAME, 1, 0}, {ROW_Q, 1, 0}, {SAME, 3, 0},
               {OUTPUT_LIKE, 3, 0}, {SAME, 4, 0}, {OUTPUT_LIKE, 4, 0}, {BETA, 0, 0}}};

static entry_point loss_backward_entry = {.name = "loss_backward", .required = 3, .run = run_loss_backward,
    .args = {ARRAY("grad_loss"), ARRAY("grad_factor"), ARRAY("out"), STREAM}, .device_arg = 1,
    .checks = {{FLOAT_DTYPE, 1, 0}, {ON_DEVICE, 1, 0}, {MARGINS, 1, 0}, {SAME, 0, 1}, {SAME_SHAPE, 0, 1},
               {MARGINS, 0, 0}, {OUTPUT_LIKE, 1, 1}, {SAME, 2, 1}, {OUTPUT_LIKE, 2, 1}}};

static entry_point adaptive_q_entry = {.name = "adaptive_q", .required = 5, .run = run_adaptive_q,
    .args = {ARRAY("margins"), REAL(gamma), REAL(q_min), REAL(q_max), ARRAY("out"), STREAM},
    .checks = {{FLOAT_DTYPE, 0, 0}, {ON_DEVICE, 0, 0}, {VECTOR, 0, 0}, {SAME, 4, 0}, {SCALAR, 4, 0},
               {Q_PARAMS, 0, 0}, {NONEMPTY, 0, 0}},
    .empty_hint = "adaptive q needs the mean of at least one margin"};

static entry_point q_from_mean_entry = {.name = "q_from_mean", .required = 5, .run = run_q_from_mean,
    .args = {ARRAY("means"), REAL(gamma), REAL(q_min), REAL(q_max), ARRAY("out"), STREAM},
    .checks = {{FLOAT_DTYPE, 0, 0}, {ON_DEVICE, 0, 0}, {SAME, 4, 0}, {Q_PARAMS, 0, 0}, {MEANS, 0, 0},
               {OUTPUT_OF_MEANS, 4, 0}}};

static entry_point dynamic_weights_entry = {.name = "dynamic_weights", .required = 4, .run = run_dynamic_weights,
    .args = {ARRAY("reward_margins"), REAL(w_min), REAL(eps), ARRAY("out"), STREAM},
    .checks = {{FLOAT_DTYPE, 0, 0}, {ON_DEVICE, 0, 0}, {VECTOR, 0, 0}, {SAME, 3, 0}, {OUTPUT_VECTOR, 3, 0},
               {WEIGHT_PARAMS, 0, 0}, {NONEMPTY, 0, 0}},
    .empty_hint = "dynamic weights need K >= 1 loss terms"};

static entry_point token_logps_entry = {.name = "token_logps", .required = 5, .run = run_token_logps,
    .args = {ARRAY("logits"), ARRAY("labels"), INTEGER(ignore_index), ARRAY("token_out"), ARRAY("lse_out"),
             INTEGER(num_threads), INTEGER(position_offset), STREAM},
    .checks = {{LOGITS_DTYPE, 0, 0}, {ON_DEVICE, 0, 0}, {LOGITS_LAYOUT, 0, 0}, {LABELS, 1, 0}, {TOKEN_BUFFER, 3, 0},
               {LSE_BUFFER, 4, 0}}};

static entry_point token_logps_backward_entry = {.name = "token_logps_backward", .required = 6,
    .run = run_token_logps_backward,
    .args = {ARRAY("logits"), ARRAY("labels"), INTEGER(ignore_index), ARRAY("lse"), ARRAY("grad_token"),
             ARRAY("grad_out"), INTEGER(num_threads), STREAM},
    .checks = {{LOGITS_DTYPE, 0, 0}, {ON_DEVICE, 0, 0}, {LOGITS_LAYOUT, 0, 0}, {LABELS, 1, 0}, {LSE_BUFFER, 3, 0},
               {TOKEN_BUFFER, 4, 0}, {LOGITS_DTYPE, 5, 0}, {SAME, 5, 0}, {SAME_SHAPE, 5, 0}, {LOGITS_LAYOUT, 5, 0},
               {GRAD_MEMORY, 5, 0}}};

static entry_point check_labels_entry = {.name = "check_labels", .required = 3, .run = run_check_labels,
    .args = {ARRAY("labels"), INTEGER(vocab), INTEGER(ignore_index), INTEGER(position_offset)},
    .checks = {{STANDALONE_LABELS, 0, 0}}};
// clang-format on

/* ---- the generic path ---- */

typedef int (*converter)(PyObject *, void *);

static int to_object(PyObject *obj, void *out) {
  *(PyObject **)out = obj;
  return 1;
}

static int to_real(PyObject *obj, void *out) { /* PyArg's "d" */
  *(double *)out = PyFloat_AsDouble(obj);
  return !(*(double *)out == -1.0 && PyErr_Occurred());
}

static int to_integer(PyObject *obj, void *out) { /* PyArg's "L" */
  *(long long *)out = PyLong_AsLongLong(obj);
  return !(*(long long *)out == -1 && PyErr_Occurred());
}

static int to_stream(PyObject *obj, void *out) { /* PyArg's "K", with its message */
  if (!PyLong_Check(obj)) {
    const entry_point *e = ((const napo_call *)(void *)((char *)out - offsetof(napo_call, stream)))->entry;
    int position = 1;
    while (e->args[position - 1].kind != ARG_STREAM) {
      ++position;
    }
    fail(PyExc_TypeError, "%.200s() argument %d must be int, not %.50s", e->name, position,
         obj == Py_None ? "None" : Py_TYPE(obj)->tp_name);
    return 0;
  }
  *(unsigned long long *)out = PyLong_AsUnsignedLongLongMask(obj);
  return 1;
}

/* Exports the arrays, then runs the checks; an optional array not given skips the checks naming it. */
static int validate(napo_call *c, int n) {
  const entry_point *e = c->entry;
  for (int i = 0; i < n; ++i) {
    const arg_kind kind = e->args[i].kind;
    if ((kind == ARG_ARRAY || (kind == ARG_OPTIONAL_ARRAY && c->object[i] != Py_None)) &&
        acquire(c->object[i], e->args[i].name, &c->arg[i]) != 0) {
      return -1;
    }
  }
  for (const check *s = e->checks; s->op != END; ++s) {
    const int absent = (e->args[s->a].kind == ARG_OPTIONAL_ARRAY && c->arg[s->a].tensor == NULL) ||
                       (e->args[s->b].kind == ARG_OPTIONAL_ARRAY && c->arg[s->b].tensor == NULL);
    if (!absent && run_check(c, *s) != 0) {
      return -1;
    }
  }
  return 0;
}

static PyObject *call_entry(const entry_point *e, PyObject *args, PyObject *kwargs) {
  napo_call c;
  memset(&c, 0, sizeof c);
  c.entry = e;
  converter convert[MAX_ARGS] = {0};
  void *into[MAX_ARGS] = {0};
  int n = 0;
  for (; n < MAX_ARGS && e->args[n].name != NULL; ++n) {
    const arg_kind kind = e->args[n].kind;
    c.object[n] = Py_None;
    convert[n] = kind == ARG_REAL      ? to_real
                 : kind == ARG_INTEGER ? to_integer
                 : kind == ARG_STREAM  ? to_stream
                                       : to_object;
    into[n] = kind == ARG_ARRAY || kind == ARG_OPTIONAL_ARRAY ? (void *)&c.object[n] : (char *)&c + e->args[n].value;
  }
  if (!PyArg_ParseTupleAndKeywords(args, kwargs, e->format, (char **)e->keywords, convert[0], into[0], convert[1],
                                   into[1], convert[2], into[2], convert[3], into[3], convert[4], into[4], convert[5],
                                   into[5], convert[6], into[6], convert[7], into[7])) {
    return NULL;
  }
  PyObject *result = NULL;
  if (validate(&c, n) == 0) {
    napo_status status;
    if (is_cuda(&c.arg[e->device_arg])) {
      status = e->run(&c, 1);
    } else {
      Py_BEGIN_ALLOW_THREADS;
      status = e->run(&c, 0);
      Py_END_ALLOW_THREADS;
    }
    result = raise_status(&c, status) == 0 ? Py_NewRef(Py_None) : NULL;
  }
  for (int i = n; i-- > 0;) {
    Py_CLEAR(c.arg[i].capsule);
  }
  return result;
}

/* PyArg's format ("O&O&|O&:name", one converter per argument) and keyword list, from the table. */
static void prepare(entry_point *e) {
  char *format = e->format;
  for (int i = 0; i < MAX_ARGS && e->args[i].name != NULL; ++i) {
    format += sprintf(format, "%sO&", i == e->required ? "|" : "");
    e->keywords[i] = (char *)e->args[i].name;
  }
  snprintf(format, sizeof e->format - (size_t)(format - e->format), ":%s", e->name);
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
  (void)self;
  (void)unused;
#ifdef NAPO_WITH_CUDA
  Py_RETURN_TRUE;
#else
  Py_RETURN_FALSE;
#endif
}

static PyObject *py_cuda_available(PyObject *self, PyObject *unused) {
  (void)self;
  (void)unused;
#ifdef NAPO_WITH_CUDA
  return PyBool_FromLong(napo_cuda_available());
#else
  Py_RETURN_FALSE;
#endif
}

static PyObject *py_cuda_runtime_info(PyObject *self, PyObject *unused) {
  (void)self;
  (void)unused;
#ifdef NAPO_WITH_CUDA
  int cuda_error = 0;
  const int count = napo_cuda_device_count(&cuda_error);
  if (cuda_error != 0) {
    return Py_BuildValue("{s:i,s:i,s:i,s:s}", "runtime_version", napo_cuda_runtime_version(), "driver_version",
                         napo_cuda_driver_version(), "device_count", count, "error",
                         napo_cuda_error_string(cuda_error));
  }
  return Py_BuildValue("{s:i,s:i,s:i,s:O}", "runtime_version", napo_cuda_runtime_version(), "driver_version",
                       napo_cuda_driver_version(), "device_count", count, "error", Py_None);
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
#ifdef NAPO_WITH_CUDA
  napo_cuda_set_debug(enabled);
#endif
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

static struct PyModuleDef napo_module = {
    PyModuleDef_HEAD_INIT,
    "napo._C",
    "napo's C core (NaPO objective kernels), called through DLPack.",
    0,
    napo_methods,
    NULL,
    NULL,
    NULL,
    NULL,
};

#define PREPARE(name) prepare(&name##_entry);

PyMODINIT_FUNC PyInit__C(void) {
  ENTRY_POINTS(PREPARE)
  PyObject *module = PyModule_Create(&napo_module);
  if (module != NULL && PyModule_AddIntConstant(module, "ABI_VERSION", 2) != 0) {
    Py_CLEAR(module);
  }
  return module;
}
