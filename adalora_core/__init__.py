"""adalora_core: the AdaLoRA algorithm in NumPy, free of any deep-learning framework.

Budget schedule, importance EMAs, triplet scores, exact top-k allocation, rank-pattern
bookkeeping, and a functional allocator (``rank_allocator(...) -> Allocator(init, update)``).
Zhang et al., "AdaLoRA", ICLR 2023, https://arxiv.org/abs/2303.10512.
"""

from ._allocate import allocate as allocate
from ._allocate import count_parameters as count_parameters
from ._allocate import count_ranks as count_ranks
from ._allocate import masks_from_rank_pattern as masks_from_rank_pattern
from ._allocate import masks_to_rank_pattern as masks_to_rank_pattern
from ._allocator import Allocator as Allocator
from ._allocator import AllocatorState as AllocatorState
from ._allocator import Triplet as Triplet
from ._allocator import as_triplet as as_triplet
from ._allocator import rank_allocator as rank_allocator
from ._importance import element_score as element_score
from ._importance import ema as ema
from ._importance import gradient_is_finite as gradient_is_finite
from ._importance import triplet_scores as triplet_scores
from ._importance import update_importance as update_importance
from ._schedule import budget_schedule as budget_schedule
from ._schedule import require_total_step as require_total_step
from ._schedule import validate_betas as validate_betas
from ._schedule import validate_schedule as validate_schedule

__all__ = [
    "Allocator",
    "AllocatorState",
    "Triplet",
    "allocate",
    "as_triplet",
    "budget_schedule",
    "count_parameters",
    "count_ranks",
    "element_score",
    "ema",
    "gradient_is_finite",
    "masks_from_rank_pattern",
    "masks_to_rank_pattern",
    "rank_allocator",
    "require_total_step",
    "triplet_scores",
    "update_importance",
    "validate_betas",
    "validate_schedule",
]
