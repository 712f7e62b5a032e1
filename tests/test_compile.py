"""torch.compile(fullgraph=True) traces napo's ops (fake kernels) and gives the eager results."""

from __future__ import annotations

import pytest
import torch
from test_objective import call, make_batch

import napo


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_objective_compiles_fullgraph(backend, generator):
    objective = napo.NaPOObjective()
    compiled = torch.compile(objective, fullgraph=True, backend=backend)
    eager_batch = make_batch(9, torch.float32, generator)
    compiled_batch = {k: v.detach().clone().requires_grad_(v.requires_grad) for k, v in eager_batch.items()}

    eager = call(objective, eager_batch)
    eager.loss.backward()
    out = call(compiled, compiled_batch)
    out.loss.backward()

    torch.testing.assert_close(out.loss, eager.loss, rtol=1e-6, atol=1e-7)
    for term in napo.TERMS:
        torch.testing.assert_close(out.q[term], eager.q[term])
        torch.testing.assert_close(out.weights[term], eager.weights[term])
    for key, value in eager_batch.items():
        if value.grad is not None:
            torch.testing.assert_close(compiled_batch[key].grad, value.grad, rtol=1e-6, atol=1e-7)


def test_functionals_compile_fullgraph(generator):
    def step(pc, pr, rc, rr):
        margins = napo.reward_margin(pc, pr, rc, rr)
        q = napo.adaptive_q(margins, gamma=0.5)
        weights = napo.dynamic_weights(torch.stack([margins.mean(), -margins.mean()]))
        return napo.napo_loss(pc, pr, rc, rr, beta=0.1, q=q).mean() * weights[0]

    args = [torch.randn(7, generator=generator) - 10 for _ in range(4)]
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(*args), step(*args))
