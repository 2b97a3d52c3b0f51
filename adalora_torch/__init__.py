"""adalora_torch: SVD adapter layers, orthogonal regularisation, the rank allocator hook."""

from ._allocator import RankAllocator as RankAllocator
from ._bnb import SVDLinear4bit as SVDLinear4bit
from ._bnb import SVDLinear8bitLt as SVDLinear8bitLt
from ._inject import inject_adapters as inject_adapters
from ._inject import mark_only_adapters_trainable as mark_only_adapters_trainable
from ._layers import SVDConv2d as SVDConv2d
from ._layers import SVDEmbedding as SVDEmbedding
from ._layers import SVDLinear as SVDLinear
from ._orth import orthogonal_penalty as orthogonal_penalty
from ._protocol import SVDAdapter as SVDAdapter
from ._shrink import shrink_to_pattern as shrink_to_pattern
from ._shrink import to_lora_state_dict as to_lora_state_dict

__all__ = [
    "RankAllocator",
    "SVDAdapter",
    "SVDConv2d",
    "SVDEmbedding",
    "SVDLinear",
    "SVDLinear4bit",
    "SVDLinear8bitLt",
    "inject_adapters",
    "mark_only_adapters_trainable",
    "orthogonal_penalty",
    "shrink_to_pattern",
    "to_lora_state_dict",
]
