"""Preference groups: which sequences a prompt's loss compares (DESIGN §3).

`groups [P, G]` int64 indexes the S scored sequences: column 0 is the prompt's positive, then its
strong negatives (rejected responses), then weak negatives (responses written for other prompts,
scored under this prompt); -1 pads a row after its positive. A sequence may appear in several
groups (weak negatives are often shared). With global negatives (a process group), indices refer to
the concatenation of every rank's sequences in rank order.
"""
from __future__ import annotations

import torch

from epa_kernels._validation import check_tensor, require


def make_groups(num_prompts: int, num_strong: int, num_weak: int = 0, *, device=None) -> torch.Tensor:
    """The regular prompt-major layout: group p holds sequences p·G … p·G+G−1, G = 1 + num_strong + num_weak.

    >>> make_groups(2, 1, 2)
    tensor([[0, 1, 2, 3],
            [4, 5, 6, 7]])
    """
    for name, value, low in (("num_prompts", num_prompts, 1), ("num_strong", num_strong, 0), ("num_weak", num_weak, 0)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int, got {type(value).__name__}")
        if value < low:
            raise ValueError(f"{name} must be >= {low}, got {value}")
    size = 1 + num_strong + num_weak
    return torch.arange(num_prompts * size, dtype=torch.int64, device=device).view(num_prompts, size)


def check_groups(groups, num_seqs: int, *, ordered: bool = False) -> torch.Tensor:
    """Validate groups against S = num_seqs sequences; return the boolean mask of real entries [P, G].

    ordered: padding must be trailing (ranked lists, e.g. Plackett-Luce).
    """
    check_tensor("groups", groups, dims=(2,))
    if groups.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"groups must be int64 (or int32) sequence indices, got {groups.dtype}")
    if groups.shape[0] == 0 or groups.shape[1] == 0:
        raise ValueError(f"groups must be [P, G] with P, G >= 1, got {tuple(groups.shape)}")
    no_positive = groups[:, 0] < 0
    require(~no_positive.any(), lambda: f"groups row {int(no_positive.nonzero()[0])} has no positive: column 0 must "
                                        "be a sequence index, got -1")
    bad = (groups < -1) | (groups >= num_seqs)
    require(~bad.any(), lambda: f"groups must index sequences in [0, {num_seqs}) or be -1 padding; found "
                                f"{int(groups[bad][0])}")
    mask = groups >= 0
    if ordered:
        require(~(mask[:, 1:] & ~mask[:, :-1]).any(),
                lambda: "groups must be ordered best→worst with -1 padding only at the end of a row")
    return mask
