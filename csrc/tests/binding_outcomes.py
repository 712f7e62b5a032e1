"""Prints the outcome (return, outputs, or exception type and message) of ~74,000 calls to napo._C: every entry
point with each argument replaced by a bad value, alone and in pairs, plus a few hand-made cases (among them
grad_out layouts on both sides of token_logps_backward's overlap checks).

Not a test: a before/after check for refactors of csrc/module.c (issue 25 made it table-driven with none of
these lines changing). Run it on both builds and diff:

    python csrc/tests/binding_outcomes.py > before.txt   # ... rebuild ...
    python csrc/tests/binding_outcomes.py > after.txt && diff before.txt after.txt

The "fake cuda" lines pass capsules that say CUDA over host memory. Without a GPU they reach the CUDA dispatch and
fail at launch (or at NAPO_ERR_NO_CUDA in a CPU-only build). Linked with the CPU emulation of CUDA instead (the
Makefile's libnapo_cuda_emu.so objects plus module.c built with -DNAPO_WITH_CUDA), the kernels run and the lines
carry their outputs.
"""

from __future__ import annotations

import ctypes
import itertools
import warnings

import numpy as np
import torch

from napo import _C as C


def _consumed_capsule():
    capsule = torch.zeros(3).__dlpack__()
    torch.from_dlpack(capsule)
    return capsule


def _bad_arrays(good: np.ndarray) -> dict:
    dtype, shape = good.dtype, good.shape
    cases = {f"as_{t.__name__}": good.astype(t) for t in (np.int32, np.int64, np.float16, np.float32, np.float64)}
    cases |= {f"as_{t.__name__}": good.astype(t) for t in (bool, np.complex64)}
    shapes = {"0d": (), "1d3": (3,), "1d2": (2,), "1d0": (0,), "2d23": (2, 3), "3d": (2, 3, 5), "3d2": (2, 3, 2),
              "4d": (1, 2, 3, 5), "empty3d": (0, 3, 5), "vocab0": (2, 3, 0)}  # fmt: skip
    cases |= {name: np.zeros(s, dtype) for name, s in shapes.items()}
    cases |= {
        "list": [0.0] * 3, "none": None, "object": object(), "str": "abc",
        "bf16": torch.from_numpy(good.astype(np.float32)).bfloat16(),
        "transposed": np.zeros((3, 2), dtype).T, "strided": np.zeros(good.size * 2 + 2, dtype)[::2],
        "reversed": np.zeros(shape, dtype)[::-1] if good.ndim else np.zeros((), dtype),
        "consumed_capsule": _consumed_capsule(), "capsule": torch.utils.dlpack.to_dlpack(torch.zeros(3)),
        "meta": torch.zeros(shape, device="meta"), "requires_grad": torch.zeros(shape, requires_grad=True),
        "expanded": torch.zeros(1).expand(*shape) if good.ndim else torch.zeros(()),
        "nan": np.full(shape, np.nan, dtype) if dtype.kind == "f" else good,
        "seven": np.full(shape, 7, dtype), "minus_one": np.full(shape, -1, dtype),
    }  # fmt: skip
    return cases


BAD_NUMBERS = {"str": "x", "float": 1.5, "nan": float("nan"), "inf": float("inf"), "negative": -1.0, "zero": 0,
               "huge": 2**70, "none": None, "negative_int": -5, "one": 1, "two": 2.0}  # fmt: skip

LOGITS = np.random.default_rng(0).standard_normal((2, 3, 5)).astype(np.float32)
LABELS = np.array([[0, 1, -100], [4, 2, 3]])

