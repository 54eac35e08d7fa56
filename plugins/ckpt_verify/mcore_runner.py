"""Load a converted legacy checkpoint into real megatron-core GPTModels on CPU and run it (the proof
in the tests, and `verify.py --logits`; needs megatron-core, which conversions do not). Tested with
0.16.1 (the venv's) and 0.12.1 and 0.19.2 (tests/test_mcore_versions.py); where the releases' GPTModel,
spec and config arguments differ, the code asks the release (signatures, config fields), not its version.

One process per rank (gloo), each building the GPTModel(s) of its rank from the checkpoint's
`args`, loading its file with `strict=True` and running a forward in fp32; pipeline stages pass
hidden states with send/recv in layer order (VPP and dualpipev chunks included; noop layers are
weightless pass-through modules in their slots), and the last stage returns the full-vocabulary
logits (`parallel_output=False`).

The models come from `ckpt_lib.io.mcore_model` (the CPU shim `on_cpu` held for the life of each worker
process); the causal mask is passed explicitly (the default helper allocates on CUDA). MoE uses the
allgather token dispatcher. Verification only: install.py does not copy this package into
Megatron-LM checkouts.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as mp

from ckpt_lib.io.mcore_model import (
    NoopLayer,
    build_model,
    dualpipev,
    layout_names,
    noop_layers,
    on_cpu,
    rank_set,
    stage_layout,
    stage_placement,
    transformer_config,
)
from ckpt_lib.io.torch_dist import is_torch_dist
from ckpt_lib.io.torch_dist import read_args as torch_dist_args

TRACKER = "latest_checkpointed_iteration.txt"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_args(ckpt_dir: Path, layout: tuple[int, int, int] | None = None) -> tuple[argparse.Namespace, Path]:
    """The checkpoint's `args`; for torch_dist, `layout` (TP, PP, EP) picks the layout to load at."""
    text = (ckpt_dir / TRACKER).read_text().strip()
    it_dir = ckpt_dir / ("release" if text == "release" else f"iter_{int(text):07d}")
    if is_torch_dist(it_dir):
        args = torch_dist_args(it_dir)
        if layout is not None:
            args = argparse.Namespace(**vars(args))
            args.tensor_model_parallel_size, args.pipeline_model_parallel_size, args.expert_model_parallel_size = layout
            args.num_layers_per_virtual_pipeline_stage = args.num_layer_list = None
        return args, it_dir
    first = sorted(it_dir.glob("mp_rank_*/model_optim_rng.pt"))[0]
    return torch.load(first, map_location="cpu", weights_only=False)["args"], it_dir


def _load_torch_dist(model: Any, it_dir: Path) -> dict[str, Any]:
    """This rank's part of a torch_dist checkpoint, read by megatron-core for the model's layout."""
    from megatron.core import dist_checkpointing
    from megatron.core import parallel_state as ps
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    # The embedding copy of an MTP stage is tied across data-parallel ranks through this group.
    metadata = {"dp_cp_group": ps.get_data_parallel_group(with_context_parallel=True)}
    sharded = {k: v for k, v in model.sharded_state_dict(metadata=metadata).items()
               if isinstance(v, (ShardedTensor, ShardedTensorFactory))}
    return dist_checkpointing.load({"model": sharded}, str(it_dir))["model"]


def _worker(rank: int, world: int, port: int, ckpt_dir: str, tokens: torch.Tensor, out_file: str,
            layout: tuple[int, int, int] | None) -> None:
    """One rank's process, on megatron-core's CPU shim."""
    warnings.filterwarnings("ignore")  # megatron-core warns about Apex/TE being absent, per module
    with on_cpu():
        _forward(rank, world, port, ckpt_dir, tokens, out_file, layout)


