"""SVD adapter layers: ``y = base(x) + dropout(x) @ (A ⊙ E)ᵀ @ Bᵀ · scaling / (r₀ + 1e-5)``.

Zhang et al., "AdaLoRA", ICLR 2023, https://arxiv.org/abs/2303.10512, eq. (1):
``W = W⁽⁰⁾ + P Λ Q`` with ``P = B`` (left singular vectors, ``(out, r)``), ``Λ = diag(E)`` and
``Q = A`` (right singular vectors, ``(r, in)``).

Each layer wraps its base layer (composition: ``self.base_layer``) and holds one triplet set
per adapter name in ``nn.ParameterDict``s named as in PEFT (``lora_A``, ``lora_E``, ``lora_B``,
``ranknum``), so parameter names line up with PEFT's (``<module>.lora_A.<adapter>``).
Adapter parameters are float32 whatever the dtype of the base layer or of the input; the
adapter path runs in float32 and its sum is cast back to the base output's dtype.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ._protocol import SVDAdapter

__all__ = ["SVDConv2d", "SVDEmbedding", "SVDLinear"]

_EPS = 1e-5  # added to r₀ in the scale, as in PEFT


def is_conv1d(module: nn.Module) -> bool:
    """transformers' ``Conv1D`` (weight stored ``(in, out)``), detected without importing it."""
    weight = getattr(module, "weight", None)
    nf = getattr(module, "nf", None)
    return (
        type(module).__name__ == "Conv1D"
        and isinstance(weight, torch.Tensor)
        and weight.dim() == 2
        and nf is not None
        and weight.shape[1] == nf
    )


def iter_svd_layers(
    model: nn.Module, adapter_name: str | None = None
) -> Iterator[tuple[str, SVDAdapter]]:
    """``(name, layer)`` for every submodule that is an ``SVDAdapter`` (holding adapter
    ``adapter_name``, when given), in module order. The one finder of adapter layers."""
    for name, m in model.named_modules():
        # our own layers first, then a dict lookup: the Protocol's isinstance costs
        # microseconds per module
        is_svd = isinstance(m, _SVDLayerBase) or (
            "lora_A" in m._modules and isinstance(m, SVDAdapter)
        )
        if is_svd and (adapter_name is None or adapter_name in m.lora_A):
            yield name, m


