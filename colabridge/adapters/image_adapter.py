"""Per-modality in/out projections that let the Cola DiT trunk read and write another latent space.

An :class:`ImageAdapter` replaces the DiT's ``txt_in.proj`` / ``txt_out.proj`` for the tokens of its
modality (see :class:`~colabridge.adapters.multimodal.MultimodalPrior`): latent tokens ``c·p·p`` →
DiT width (plus a learned modality embedding and a per-patch embedding, since the DiT's 1-D RoPE
alone does not say where a patch sits in 2-D), and DiT width → velocity in the latent space. LoRA on
the shared trunk is added separately with PEFT (:mod:`colabridge.adapters.saving`).
"""

from __future__ import annotations

import torch
import torch.nn as nn
from diffusers import ConfigMixin, ModelMixin  # ModelMixin must be a module-level name for diffusers loading
from diffusers.configuration_utils import register_to_config

from .latent_spaces import latent_space_from_config

EMBEDDING_INIT_STD = 0.02  # modality / patch embeddings start small so the trunk first sees plain projections


class ImageAdapter(ModelMixin, ConfigMixin):
    r"""Token projections between a registered latent space and a DiT of width ``txt_dim``.

    Args:
        latent_space: the space's ``to_config()`` dict (e.g. :class:`ImageLatentSpace`), rebuilt through
            the latent-space registry; fixes ``token_dim`` and ``num_tokens``.
        txt_dim: width of the DiT trunk (``transformer.config.txt_dim``).
    """

    config_name = "config.json"

    @register_to_config
    def __init__(self, latent_space: dict, txt_dim: int):
        super().__init__()
        self.space = latent_space_from_config(latent_space)
        self.proj_in = nn.Linear(self.space.token_dim, txt_dim)
        self.proj_out = nn.Linear(txt_dim, self.space.token_dim)
        self.modality_embedding = nn.Parameter(torch.zeros(txt_dim))
        self.patch_embedding = nn.Parameter(torch.zeros(self.space.num_tokens, txt_dim))
        self.init_weights()

    def init_weights(self) -> None:
        """xavier in-projection; zero out-projection (a new adapter predicts v = 0); small embeddings."""
        nn.init.xavier_uniform_(self.proj_in.weight)
        nn.init.zeros_(self.proj_in.bias)
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)
        nn.init.normal_(self.modality_embedding, std=EMBEDDING_INIT_STD)
        nn.init.normal_(self.patch_embedding, std=EMBEDDING_INIT_STD)

    @property
    def token_dim(self) -> int:
        return self.space.token_dim

    @property
    def num_tokens(self) -> int:
        return self.space.num_tokens

    def embed(self, tokens: torch.Tensor, patch_index: torch.LongTensor) -> torch.Tensor:
        """Latent tokens ``(B, L, token_dim)`` at patch indices ``(B, L)`` → DiT inputs ``(B, L, txt_dim)``."""
        return self.proj_in(tokens) + self.modality_embedding + self.patch_embedding[patch_index]

    def project(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final DiT hidden states ``(B, L, txt_dim)`` → velocity ``(B, L, token_dim)``."""
        return self.proj_out(hidden)
