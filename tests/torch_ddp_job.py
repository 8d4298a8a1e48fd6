"""DDP and FSDP2 training with backend "collcomm", compared with the same training over gloo.

Run under torchrun (``python -m torch.distributed.run --nproc-per-node N tests/torch_ddp_job.py``).
The default process group is collcomm; a gloo group of the same ranks is made next to it, and the
same model (fixed seed) is trained on the same data (fixed per rank) once over each:

* DDP, a 2-layer MLP, 20 SGD steps;
* DDP with ``find_unused_parameters=True``, a model with a branch that is never used and one used
  on even steps only, 20 steps;
* DDP with the PowerSGD comm hook (its callbacks run collectives and wait for them), 20 steps;
* FSDP2 (``fully_shard``) on CPU, 5 steps (``--fsdp``).

Each rank writes ``rank<R>.json`` into ``--results DIR`` (stdout is shared by the ranks under
torchrun, so lines there can interleave): for every variant whether the parameters after the
last step match gloo's (``torch.allclose``), the largest difference, and whether every rank holds
the same parameters.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys

import torch
import torch.distributed as dist
import torch.nn as nn


class MLP(nn.Module):
    def __init__(self, unused: bool = False):
        super().__init__()
        self.fc1 = nn.Linear(16, 32)
        self.fc2 = nn.Linear(32, 4)
        self.unused = unused
        if unused:
            self.never = nn.Linear(32, 4)      # never in the graph
            self.sometimes = nn.Linear(32, 4)  # in the graph on even steps only
        self.step = 0

    def forward(self, x):
        h = torch.relu(self.fc1(x))
        out = self.fc2(h)
        if self.unused and self.step % 2 == 0:
            out = out + self.sometimes(h)
        return out


def data(step: int, rank: int):
    g = torch.Generator().manual_seed(1000 * rank + step)
    return torch.randn(8, 16, generator=g), torch.randn(8, 4, generator=g)


def train_ddp(pg, unused: bool, steps: int, powersgd: bool = False) -> list[torch.Tensor]:
    torch.manual_seed(0)
    model = MLP(unused)
    ddp = nn.parallel.DistributedDataParallel(model, process_group=pg, find_unused_parameters=unused)
    if powersgd:  # a comm hook whose future callbacks run further collectives and wait for them
        from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook as powerSGD

        state = powerSGD.PowerSGDState(process_group=pg, matrix_approximation_rank=1, start_powerSGD_iter=2,
                                       use_error_feedback=False, warm_start=False)
        ddp.register_comm_hook(state, powerSGD.powerSGD_hook)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.05, momentum=0.9)
    for s in range(steps):
        model.step = s
        x, y = data(s, dist.get_rank())
        opt.zero_grad()
        loss = ((ddp(x) - y) ** 2).mean()
        loss.backward()
        opt.step()
    return [p.detach().clone() for p in model.parameters()]


def train_fsdp(pg, steps: int) -> list[torch.Tensor]:
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = MLP()
    mesh = DeviceMesh.from_group(pg, "cpu")
    for layer in (model.fc1, model.fc2):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for s in range(steps):
        x, y = data(s, dist.get_rank())
        opt.zero_grad()
        loss = ((model(x) - y) ** 2).mean()
        loss.backward()
        opt.step()
    return [p.full_tensor().detach().clone() for p in model.parameters()]


def compare(a: list[torch.Tensor], b: list[torch.Tensor], group) -> dict:
    flat = torch.cat([p.reshape(-1) for p in a])
    hi, lo = flat.clone(), flat.clone()
    dist.all_reduce(hi, op=dist.ReduceOp.MAX, group=group)
    dist.all_reduce(lo, op=dist.ReduceOp.MIN, group=group)
    return {"match": all(torch.allclose(x, y) for x, y in zip(a, b)),
            "max_diff": max(float((x - y).abs().max()) for x, y in zip(a, b)),
            "ranks_agree": bool(torch.equal(hi, flat) and torch.equal(lo, flat))}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--fsdp", action="store_true")
    ap.add_argument("--fsdp-steps", type=int, default=5)
    ap.add_argument("--results", help="a folder for rank<R>.json (default: a RESULT line on stdout)")
    args = ap.parse_args()
    from collcomm.integrations.torch import register

    register()
    dist.init_process_group("collcomm", timeout=datetime.timedelta(seconds=60))
    gloo = dist.new_group(backend="gloo")
    result: dict = {"rank": dist.get_rank(), "world_size": dist.get_world_size(),
                    "backend": dist.get_backend()}
    for unused in (False, True):
        mine = train_ddp(dist.group.WORLD, unused, args.steps)
        ref = train_ddp(gloo, unused, args.steps)
        result["ddp_unused" if unused else "ddp"] = compare(mine, ref, gloo)
    mine = train_ddp(dist.group.WORLD, False, args.steps, powersgd=True)
    ref = train_ddp(gloo, False, args.steps, powersgd=True)
    result["ddp_powersgd"] = compare(mine, ref, gloo)
    if args.fsdp:
        mine = train_fsdp(dist.group.WORLD, args.fsdp_steps)
        ref = train_fsdp(gloo, args.fsdp_steps)
        result["fsdp"] = compare(mine, ref, gloo)
    if args.results:
        with open(os.path.join(args.results, f"rank{result['rank']}.json"), "w") as f:
            json.dump(result, f)
    else:
        print("RESULT " + json.dumps(result), flush=True)
    dist.destroy_process_group()
    # About one exit in 50 of a process that imported torch aborts in C++ static destructors
    # ("terminate called without an active exception", no Python frame; gloo-only jobs too): the
    # results are written, so leave without the interpreter's teardown, as the other test ranks do.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
