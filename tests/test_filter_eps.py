"""Gradient filtering (`filter_eps`, a probability): Triton skips whole tiles whose probabilities are all below it
and that hold no target; native drops single entries and replaces their sum by the mean row (see
csrc/linear_logprobs.cpp, SparseTile). Checked against fp64."""
import pytest
import torch
from conftest import BACKEND_PARAMS, DEVICE, fresh_seed

import epa_kernels

TRITON = next(p for p in BACKEND_PARAMS if p.values[0] == "triton")
NATIVE = next(p for p in BACKEND_PARAMS if p.values[0] == "native")


def peaked_case(lengths, *, vocab=700, dim=32, dtype=torch.float32, bias=False):
    """Packed sequences whose softmax is peaked (large logits), so that most |∂z| are tiny, as in a trained model."""
    gen = torch.Generator().manual_seed(fresh_seed())
    total = sum(lengths)
    case = {
        "hidden": torch.randn(total, dim, generator=gen).to(dtype).requires_grad_(),
        "weight": (torch.randn(vocab, dim, generator=gen) * 6.0 / dim**0.5).to(dtype).requires_grad_(),
        "targets": torch.randint(0, vocab, (total,), generator=gen),
        "cu_seqlens": torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()]),
        "bias": (torch.randn(vocab, generator=gen) * 0.5).to(dtype).requires_grad_() if bias else None,
    }
    # one upstream gradient per sequence, of both signs
    case["upstream"] = torch.linspace(-1, 1, len(lengths))
    case["per_token"] = case["upstream"].double().repeat_interleave(torch.tensor(lengths))
    return case


def gradients(case, backend, filter_eps):
    """d hidden, d weight (, d bias) of Σ upstream·logp, computed on the backend's device (Triton: CUDA on a GPU
    machine, the interpreter's CPU otherwise) and returned on the CPU, where the fp64 checks run."""
    device = DEVICE if backend == "triton" else torch.device("cpu")
    leaves = [case[k].detach().to(device).requires_grad_() for k in ("hidden", "weight", "bias") if case[k] is not None]
    out = epa_kernels.linear_logprobs(leaves[0], leaves[1], case["targets"].to(device),
                                      bias=leaves[2] if len(leaves) == 3 else None,
                                      cu_seqlens=case["cu_seqlens"].to(device), backend=backend, filter_eps=filter_eps)
    return tuple(g.cpu() for g in torch.autograd.grad((out * case["upstream"].to(device)).sum(), leaves))


def probabilities(case):
    h, w = case["hidden"].detach().double(), case["weight"].detach().double()
    logits = h @ w.T + (case["bias"].detach().double() if case["bias"] is not None else 0.0)
    return torch.softmax(logits, dim=1)


def softmax_part(case):
    """fp64 −g·p: the part of ∂z that filtering may drop (the one-hot target terms g·onehot are always exact)."""
    return -case["per_token"][:, None] * probabilities(case)


def launch_tiles(case, x):
    """[M, V] → the max of x over each (BLOCK_M, BLOCK_V) tile of the Triton backward launch for this case."""
    from epa_kernels.ops import triton_logprobs as tk

    cfg = tk._config(len(x), case["hidden"].dtype, tk._BACKWARD_CONFIG, tk._BACKWARD_CONFIG_FEW_TOKENS)
    padded = torch.nn.functional.pad(x, (0, -x.shape[1] % cfg.block_v, 0, -x.shape[0] % cfg.block_m))
    return padded.unflatten(0, (-1, cfg.block_m)).unflatten(2, (-1, cfg.block_v)).amax(dim=(1, 3)), cfg


def eps_between_tiles(case):
    """A mid-range eps that keeps some tiles and skips others, at the geometric mean of the widest gap between
    two neighbouring tile maxima in the middle half: no tile's max lies within rounding of it, so the kernel's fp32
    probabilities (GPU exp2 approximations included) sort every tile the way the fp64 emulation does."""
    maxima = launch_tiles(case, probabilities(case))[0].flatten().sort().values
    middle = maxima[len(maxima) // 4: 3 * len(maxima) // 4 + 1]
    i = (middle[1:] / middle[:-1]).argmax()
    assert middle[i + 1] / middle[i] > 1.01, "no gap between tile maxima: the case cannot separate them"
    return (middle[i] * middle[i + 1]).sqrt().item()


def triton_filtered_fp64(case, eps):
    """What the Triton filter computes, in fp64: ∂z zeroed over every (BLOCK_M, BLOCK_V) tile of the launch whose
    probabilities are all below eps and that holds no counted target (one whose upstream gradient is not 0)."""
    h, w = case["hidden"].detach().double(), case["weight"].detach().double()
    p = probabilities(case)
    g = case["per_token"][:, None]
    onehot = torch.zeros_like(p)
    onehot[torch.arange(len(p)), case["targets"]] = 1.0
    dz = g * (onehot - p)
    tile_p, cfg = launch_tiles(case, p)
    keep = (tile_p >= eps) | (launch_tiles(case, onehot * (g != 0))[0] > 0)
    mask = keep.repeat_interleave(cfg.block_m, 0)[: len(p)].repeat_interleave(cfg.block_v, 1)[:, : p.shape[1]]
    dz = dz * mask
    return dz @ w, dz.T @ h


@pytest.mark.parametrize("backend", [TRITON])
def test_triton_skips_tiles_without_probability_or_target(backend):
    """eps = 0 is exact; a middle eps skips some tiles, exactly those of the fp64 emulation, erring by at most
    |g_t|·eps per skipped entry summed over the vocabulary (|Δ d_hidden[t]| ≤ eps·Σ_j |W_j| with |g_t| ≤ 1); a huge
    eps keeps only the tiles that hold targets."""
    case = peaked_case([40, 90, 130])
    exact = gradients(case, backend, None)
    for got, want in zip(gradients(case, backend, 0.0), exact, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)  # on a GPU the atomics' order varies
    eps = eps_between_tiles(case)  # some tiles skipped, others kept
    d_hidden, d_weight = gradients(case, backend, eps)
    err_h = (d_hidden - exact[0]).norm(dim=1)
    assert err_h.max() > 0, "eps filtered nothing: the case does not test the filter"
    assert err_h.max() <= eps * case["weight"].detach().norm(dim=1).sum() * 1.01 + 1e-6
    for huge in (eps, 1e9):
        for got, want in zip(gradients(case, backend, huge), triton_filtered_fp64(case, huge), strict=True):
            torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5)


