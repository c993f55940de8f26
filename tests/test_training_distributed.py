"""One training step on 2 gloo ranks (CPU) equals one process holding the whole step (DESIGN §9).

The planner gives each rank a shard of the step; weak negatives come from every rank's prompts (the plan is the
same everywhere). Each rank scales its prompts' mean loss by (its prompts × ranks / the step's prompts), so DDP's
gradient average is the gradient of the mean over all prompts, even with unequal shards. With SGD the updated
parameters are then the single-process ones. FSDP2 (`fully_shard` on the decoder layers and the root, as
accelerate's FSDP2 plugin lays it out) must give the same step: the LM head's weight is used directly inside the
wrapper's forward, which only works while the root's parameters are unsharded. So must accelerate's own FSDP2
preparation with cpu_ram_efficient_loading, which unties the tied LM head (meta device, load with assign=True) and
relies on the wrapper's `tie_weights()`; the head stays the embedding through the step and a state-dict round trip.
"""
import faulthandler
import gc
import os
import sys
import tempfile
from datetime import timedelta
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from tiny_models import tiny_causal_lm

from epa_kernels.transformers import BatchPlanner, PreferenceExample, PreferenceModel

WORLD = 2
SEED = 1234
LR = 0.5
# A collective waiting longer than HANG_S / 2 (the group's timeout) raises; a rank still running after HANG_S dumps
# every thread's stack and exits (a hang outside collectives). Either fails the test instead of stalling CI.
HANG_S = 120


def examples():
    """Seven prompts with ragged responses (token ids < the tiny vocab)."""
    gen = torch.Generator().manual_seed(SEED)

    def ids(n):
        return tuple(torch.randint(4, 300, (n,), generator=gen).tolist())

    return [PreferenceExample(row=i, prompt=ids(3 + i % 3), responses=tuple(ids(2 + (i + j) % 4)
            for j in range(2 + i % 2))) for i in range(7)]


def planned_step():
    planner = BatchPlanner(examples(), max_tokens_per_batch=160, num_weak=2, seed=SEED, world_size=WORLD)
    step = planner.plan_epoch(0)[0]
    return planner, step


def make_wrapper():
    model = tiny_causal_lm("llama_tied", seed=SEED)
    model.train()  # dropout is 0 in the tiny config; train mode as in training
    return PreferenceModel(model, loss="epa", beta=0.5, weak_weight=0.5, backend="torch")


def ref_logps(batch):
    gen = torch.Generator().manual_seed(SEED + 1)
    keys = batch["keys"].tolist()
    noise = torch.randn(200, generator=gen).double()
    return torch.tensor([-30.0 + noise[(a * 13 + b * 5 + c) % 200].item() for a, b, c in keys], dtype=torch.float64)


def single_process_step():
    planner, step = planned_step()
    wrapper = make_wrapper()
    batch = planner.collate([p for shard in step.shards for p in shard])
    batch["ref_logps"] = ref_logps(batch)
    loss, _ = wrapper(batch)
    loss.backward()
    with torch.no_grad():
        for p in wrapper.parameters():
            p -= LR * p.grad
    return loss.item(), {k: v.detach().clone() for k, v in wrapper.model.state_dict().items()}


def accelerate_fsdp2(rank):
    """accelerate's FSDP2 preparation with cpu_ram_efficient_loading, of a fresh wrapper (accelerate enables FSDP
    only on accelerators: its `Accelerator` is stood in for) and that accelerator."""
    from accelerate.utils import FullyShardedDataParallelPlugin, fsdp2_prepare_model

    plugin = FullyShardedDataParallelPlugin(fsdp_version=2, cpu_ram_efficient_loading=True,
                                            auto_wrap_policy="transformer_based_wrap")
    accelerator = SimpleNamespace(state=SimpleNamespace(fsdp_plugin=plugin), torch_device_mesh=None,
                                  parallelism_config=None, mixed_precision="no", is_main_process=rank == 0,
                                  device=torch.device("cpu"))
    return fsdp2_prepare_model(accelerator, make_wrapper()), accelerator


def tied(wrapper):
    """The LM head's weight is the input embedding's: one parameter, sharded or not."""
    return wrapper.head.weight is wrapper.model.get_input_embeddings().weight


def full_state(wrapper):
    return {name: value.full_tensor() if hasattr(value, "full_tensor") else value.clone()
            for name, value in wrapper.model.state_dict().items()}


