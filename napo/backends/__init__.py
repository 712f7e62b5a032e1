"""The kernels of napo's custom ops (see ``napo._ops``): ``reference`` (plain PyTorch, the ground truth), ``native``
(napo._C: C on the CPU, CUDA C on the GPU), ``fused_linear`` (the LM head fused with the log-probs), registered by
``registry.register_backend``. Empty of imports: ``napo._ops`` reaches the reference without a circle."""
