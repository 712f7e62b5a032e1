/*
 * napo._C: the CPython binding of the C core.
 *
 * Arrays arrive as any object speaking DLPack (torch.Tensor, numpy.ndarray,
 * ...). Each is exported once into a small napo_arg, checked (dtype, rank,
 * shape, device, compactness of outputs), then the C kernel runs with the GIL
 * released. Errors name the argument and the value: TypeError for types,
 * ValueError for shapes and values, LookupError for dtypes the core does not
 * compute in (bf16/fp16 are upcast by the caller). Outputs are passed in by
 * the caller, which owns the allocator (torch's caching allocator on CUDA).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <math.h>
#include <stdint.h>
#include <stdio.h>

#include "dlpack.h"
#include "napo.h"

typedef struct {
  const char *name;  /* the Python argument name, for messages */
  PyObject *capsule; /* owns the export; its destructor calls the producer's deleter */
  DLTensor *tensor;
} napo_arg;

typedef enum { DTYPE_F32, DTYPE_F64 } arg_dtype;

static void release(napo_arg *arg) {
  Py_CLEAR(arg->capsule);
  arg->tensor = NULL;
}

/* Re-raise the pending exception as `type`, prefixed with the argument name,
 * keeping the original as __cause__. */
static void reraise_with_name(PyObject *type, const char *name, const char *what) {
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
    return;
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
}