def native_filtered_fp64(case, eps):
    """What the native filter computes, in fp64: kept entries exactly, each row's (column's) dropped sum times the
    mean row W̄ (H̄), the target terms exactly."""
    h, w = case["hidden"].detach().double(), case["weight"].detach().double()
    soft = softmax_part(case)
    dropped = torch.where(probabilities(case) >= eps, 0.0, soft)
    dz = soft - dropped
    dz[torch.arange(len(dz)), case["targets"]] += case["per_token"]
    d_hidden = dz @ w + dropped.sum(1, keepdim=True) * w.mean(0)
    d_weight = dz.T @ h + dropped.sum(0)[:, None] * h.mean(0)
    d_bias = (dz + dropped).sum(0)  # the bias gradient stays exact
    return d_hidden, d_weight, d_bias


# 4500 tokens: two token blocks (4096 + 404) and two vocabulary tiles (512 + 188) in the native tiling.
@pytest.mark.parametrize("backend", [NATIVE])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_native_drops_small_entries_and_corrects_their_sum(backend, dtype):
    case = peaked_case([1500, 1500, 1500], dtype=dtype, bias=True)
    p = probabilities(case)
    eps = p.flatten().kthvalue(int(0.97 * p.numel())).values.item()  # ~3% kept: the sparse path
    got = gradients(case, backend, eps)
    want = native_filtered_fp64(case, eps)
    exact = gradients(case, backend, None)
    # Entries within rounding of eps may fall either side: each moves a result by at most eps·|g|·|row|.
    tol = {torch.float32: 1e-4, torch.bfloat16: 2e-2}[dtype]
    for name, g, e, x in zip(("d_hidden", "d_weight", "d_bias"), got, want, exact, strict=True):
        scale = e.norm().item()
        err = (g.double() - e).norm().item() / scale
        assert err <= tol, f"{name}: relative error {err:.2e} to the fp64 filter > {tol}"
        if name != "d_bias":  # the filter changed something, by much less than the gradient
            change = (x.double() - e).norm().item() / scale
            assert 1e-6 < change < 0.05, f"{name}: filtered vs exact differ by {change:.2e}"
    # the residual bound per row: |Δ d_hidden[t]| ≤ |g_t|·eps·Σ_j |W_j − W̄|
    w = case["weight"].detach().double()
    bound_h = case["per_token"].abs() * eps * (w - w.mean(0)).norm(dim=1).sum()
    assert ((got[0].double() - exact[0].double()).norm(dim=1) <= bound_h * 1.01 + tol).all()


@pytest.mark.parametrize("backend", [NATIVE])
def test_native_huge_eps_keeps_the_target_terms_and_the_mean_rows(backend):
    """Everything dropped: d_hidden[t] = g_t·(W[y_t] − W̄) since Σ_j p_tj = 1; d_weight[j] = Σ_{y_t=j} g_t·h_t −
    (Σ_t g_t·p_tj)·H̄."""
    case = peaked_case([40, 90, 130])
    d_hidden, d_weight = gradients(case, backend, 1e9)
    want_h, want_w, _ = native_filtered_fp64(case, float("inf"))
    w = case["weight"].detach().double()
    g = case["per_token"][:, None]
    torch.testing.assert_close(want_h, g * (w[case["targets"]] - w.mean(0)))  # the closed form itself
    torch.testing.assert_close(d_hidden.double(), want_h, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(d_weight.double(), want_w, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", [NATIVE])
def test_native_dense_tiles_stay_exact(backend):
    """A tile keeping more entries than sparse updates can beat is applied exactly by the GEMMs (and the bias
    gradient stays exact, though the tile stopped collecting entries)."""
    case = peaked_case([40, 90, 130], bias=True)
    p = probabilities(case)
    eps = p.flatten().kthvalue(int(0.5 * p.numel())).values.item()  # half kept: dense
    for got, want in zip(gradients(case, backend, eps), gradients(case, backend, None), strict=True):
        torch.testing.assert_close(got, want)