def _forward(rank: int, world: int, port: int, ckpt_dir: str, tokens: torch.Tensor, out_file: str,
             layout: tuple[int, int, int] | None) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    from megatron.core import parallel_state as ps

    args, it_dir = read_args(Path(ckpt_dir), layout)
    tp, pp, ep = args.tensor_model_parallel_size, args.pipeline_model_parallel_size, args.expert_model_parallel_size
    stages = stage_layout(args)
    chunks = len(stages) // pp
    ps.initialize_model_parallel(tp, pp, virtual_pipeline_model_parallel_size=chunks if chunks > 1 else None,
                                 expert_model_parallel_size=ep)
    tp_rank, pp_rank = ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank()
    ep_rank = ps.get_expert_model_parallel_rank() if ep > 1 else 0
    config = transformer_config(args, layout_names(args))
    name = f"mp_rank_{tp_rank:02d}" + (f"_{pp_rank:03d}" if pp > 1 else "") + (f"_{ep_rank:03d}" if ep > 1 else "")
    models = [m.eval() for m in load_rank_models(args, config, it_dir, name)]

    b, s = tokens.shape
    position_ids = torch.arange(s).unsqueeze(0).expand(b, s)
    mask = torch.triu(torch.ones(s, s, dtype=torch.bool), diagonal=1).view(1, 1, s, s).expand(b, 1, s, s)
    hidden_shape = (s, b, args.hidden_size)
    placement = stage_placement(args)
    kept = None  # the output of this rank's previous stage when it also runs the next (dualpipev's turn)
    with torch.no_grad():
        for stage, (owner, v) in enumerate(placement):
            if owner != pp_rank:
                continue
            model = models[v]
            if stage > 0:
                previous = placement[stage - 1][0]
                if previous == pp_rank:
                    hidden = kept
                else:
                    hidden = torch.empty(hidden_shape)
                    torch.distributed.recv(hidden, src=_stage_peer(previous))
                model.set_input_tensor(hidden)
            if stage < len(stages) - 1:
                kept = model(tokens, position_ids, mask).contiguous()
                if placement[stage + 1][0] != pp_rank:
                    torch.distributed.send(kept, dst=_stage_peer(placement[stage + 1][0]))
                continue
            if getattr(args, "mtp_num_layers", None):
                # With MTP the model computes losses from labels (the cross entropy then edits the logits
                # in place, hence the clone); the output layer's calls give the
                # MTP logits first, then the main logits ([s, b, V] each).
                calls: list[torch.Tensor] = []
                model.output_layer.register_forward_hook(lambda m, i, o, calls=calls: calls.append(o[0].clone()))
                model(tokens, position_ids, mask, labels=tokens)
                result = {"logits": calls[-1].transpose(0, 1), "mtp_logits": calls[0].transpose(0, 1)}
            else:
                result = {"logits": model(tokens, position_ids, mask)}
            if tp_rank == 0 and ps.get_data_parallel_rank() == 0:
                torch.save({k: t.float() for k, t in result.items()}, out_file)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def load_rank_models(args: argparse.Namespace, config: Any, it_dir: Path, name: str, parallel_output: bool = False) -> list[Any]:
    """This rank's model chunks built from `args` and loaded strictly from its file (or torch_dist)."""
    from megatron.core import parallel_state as ps

    torch_dist = is_torch_dist(it_dir)
    pp, pp_rank = args.pipeline_model_parallel_size, ps.get_pipeline_model_parallel_rank()
    stages = stage_layout(args)
    chunks = len(stages) // pp
    ckpt = {} if torch_dist else torch.load(it_dir / name / "model_optim_rng.pt", map_location="cpu", weights_only=False)
    placement, noop = stage_placement(args), noop_layers(args)
    groups = _without_embedding_sync() if dualpipev(args) else None
    models = []
    for v in range(chunks):
        stage = placement.index((pp_rank, v))
        with _built_as_pipeline_rank(stage % pp):
            model = build_model(args, config, stage, len(stages), stage // pp if chunks > 1 else None, parallel_output, groups)
        for i, layer in enumerate(model.decoder.layers):
            if layer.layer_number - 1 in noop:
                model.decoder.layers[i] = NoopLayer(layer.layer_number)
        state = _load_torch_dist(model, it_dir) if torch_dist else ckpt["model"] if chunks == 1 else ckpt[f"model{v}"]
        result = model.load_state_dict(state, strict=False)
        missing = [k for k in result.missing_keys if not k.endswith("_extra_state")]
        if missing or result.unexpected_keys:
            raise RuntimeError(f"{name} chunk {v}: strict load failed: missing {missing} unexpected {result.unexpected_keys}")
        models.append(model)
    return models


@contextlib.contextmanager
def _built_as_pipeline_rank(rank: int) -> Any:
    """Build a dualpipev chunk as megatron-core builds the same forward stage under plain VPP (its layer
    numbers, first/last-stage parts): the pipeline rank megatron-core reads is that stage's rank there."""
    from megatron.core import parallel_state as ps

    with rank_set(ps.get_pipeline_model_parallel_rank, ps.set_pipeline_model_parallel_rank, rank):
        yield


def _without_embedding_sync() -> Any:
    """Process groups without the embedding group: dualpipev keeps the first stage and the MTP stage on
    rank 0, where megatron-core's construction-time all-reduce (copying the embedding to the MTP stage)
    expects ranks 0 and PP-1 and would wait forever. The copy is loaded from the checkpoint anyway."""
    try:
        from megatron.core.process_groups_config import ProcessGroupCollection
    except ImportError as e:
        raise NotImplementedError("dualpipev needs a megatron-core whose GPTModel takes process groups") from e

    groups = ProcessGroupCollection.use_mpu_process_groups()
    groups.embd = None
    return groups


def _stage_peer(pp_rank: int) -> int:
    """Global rank of this rank's peer (same TP/EP/DP position) in pipeline stage `pp_rank`."""
    from megatron.core import parallel_state as ps

    return torch.distributed.get_process_group_ranks(ps.get_pipeline_model_parallel_group())[pp_rank]


def mcore_logits(ckpt_dir: str | Path, tokens: torch.Tensor, layout: tuple[int, int, int] | None = None) -> torch.Tensor:
    """fp32 logits [batch, seq, padded_vocab] of the checkpoint run by megatron-core on CPU
    (a torch_dist checkpoint at `layout` (TP, PP, EP), default TP1/PP1/EP1)."""
    return mcore_outputs(ckpt_dir, tokens, layout)["logits"]


def mcore_outputs(ckpt_dir: str | Path, tokens: torch.Tensor, layout: tuple[int, int, int] | None = None) -> dict[str, torch.Tensor]:
    """`logits`, and `mtp_logits` for checkpoints with an MTP layer."""
    ckpt_dir = Path(ckpt_dir)
    layout = layout or (1, 1, 1)
    args, _ = read_args(ckpt_dir, layout)
    world = args.tensor_model_parallel_size * args.pipeline_model_parallel_size * getattr(args, "expert_model_parallel_size", 1)
    with tempfile.TemporaryDirectory() as tmp:
        out_file = os.path.join(tmp, "logits.pt")
        mp.start_processes(_worker, args=(world, free_port(), str(ckpt_dir), tokens, out_file, layout), nprocs=world,
                           join=True, start_method="spawn")
        return torch.load(out_file)