static int acquire(PyObject *obj, const char *name, napo_arg *arg) {
  arg->name = name;
  arg->capsule = NULL;
  arg->tensor = NULL;
  if (PyCapsule_CheckExact(obj)) {
    /* A capsule from torch.utils.dlpack.to_dlpack (napo's own fast path: it
     * skips two Python-level method calls per tensor). Borrowed, not consumed:
     * its producer's deleter still runs when the caller drops it. */
    DLManagedTensor *managed = (DLManagedTensor *)PyCapsule_GetPointer(obj, "dltensor");
    if (managed == NULL) {
      PyErr_Clear();
      PyErr_Format(PyExc_TypeError, "argument '%s' is a capsule but not an unconsumed 'dltensor' capsule", name);
      return -1;
    }
    arg->capsule = Py_NewRef(obj);
    arg->tensor = &managed->dl_tensor;
    return 0;
  }
  if (!PyObject_HasAttrString(obj, "__dlpack__") || !PyObject_HasAttrString(obj, "__dlpack_device__")) {
    PyErr_Format(PyExc_TypeError,
                 "argument '%s' must be an array that supports DLPack (torch.Tensor, numpy.ndarray, ...), got %s", name,
                 Py_TYPE(obj)->tp_name);
    return -1;
  }
  PyObject *device = PyObject_CallMethod(obj, "__dlpack_device__", NULL);
  if (device == NULL) {
    reraise_with_name(PyExc_TypeError, name, "has no usable __dlpack_device__");
    return -1;
  }
  long device_type = -1;
  if (PyTuple_Check(device) && PyTuple_GET_SIZE(device) == 2) {
    device_type = PyLong_AsLong(PyTuple_GET_ITEM(device, 0));
  }
  Py_DECREF(device);
  if (device_type == -1 && PyErr_Occurred()) {
    reraise_with_name(PyExc_TypeError, name, "has a malformed __dlpack_device__");
    return -1;
  }
  if (device_type == kDLCUDA) {
    /* stream=-1: no cross-stream synchronisation; the kernel is launched on the
     * stream the caller passes, which is the stream producing these tensors. */
    PyObject *kwargs = Py_BuildValue("{s:i}", "stream", -1);
    PyObject *method = kwargs != NULL ? PyObject_GetAttrString(obj, "__dlpack__") : NULL;
    PyObject *no_args = method != NULL ? PyTuple_New(0) : NULL;
    arg->capsule = no_args != NULL ? PyObject_Call(method, no_args, kwargs) : NULL;
    Py_XDECREF(no_args);
    Py_XDECREF(method);
    Py_XDECREF(kwargs);
  } else {
    arg->capsule = PyObject_CallMethod(obj, "__dlpack__", NULL);
  }
  if (arg->capsule == NULL) {
    reraise_with_name(PyExc_TypeError, name, "could not be exported through DLPack");
    return -1;
  }
  DLManagedTensor *managed = (DLManagedTensor *)PyCapsule_GetPointer(arg->capsule, "dltensor");
  if (managed == NULL) {
    release(arg);
    PyErr_Clear();
    PyErr_Format(PyExc_TypeError, "argument '%s': __dlpack__ did not return an unconsumed 'dltensor' capsule", name);
    return -1;
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

static int arg_dtype_of(const napo_arg *arg, arg_dtype *out) {
  const DLDataType dtype = arg->tensor->dtype;
  if (dtype.lanes == 1 && dtype.code == kDLFloat && (dtype.bits == 32 || dtype.bits == 64)) {
    *out = dtype.bits == 32 ? DTYPE_F32 : DTYPE_F64;
    return 0;
  }
  if (dtype.lanes == 1 && (dtype.code == kDLFloat || dtype.code == kDLBfloat)) {
    PyErr_Format(PyExc_LookupError,
                 "argument '%s' has dtype %s; napo's C core computes in float32 or float64 (upcast first)", arg->name,
                 dtype_name(dtype));
  } else {
    PyErr_Format(PyExc_TypeError, "argument '%s' must be a floating-point array, got dtype %s", arg->name,
                 dtype_name(dtype));
  }
  return -1;
}

static int check_device_supported(const napo_arg *arg) {
  const int32_t type = arg->tensor->device.device_type;
  if (type == kDLCPU || type == kDLCUDAHost || type == kDLCUDA) {
    return 0;
  }
  PyErr_Format(PyExc_ValueError, "argument '%s' lives on DLPack device type %d; napo supports CPU and CUDA", arg->name,
               (int)type);
  return -1;
}

static int is_cuda(const napo_arg *arg) { return arg->tensor->device.device_type == kDLCUDA; }

static int64_t numel(const napo_arg *arg) {
  int64_t n = 1;
  for (int32_t d = 0; d < arg->tensor->ndim; ++d) {
    n *= arg->tensor->shape[d];
  }
  return n;
}

static void *data_of(const napo_arg *arg) { return (char *)arg->tensor->data + arg->tensor->byte_offset; }

/* A 1-D input: its length and element stride (DLPack's NULL strides mean compact). */
static int vector_of(const napo_arg *arg, int64_t *length, int64_t *stride) {
  if (arg->tensor->ndim != 1) {
    PyErr_Format(PyExc_ValueError, "argument '%s' must be 1-D, got %d dimensions", arg->name, (int)arg->tensor->ndim);
    return -1;
  }
  *length = arg->tensor->shape[0];
  *stride = arg->tensor->strides != NULL ? arg->tensor->strides[0] : 1;
  return 0;
}

static int check_scalar(const napo_arg *arg) {
  if (numel(arg) != 1 || arg->tensor->ndim > 1) {
    PyErr_Format(PyExc_ValueError,
                 "argument '%s' must hold exactly one value (0-dim), got %d dimensions and %lld elements", arg->name,
                 (int)arg->tensor->ndim, (long long)numel(arg));
    return -1;
  }
  return 0;
}

/* Margins of the loss: a 1-D vector is one term (one row), a 2-D array one term per row. */
static int layout_of(const napo_arg *arg, napo_layout *layout) {
  const DLTensor *t = arg->tensor;
  if (t->ndim == 1) {
    layout->rows = 1;
    layout->cols = t->shape[0];
    layout->row_stride = 0;
    layout->col_stride = t->strides != NULL ? t->strides[0] : 1;
    return 0;
  }
  if (t->ndim == 2) {
    layout->rows = t->shape[0];
    layout->cols = t->shape[1];
    layout->row_stride = t->strides != NULL ? t->strides[0] : t->shape[1];
    layout->col_stride = t->strides != NULL ? t->strides[1] : 1;
    return 0;
  }
  PyErr_Format(PyExc_ValueError, "argument '%s' must be 1-D [batch] or 2-D [terms, batch], got %d dimensions",
               arg->name, (int)t->ndim);
  return -1;
}

/* q: one value for 1-D margins, one per row for 2-D margins; returns its element stride. */
static int row_q_of(const napo_arg *q, const napo_arg *margins, int64_t rows, int64_t *q_stride) {
  if (margins->tensor->ndim == 1) {
    *q_stride = 0;
    return check_scalar(q);
  }
  if (q->tensor->ndim != 1 || q->tensor->shape[0] != rows) {
    PyErr_Format(PyExc_ValueError, "argument '%s' must be 1-D with one value per row of '%s' (%lld), got %d dimensions",
                 q->name, margins->name, (long long)rows, (int)q->tensor->ndim);
    return -1;
  }
  *q_stride = q->tensor->strides != NULL ? q->tensor->strides[0] : 1;
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

/* `other` has the same dimensions and shape as `ref` (a 1-D or 2-D margins array). */
static int check_same_shape(const napo_arg *ref, const napo_arg *other) {
  int same = other->tensor->ndim == ref->tensor->ndim;
  for (int32_t d = 0; same && d < ref->tensor->ndim; ++d) {
    same = other->tensor->shape[d] == ref->tensor->shape[d];
  }
  if (!same) {
    char want[64], got[64];
    shape_repr(ref->tensor, want, sizeof want);
    shape_repr(other->tensor, got, sizeof got);
    PyErr_Format(PyExc_ValueError, "argument '%s' must have the shape of '%s' %s, got %s", other->name, ref->name, want,
                 got);
    return -1;
  }
  return 0;
}

/* An output shaped like `ref` and compact (row-major, no gaps). */
static int check_output_like(const napo_arg *out, const napo_arg *ref) {
  if (check_same_shape(ref, out) != 0) {
    return -1;
  }
  napo_layout layout;
  if (layout_of(out, &layout) != 0) {
    return -1;
  }
  /* An empty output has nothing to write: producers give it arbitrary strides. */
  const int compact = layout.rows == 0 || layout.cols == 0 ||
                      ((layout.cols <= 1 || layout.col_stride == 1) &&
                       (out->tensor->ndim == 1 || layout.rows <= 1 || layout.row_stride == layout.cols));
  if (!compact) {
    PyErr_Format(PyExc_ValueError, "argument '%s' must be contiguous", out->name);
    return -1;
  }
  return 0;
}

/* `other` must match `ref` in dtype and device; outputs must also be compact. */
static int check_same(const napo_arg *ref, const napo_arg *other) {
  const DLDataType a = ref->tensor->dtype, b = other->tensor->dtype;
  if (a.code != b.code || a.bits != b.bits || a.lanes != b.lanes) {
    PyErr_Format(PyExc_LookupError, "argument '%s' has dtype %s but '%s' has dtype %s; they must match", other->name,
                 dtype_name(b), ref->name, dtype_name(a));
    return -1;
  }
  const DLDevice da = ref->tensor->device, db = other->tensor->device;
  if (is_cuda(ref) != is_cuda(other) || (is_cuda(ref) && da.device_id != db.device_id)) {
    PyErr_Format(PyExc_ValueError, "argument '%s' is on device (%d, %d) but '%s' is on device (%d, %d)", other->name,
                 (int)db.device_type, (int)db.device_id, ref->name, (int)da.device_type, (int)da.device_id);
    return -1;
  }
  return 0;
}

static int check_output_vector(const napo_arg *out, int64_t expected_length) {
  int64_t length = 0, stride = 0;
  if (vector_of(out, &length, &stride) != 0) {
    return -1;
  }
  if (length != expected_length) {
    PyErr_Format(PyExc_ValueError, "argument '%s' must have length %lld, got %lld", out->name,
                 (long long)expected_length, (long long)length);
    return -1;
  }
  if (length > 1 && stride != 1) {
    PyErr_Format(PyExc_ValueError, "argument '%s' must be contiguous, got stride %lld", out->name, (long long)stride);
    return -1;
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

static int check_beta(double beta) {
  return napo_check_loss_params(beta) == NAPO_OK ? 0 : raise_parameter("beta", beta, "a finite number > 0");
}

static int check_q_params(double gamma, double q_min, double q_max) {
  if (!(isfinite(gamma) && gamma > 0.0)) {
    return raise_parameter("gamma", gamma, "a finite number > 0");
  }
  if (!(q_min >= 0.0 && q_min <= 1.0)) {
    return raise_parameter("q_min", q_min, "in [0, 1]");
  }
  if (!(q_max >= q_min && q_max <= 1.0)) {
    return raise_parameter("q_max", q_max, "in [q_min, 1]");
  }
  return 0;
}

static int check_weight_params(double w_min, double eps) {
  if (!(w_min >= 0.0 && w_min <= 1.0)) {
    return raise_parameter("w_min", w_min, "in [0, 1]");
  }
  if (!(isfinite(eps) && eps >= 0.0)) {
    return raise_parameter("eps", eps, "a finite number >= 0");
  }
  return 0;
}

/* Turns a kernel status into the matching Python exception; 0 when ok. */
static int raise_status(napo_status status, int cuda_error, const napo_arg *q) {
  switch (status) {
  case NAPO_OK:
    return 0;
  case NAPO_ERR_Q_RANGE: {
    if (is_cuda(q)) { /* never dereference device memory on the host */
      PyErr_SetString(PyExc_ValueError, "q must be in [0, 1]");
      return -1;
    }
    const double value = q->tensor->dtype.bits == 32 ? (double)*(const float *)data_of(q) : *(const double *)data_of(q);
    return raise_parameter("q", value, "in [0, 1]");
  }
  case NAPO_ERR_CUDA: {
    const int code = cuda_error & ~NAPO_CUDA_FOREIGN_ERROR;
#ifdef NAPO_WITH_CUDA
    const char *what = napo_cuda_error_string(code);
#else
    const char *what = "unknown";
#endif
    if (cuda_error & NAPO_CUDA_FOREIGN_ERROR) {
      PyErr_Format(PyExc_RuntimeError,
                   "a CUDA error was already pending before napo's kernel launch, left by earlier CUDA work (not by "
                   "napo; napo did not launch): %s (CUDA error %d). NAPO_CUDA_DEBUG=1 and CUDA_LAUNCH_BLOCKING=1 help "
                   "find its source.",
                   what, code);
    } else {
      PyErr_Format(PyExc_RuntimeError, "napo CUDA kernel failed: %s (CUDA error %d)", what, code);
    }
    return -1;
  }
  case NAPO_ERR_NO_CUDA:
    PyErr_SetString(PyExc_RuntimeError,
                    "napo was built without CUDA kernels; rebuild with nvcc on PATH (NAPO_CUDA=1) to use CUDA tensors");
    return -1;
  default:
    PyErr_Format(PyExc_ValueError, "napo: %s", napo_status_message(status));
    return -1;
  }
}

#ifdef NAPO_WITH_CUDA
#define NAPO_CUDA_CALL(call) (call)
#else
#define NAPO_CUDA_CALL(call) NAPO_ERR_NO_CUDA
#endif

#define NAPO_CUDA_ARGS(arg) (int)(arg).tensor->device.device_id, (void *)(uintptr_t)stream, &cuda_error

/* ------------------------------------------------------------------ */

PyDoc_STRVAR(loss_forward_doc, "loss_forward(margins, q, beta, out, grad_out=None, stream=0)\n--\n\n"
                               "Per-pair NaPO loss into `out` and, if given, dL/dmargins into `grad_out`.\n"
                               "margins [B] with a 0-dim q, or [K, B] with q [K] (one loss term per row);\n"
                               "q == 0 is DPO.");

static PyObject *py_loss_forward(PyObject *self, PyObject *args, PyObject *kwargs) {
  (void)self;
  static char *keywords[] = {"margins", "q", "beta", "out", "grad_out", "stream", NULL};
  PyObject *margins_obj, *q_obj, *out_obj, *grad_obj = Py_None;
  double beta;
  unsigned long long stream = 0;
  if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOdO|OK:loss_forward", keywords, &margins_obj, &q_obj, &beta,
                                   &out_obj, &grad_obj, &stream)) {
    return NULL;
  }
  napo_arg margins = {0}, q = {0}, out = {0}, grad = {0};
  PyObject *result = NULL;
  arg_dtype dtype;
  napo_layout layout;
  int64_t q_stride = 0;
  int cuda_error = 0;
  napo_status status = NAPO_OK;
  const int with_grad = grad_obj != Py_None;
  if (acquire(margins_obj, "margins", &margins) || acquire(q_obj, "q", &q) || acquire(out_obj, "out", &out) ||
      (with_grad && acquire(grad_obj, "grad_out", &grad)) || arg_dtype_of(&margins, &dtype) ||
      check_device_supported(&margins) || layout_of(&margins, &layout) || check_same(&margins, &q) ||
      row_q_of(&q, &margins, layout.rows, &q_stride) || check_same(&margins, &out) ||
      check_output_like(&out, &margins) ||
      (with_grad && (check_same(&margins, &grad) || check_output_like(&grad, &margins))) || check_beta(beta)) {
    goto cleanup;
  }
  void *grad_data = with_grad ? data_of(&grad) : NULL;
  if (is_cuda(&margins)) {
    status = dtype == DTYPE_F32
                 ? NAPO_CUDA_CALL(napo_loss_forward_f32_cuda(data_of(&margins), layout, data_of(&q), q_stride, beta,
                                                             data_of(&out), grad_data, NAPO_CUDA_ARGS(margins)))
                 : NAPO_CUDA_CALL(napo_loss_forward_f64_cuda(data_of(&margins), layout, data_of(&q), q_stride, beta,
                                                             data_of(&out), grad_data, NAPO_CUDA_ARGS(margins)));
  } else {
    Py_BEGIN_ALLOW_THREADS;
    status =
        dtype == DTYPE_F32
            ? napo_loss_forward_f32(data_of(&margins), layout, data_of(&q), q_stride, beta, data_of(&out), grad_data)
            : napo_loss_forward_f64(data_of(&margins), layout, data_of(&q), q_stride, beta, data_of(&out), grad_data);
    Py_END_ALLOW_THREADS;
  }
  if (raise_status(status, cuda_error, &q) == 0) {
    result = Py_NewRef(Py_None);
  }
cleanup:
  release(&grad);
  release(&out);
  release(&q);
  release(&margins);
  return result;
}

PyDoc_STRVAR(loss_backward_doc, "loss_backward(grad_loss, grad_factor, out, stream=0)\n--\n\n"
                                "out = grad_loss * grad_factor (the dL/dmargins saved by loss_forward).");

static PyObject *py_loss_backward(PyObject *self, PyObject *args, PyObject *kwargs) {
  (void)self;
  static char *keywords[] = {"grad_loss", "grad_factor", "out", "stream", NULL};
  PyObject *grad_obj, *factor_obj, *out_obj;
  unsigned long long stream = 0;
  if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOO|K:loss_backward", keywords, &grad_obj, &factor_obj, &out_obj,
                                   &stream)) {
    return NULL;
  }
  napo_arg grad = {0}, factor = {0}, out = {0};
  PyObject *result = NULL;
  arg_dtype dtype;
  napo_layout grad_layout;
  int cuda_error = 0;
  napo_status status = NAPO_OK;
  if (acquire(grad_obj, "grad_loss", &grad) || acquire(factor_obj, "grad_factor", &factor) ||
      acquire(out_obj, "out", &out) || arg_dtype_of(&factor, &dtype) || check_device_supported(&factor) ||
      layout_of(&factor, &grad_layout) || check_same(&factor, &grad) || check_same_shape(&factor, &grad) ||
      layout_of(&grad, &grad_layout) || check_output_like(&factor, &factor) || check_same(&factor, &out) ||
      check_output_like(&out, &factor)) {
    goto cleanup;
  }
  if (is_cuda(&factor)) {
    status = dtype == DTYPE_F32
                 ? NAPO_CUDA_CALL(napo_loss_backward_f32_cuda(data_of(&grad), grad_layout, data_of(&factor),
                                                              data_of(&out), NAPO_CUDA_ARGS(factor)))
                 : NAPO_CUDA_CALL(napo_loss_backward_f64_cuda(data_of(&grad), grad_layout, data_of(&factor),
                                                              data_of(&out), NAPO_CUDA_ARGS(factor)));
  } else {
    Py_BEGIN_ALLOW_THREADS;
    status = dtype == DTYPE_F32 ? napo_loss_backward_f32(data_of(&grad), grad_layout, data_of(&factor), data_of(&out))
                                : napo_loss_backward_f64(data_of(&grad), grad_layout, data_of(&factor), data_of(&out));
    Py_END_ALLOW_THREADS;
  }
  if (raise_status(status, cuda_error, &factor) == 0) {
    result = Py_NewRef(Py_None);
  }
cleanup:
  release(&out);
  release(&factor);
  release(&grad);
  return result;
}

PyDoc_STRVAR(adaptive_q_doc, "adaptive_q(margins, gamma, q_min, q_max, out, stream=0)\n--\n\n"
                             "out = clip(2 * (1 - sigmoid(gamma * mean(margins))), q_min, q_max); out is 0-dim.");

static PyObject *py_adaptive_q(PyObject *self, PyObject *args, PyObject *kwargs) {
  (void)self;
  static char *keywords[] = {"margins", "gamma", "q_min", "q_max", "out", "stream", NULL};
  PyObject *margins_obj, *out_obj;
  double gamma, q_min, q_max;
  unsigned long long stream = 0;
  if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OdddO|K:adaptive_q", keywords, &margins_obj, &gamma, &q_min, &q_max,
                                   &out_obj, &stream)) {
    return NULL;
  }
  napo_arg margins = {0}, out = {0};
  PyObject *result = NULL;
  arg_dtype dtype;
  int64_t n = 0, stride = 0;
  int cuda_error = 0;
  napo_status status = NAPO_OK;
  if (acquire(margins_obj, "margins", &margins) || acquire(out_obj, "out", &out) || arg_dtype_of(&margins, &dtype) ||
      check_device_supported(&margins) || vector_of(&margins, &n, &stride) || check_same(&margins, &out) ||
      check_scalar(&out) || check_q_params(gamma, q_min, q_max)) {
    goto cleanup;
  }
  if (n == 0) {
    PyErr_SetString(PyExc_ValueError, "argument 'margins' is empty; adaptive q needs the mean of at least one margin");
    goto cleanup;
  }
  if (is_cuda(&margins)) {
    status = dtype == DTYPE_F32
                 ? NAPO_CUDA_CALL(napo_adaptive_q_f32_cuda(data_of(&margins), stride, n, gamma, q_min, q_max,
                                                           data_of(&out), NAPO_CUDA_ARGS(margins)))
                 : NAPO_CUDA_CALL(napo_adaptive_q_f64_cuda(data_of(&margins), stride, n, gamma, q_min, q_max,
                                                           data_of(&out), NAPO_CUDA_ARGS(margins)));
  } else {
    Py_BEGIN_ALLOW_THREADS;
    status = dtype == DTYPE_F32 ? napo_adaptive_q_f32(data_of(&margins), stride, n, gamma, q_min, q_max, data_of(&out))
                                : napo_adaptive_q_f64(data_of(&margins), stride, n, gamma, q_min, q_max, data_of(&out));
    Py_END_ALLOW_THREADS;
  }
  if (raise_status(status, cuda_error, &out) == 0) {
    result = Py_NewRef(Py_None);
  }