class _SVDLayerBase(nn.Module):
    """State and bookkeeping shared by the three SVD layers (see ``SVDAdapter``).

    Subclasses say how many columns A has (``_a_cols``) and rows B has (``_b_rows``), how the
    adapter path runs (``_adapter_forward``) and how the delta is laid out like the base
    weight (``get_delta_weight``).
    """

    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        self.base_layer = base
        self.lora_A = nn.ParameterDict()  # name -> (r, a_cols)
        self.lora_E = nn.ParameterDict()  # name -> (r, 1)
        self.lora_B = nn.ParameterDict()  # name -> (b_rows, r)
        self.ranknum = nn.ParameterDict()  # name -> (1,), r₀, frozen
        self.lora_dropout = nn.ModuleDict()
        self.r: dict[str, int] = {}  # current rank (shrinks with set_rank)
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}  # alpha if alpha > 0 else r₀
        self.keep: dict[str, torch.Tensor] = {}  # bool (r,), written by the rank allocator
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self.disable_adapters: bool = False

    # -- shape hooks --------------------------------------------------------------------------
    def _a_cols(self) -> int:
        raise NotImplementedError

    def _b_rows(self) -> int:
        raise NotImplementedError

    def _adapter_forward(self, x: torch.Tensor, name: str) -> torch.Tensor:
        raise NotImplementedError

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        """``ΔW`` of ``adapter`` in the layout of the base layer's weight (float32)."""
        raise NotImplementedError

    # -- delegation so code reading ``module.weight`` keeps working -------------------------
    @property
    def weight(self) -> torch.Tensor:
        """The base layer's weight."""
        w = self.base_layer.weight
        assert isinstance(w, torch.Tensor)
        return w

    @property
    def bias(self) -> torch.Tensor | None:
        """The base layer's bias (None if it has none)."""
        b = getattr(self.base_layer, "bias", None)
        return b if isinstance(b, torch.Tensor) else None

    # -- adapters -----------------------------------------------------------------------------
    def add_adapter(
        self,
        adapter_name: str,
        rank: int,
        alpha: float,
        dropout: float = 0.0,
        init_weights: bool = True,
        *,
        ranknum: int | None = None,
        activate: bool = True,
    ) -> None:
        """Create the triplets of a new adapter; make it active unless ``activate=False``.

        ``init_weights=True``: E = 0, A, B ~ N(0, 0.02²) (paper, PEFT), so the layer starts
        as its base. ``init_weights=False``: E ~ N(0, 0.02²) as well, so the adapter changes
        the output from the start (for tests). Parameters are float32 on the base weight's
        device and require grad; ``ranknum`` (r₀, frozen) is the rank the adapter was created
        with, ``rank`` by default; pass the creation rank when building an already shrunk
        adapter (``rank < ranknum``) so that its scale stays ``scaling / r₀``.
        """
        if adapter_name in self.lora_A:
            raise ValueError(
                f"Adapter {adapter_name!r} already exists on this layer; call "
                "delete_adapter first or choose another name."
            )
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 0:
            raise ValueError(f"rank must be an integer >= 0, got {rank!r}.")
        r0 = rank if ranknum is None else ranknum
        if isinstance(r0, bool) or not isinstance(r0, int) or r0 < rank:
            raise ValueError(
                f"ranknum (the creation rank r₀) must be an integer >= rank ({rank}), got {r0!r}."
            )
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must lie in [0, 1), got {dropout}.")
        device = self.weight.device
        kw: dict[str, Any] = {"device": device, "dtype": torch.float32}
        a = torch.empty(rank, self._a_cols(), **kw)
        e = torch.empty(rank, 1, **kw)
        b = torch.empty(self._b_rows(), rank, **kw)
        nn.init.normal_(a, mean=0.0, std=0.02)
        nn.init.normal_(b, mean=0.0, std=0.02)
        if init_weights:
            nn.init.zeros_(e)
        else:
            nn.init.normal_(e, mean=0.0, std=0.02)
        self.lora_A[adapter_name] = nn.Parameter(a)
        self.lora_E[adapter_name] = nn.Parameter(e)
        self.lora_B[adapter_name] = nn.Parameter(b)
        self.ranknum[adapter_name] = nn.Parameter(
            torch.full((1,), float(r0), **kw), requires_grad=False
        )
        self.lora_dropout[adapter_name] = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.r[adapter_name] = rank
        self.lora_alpha[adapter_name] = float(alpha)
        self.scaling[adapter_name] = float(alpha) if alpha > 0 else float(r0)
        if activate and adapter_name not in self.active_adapters:
            self.active_adapters.append(adapter_name)

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove an adapter (unmerging first if it is merged)."""
        if adapter_name not in self.lora_A:
            raise ValueError(f"No adapter {adapter_name!r}; this layer has {list(self.lora_A)}.")
        if adapter_name in self.merged_adapters:
            self._unmerge_one(adapter_name)
        for d in (self.lora_A, self.lora_E, self.lora_B, self.ranknum):
            del d[adapter_name]
        del self.lora_dropout[adapter_name]
        for attr in (self.r, self.lora_alpha, self.scaling, self.keep):
            attr.pop(adapter_name, None)  # type: ignore[attr-defined]
        if adapter_name in self.active_adapters:
            self.active_adapters.remove(adapter_name)

    def set_adapter(self, adapter_names: str | Sequence[str]) -> None:
        """Make ``adapter_names`` (one name or a list) the active adapters, in that order."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        unknown = [n for n in names if n not in self.lora_A]
        if unknown:
            raise ValueError(f"Unknown adapters {unknown}; this layer has {list(self.lora_A)}.")
        self.active_adapters = names

    def set_rank(self, adapter_name: str, keep: object) -> None:
        """Physically keep only the triplets where ``keep`` (bool, shape (r,)) is True.

        A, E lose rows and B loses columns (new Parameters, ``requires_grad`` kept);
        ``ranknum`` (r₀) is unchanged so the scale of the update is preserved;
        ``keep[adapter_name]`` becomes all-True of the new rank.
        """
        if adapter_name not in self.lora_A:
            raise ValueError(f"No adapter {adapter_name!r}; this layer has {list(self.lora_A)}.")
        if adapter_name in self.merged_adapters:
            raise ValueError(f"Adapter {adapter_name!r} is merged; unmerge() before set_rank.")
        a, e, b = self.lora_A[adapter_name], self.lora_E[adapter_name], self.lora_B[adapter_name]
        mask = torch.as_tensor(keep, device=a.device).reshape(-1)
        if mask.dtype != torch.bool or mask.numel() != a.shape[0]:
            raise ValueError(
                f"keep must be a bool tensor of shape ({a.shape[0]},), got dtype {mask.dtype} "
                f"and shape {tuple(mask.shape)}."
            )
        with torch.no_grad():
            self.lora_A[adapter_name] = nn.Parameter(a[mask].clone(), a.requires_grad)
            self.lora_E[adapter_name] = nn.Parameter(e[mask].clone(), e.requires_grad)
            self.lora_B[adapter_name] = nn.Parameter(b[:, mask].clone(), b.requires_grad)
        new_r = int(mask.sum())
        self.r[adapter_name] = new_r
        self.keep[adapter_name] = torch.ones(new_r, dtype=torch.bool, device=a.device)

    # -- merge --------------------------------------------------------------------------------
    @property
    def merged(self) -> bool:
        """Whether any adapter is merged into the base weight."""
        return bool(self.merged_adapters)

    def merge(self, safe_merge: bool = False, adapter_names: Sequence[str] | None = None) -> None:
        """Add ``ΔW`` of ``adapter_names`` (default: the active ones) to the base weight.

        ``safe_merge=True`` adds on a copy and raises ``ValueError`` if it is not finite,
        leaving the base weight untouched. Already merged adapters are skipped.
        """
        names = list(self.active_adapters if adapter_names is None else adapter_names)
        unknown = [n for n in names if n not in self.lora_A]
        if unknown:
            raise ValueError(f"Unknown adapters {unknown}; this layer has {list(self.lora_A)}.")
        for name in names:
            if name in self.merged_adapters:
                continue
            with torch.no_grad():
                self._add_to_weight(self.get_delta_weight(name).detach(), name, safe_merge)
            self.merged_adapters.append(name)

    def _add_to_weight(self, delta: torch.Tensor, name: str, safe_merge: bool) -> None:
        # the one place a merge writes the base weight (quantized layers override it)
        weight = self.weight
        if safe_merge:
            merged = weight.detach().to(torch.float32) + delta
            if not torch.isfinite(merged).all():
                raise ValueError(
                    f"NaNs detected in the merged weights. The adapter {name} seems to be "
                    "broken: merging it gives non-finite weights (NaN/inf in A, E or B); the "
                    "base weight is unchanged."
                )
            weight.copy_(merged.to(weight.dtype))
        else:
            weight.add_(delta.to(weight.dtype))

    def _unmerge_one(self, name: str) -> None:
        with torch.no_grad():
            self._add_to_weight(-self.get_delta_weight(name).detach(), name, False)
        self.merged_adapters.remove(name)

    def unmerge(self) -> None:
        """Subtract every merged adapter's ``ΔW`` from the base weight (last merged first)."""
        for name in reversed(list(self.merged_adapters)):
            self._unmerge_one(name)

    def _scale(self, name: str) -> torch.Tensor:
        # scaling / (r₀ + 1e-5), shape (1,)
        return self.scaling[name] / (self.ranknum[name] + _EPS)

    # -- forward ------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Base output plus, for each active unmerged adapter, its low-rank update."""
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)  # (..., out), dtype of the base output
        out_dtype = result.dtype
        for name in self.active_adapters:
            # merged, absent, or shrunk to rank 0 (no update): nothing to add
            if name in self.merged_adapters or name not in self.lora_A or self.r.get(name) == 0:
                continue
            # float32 sum, cast back: same rounding as PEFT's in-place `result += delta`
            result = (result + self._adapter_forward(x, name)).to(out_dtype)
        return result

    def extra_repr(self) -> str:
        return f"r={self.r}, scaling={self.scaling}"


