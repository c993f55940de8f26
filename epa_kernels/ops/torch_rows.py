"""Row work of the `gemm` backend in plain PyTorch: the reference (and the CPU implementation) of `triton_rows`.

The GEMMs of `gemm_logprobs` leave a chunk of raw logits a [R, C] in the input dtype: R tokens against the C
vocabulary rows v0 … v0 + C − 1 (a token chunk has v0 = 0 and C = V). The row work turns them into what the
kernel contract (`torch_logprobs`) needs, in fp32, reading each logit once:

    z = c · tanh(a / (T · c))  (softcap c; without one z = a / T)

    forward_rows   online log-sum-exp across chunks: per row a running max m, Σ e^(z − m), Σ e^(z − m)·z (for the
                   entropy statistic ez) and the target logit z[y] when y falls in this chunk (`RowState`)
    backward_rows  writes, in place over a, the gradient w.r.t. a of the contract's dz:
                   dz = coef_a · 1[v = y] + p · (coef_b + coef_c · z),  p = e^(z − lse)
                   da = dz · (1 − (z / c)²) / T  (the softcap's and the temperature's chain), rounded to the
                   input dtype

Rows are taken a block at a time so that the fp32 temporaries stay below SCRATCH_BYTES whatever the chunk: the
memory budget of the backend bounds its logits buffer, not this scratch (the Triton kernels need none).
"""
from __future__ import annotations

from typing import NamedTuple

import torch

# fp32 scratch of one block of rows: at most FP32_TEMPORARIES [rows, C] fp32 tensors are live at once.
SCRATCH_BYTES = 16 * 1024 * 1024
FP32_TEMPORARIES = 3


class RowState(NamedTuple):
    """The online log-sum-exp of R rows, fp32 [R] each: running max, Σ e^(z − max), Σ e^(z − max)·z (None without
    the entropy) and the target logit (0 until the chunk holding the target is seen)."""

    max: torch.Tensor
    sum: torch.Tensor
    ez: torch.Tensor | None
    target: torch.Tensor

    @classmethod
    def fresh(cls, num_rows: int, device, with_entropy: bool) -> RowState:
        zeros = torch.zeros(3 if with_entropy else 2, num_rows, device=device, dtype=torch.float32)
        return cls(torch.full((num_rows,), float("-inf"), device=device, dtype=torch.float32), zeros[0],
                   zeros[2] if with_entropy else None, zeros[1])

    def rows(self, start: int, stop: int) -> RowState:
        """Views of rows start … stop − 1: the row work updates them in place."""
        return RowState(*(None if t is None else t[start:stop] for t in self))

    def finish(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(logp, lse, ez | None) once every chunk has been seen."""
        lse = self.max + torch.log(self.sum)
        return self.target - lse, lse, None if self.ez is None else self.ez / self.sum


def _blocks(logits: torch.Tensor):
    step = max(1, SCRATCH_BYTES // (FP32_TEMPORARIES * 4 * logits.shape[1]))
    return [slice(start, start + step) for start in range(0, logits.shape[0], step)]


def _transform(a: torch.Tensor, inv_temp: float, softcap: float | None) -> torch.Tensor:
    """fp32 z of raw logits a, in a new tensor (a.float() is a itself when a is fp32: kept logits must survive)."""
    z = a.float() * inv_temp
    if softcap is not None:
        z.div_(softcap).tanh_().mul_(softcap)
    return z


def _target_columns(targets: torch.Tensor, v0: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(column of each row's target in this chunk, clamped into range; whether it is in this chunk)."""
    local = targets - v0
    return local.clamp(0, width - 1)[:, None], (local >= 0) & (local < width)


def forward_rows(logits: torch.Tensor, targets: torch.Tensor, v0: int, state: RowState, *, inv_temp: float,
                 softcap: float | None) -> None:
    """Fold the chunk logits [R, C] (vocabulary rows v0 …) into `state` (R rows), in place."""
    for rows in _blocks(logits):
        z = _transform(logits[rows], inv_temp, softcap)
        new_max = torch.maximum(state.max[rows], z.amax(1))
        scale = torch.exp(state.max[rows] - new_max)  # 0 on the first chunk (max −inf)
        e = torch.exp(z - new_max[:, None])
        state.sum[rows] = state.sum[rows] * scale + e.sum(1)
        if state.ez is not None:
            state.ez[rows] = state.ez[rows] * scale + e.mul_(z).sum(1)
        column, inside = _target_columns(targets[rows], v0, logits.shape[1])
        state.target[rows] += torch.where(inside, z.gather(1, column).squeeze(1), 0.0)
        state.max[rows] = new_max


def backward_rows(logits: torch.Tensor, targets: torch.Tensor, v0: int, lse: torch.Tensor, coef_a: torch.Tensor,
                  coef_b: torch.Tensor, coef_c: torch.Tensor | None, *, inv_temp: float,
                  softcap: float | None) -> None:
    """Overwrite the chunk logits [R, C] (vocabulary rows v0 …) with d loss / d logits, in their dtype."""
    for rows in _blocks(logits):
        z = _transform(logits[rows], inv_temp, softcap)
        dz = z.sub(lse[rows, None]).exp_()
        if coef_c is None:
            dz.mul_(coef_b[rows, None])
        else:
            dz.mul_(torch.addcmul(coef_b[rows, None], coef_c[rows, None], z))
        column, inside = _target_columns(targets[rows], v0, logits.shape[1])
        dz.scatter_add_(1, column, torch.where(inside, coef_a[rows], 0.0)[:, None])
        if softcap is not None:
            dz.mul_(z.div_(softcap).square_().neg_().add_(1.0))
        logits[rows] = dz.mul_(inv_temp)