cleanup:
  release(&out);
  release(&margins);
  return result;
}

PyDoc_STRVAR(q_from_mean_doc, "q_from_mean(means, gamma, q_min, q_max, out, stream=0)\n--\n\n"
                              "Adaptive q from already-reduced (e.g. all-reduced) mean margins, elementwise:\n"
                              "means is 0-dim or 1-D, out has its shape.");

static PyObject *py_q_from_mean(PyObject *self, PyObject *args, PyObject *kwargs) {
  (void)self;
  static char *keywords[] = {"means", "gamma", "q_min", "q_max", "out", "stream", NULL};
  PyObject *means_obj, *out_obj;
  double gamma, q_min, q_max;
  unsigned long long stream = 0;
  if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OdddO|K:q_from_mean", keywords, &means_obj, &gamma, &q_min, &q_max,
                                   &out_obj, &stream)) {
    return NULL;
  }
  napo_arg means = {0}, out = {0};
  PyObject *result = NULL;
  arg_dtype dtype;
  int64_t n = 1, stride = 0;
  int cuda_error = 0;
  napo_status status = NAPO_OK;
  if (acquire(means_obj, "means", &means) || acquire(out_obj, "out", &out) || arg_dtype_of(&means, &dtype) ||
      check_device_supported(&means) || check_same(&means, &out) || check_q_params(gamma, q_min, q_max)) {
    goto cleanup;
  }
  if (means.tensor->ndim > 1) {
    PyErr_Format(PyExc_ValueError, "argument 'means' must be 0-dim or 1-D, got %d dimensions", (int)means.tensor->ndim);
    goto cleanup;
  }
  if (means.tensor->ndim == 1 && vector_of(&means, &n, &stride) != 0) {
    goto cleanup;
  }
  if (means.tensor->ndim == 1 ? check_output_vector(&out, n) : check_scalar(&out)) {
    goto cleanup;
  }
  if (is_cuda(&means)) {
    status = dtype == DTYPE_F32
                 ? NAPO_CUDA_CALL(napo_q_from_mean_f32_cuda(data_of(&means), n, stride, gamma, q_min, q_max,
                                                            data_of(&out), NAPO_CUDA_ARGS(means)))
                 : NAPO_CUDA_CALL(napo_q_from_mean_f64_cuda(data_of(&means), n, stride, gamma, q_min, q_max,
                                                            data_of(&out), NAPO_CUDA_ARGS(means)));
  } else {
    status = dtype == DTYPE_F32 ? napo_q_from_mean_f32(data_of(&means), n, stride, gamma, q_min, q_max, data_of(&out))
                                : napo_q_from_mean_f64(data_of(&means), n, stride, gamma, q_min, q_max, data_of(&out));
  }
  if (raise_status(status, cuda_error, &out) == 0) {
    result = Py_NewRef(Py_None);
  }