# name: (function, argument names, "A" array or "N" number per argument, good arguments)
ENTRY_POINTS = {
    "loss_forward": ("loss_forward", "margins q beta out grad_out stream", "AANAAN",
                     lambda: [np.linspace(-3, 3, 3), np.array(0.3), 0.1, np.zeros(3), np.zeros(3), 0]),
    "loss_forward_2d": ("loss_forward", "margins q beta out grad_out stream", "AANAAN",
                        lambda: [np.linspace(-3, 3, 6).reshape(2, 3), np.array([0.1, 0.2]), 0.1, np.zeros((2, 3)),
                                 np.zeros((2, 3)), 0]),
    "loss_backward": ("loss_backward", "grad_loss grad_factor out stream", "AAAN",
                      lambda: [np.ones(3), np.linspace(0, 1, 3), np.zeros(3), 0]),
    "adaptive_q": ("adaptive_q", "margins gamma q_min q_max out stream", "ANNNAN",
                   lambda: [np.linspace(-1, 2, 3), 0.5, 0.01, 1.0, np.zeros(()), 0]),
    "q_from_mean": ("q_from_mean", "means gamma q_min q_max out stream", "ANNNAN",
                    lambda: [np.linspace(-1, 2, 3), 0.5, 0.01, 1.0, np.zeros(3), 0]),
    "q_from_mean_0d": ("q_from_mean", "means gamma q_min q_max out stream", "ANNNAN",
                       lambda: [np.array(0.4), 0.5, 0.01, 1.0, np.zeros(()), 0]),
    "dynamic_weights": ("dynamic_weights", "reward_margins w_min eps out stream", "ANNAN",
                        lambda: [np.array([2.0, 1.0, 1.0]), 0.01, 1e-8, np.zeros(3), 0]),
    "token_logps": ("token_logps", "logits labels ignore_index token_out lse_out num_threads position_offset stream",
                    "AANAANNN",
                    lambda: [LOGITS.copy(), LABELS.copy(), -100, np.zeros((2, 3), np.float32), np.zeros((2, 3)), 1, 0,
                             0]),
    "token_logps_backward": ("token_logps_backward",
                             "logits labels ignore_index lse grad_token grad_out num_threads stream", "AANAAANN",
                             lambda: [LOGITS.copy(), LABELS.copy(), -100, np.full((2, 3), 2.0),
                                      np.ones((2, 3), np.float32), np.zeros((2, 3, 5), np.float32), 1, 0]),
    "check_labels": ("check_labels", "labels vocab ignore_index position_offset", "ANNN",
                     lambda: [LABELS.copy(), 5, -100, 0]),
}  # fmt: skip


class _DLDevice(ctypes.Structure):
    _fields_ = [("device_type", ctypes.c_int32), ("device_id", ctypes.c_int32)]


class _DLDataType(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint8), ("bits", ctypes.c_uint8), ("lanes", ctypes.c_uint16)]


class _DLManagedTensor(ctypes.Structure):
    _fields_ = [("data", ctypes.c_void_p), ("device", _DLDevice), ("ndim", ctypes.c_int32), ("dtype", _DLDataType),
                ("shape", ctypes.POINTER(ctypes.c_int64)), ("strides", ctypes.c_void_p),
                ("byte_offset", ctypes.c_uint64), ("manager_ctx", ctypes.c_void_p),
                ("deleter", ctypes.c_void_p)]  # fmt: skip


_KEEP_ALIVE = []  # what the fake capsules point into (a capsule keeps only a pointer)
_CAPSULE_NAME = ctypes.create_string_buffer(b"dltensor")
_capsule_new = ctypes.pythonapi.PyCapsule_New
_capsule_new.restype, _capsule_new.argtypes = ctypes.py_object, [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]


def _fake_cuda(array: np.ndarray, device_id: int = 0):
    """A "dltensor" capsule that says kDLCUDA over host memory: it takes the binding's CUDA paths (checks, dispatch,
    device and stream handed to the kernel). Without a GPU the launch fails cleanly; in a build on the CPU emulation
    of CUDA (csrc/cuda/emu, where device pointers are host pointers) the kernels run and their outputs are printed."""
    array = np.ascontiguousarray(array)
    shape = (ctypes.c_int64 * max(array.ndim, 1))(*array.shape)
    code = {"f": 2, "i": 0}[array.dtype.kind]
    managed = _DLManagedTensor(array.ctypes.data, _DLDevice(2, device_id), array.ndim,
                               _DLDataType(code, array.dtype.itemsize * 8, 1), shape, None, 0, None, None)  # fmt: skip
    _KEEP_ALIVE.append(array)
    _KEEP_ALIVE.append((shape, managed))
    return _capsule_new(ctypes.addressof(managed), ctypes.addressof(_CAPSULE_NAME), None)