def sharded_step(rank, mode):
    """This rank's part of the step under DDP, FSDP2 or accelerate's FSDP2: the mean loss over all prompts, the full
    state, whether the head stayed tied and, for accelerate, the state dict's round trip."""
    torch.set_num_threads(1)
    planner, step = planned_step()
    if mode == "ddp":
        wrapper = make_wrapper()
        module = torch.nn.parallel.DistributedDataParallel(wrapper)
    elif mode == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        wrapper = make_wrapper()
        for layer in wrapper.model.model.layers:
            fully_shard(layer)
        module = fully_shard(wrapper)
    else:
        wrapper, accelerator = accelerate_fsdp2(rank)
        module = wrapper
    result = {"tied": [tied(wrapper)]}
    shard = step.shards[rank]
    batch = planner.collate(shard)
    batch["ref_logps"] = ref_logps(batch)
    loss, _ = module(batch)
    (loss * len(shard) * WORLD / step.num_prompts).backward()
    optimizer = torch.optim.SGD(wrapper.parameters(), lr=LR)
    optimizer.step()
    result["tied"].append(tied(wrapper))
    loss_sum = torch.tensor([loss.item() * len(shard)], dtype=torch.float64)
    dist.all_reduce(loss_sum)
    result.update(loss=loss_sum.item() / step.num_prompts, state=full_state(wrapper))
    if mode == "accelerate_fsdp2":
        # The trained full state dict into a fresh prepared wrapper, as accelerate loads one: assign=True unties
        # the head; accelerate then calls tie_weights() where the model has it.
        from accelerate.utils import fsdp2_load_full_state_dict

        fresh, _ = accelerate_fsdp2(rank)
        trained = {f"model.{name}": value for name, value in result["state"].items()}
        fsdp2_load_full_state_dict(accelerator, fresh, trained)
        if hasattr(fresh, "tie_weights"):
            fresh.tie_weights()
        result["tied"].append(tied(fresh))
        with torch.no_grad():
            result["round_trip"] = dict(state=full_state(fresh), loss=fresh(batch)[0].item(),
                                        expected_loss=wrapper(batch)[0].item())
    return result


def worker(rank, init_file, mode, out_dir):
    faulthandler.enable()  # a fatal signal (an abort in teardown, say) prints every thread's Python stack
    faulthandler.dump_traceback_later(HANG_S, exit=True)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD,
                            timeout=timedelta(seconds=HANG_S // 2))
    try:
        result = sharded_step(rank, mode)
        # DDP's reducer must die while the process group is still registered. If it outlives
        # destroy_process_group, it drops the group's last reference while holding the GIL; the group's
        # destructor then joins a gloo worker thread that needs the GIL to free its last finished work:
        # a deadlock, seen under CPU load (gdb: ~ProcessGroupGloo joining, runLoop in take_gil).
        gc.collect()
        if rank == 0:
            torch.save(result, os.path.join(out_dir, "out.pt"))
    finally:
        dist.destroy_process_group()
    # gloo's threads can abort interpreter finalisation ("terminate called without an active exception", seen in
    # tests/test_distributed.py): the result is written, so leave without finalising.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed gloo")
@pytest.mark.parametrize("mode", ["ddp", "fsdp2", "accelerate_fsdp2"])
def test_sharded_step_equals_single_process(mode):
    """The tiny model's LM head is tied to its embedding: it must stay one parameter, updated by both uses."""
    print(f"seed {SEED}")
    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(worker, args=(os.path.join(out_dir, "init"), mode, out_dir), nprocs=WORLD, join=True)
        result = torch.load(os.path.join(out_dir, "out.pt"))
    loss, state = single_process_step()
    assert result["loss"] == pytest.approx(loss, rel=1e-5)
    assert all(result["tied"]), f"the LM head untied (after sharding, the step, the round trip): {result['tied']}"
    initial = make_wrapper().model.state_dict()
    moved = 0
    for name, expected in state.items():
        torch.testing.assert_close(result["state"][name], expected, rtol=1e-5, atol=1e-6, msg=name)
        moved += int(not torch.equal(expected, initial[name]))
    assert moved > len(state) // 2, "the step must change most parameters for the comparison to mean something"
    if mode == "accelerate_fsdp2":
        round_trip = result["round_trip"]
        for name, value in result["state"].items():
            torch.testing.assert_close(round_trip["state"][name], value, rtol=0, atol=0, msg=name)
        assert round_trip["loss"] == round_trip["expected_loss"]


def test_planned_shards_are_unequal_and_weak_negatives_cross_ranks():
    """The fixture exercises what the weighting is for: shards of different sizes, weak negatives from the other
    rank."""
    planner, step = planned_step()
    assert len(step.shards[0]) != len(step.shards[1])
    rank_of = {p.example: r for r, shard in enumerate(step.shards) for p in shard}
    crossing = [(p.example, q) for shard in step.shards for p in shard for q, _ in p.weak
                if rank_of[q] != rank_of[p.example]]
    assert crossing, "some weak negative must come from another rank's prompt"