cleanup:
  release(&out);
  release(&means);
  return result;
}

PyDoc_STRVAR(dynamic_weights_doc, "dynamic_weights(reward_margins, w_min, eps, out, stream=0)\n--\n\n"
                                  "out[k] = clip(R_k / sum(R), w_min, 1), uniform 1/K when sum(R) <= eps.");

static PyObject *py_dynamic_weights(PyObject *self, PyObject *args, PyObject *kwargs) {
  (void)self;
  static char *keywords[] = {"reward_margins", "w_min", "eps", "out", "stream", NULL};
  PyObject *margins_obj, *out_obj;
  double w_min, eps;
  unsigned long long stream = 0;
  if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OddO|K:dynamic_weights", keywords, &margins_obj, &w_min, &eps,
                                   &out_obj, &stream)) {
    return NULL;
  }
  napo_arg margins = {0}, out = {0};
  PyObject *result = NULL;
  arg_dtype dtype;
  int64_t k = 0, stride = 0;
  int cuda_error = 0;
  napo_status status = NAPO_OK;
  if (acquire(margins_obj, "reward_margins", &margins) || acquire(out_obj, "out", &out) ||
      arg_dtype_of(&margins, &dtype) || check_device_supported(&margins) || vector_of(&margins, &k, &stride) ||
      check_same(&margins, &out) || check_output_vector(&out, k) || check_weight_params(w_min, eps)) {
    goto cleanup;
  }
  if (k == 0) {
    PyErr_SetString(PyExc_ValueError, "argument 'reward_margins' is empty; dynamic weights need K >= 1 loss terms");
    goto cleanup;
  }
  if (is_cuda(&margins)) {
    status = dtype == DTYPE_F32 ? NAPO_CUDA_CALL(napo_dynamic_weights_f32_cuda(data_of(&margins), stride, k, w_min, eps,
                                                                               data_of(&out), NAPO_CUDA_ARGS(margins)))
                                : NAPO_CUDA_CALL(napo_dynamic_weights_f64_cuda(data_of(&margins), stride, k, w_min, eps,
                                                                               data_of(&out), NAPO_CUDA_ARGS(margins)));
  } else {
    status = dtype == DTYPE_F32 ? napo_dynamic_weights_f32(data_of(&margins), stride, k, w_min, eps, data_of(&out))
                                : napo_dynamic_weights_f64(data_of(&margins), stride, k, w_min, eps, data_of(&out));
  }
  if (raise_status(status, cuda_error, &out) == 0) {
    result = Py_NewRef(Py_None);
  }
