"""Retrieval metrics for embedding spaces (CLIP-style): recall@k of queries among keys."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def recall_at_k(queries: torch.Tensor, keys: torch.Tensor, targets: torch.LongTensor | None = None,
                ks: tuple[int, ...] = (1, 5)) -> dict[str, float]:
    """Share of queries ``(Q, D)`` whose target key (row ``targets[i]`` of ``keys`` ``(N, D)``; default ``i``)
    is among the ``k`` most cosine-similar keys (rank = number of keys strictly more similar than the target).

    Returns ``{"R@1": ..., "R@5": ..., "chance@1": 1/N, "chance@5": 5/N}``.
    """
    if queries.ndim != 2 or keys.ndim != 2 or queries.shape[1] != keys.shape[1]:
        raise ValueError(f"queries (Q, D) and keys (N, D) must share D, got {tuple(queries.shape)} and {tuple(keys.shape)}.")
    if targets is None:
        if queries.shape[0] != keys.shape[0]:
            raise ValueError("without `targets`, query i must match key i: pass as many queries as keys.")
        targets = torch.arange(queries.shape[0], device=queries.device)
    sims = F.normalize(queries.float(), dim=-1) @ F.normalize(keys.float(), dim=-1).T  # (Q, N)
    target_sim = sims.gather(1, targets[:, None])  # (Q, 1)
    rank = (sims > target_sim).sum(1)  # (Q,) keys strictly better than the target
    out = {}
    for k in ks:
        out[f"R@{k}"] = float((rank < k).float().mean())
        out[f"chance@{k}"] = min(k, keys.shape[0]) / keys.shape[0]
    return out


__all__ = ["recall_at_k"]


@torch.no_grad()
def clip_prior_retrieval(pipe, clip_tokenizer, examples, num_inference_steps: int = 16, guidance_scale: float = 3.0,
                         seed: int = 0) -> dict:
    """Caption → image retrieval among the examples' images in a CLIP space, two ways.

    ``prior``: one ``pipe`` (:class:`~colabridge.pipelines.ColaClipPriorPipeline`) sample per caption as the
    query; ``text_tower``: the CLIP's own text embedding of the caption. Keys: the image tower's embeddings of
    the ``examples`` (shapes-world ``ShapesExample``); query ``i`` should retrieve image ``i``.
    """
    import numpy as np

    clip = pipe.image_encoder
    keys = clip.embed_images(np.stack([e.image for e in examples])).float()  # (N, D)
    captions = [e.caption for e in examples]
    prior = pipe(captions, num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                 generator=torch.Generator().manual_seed(seed)).image_embeds  # (N, D)
    text = clip.encode_text(clip_tokenizer(captions).to(keys.device)).float()  # (N, D)
    return {"num": len(examples), "num_inference_steps": num_inference_steps, "guidance_scale": guidance_scale,
            "prior": recall_at_k(prior, keys), "text_tower": recall_at_k(text, keys),
            "prior_cosine_to_target": float((prior * keys).sum(-1).mean())}


__all__ += ["clip_prior_retrieval"]
