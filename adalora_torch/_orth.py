"""Orthogonal regularisation of the singular vectors (AdaLoRA eq. (4)).

``R(P, Q) = ‖PᵀP − I‖_F + ‖QQᵀ − I‖_F`` with ``P = B`` and ``Q = A``
(https://arxiv.org/abs/2303.10512, section 3.1). As in PEFT's ``AdaLoraModel.forward`` the
penalty is the mean over all A and B matrices of those Frobenius norms.

The penalty is one autograd node over all the matrices: same-shape matrices are stacked (in
batches of at most 64K entries, so the copy never doubles the adapter's memory) and handled by
one batched matmul and one batched norm per batch in the forward, and the backward writes the
closed-form gradient ``∂‖SSᵀ − I‖_F/∂S = 2 (SSᵀ − I) S / ‖SSᵀ − I‖_F`` (``S = A``; for B,
``2 B (BᵀB − I) / ‖BᵀB − I‖_F``) with one batched matmul per batch. Autograd through the
stacking instead costs a few nodes per matrix (stack, transpose, accumulate), which on a
24-layer BERT is most of the penalty's time (forward and backward: 9 ms there, 3 ms here,
PEFT's loop 12 ms).
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from ._layers import iter_svd_layers

__all__ = ["orthogonal_penalty"]

_BATCH_FLOATS = 1 << 16  # matrices stacked at a time: 256 KiB in float32


def _no_autocast(device: torch.device) -> Any:
    # under torch.autocast the penalty still runs in the adapters' dtype (float32): the
    # backward, which autocast does not reach, multiplies the saved tensors with the stack
    if torch.amp.is_autocast_available(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


class _Penalty(torch.autograd.Function):
    """``Σ_M ‖cov(M) − I‖_F / count`` over the matrices ``mats``; ``groups`` lists
    ``(is_a, first, n)``: ``mats[first : first + n]`` have one shape, and ``cov(A) = AAᵀ``,
    ``cov(B) = BᵀB`` (both ``(r, r)``)."""

    @staticmethod
    def forward(
        ctx: Any, groups: list[tuple[bool, int, int]], count: int, *mats: torch.Tensor
    ) -> torch.Tensor:
        total: torch.Tensor | None = None
        saved: list[torch.Tensor] = []
        for is_a, first, n in groups:
            with _no_autocast(mats[first].device):  # in the adapters' dtype, as the backward
                s = torch.stack(mats[first : first + n])  # (n, r, in) or (n, out, r)
                d = torch.bmm(s, s.mT) if is_a else torch.bmm(s.mT, s)  # (n, r, r)
                d.diagonal(dim1=1, dim2=2).sub_(1.0)  # cov − I
                norms = torch.linalg.matrix_norm(d)  # (n,), Frobenius
            part = norms.sum()
            total = part if total is None else total + part.to(total.device)
            saved += [d, norms]  # the stack is rebuilt in backward rather than kept
        ctx.groups = groups
        ctx.save_for_backward(*saved, *mats)
        assert total is not None
        return total / count

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        groups = ctx.groups
        count = sum(n for _, _, n in groups)
        saved = ctx.saved_tensors
        mats = saved[2 * len(groups) :]
        grads: list[torch.Tensor | None] = []
        needs = ctx.needs_input_grad[2:]
        for k, (is_a, first, n) in enumerate(groups):
            if not any(needs[first : first + n]):
                grads += [None] * n
                continue
            d, norms = saved[2 * k : 2 * k + 2]
            s = torch.stack(mats[first : first + n])  # (n, r, in) or (n, out, r)
            # 2 · g / (count · ‖D‖), 0 where ‖D‖ = 0 (as torch's norm backward), into D
            coef = (2.0 / count) * grad.to(norms.device) / norms
            d = d * coef.masked_fill(norms == 0, 0.0).reshape(n, 1, 1)  # (n, r, r)
            ds = torch.bmm(d, s) if is_a else torch.bmm(s, d)  # (n, r, in) or (n, out, r)
            # one storage per gradient: autograd adds the model's gradient into it in place
            # (into views of one buffer it cannot, and would hold the buffer and the sums)
            grads += map(torch.clone, ds.unbind(0))
        return (None, None, *grads)


def orthogonal_penalty(model: nn.Module, adapter_name: str | None = None) -> torch.Tensor:
    """Mean over adapted A and B of ``‖A Aᵀ − I‖_F`` and ``‖Bᵀ B − I‖_F``.

    Covers ``adapter_name`` on every SVD layer that has it, or, when None, each layer's
    active adapters. With n matrices pairs the result is the sum of the 2n norms over 2n.
    Same-shape matrices are stacked and handled by one batched matmul and one batched norm
    per batch of 64K entries, and the whole penalty is one autograd node, so the cost is a few
    kernels per batch, not per module. It is computed in the adapters' dtype (float32) also
    under ``torch.autocast``, and differentiable once (no double backward). Returns a 0-dim
    tensor on the adapters' device (0.0 on the CPU when there is no adapter).

    Add ``orth_reg_weight * orthogonal_penalty(model)`` to the loss before ``backward()``.
    """
    # group by (kind, device, dtype, shape): A is (r, in), B is (out, r); cov is (r, r)
    groups: dict[tuple[object, ...], list[torch.Tensor]] = {}
    for _, m in iter_svd_layers(model):
        names = [adapter_name] if adapter_name is not None else getattr(m, "active_adapters", [])
        a_dict, b_dict = m.lora_A._parameters, m.lora_B._parameters
        for name in names:
            a, b = a_dict.get(name), b_dict.get(name)
            if a is None or b is None:
                continue
            groups.setdefault((True, a.device, a.dtype, *a.shape), []).append(a)
            groups.setdefault((False, b.device, b.dtype, *b.shape), []).append(b)
    if not groups:
        return torch.zeros(())
    # batches of at most _BATCH_FLOATS entries: the stacked copy is a transient of that size,
    # not a second copy of the adapter at the step's memory peak (the backward's start)
    layout: list[tuple[bool, int, int]] = []
    mats: list[torch.Tensor] = []
    for key, members in groups.items():
        per_batch = max(1, _BATCH_FLOATS // max(1, members[0].numel()))
        for k in range(0, len(members), per_batch):
            batch = members[k : k + per_batch]
            layout.append((bool(key[0]), len(mats), len(batch)))
            mats += batch
    out = _Penalty.apply(layout, len(mats), *mats)
    return out  # type: ignore[no-any-return]