cleanup:
  release(&out);
  release(&margins);
  return result;
}

/* ---- sequence log-probs ---- */

static int logits_dtype_of(const napo_arg *arg, napo_logits_dtype *out) {
  const DLDataType d = arg->tensor->dtype;
  if (d.lanes == 1 && d.code == kDLFloat && (d.bits == 32 || d.bits == 64 || d.bits == 16)) {
    *out = d.bits == 32 ? NAPO_LOGITS_F32 : d.bits == 64 ? NAPO_LOGITS_F64 : NAPO_LOGITS_F16;
    return 0;
  }
  if (d.lanes == 1 && d.code == kDLBfloat && d.bits == 16) {
    *out = NAPO_LOGITS_BF16;
    return 0;
  }
  PyErr_Format(PyExc_TypeError, "argument '%s' must be float32, float64, bfloat16 or float16, got %s", arg->name,
               dtype_name(d));
  return -1;
}

static int logits_layout_of(const napo_arg *arg, napo_logits_layout *layout) {
  const DLTensor *t = arg->tensor;
  if (t->ndim != 3) {
    PyErr_Format(PyExc_ValueError, "argument '%s' must be 3-D [batch, time, vocab], got %d dimensions", arg->name,
                 (int)t->ndim);
    return -1;
  }
  layout->batch = t->shape[0];
  layout->time = t->shape[1];
  layout->vocab = t->shape[2];
  layout->stride_b = t->strides != NULL ? t->strides[0] : t->shape[1] * t->shape[2];
  layout->stride_t = t->strides != NULL ? t->strides[1] : t->shape[2];
  layout->stride_v = t->strides != NULL ? t->strides[2] : 1;
  if (layout->vocab < 1) {
    PyErr_Format(PyExc_ValueError, "argument '%s' has an empty vocabulary dimension", arg->name);
    return -1;
  }
  return 0;
}