class SVDLinear(_SVDLayerBase):
    """AdaLoRA adapter around ``nn.Linear`` or transformers' ``Conv1D``.

    ``fan_in_fan_out=True`` says the base weight is stored ``(in, out)`` (``Conv1D``); it is
    detected and set automatically for ``Conv1D`` and ignored (with a warning) for
    ``nn.Linear``. A is ``(r, in_features)``, E ``(r, 1)``, B ``(out_features, r)``.
    """

    def __init__(
        self,
        base: nn.Module,
        rank: int,
        alpha: float,
        dropout: float = 0.0,
        *,
        adapter_name: str = "default",
        fan_in_fan_out: bool = False,
        init_weights: bool = True,
        ranknum: int | None = None,
    ) -> None:
        super().__init__(base)
        if is_conv1d(base):
            if not fan_in_fan_out:
                warnings.warn(
                    "The base layer is a Conv1D (weight stored (in, out)); setting "
                    "fan_in_fan_out=True.",
                    stacklevel=2,
                )
            fan_in_fan_out = True
        elif isinstance(base, nn.Linear):
            if fan_in_fan_out:
                warnings.warn(
                    "fan_in_fan_out=True but the base layer is nn.Linear (weight stored "
                    "(out, in)); setting fan_in_fan_out=False.",
                    stacklevel=2,
                )
            fan_in_fan_out = False
        else:
            raise ValueError(
                f"SVDLinear wraps nn.Linear or transformers' Conv1D, got {type(base).__name__}."
            )
        self.fan_in_fan_out = fan_in_fan_out
        if isinstance(base, nn.Linear):  # its own sizes: a bitsandbytes 4-bit weight is packed
            self.in_features, self.out_features = base.in_features, base.out_features
        else:  # Conv1D stores (in, out)
            self.in_features, self.out_features = self.weight.shape
        self.add_adapter(adapter_name, rank, alpha, dropout, init_weights, ranknum=ranknum)

    def _a_cols(self) -> int:
        return int(self.in_features)

    def _b_rows(self) -> int:
        return int(self.out_features)

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        """``B (A ⊙ E) · scaling / (r₀ + 1e-5)``: ``(out, in)``, or ``(in, out)`` for Conv1D."""
        a, e, b = self.lora_A[adapter], self.lora_E[adapter], self.lora_B[adapter]
        delta = b @ (a * e) * self._scale(adapter)  # (out, in)
        return delta.T if self.fan_in_fan_out else delta

    def _adapter_forward(self, x: torch.Tensor, name: str) -> torch.Tensor:
        a, e, b = self.lora_A[name], self.lora_E[name], self.lora_B[name]
        x = self.lora_dropout[name](x.to(a.dtype))  # (..., in)
        # the scale goes into E, (r, 1), rather than into a pass over the output (PEFT: two)
        ae = a * (e * self._scale(name))  # (r, in)
        # (..., in) @ (in, r) @ (r, out) -> (..., out)
        return x @ ae.T @ b.T


