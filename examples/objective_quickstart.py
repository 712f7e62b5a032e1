"""The NaPO objective on a batch of log-probs: what a training step computes.

Run: python examples/objective_quickstart.py
"""

import torch

import napo

torch.manual_seed(0)
B = 4


def logps(scale: float = 40.0) -> torch.Tensor:
    return -scale * torch.rand(B)


# Sequence log-probs of chosen, rejected, language-biased (question only) and
# vision-biased (image only) answers, under the policy and the frozen reference.
reference = {a: logps() for a in ("chosen", "rejected", "language", "vision")}
policy = {a: (v + torch.randn(B)).requires_grad_(True) for a, v in reference.items()}
length = {a: torch.randint(5, 50, (B,)).float() for a in reference}

objective = napo.NaPOObjective(beta=0.1)  # the paper's defaults
out = objective(
    policy["chosen"], policy["rejected"], reference["chosen"], reference["rejected"],
    policy["language"], reference["language"], policy["vision"], reference["vision"],
    policy_chosen_avg_logps=policy["chosen"] / length["chosen"],
    reference_chosen_avg_logps=reference["chosen"] / length["chosen"],
    policy_language_avg_logps=policy["language"] / length["language"],
    reference_language_avg_logps=reference["language"] / length["language"],
)  # fmt: skip
out.loss.backward()
print(f"loss {out.loss.item():.4f}")
for name, value in out.metrics().items():
    print(f"{name:24s} {value.item(): .4f}")

# The pieces on their own: a noise-robust drop-in for DPO's sigmoid loss.
margins = napo.reward_margin(policy["chosen"], policy["rejected"], reference["chosen"], reference["rejected"])
q = napo.adaptive_q(margins, gamma=0.05)
per_pair = napo.napo_loss(
    policy["chosen"], policy["rejected"], reference["chosen"], reference["rejected"], beta=0.1, q=q
)
print("q =", q.item(), "per-pair losses:", per_pair.tolist())