static int labels_of(const napo_arg *arg, const napo_arg *logits, napo_logits_layout layout, napo_labels *labels) {
  const DLTensor *t = arg->tensor;
  if (t->dtype.code != kDLInt || t->dtype.bits != 64 || t->dtype.lanes != 1) {
    PyErr_Format(PyExc_TypeError, "argument '%s' must be int64, got %s with %d bits", arg->name, dtype_name(t->dtype),
                 (int)t->dtype.bits);
    return -1;
  }
  if (t->ndim != 2 || t->shape[0] != layout.batch || t->shape[1] != layout.time) {
    PyErr_Format(PyExc_ValueError, "argument '%s' must have shape [batch, time] = (%lld, %lld) like '%s'", arg->name,
                 (long long)layout.batch, (long long)layout.time, logits->name);
    return -1;
  }
  if (is_cuda(arg) != is_cuda(logits) || arg->tensor->device.device_id != logits->tensor->device.device_id) {
    PyErr_Format(PyExc_ValueError, "argument '%s' is not on the device of '%s'", arg->name, logits->name);
    return -1;
  }
  labels->data = (const int64_t *)data_of(arg);
  labels->stride_b = t->strides != NULL ? t->strides[0] : t->shape[1];
  labels->stride_t = t->strides != NULL ? t->strides[1] : 1;
  return 0;
}

/* A compact [batch, time] float buffer of `bits` bits on the logits' device. */
static int check_row_buffer(const napo_arg *arg, const napo_arg *logits, napo_logits_layout layout, int bits) {
  const DLTensor *t = arg->tensor;
  if (t->dtype.code != kDLFloat || t->dtype.bits != bits || t->dtype.lanes != 1) {
    PyErr_Format(PyExc_LookupError, "argument '%s' must be float%d (for %s logits), got %s", arg->name, bits,
                 dtype_name(logits->tensor->dtype), dtype_name(t->dtype));
    return -1;
  }
  if (t->ndim != 2 || t->shape[0] != layout.batch || t->shape[1] != layout.time) {
    PyErr_Format(PyExc_ValueError, "argument '%s' must have shape (%lld, %lld)", arg->name, (long long)layout.batch,
                 (long long)layout.time);
    return -1;
  }
  const int compact = layout.batch * layout.time == 0 || t->strides == NULL ||
                      ((layout.time <= 1 || t->strides[1] == 1) && (layout.batch <= 1 || t->strides[0] == layout.time));
  if (!compact) {
    PyErr_Format(PyExc_ValueError, "argument '%s' must be contiguous", arg->name);
    return -1;
  }
  if (is_cuda(arg) != is_cuda(logits) || arg->tensor->device.device_id != logits->tensor->device.device_id) {
    PyErr_Format(PyExc_ValueError, "argument '%s' is not on the device of '%s'", arg->name, logits->name);
    return -1;
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
static int check_grad_out_memory(const napo_arg *grad, napo_logits_layout g, const napo_arg *logits,
                                 napo_logits_layout l) {
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
      PyErr_Format(PyExc_ValueError,
                   "argument '%s' overlaps itself (shape (%lld, %lld, %lld), strides (%lld, %lld, %lld)): it is "
                   "written, so every element needs memory of its own",
                   grad->name, (long long)g.batch, (long long)g.time, (long long)g.vocab, (long long)g.stride_b,
                   (long long)g.stride_t, (long long)g.stride_v);
      return -1;
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
    PyErr_Format(PyExc_ValueError,
                 "argument '%s' overlaps '%s' without being the same array: pass a separate buffer, or the "
                 "logits themselves for an in-place backward",
                 grad->name, logits->name);
    return -1;
  }
  return 0;
}

/* token_logps and grad_token: the accumulation dtype (float64 for float64 logits, else float32). */
static int check_token_buffer(const napo_arg *arg, const napo_arg *logits, napo_logits_layout layout,
                              napo_logits_dtype dtype) {
  return check_row_buffer(arg, logits, layout, dtype == NAPO_LOGITS_F64 ? 64 : 32);
}

/* lse: always float64 (csrc/napo.h says why). */
static int check_lse_buffer(const napo_arg *arg, const napo_arg *logits, napo_logits_layout layout) {
  return check_row_buffer(arg, logits, layout, 64);
}

static int raise_label_error(const napo_label_error *bad, int64_t ignore_index, int64_t vocab, long long time_offset) {
  PyErr_Format(PyExc_ValueError,
               "labels[%lld, %lld] = %lld is outside the vocabulary [0, %lld) and is not ignore_index (%lld)",
               (long long)bad->batch, (long long)bad->time + time_offset, (long long)bad->value, (long long)vocab,
               (long long)ignore_index);
  return -1;
}

static int clamp_threads(long long requested) { return requested < 1 ? 1 : requested > 64 ? 64 : (int)requested; }

PyDoc_STRVAR(token_logps_doc,
             "token_logps(logits, labels, ignore_index, token_out, lse_out, num_threads=1, position_offset=0, "
             "stream=0)\n--\n\n"
             "Per-token log-probs of logits [B, T, V] (f32/f64/bf16/f16, any strides) at int64 labels [B, T]\n"
             "(already aligned with the logits) into token_out, compact [B, T] float32 (float64 for float64\n"
             "logits), and the log-sum-exp into lse_out, compact [B, T] float64. position_offset is added to the time\n"
             "index in error messages (the caller's shift).");

static PyObject *py_token_logps(PyObject *self, PyObject *args, PyObject *kwargs) {
  (void)self;
  static char *keywords[] = {"logits",      "labels",          "ignore_index", "token_out", "lse_out",
                             "num_threads", "position_offset", "stream",       NULL};
  PyObject *logits_obj, *labels_obj, *token_obj, *lse_obj;
  long long ignore_index, num_threads = 1, position_offset = 0;
  unsigned long long stream = 0;
  if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOLOO|LLK:token_logps", keywords, &logits_obj, &labels_obj,
                                   &ignore_index, &token_obj, &lse_obj, &num_threads, &position_offset, &stream)) {
    return NULL;
  }
  napo_arg logits = {0}, labels_arg = {0}, token = {0}, lse = {0};
  PyObject *result = NULL;
  napo_logits_dtype dtype;
  napo_logits_layout layout;
  napo_labels labels;
  napo_label_error bad = {0, 0, 0};
  int cuda_error = 0;
  napo_status status = NAPO_OK;
  if (acquire(logits_obj, "logits", &logits) || acquire(labels_obj, "labels", &labels_arg) ||
      acquire(token_obj, "token_out", &token) || acquire(lse_obj, "lse_out", &lse) ||
      logits_dtype_of(&logits, &dtype) || check_device_supported(&logits) || logits_layout_of(&logits, &layout) ||
      labels_of(&labels_arg, &logits, layout, &labels) || check_token_buffer(&token, &logits, layout, dtype) ||
      check_lse_buffer(&lse, &logits, layout)) {
    goto cleanup;
  }
  if (is_cuda(&logits)) {
    status = NAPO_CUDA_CALL(napo_token_logps_cuda(data_of(&logits), layout, dtype, labels, ignore_index,
                                                  data_of(&token), data_of(&lse), NAPO_CUDA_ARGS(logits)));
  } else {
    const int threads = clamp_threads(num_threads);
    Py_BEGIN_ALLOW_THREADS;
    status = napo_token_logps(data_of(&logits), layout, dtype, labels, ignore_index, data_of(&token), data_of(&lse),
                              threads, &bad);
    Py_END_ALLOW_THREADS;
  }
  if (status == NAPO_ERR_LABEL) {
    raise_label_error(&bad, ignore_index, layout.vocab, position_offset);
  } else if (raise_status(status, cuda_error, &token) == 0) {
    result = Py_NewRef(Py_None);
  }