class SVDConv2d(_SVDLayerBase):
    """AdaLoRA adapter around ``nn.Conv2d`` (``groups=1``).

    A is ``(r, in_channels · kh · kw)``, E ``(r, 1)``, B ``(out_channels, r)``; the update
    ``B (A ⊙ E)`` is reshaped to the kernel ``(out, in, kh, kw)`` and convolved with the
    base's stride, padding, dilation and padding mode.
    """

    def __init__(
        self,
        base: nn.Conv2d,
        rank: int,
        alpha: float,
        dropout: float = 0.0,
        *,
        adapter_name: str = "default",
        init_weights: bool = True,
        ranknum: int | None = None,
    ) -> None:
        if not isinstance(base, nn.Conv2d):
            raise ValueError(f"SVDConv2d wraps nn.Conv2d, got {type(base).__name__}.")
        if base.groups != 1:
            raise ValueError(
                f"SVDConv2d supports groups=1 only, got groups={base.groups}; leave grouped or "
                "depthwise convolutions out of the targets."
            )
        super().__init__(base)
        self.in_features = base.in_channels
        self.out_features = base.out_channels
        self.add_adapter(adapter_name, rank, alpha, dropout, init_weights, ranknum=ranknum)

    def _a_cols(self) -> int:
        return int(self.weight[0].numel())  # in · kh · kw

    def _b_rows(self) -> int:
        return int(self.out_features)

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        """``B (A ⊙ E) · scaling / (r₀ + 1e-5)`` reshaped to ``(out, in, kh, kw)``."""
        a, e, b = self.lora_A[adapter], self.lora_E[adapter], self.lora_B[adapter]
        return (b @ (a * e) * self._scale(adapter)).reshape(self.weight.shape)

    def _adapter_forward(self, x: torch.Tensor, name: str) -> torch.Tensor:
        base = self.base_layer
        assert isinstance(base, nn.Conv2d)
        x = self.lora_dropout[name](x.to(self.lora_A[name].dtype))  # (N, in, H, W)
        return base._conv_forward(x, self.get_delta_weight(name), None)  # (N, out, H', W')


