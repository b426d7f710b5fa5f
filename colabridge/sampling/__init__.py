"""The shared block-causal flow-matching engine (modality-agnostic)."""

from .engine import (CachedStream, guided_velocity, pin, projected_velocity, round_to, transport_block,
                     transport_in_passes)
from .schedules import NUM_TRAIN_TIMESTEPS, official_sigmas
from .tokens import apply_repetition_penalty, filter_top_k_top_p, select_tokens

__all__ = [
    "CachedStream", "NUM_TRAIN_TIMESTEPS", "apply_repetition_penalty", "filter_top_k_top_p", "guided_velocity",
    "official_sigmas", "pin", "projected_velocity", "round_to", "select_tokens", "transport_block",
    "transport_in_passes",
]