cleanup:
  release(&lse);
  release(&token);
  release(&labels_arg);
  release(&logits);
  return result;
}

PyDoc_STRVAR(token_logps_backward_doc,
             "token_logps_backward(logits, labels, ignore_index, lse, grad_token, grad_out, num_threads=1, "
             "stream=0)\n--\n\n"
             "grad_out[b, t, v] = grad_token[b, t] * (1[v == label] - softmax(logits[b, t])[v]), 0 at ignored\n"
             "positions. grad_out has the logits' shape and dtype, any strides; it may be the logits itself.");

static PyObject *py_token_logps_backward(PyObject *self, PyObject *args, PyObject *kwargs) {
  (void)self;
  static char *keywords[] = {"logits",   "labels",      "ignore_index", "lse", "grad_token",
                             "grad_out", "num_threads", "stream",       NULL};
  PyObject *logits_obj, *labels_obj, *lse_obj, *grad_token_obj, *grad_obj;
  long long ignore_index, num_threads = 1;
  unsigned long long stream = 0;
  if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOLOOO|LK:token_logps_backward", keywords, &logits_obj, &labels_obj,
                                   &ignore_index, &lse_obj, &grad_token_obj, &grad_obj, &num_threads, &stream)) {
    return NULL;
  }
  napo_arg logits = {0}, labels_arg = {0}, lse = {0}, grad_token = {0}, grad = {0};
  PyObject *result = NULL;
  napo_logits_dtype dtype, grad_dtype;
  napo_logits_layout layout, grad_layout;
  napo_labels labels;
  napo_label_error bad = {0, 0, 0};
  int cuda_error = 0;
  napo_status status = NAPO_OK;
  if (acquire(logits_obj, "logits", &logits) || acquire(labels_obj, "labels", &labels_arg) ||
      acquire(lse_obj, "lse", &lse) || acquire(grad_token_obj, "grad_token", &grad_token) ||
      acquire(grad_obj, "grad_out", &grad) || logits_dtype_of(&logits, &dtype) || check_device_supported(&logits) ||
      logits_layout_of(&logits, &layout) || labels_of(&labels_arg, &logits, layout, &labels) ||
      check_lse_buffer(&lse, &logits, layout) || check_token_buffer(&grad_token, &logits, layout, dtype) ||
      logits_dtype_of(&grad, &grad_dtype) || check_same(&logits, &grad) || check_same_shape(&logits, &grad) ||
      logits_layout_of(&grad, &grad_layout) || check_grad_out_memory(&grad, grad_layout, &logits, layout)) {
    goto cleanup;
  }
  if (is_cuda(&logits)) {
    status = NAPO_CUDA_CALL(napo_token_logps_backward_cuda(data_of(&logits), layout, dtype, labels, ignore_index,
                                                           data_of(&lse), data_of(&grad_token), data_of(&grad),
                                                           grad_layout, NAPO_CUDA_ARGS(logits)));
  } else {
    const int threads = clamp_threads(num_threads);
    Py_BEGIN_ALLOW_THREADS;
    status = napo_token_logps_backward(data_of(&logits), layout, dtype, labels, ignore_index, data_of(&lse),
                                       data_of(&grad_token), data_of(&grad), grad_layout, threads, &bad);
    Py_END_ALLOW_THREADS;
  }
  if (status == NAPO_ERR_LABEL) {
    raise_label_error(&bad, ignore_index, layout.vocab, 0);
  } else if (raise_status(status, cuda_error, &lse) == 0) {
    result = Py_NewRef(Py_None);
  }
