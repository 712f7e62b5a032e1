"""Type stub of napo's C extension. Arrays are any DLPack-capable objects (or "dltensor" capsules);
outputs are caller-allocated and compact. ``stream`` is a cudaStream_t as an int (CUDA arrays only)."""

from typing import Any

ABI_VERSION: int

def loss_forward(margins: Any, q: Any, beta: float, out: Any, grad_out: Any | None = None, stream: int = 0) -> None: ...
def loss_backward(grad_loss: Any, grad_factor: Any, out: Any, stream: int = 0) -> None: ...
def adaptive_q(margins: Any, gamma: float, q_min: float, q_max: float, out: Any, stream: int = 0) -> None: ...
def q_from_mean(means: Any, gamma: float, q_min: float, q_max: float, out: Any, stream: int = 0) -> None: ...
def dynamic_weights(reward_margins: Any, w_min: float, eps: float, out: Any, stream: int = 0) -> None: ...
def built_with_cuda() -> bool: ...
def cuda_available() -> bool: ...
def token_logps(
    logits: Any,
    labels: Any,
    ignore_index: int,
    token_out: Any,
    lse_out: Any,
    num_threads: int = 1,
    position_offset: int = 0,
    stream: int = 0,
) -> None: ...
def token_logps_backward(
    logits: Any,
    labels: Any,
    ignore_index: int,
    lse: Any,
    grad_token: Any,
    grad_out: Any,
    num_threads: int = 1,
    stream: int = 0,
) -> None: ...
def check_labels(labels: Any, vocab: int, ignore_index: int, position_offset: int = 0) -> None: ...