def _fake_cuda_lines() -> list[str]:
    if torch.cuda.is_available():  # a real device would be handed host pointers
        return ["fake cuda: skipped, a CUDA device is visible"]
    f = _fake_cuda
    logps_in = lambda: [f(LOGITS), f(LABELS), -100]  # noqa: E731
    cases = {
        "loss_forward": (C.loss_forward, lambda: [f(np.linspace(-3, 3, 3)), f(np.array(0.3)), 0.1, f(np.zeros(3)),
                                                  f(np.zeros(3)), 7]),
        "loss_forward 2d": (C.loss_forward, lambda: [f(np.linspace(-3, 3, 6).reshape(2, 3)), f(np.array([0.1, 0.2])),
                                                     0.1, f(np.zeros((2, 3)))]),
        "loss_forward q on cpu": (C.loss_forward, lambda: [f(np.zeros(3)), np.array(0.3), 0.1, f(np.zeros(3))]),
        "loss_forward out on device 1": (C.loss_forward, lambda: [f(np.zeros(3)), f(np.array(0.3)), 0.1,
                                                                  f(np.zeros(3), 1)]),
        "loss_forward on device 1": (C.loss_forward, lambda: [f(np.zeros(3), 1), f(np.array(0.3), 1), 0.1,
                                                              f(np.zeros(3), 1)]),
        "loss_forward q = 2": (C.loss_forward, lambda: [f(np.zeros(3)), f(np.array(2.0)), 0.1, f(np.zeros(3))]),
        "loss_backward": (C.loss_backward, lambda: [f(np.ones(3)), f(np.linspace(0, 1, 3)), f(np.zeros(3))]),
        "loss_backward f32": (C.loss_backward, lambda: [f(np.ones(3, np.float32)),
                                                        f(np.linspace(0, 1, 3, dtype=np.float32)),
                                                        f(np.zeros(3, np.float32))]),
        "adaptive_q": (C.adaptive_q, lambda: [f(np.linspace(-1, 2, 3)), 0.5, 0.01, 1.0, f(np.zeros(()))]),
        "q_from_mean": (C.q_from_mean, lambda: [f(np.linspace(-1, 2, 3)), 0.5, 0.01, 1.0, f(np.zeros(3))]),
        "dynamic_weights": (C.dynamic_weights, lambda: [f(np.array([2.0, 1.0, 1.0])), 0.01, 1e-8, f(np.zeros(3))]),
        "dynamic_weights f32": (C.dynamic_weights, lambda: [f(np.array([2.0, 1.0, 1.0], np.float32)), 0.01, 1e-8,
                                                            f(np.zeros(3, np.float32))]),
        "token_logps": (C.token_logps, lambda: [*logps_in(), f(np.zeros((2, 3), np.float32)), f(np.zeros((2, 3)))]),
        "token_logps f64": (C.token_logps, lambda: [f(LOGITS.astype(np.float64)), f(LABELS), -100, f(np.zeros((2, 3))),
                                                    f(np.zeros((2, 3))), 3, 5, 11]),
        "token_logps labels on cpu": (C.token_logps, lambda: [f(LOGITS), LABELS, -100,
                                                              f(np.zeros((2, 3), np.float32)), f(np.zeros((2, 3)))]),
        "token_logps_backward": (C.token_logps_backward, lambda: [*logps_in(), f(np.full((2, 3), 2.0)),
                                                                  f(np.ones((2, 3), np.float32)),
                                                                  f(np.zeros((2, 3, 5), np.float32)), 4, 99]),
        "check_labels": (C.check_labels, lambda: [f(LABELS), 5, -100]),
    }  # fmt: skip
    lines = []
    for name, (function, make) in cases.items():
        first = len(_KEEP_ALIVE)
        result = outcome(function, make())
        arrays = [np.round(a, 6).tolist() for a in _KEEP_ALIVE[first::2]]
        lines.append(f"fake cuda {name}: {result} {arrays}")
    return lines


def outcome(function, args, kwargs=None) -> str:
    try:
        result = function(*args, **(kwargs or {}))
    except Exception as error:
        cause = f" <- {type(error.__cause__).__name__}: {error.__cause__}" if error.__cause__ else ""
        return f"{type(error).__name__}: {error}{cause}"
    outputs = [np.round(a, 6).tolist() for a in args if isinstance(a, np.ndarray)]
    return f"ok {result!r} {outputs}"


