"""The Triton backward's two schemes against the kernel contract in fp64 (the torch backend run on fp64 copies):
"atomic" (each tile adds dz·W and dzᵀ·h into fp32 gradients with atomics, the default) and "stored" (each tile
writes da for a chunk of tokens, two torch GEMMs form the gradients). Small chunks force several of them. The
inputs live on DEVICE (CUDA on a GPU machine, where the compiled kernels run; the interpreter's CPU otherwise); the
fp64 contract runs on the CPU."""
import pytest
import torch
from conftest import DEVICE, fresh_seed

from epa_kernels.ops import torch_logprobs
from epa_kernels.ops import triton_logprobs as tk

DTYPES = {"fp32": (torch.float32, 1e-5), "bf16": (torch.bfloat16, 2e-2)}


def case(dtype, *, tokens=70, dim=40, vocab=150, bias=False, entropy=False):
    gen = torch.Generator().manual_seed(fresh_seed())
    c = {"hidden": torch.randn(tokens, dim, generator=gen).to(dtype),
         "weight": (torch.randn(vocab, dim, generator=gen) / dim**0.5).to(dtype),
         "bias": (torch.randn(vocab, generator=gen) * 0.3).to(dtype) if bias else None,
         "targets": torch.randint(0, vocab, (tokens,), generator=gen),
         "coef_a": torch.randn(tokens, generator=gen), "coef_b": torch.randn(tokens, generator=gen),
         "coef_c": torch.randn(tokens, generator=gen) * 0.1 if entropy else None}
    return {k: None if v is None else v.to(DEVICE) for k, v in c.items()}


def gradients(c, run, *, softcap=None, temperature=1.0, **options):
    """The backward of `run` (torch_logprobs: on fp64 CPU copies, the contract; else the Triton launcher), on CPU."""
    cpu64 = {k: None if v is None else (v.double() if v.is_floating_point() else v).cpu() for k, v in c.items()}
    lse = torch_logprobs.forward(cpu64["hidden"], cpu64["weight"], cpu64["bias"], cpu64["targets"],
                                 temperature=temperature, softcap=softcap)[1].float()
    if run is torch_logprobs:
        c, lse = {**cpu64, **{k: c[k].cpu() if c[k] is not None else None for k in ("coef_a", "coef_b", "coef_c")}}, lse
    else:
        lse = lse.to(c["hidden"].device)
    got = run.backward(c["hidden"], c["weight"], c["bias"], c["targets"], lse, c["coef_a"], c["coef_b"], c["coef_c"],
                       temperature=temperature, softcap=softcap, **options)
    return tuple(None if g is None else g.cpu() for g in got)


def relative(got, want):
    return ((got.double() - want).norm() / want.norm()).item()


@pytest.mark.parametrize("dtype", DTYPES, ids=list(DTYPES))
@pytest.mark.parametrize("flags", ["plain", "bias+softcap+entropy+temperature"])
def test_stored_scheme_matches_fp64_and_the_atomic_scheme(dtype, flags):
    dtype, tol = DTYPES[dtype]
    full = flags != "plain"
    c = case(dtype, bias=full, entropy=full)
    options = {"softcap": 5.0, "temperature": 0.7} if full else {}
    want = gradients(c, torch_logprobs, **options)
    # 16 tokens per chunk under the interpreter (its BLOCK_M): 70 tokens are 5 chunks, the last one partial.
    stored = gradients(c, tk, scheme="stored", stored_bytes=1, **options)
    atomic = gradients(c, tk, **options)
    for name, s, a, w in zip(("d_hidden", "d_weight", "d_bias"), stored, atomic, want, strict=True):
        if w is None:
            assert s is None and a is None
            continue
        assert s.dtype == a.dtype == dtype, name
        assert relative(s, w) <= tol, f"{name}: stored scheme {relative(s, w):.2e} from fp64"
        assert relative(s, w) <= 2 * relative(a, w) + tol / 10, f"{name}: stored less accurate than atomic"


def test_stored_scheme_one_chunk_equals_several():
    c = case(torch.float32, tokens=50)
    one = gradients(c, tk, scheme="stored")  # the default buffer holds every token
    several = gradients(c, tk, scheme="stored", stored_bytes=1)
    for a, b in zip(one[:2], several[:2], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("need", ["hidden", "weight", "bias"])
def test_stored_scheme_computes_only_what_is_needed(need):
    c = case(torch.float32, bias=True)
    needs = {f"need_{n}": n == need for n in ("hidden", "weight", "bias")}
    got = gradients(c, tk, scheme="stored", stored_bytes=1, **needs)
    want = gradients(c, torch_logprobs, **needs)
    for g, w in zip(got, want, strict=True):
        assert (g is None) == (w is None)
        if w is not None:
            assert relative(g, w) <= 1e-5


def test_stored_scheme_filters_the_same_tiles_as_the_atomic_one():
    c = case(torch.float32, tokens=60, vocab=200)
    c["weight"] = c["weight"] * 20.0  # a peaked softmax: most tiles hold no probability near eps
    eps = 0.05
    stored = gradients(c, tk, scheme="stored", stored_bytes=1, filter_eps=eps)
    atomic = gradients(c, tk, filter_eps=eps)
    exact = gradients(c, tk)
    assert relative(atomic[0], exact[0].double()) > 0, "eps filtered nothing: the case does not test the filter"
    for s, a in zip(stored[:2], atomic[:2], strict=True):
        torch.testing.assert_close(s, a, rtol=1e-5, atol=1e-6)


def test_unknown_scheme_and_empty_buffer_are_refused():
    c = case(torch.float32, tokens=4)
    with pytest.raises(ValueError, match="scheme must be 'atomic' or 'stored'"):
        gradients(c, tk, scheme="fast")
    with pytest.raises(ValueError, match="stored_bytes must be positive"):
        gradients(c, tk, scheme="stored", stored_bytes=0)
