"""Global negatives across ranks: 2 gloo processes on CPU equal one process holding the concatenated batch.

Each rank holds its own prompts' sequences; its groups take weak negatives from the other rank through
global indices (position in the rank-ordered concatenation). Each rank's loss is the mean over its
own groups, so with equal prompts per rank: mean of the ranks' losses = the single-process loss, and
every gradient summed over ranks (what DDP's all-reduce does, before its averaging) = world size ×
the single-process gradient.
"""
import faulthandler
import os
import sys
import tempfile
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from epa_kernels import fused_linear_preference_loss, make_groups, preference_loss

WORLD = 2
# A collective waiting longer than HANG_S / 2 (the group's timeout) raises; a rank still running after HANG_S dumps
# every thread's stack and exits (a hang outside collectives). Either fails the test instead of stalling CI.
HANG_S = 120
VOCAB, DIM, PROMPTS_PER_RANK, STRONG, WEAK = 300, 24, 2, 1, 2
SIZE = 1 + STRONG + WEAK
SEQS_PER_RANK = PROMPTS_PER_RANK * SIZE


def full_batch(seed=0):
    """The concatenated batch: rank r owns sequences [r·S_r, (r+1)·S_r) and prompts [r·P_r, (r+1)·P_r)."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, 7, (WORLD * SEQS_PER_RANK,), generator=gen)
    tokens = int(lengths.sum())
    targets = torch.randint(0, VOCAB, (tokens,), generator=gen)
    targets[::5] = -100
    groups = make_groups(WORLD * PROMPTS_PER_RANK, STRONG, WEAK)
    # weak negatives: the other rank's positives (global indices)
    for p in range(WORLD * PROMPTS_PER_RANK):
        other_rank = (p // PROMPTS_PER_RANK + 1) % WORLD
        groups[p, 1 + STRONG :] = torch.arange(WEAK) * SIZE + other_rank * SEQS_PER_RANK
    return {
        "lengths": lengths,
        "hidden": torch.randn(tokens, DIM, generator=gen),
        "weight": torch.randn(VOCAB, DIM, generator=gen) / DIM**0.5,
        "targets": targets,
        "groups": groups,
        "ref_logps": torch.randn(WORLD * SEQS_PER_RANK, generator=gen) - 10,
    }


def rank_slice(batch, rank):
    seq = slice(rank * SEQS_PER_RANK, (rank + 1) * SEQS_PER_RANK)
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), batch["lengths"].cumsum(0)])
    tok = slice(int(offsets[seq.start]), int(offsets[seq.stop]))
    lengths = batch["lengths"][seq]
    return {
        "hidden": batch["hidden"][tok], "targets": batch["targets"][tok],
        "cu_seqlens": torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)]),
        "groups": batch["groups"][rank * PROMPTS_PER_RANK : (rank + 1) * PROMPTS_PER_RANK],
        "ref_logps": batch["ref_logps"][seq],
    }


def single_process(batch, fused):
    hidden = batch["hidden"].clone().requires_grad_()
    weight = batch["weight"].clone().requires_grad_()
    cu = torch.cat([torch.zeros(1, dtype=torch.int64), batch["lengths"].cumsum(0)])
    args = dict(cu_seqlens=cu, ref_logps=batch["ref_logps"], num_strong=STRONG, weak_weight=0.5, backend="torch")
    loss, _ = run_loss(fused, hidden, weight, batch["targets"], batch["groups"], args)
    d_hidden, d_weight = torch.autograd.grad(loss, (hidden, weight))
    return loss.detach(), d_hidden, d_weight


def run_loss(fused, hidden, weight, targets, groups, args, process_group=None):
    if fused:
        return fused_linear_preference_loss(hidden, weight, targets, groups, process_group=process_group, **args)
    from epa_kernels import linear_logprobs

    logps = linear_logprobs(hidden, weight, targets, cu_seqlens=args["cu_seqlens"], backend=args["backend"])
    return preference_loss(logps, args["ref_logps"], groups, num_strong=args["num_strong"],
                           weak_weight=args["weak_weight"], process_group=process_group)


def worker(rank, init_file, fused, out_dir):
    faulthandler.enable()  # a fatal signal (an abort in teardown, say) prints every thread's Python stack
    faulthandler.dump_traceback_later(HANG_S, exit=True)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD,
                            timeout=timedelta(seconds=HANG_S // 2))
    try:
        torch.set_num_threads(1)
        batch = full_batch()
        mine = rank_slice(batch, rank)
        hidden = mine["hidden"].clone().requires_grad_()
        weight = batch["weight"].clone().requires_grad_()
        args = dict(cu_seqlens=mine["cu_seqlens"], ref_logps=mine["ref_logps"], num_strong=STRONG, weak_weight=0.5,
                    backend="torch")
        loss, metrics = run_loss(fused, hidden, weight, mine["targets"], mine["groups"], args, dist.group.WORLD)
        d_hidden, d_weight = torch.autograd.grad(loss, (hidden, weight))
        torch.save({"loss": loss.detach(), "d_hidden": d_hidden, "d_weight": d_weight},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()
    sys.stdout.flush()  # as in scenario_worker: no interpreter finalisation after the result is written
    sys.stderr.flush()
    os._exit(0)


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed gloo")
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "unfused"])
def test_global_negatives_equal_single_process(fused):
    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(worker, args=(os.path.join(out_dir, "init"), fused, out_dir), nprocs=WORLD, join=True)
        ranks = [torch.load(os.path.join(out_dir, f"rank{r}.pt")) for r in range(WORLD)]
    loss, d_hidden, d_weight = single_process(full_batch(), fused)
    torch.testing.assert_close(sum(r["loss"] for r in ranks) / WORLD, loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.cat([r["d_hidden"] for r in ranks]), WORLD * d_hidden, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(sum(r["d_weight"] for r in ranks), WORLD * d_weight, rtol=1e-4, atol=1e-6)


# -- unequal ranks and bad input on one rank ------------------------------------------------------------------------

UNEQUAL_PROMPTS = (2, 1)  # rank 0 holds two prompts, rank 1 one: the gather pads rank 1's sequences


def unequal_split(batch):
    """Rank r holds UNEQUAL_PROMPTS[r] prompts (and their sequences); groups keep their global indices."""
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), batch["lengths"].cumsum(0)])
    first = [0, UNEQUAL_PROMPTS[0]]
    parts = []
    for rank, prompts in enumerate(UNEQUAL_PROMPTS):
        seq = slice(first[rank] * SIZE, (first[rank] + prompts) * SIZE)
        tok = slice(int(offsets[seq.start]), int(offsets[seq.stop]))
        parts.append({"hidden": batch["hidden"][tok], "targets": batch["targets"][tok],
                      "cu_seqlens": offsets[seq.start : seq.stop + 1] - offsets[seq.start],
                      "groups": batch["groups"][first[rank] : first[rank] + prompts],
                      "ref_logps": batch["ref_logps"][seq]})
    return parts


def unequal_batch():
    """Three prompts of 1 + STRONG + WEAK; each prompt's weak negatives are the next prompt's responses."""
    gen = torch.Generator().manual_seed(7)
    prompts = sum(UNEQUAL_PROMPTS)
    lengths = torch.randint(2, 7, (prompts * SIZE,), generator=gen)
    tokens = int(lengths.sum())
    groups = make_groups(prompts, STRONG, WEAK)
    for p in range(prompts):
        groups[p, 1 + STRONG :] = ((p + 1) % prompts) * SIZE + torch.arange(WEAK)
    return {"lengths": lengths, "hidden": torch.randn(tokens, DIM, generator=gen),
            "weight": torch.randn(VOCAB, DIM, generator=gen) / DIM**0.5,
            "targets": torch.randint(0, VOCAB, (tokens,), generator=gen), "groups": groups,
            "ref_logps": torch.randn(prompts * SIZE, generator=gen) - 10}


def scenario_worker(rank, init_file, scenario, fused, out_dir):
    faulthandler.enable()  # a fatal signal (an abort in teardown, say) prints every thread's Python stack
    faulthandler.dump_traceback_later(HANG_S, exit=True)
    # The group's timeout turns a hang (one rank raised, the other waits) into a failure instead of a stuck test.
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD,
                            timeout=timedelta(seconds=HANG_S // 2))
    try:
        torch.set_num_threads(1)
        batch = unequal_batch()
        mine = unequal_split(batch)[rank]
        hidden = mine["hidden"].clone().requires_grad_()
        weight = batch["weight"].clone().requires_grad_()
        groups = mine["groups"]
        if scenario == "bad-groups" and rank == 1:
            groups = groups.clone()
            groups[0, -1] = 10_000  # past the global sequence count: only this rank can see it is wrong
        args = dict(cu_seqlens=mine["cu_seqlens"], ref_logps=mine["ref_logps"], num_strong=STRONG, weak_weight=0.5,
                    backend="torch")
        try:
            loss, _ = run_loss(fused, hidden, weight, mine["targets"], groups, args, dist.group.WORLD)
            d_hidden, d_weight = torch.autograd.grad(loss, (hidden, weight))
            result = {"loss": loss.detach(), "d_hidden": d_hidden, "d_weight": d_weight}
        except ValueError as error:
            result = {"error": str(error)}
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()
    # CI saw this worker abort after its last Python frame ("terminate called without an active exception" in
    # interpreter finalisation, gloo's threads): the result is written, so leave without finalising.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_scenario(scenario, fused):
    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(scenario_worker, args=(os.path.join(out_dir, "init"), scenario, fused, out_dir), nprocs=WORLD,
                 join=True)
        return [torch.load(os.path.join(out_dir, f"rank{r}.pt")) for r in range(WORLD)]


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed gloo")
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "unfused"])
def test_unequal_sequence_counts_per_rank_equal_one_process(fused):
    """Rank 0 holds 8 sequences, rank 1 holds 4 (the gather pads): Σ_r loss_r and its gradients equal one process
    computing each rank's loss over the whole batch."""
    ranks = run_scenario("unequal", fused)
    assert all("error" not in r for r in ranks), ranks
    batch = unequal_batch()
    hidden = batch["hidden"].clone().requires_grad_()
    weight = batch["weight"].clone().requires_grad_()
    cu = torch.cat([torch.zeros(1, dtype=torch.int64), batch["lengths"].cumsum(0)])
    args = dict(cu_seqlens=cu, ref_logps=batch["ref_logps"], num_strong=STRONG, weak_weight=0.5, backend="torch")
    bounds = [0, UNEQUAL_PROMPTS[0], sum(UNEQUAL_PROMPTS)]
    losses = [run_loss(fused, hidden, weight, batch["targets"], batch["groups"][bounds[r] : bounds[r + 1]], args)[0]
              for r in range(WORLD)]
    d_hidden, d_weight = torch.autograd.grad(sum(losses), (hidden, weight))
    for rank, expected in zip(ranks, losses, strict=True):
        torch.testing.assert_close(rank["loss"], expected.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.cat([r["d_hidden"] for r in ranks]), d_hidden, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(sum(r["d_weight"] for r in ranks), d_weight, rtol=1e-4, atol=1e-6)


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed gloo")
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "unfused"])
def test_bad_groups_on_one_rank_raise_on_every_rank(fused):
    """Rank 1's groups index past the global sequence count: it raises the reason, rank 0 raises naming rank 1,
    and neither hangs."""
    ranks = run_scenario("bad-groups", fused)
    assert "error" in ranks[1] and "groups" in ranks[1]["error"], ranks[1]
    assert "error" in ranks[0] and "rank(s) [1]" in ranks[0]["error"], ranks[0]
