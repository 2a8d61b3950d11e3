"""Slow reference computations and magnitude-scaled comparisons for the generation tests."""

from __future__ import annotations

import torch

EPS = torch.finfo(torch.float32).eps


def close(actual, expected, scale: float, ulps: float = 64) -> None:
    """fp32 values equal up to `ulps` float32 epsilons of the magnitudes involved (`scale`, at
    least 1): the KV-cache and full-forward paths sum in different orders."""
    tol = ulps * EPS * max(1.0, scale)
    torch.testing.assert_close(
        torch.as_tensor(actual, dtype=torch.float32),
        torch.as_tensor(expected, dtype=torch.float32),
        atol=tol,
        rtol=0,
    )


def hand_logprob(logits: list[float], token: int, temperature: float, top_k: int, top_p: float) -> float:
    """The processed log-prob the slow way, in float64: scale, sort, keep the top k, keep the
    nucleus of their renormalised mass, renormalise what is left."""
    scaled = sorted(((x / temperature, i) for i, x in enumerate(logits)), reverse=True)
    kept = scaled[:top_k] if top_k else scaled
    weights = torch.tensor([x for x, _ in kept], dtype=torch.float64).softmax(0).tolist()
    nucleus, mass = [], 0.0
    for (_, i), w in zip(kept, weights):
        nucleus.append(i)
        mass += w
        if mass >= top_p:
            break
    if token not in nucleus:
        return float("-inf")
    z = torch.tensor([logits[i] / temperature for i in nucleus], dtype=torch.float64)
    return (z[nucleus.index(token)] - z.logsumexp(0)).item()


def full_forward_logits(model, prompt: list[int], generated: list[int]) -> torch.Tensor:
    """fp32 logits over the real vocabulary that predicted each generated token, from one forward."""
    with torch.no_grad():
        logits = model.logits(model(torch.tensor([prompt + generated])))
    return logits[0, len(prompt) - 1 : -1, : model.vocab_size].float()