def main() -> None:
    lines = []
    for entry, (function_name, names, kinds, make) in ENTRY_POINTS.items():
        function, names = getattr(C, function_name), names.split()
        lines.append(f"{entry} good: {outcome(function, make())}")
        lines.append(f"{entry} by keyword: {outcome(function, [], dict(zip(names, make(), strict=True)))}")
        lines.append(f"{entry} missing: {outcome(function, make()[:-3])}")
        lines.append(f"{entry} extra: {outcome(function, [*make(), 1, 2])}")
        lines.append(f"{entry} twice: {outcome(function, make(), {names[0]: 1})}")
        lines.append(f"{entry} unknown keyword: {outcome(function, make(), {'nope': 1})}")
        bad = [(i, name, value) for i, kind in enumerate(kinds)
               for name, value in (_bad_arrays(make()[i]) if kind == "A" else BAD_NUMBERS).items()]  # fmt: skip
        for i, name, value in bad:
            args = make()
            args[i] = value
            lines.append(f"{entry} {names[i]}={name}: {outcome(function, args)}")
        for (i, first, one), (j, second, other) in itertools.combinations(bad, 2):
            if i != j:
                args = make()
                args[i], args[j] = one, other
                lines.append(f"{entry} {names[i]}={first} {names[j]}={second}: {outcome(function, args)}")
    grad = (np.full((2, 3), 2.0), np.ones((2, 3), np.float32))
    shared = np.zeros((2, 3, 6), np.float32)
    # grad_out layouts for the self-overlap proof (sorted |strides|, each past the span of the smaller ones)
    base = torch.zeros(64)
    layouts = {
        "permuted": torch.zeros(5, 3, 2).permute(2, 1, 0), "time_expanded": torch.zeros(2, 1, 5).expand(2, 3, 5),
        "time_steps_one": base.as_strided((2, 3, 5), (15, 1, 1)), "interleaved": base.as_strided((2, 3, 5), (1, 2, 6)),
        "reversed_time": np.zeros((2, 3, 5), np.float32)[:, ::-1],
        "size_one_far": base.as_strided((2, 1, 5), (5, 10**6, 1)),
        "batch_meets_time": base.as_strided((2, 3, 5), (10, 5, 1)), "vocab_wide": base.as_strided((2, 3, 5), (2, 1, 6)),
    }  # fmt: skip
    for name, out in layouts.items():
        logits, labels = torch.zeros(out.shape), torch.zeros(out.shape[:2], dtype=torch.int64)
        lines.append(f"grad_out {name}: " + outcome(C.token_logps_backward, [logits, labels, -100,
                     torch.zeros(out.shape[:2], dtype=torch.float64), torch.ones(out.shape[:2]), out]))  # fmt: skip
    same_data = [base.as_strided((2, 3, 5), (15, 5, 1)), base.as_strided((2, 3, 5), (1, 2, 6))]
    lines.append("grad_out same data, other strides: " + outcome(C.token_logps_backward, [same_data[0], labels, -100,
                 torch.zeros(2, 3, dtype=torch.float64), torch.ones(2, 3), same_data[1]]))  # fmt: skip
    lines += [
        "in place: " + outcome(C.token_logps_backward, [LOGITS.copy(), LABELS, -100, *grad, LOGITS.copy()]),
        "overlap: " + outcome(C.token_logps_backward, [shared[:, :, :5], LABELS, -100, *grad, shared[:, :, 1:]]),
        "bad label: "
        + outcome(
            C.token_logps,
            [LOGITS, np.array([[0, 1, 9], [4, 2, 3]]), -100, np.zeros((2, 3), np.float32), np.zeros((2, 3)), 1, 7],
        ),
        "bad label alone: " + outcome(C.check_labels, [np.array([[0, 1, 9], [4, 2, 3]]), 5, -100, 3]),
        "q row out of range: "
        + outcome(C.loss_forward, [np.zeros((2, 3)), np.array([0.5, 1.5]), 0.1, np.zeros((2, 3))]),
        "q nan: " + outcome(C.loss_forward, [np.zeros(3), np.array(np.nan), 0.1, np.zeros(3)]),
        *_fake_cuda_lines(),
        f"cuda: {C.built_with_cuda()!r} {C.cuda_available()!r} {C.cuda_runtime_info()!r}",
        "debug: " + outcome(C.set_cuda_debug, [False]) + " " + outcome(C.set_cuda_debug, [np.array([1, 2])]),
        f"abi: {C.ABI_VERSION!r}",
        f"module doc: {C.__doc__!r}",
    ]
    for name in sorted(n for n in dir(C) if not n.startswith("__")):
        member = getattr(C, name)
        signature = getattr(member, "__text_signature__", None)
        lines.append(f"doc {name}: {getattr(member, '__doc__', None)!r} {signature!r}")
    print("\n".join(lines))


if __name__ == "__main__":
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # numpy's, on the NaN cases
        main()
