"""Vision-language policies (Qwen2-VL / Qwen2.5-VL): multimodal rotary positions.

Qwen2-VL's M-RoPE gives every token three position ids (temporal, height, width). Text tokens
carry the same value in all three, counting on from the previous token; the ``image_pad`` tokens of
one image carry ``start + (t, row, column)`` over the image's merged grid, and the text after it
resumes at ``start + max(rows, columns)``. Computed here from the token ids and the grids alone
(the same numbers as HF's ``get_rope_index``, whose signature moves between transformers
releases), so the actor, the reference and the torch engine pass explicit positions.
"""

from __future__ import annotations

import torch


def mrope_positions(input_ids_L: torch.Tensor, image_grid_thw_I3: torch.Tensor, image_token_id: int,
                    spatial_merge_size: int) -> torch.Tensor:
    """Positions ``[3, L]`` of one unpadded sequence whose images' placeholders are expanded.

    The ``image_pad`` runs are matched to ``image_grid_thw_I3`` in order; each run must be exactly
    ``t * h * w / spatial_merge_size**2`` tokens long."""
    ids = input_ids_L.tolist()
    grids = image_grid_thw_I3.tolist()
    pieces: list[torch.Tensor] = []
    pos, i, image = 0, 0, 0
    while i < len(ids):
        if ids[i] != image_token_id:
            j = i
            while j < len(ids) and ids[j] != image_token_id:
                j += 1
            pieces.append(torch.arange(pos, pos + j - i).expand(3, -1))
            pos += j - i
            i = j
            continue
        assert image < len(grids), "more image placeholders than images"
        t, h, w = grids[image]
        h, w = h // spatial_merge_size, w // spatial_merge_size
        count = t * h * w
        assert ids[i:i + count] == [image_token_id] * count and (i + count == len(ids) or ids[i + count] != image_token_id), \
            f"image {image}: its placeholder run is not {count} tokens"
        grid_t, grid_h, grid_w = torch.meshgrid(torch.arange(t), torch.arange(h), torch.arange(w), indexing="ij")
        pieces.append(torch.stack([grid_t, grid_h, grid_w]).reshape(3, -1) + pos)
        pos += max(h, w)
        i += count
        image += 1
    assert image == len(grids), "fewer image placeholders than images"
    if not pieces:
        return torch.zeros(3, 0, dtype=torch.long)
    return torch.cat(pieces, dim=1).long()