class SVDEmbedding(_SVDLayerBase):
    """AdaLoRA adapter around ``nn.Embedding``.

    A is ``(r, num_embeddings)``, E ``(r, 1)``, B ``(embedding_dim, r)``; the update of the
    table is ``(B (A ⊙ E))ᵀ``. Dropout is accepted for a uniform interface but not applied
    (dropping token ids makes no sense; PEFT's LoRA embedding ignores it too).
    """

    def __init__(
        self,
        base: nn.Embedding,
        rank: int,
        alpha: float,
        dropout: float = 0.0,
        *,
        adapter_name: str = "default",
        init_weights: bool = True,
        ranknum: int | None = None,
    ) -> None:
        if not isinstance(base, nn.Embedding):
            raise ValueError(f"SVDEmbedding wraps nn.Embedding, got {type(base).__name__}.")
        super().__init__(base)
        self.in_features = base.num_embeddings
        self.out_features = base.embedding_dim
        self.add_adapter(adapter_name, rank, alpha, dropout, init_weights, ranknum=ranknum)

    def _a_cols(self) -> int:
        return int(self.in_features)

    def _b_rows(self) -> int:
        return int(self.out_features)

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        """``(B (A ⊙ E))ᵀ · scaling / (r₀ + 1e-5)``: ``(num_embeddings, embedding_dim)``."""
        a, e, b = self.lora_A[adapter], self.lora_E[adapter], self.lora_B[adapter]
        return (b @ (a * e)).T * self._scale(adapter)

    def _adapter_forward(self, x: torch.Tensor, name: str) -> torch.Tensor:
        base = self.base_layer
        assert isinstance(base, nn.Embedding)
        a, e, b = self.lora_A[name], self.lora_E[name], self.lora_B[name]
        # token ids (...,) -> rows of (A ⊙ E · scale)ᵀ: (..., r), the scale folded into E
        # (max_norm and sparse concern the base table, not this product)
        ae = a * (e * self._scale(name))  # (r, num_embeddings)
        after_a = F.embedding(x, ae.T, base.padding_idx, scale_grad_by_freq=base.scale_grad_by_freq)
        # (..., r) @ (r, dim) -> (..., dim)
        return after_a @ b.T