cleanup:
  release(&grad);
  release(&grad_token);
  release(&lse);
  release(&labels_arg);
  release(&logits);
  return result;
}

PyDoc_STRVAR(check_labels_doc, "check_labels(labels, vocab, ignore_index, position_offset=0)\n--\n\n"
                               "Raises ValueError naming the first int64 label of the CPU array labels [B, T]\n"
                               "outside [0, vocab) that is not ignore_index.");

static PyObject *py_check_labels(PyObject *self, PyObject *args, PyObject *kwargs) {
  (void)self;
  static char *keywords[] = {"labels", "vocab", "ignore_index", "position_offset", NULL};
  PyObject *labels_obj;
  long long vocab, ignore_index, position_offset = 0;
  if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OLL|L:check_labels", keywords, &labels_obj, &vocab, &ignore_index,
                                   &position_offset)) {
    return NULL;
  }
  napo_arg labels_arg = {0};
  PyObject *result = NULL;
  napo_labels labels;
  napo_label_error bad = {0, 0, 0};
  if (acquire(labels_obj, "labels", &labels_arg)) {
    goto cleanup;
  }
  const DLTensor *t = labels_arg.tensor;
  if (t->ndim != 2) {
    PyErr_Format(PyExc_ValueError, "argument 'labels' must be 2-D [batch, time], got %d dimensions", (int)t->ndim);
    goto cleanup;
  }
  if (is_cuda(&labels_arg) || check_device_supported(&labels_arg)) {
    if (!PyErr_Occurred()) {
      PyErr_SetString(PyExc_ValueError, "argument 'labels' must be on the CPU for check_labels");
    }
    goto cleanup;
  }
  const napo_logits_layout shape = {t->shape[0], t->shape[1], vocab, 0, 0, 0};
  napo_arg self_ref = labels_arg; /* labels_of compares devices with a reference array: itself */
  if (labels_of(&labels_arg, &self_ref, shape, &labels)) {
    goto cleanup;
  }
  const napo_status status = napo_check_labels(labels, shape.batch, shape.time, vocab, ignore_index, &bad);
  if (status == NAPO_ERR_LABEL) {
    raise_label_error(&bad, ignore_index, vocab, position_offset);
  } else if (status != NAPO_OK) {
    PyErr_Format(PyExc_ValueError, "napo: %s", napo_status_message(status));
  } else {
    result = Py_NewRef(Py_None);
  }
cleanup:
  release(&labels_arg);
  return result;
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

PyDoc_STRVAR(cuda_runtime_info_doc,
             "cuda_runtime_info()\n--\n\n"
             "None without CUDA kernels; else a dict: runtime_version (the CUDA runtime napo links, e.g. 13000),\n"
             "driver_version (the newest CUDA the driver supports, 0 without a driver), device_count, and\n"
             "error (why the runtime cannot start, or None).");

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

PyDoc_STRVAR(set_cuda_debug_doc, "set_cuda_debug(enabled)\n--\n\n"
                                 "Debug mode: synchronise and check errors after every napo CUDA launch (a fault is\n"
                                 "then reported by the napo call that caused it). No effect without CUDA kernels.");

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

static PyObject *py_built_with_cuda(PyObject *self, PyObject *unused) {
  (void)self;
  (void)unused;
#ifdef NAPO_WITH_CUDA
  Py_RETURN_TRUE;
#else
  Py_RETURN_FALSE;
#endif
}

static PyMethodDef napo_methods[] = {
    {"loss_forward", (PyCFunction)(void (*)(void))py_loss_forward, METH_VARARGS | METH_KEYWORDS, loss_forward_doc},
    {"loss_backward", (PyCFunction)(void (*)(void))py_loss_backward, METH_VARARGS | METH_KEYWORDS, loss_backward_doc},
    {"adaptive_q", (PyCFunction)(void (*)(void))py_adaptive_q, METH_VARARGS | METH_KEYWORDS, adaptive_q_doc},
    {"q_from_mean", (PyCFunction)(void (*)(void))py_q_from_mean, METH_VARARGS | METH_KEYWORDS, q_from_mean_doc},
    {"dynamic_weights", (PyCFunction)(void (*)(void))py_dynamic_weights, METH_VARARGS | METH_KEYWORDS,
     dynamic_weights_doc},
    {"token_logps", (PyCFunction)(void (*)(void))py_token_logps, METH_VARARGS | METH_KEYWORDS, token_logps_doc},
    {"token_logps_backward", (PyCFunction)(void (*)(void))py_token_logps_backward, METH_VARARGS | METH_KEYWORDS,
     token_logps_backward_doc},
    {"check_labels", (PyCFunction)(void (*)(void))py_check_labels, METH_VARARGS | METH_KEYWORDS, check_labels_doc},
    {"built_with_cuda", py_built_with_cuda, METH_NOARGS, "True when the CUDA kernels were compiled in."},
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

PyMODINIT_FUNC PyInit__C(void) {
  PyObject *module = PyModule_Create(&napo_module);
  if (module != NULL && PyModule_AddIntConstant(module, "ABI_VERSION", 2) != 0) {
    Py_CLEAR(module);
  }
  return module;
}
