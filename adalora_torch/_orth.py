"""Orthogonal regularisation of the singular vectors (AdaLoRA eq. (4)).

``R(P, Q) = ‖PᵀP − I‖_F + ‖QQᵀ − I‖_F`` with ``P = B`` and ``Q = A``
(https://arxiv.org/abs/2303.10512, section 3.1). As in PEFT's ``AdaLoraModel.forward`` the
penalty is the mean over all A and B matrices of those Frobenius norms.
"""

from __future__ import annotations

from collections import defaultdict

import torch
from torch import nn

from ._layers import iter_svd_layers

__all__ = ["orthogonal_penalty"]


def orthogonal_penalty(model: nn.Module, adapter_name: str | None = None) -> torch.Tensor:
    """Mean over adapted A and B of ``‖A Aᵀ − I‖_F`` and ``‖Bᵀ B − I‖_F``.

    Covers ``adapter_name`` on every SVD layer that has it, or, when None, each layer's
    active adapters. With n matrices pairs the result is the sum of the 2n norms over 2n.
    Same-shape matrices are stacked and handled by one batched matmul and one batched norm,
    so the cost is a few kernel launches per distinct shape, not per module. Returns a 0-dim
    tensor on the adapters' device (0.0 on the CPU when there is no adapter).

    Add ``orth_reg_weight * orthogonal_penalty(model)`` to the loss before ``backward()``.
    """
    # group by shape: the rank dim goes last so a cov is (r, r) for both A and B
    groups: dict[tuple[object, ...], list[torch.Tensor]] = defaultdict(list)
    for _, m in iter_svd_layers(model):
        names = [adapter_name] if adapter_name is not None else getattr(m, "active_adapters", [])
        for name in names:
            if name not in m.lora_A:
                continue
            a, b = m.lora_A[name], m.lora_B[name]
            for mat in (a.T, b):  # (in, r): AAᵀ = (Aᵀ)ᵀ(Aᵀ);  (out, r)
                groups[(mat.device, mat.dtype, *mat.shape)].append(mat)
    if not groups:
        return torch.zeros(())
    total: torch.Tensor | None = None
    count = 0
    for mats in groups.values():
        stacked = torch.stack(mats)  # (n, rows, r)
        cov = torch.bmm(stacked.transpose(1, 2), stacked)  # (n, r, r)
        eye = torch.eye(cov.shape[-1], dtype=cov.dtype, device=cov.device)
        norms = torch.linalg.matrix_norm(cov - eye, ord="fro").sum()  # ()
        total = norms if total is None else total + norms.to(total.device)
        count += len(mats)
    assert total is not None
    return total / count
