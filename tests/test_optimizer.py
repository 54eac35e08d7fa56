"""Optimizer state: tiny models trained with real megatron-core on CPU (distributed optimizer,
Adam), saved in Megatron-LM's legacy layout, read back per parameter, resharded and resumed."""

from __future__ import annotations

import torch

from ckpt_lib.mcore_trainer import TrainSpec, train
from util import convert_inprocess, make_hf_model

TP2PP2 = ("--target-tensor-parallel-size", "2", "--target-pipeline-parallel-size", "2", "--saver-transformer-impl", "local")


def test_trainer_saves_megatron_legacy_layout(tmp_path):
    make_hf_model("llama", tmp_path / "hf")
    convert_inprocess("hf", "core_ext", tmp_path / "hf", tmp_path / "init", *TP2PP2)
    train(tmp_path / "init", tmp_path / "run", TrainSpec(steps=2, save_at=(1,)))
    assert (tmp_path / "run" / "latest_checkpointed_iteration.txt").read_text() == "2\n"
    for it in (1, 2):
        for rank in ("mp_rank_00_000", "mp_rank_00_001", "mp_rank_01_000", "mp_rank_01_001"):
            d = tmp_path / "run" / f"iter_{it:07d}" / rank
            ckpt = torch.load(d / "model_optim_rng.pt", map_location="cpu", weights_only=False)
            assert {"args", "checkpoint_version", "iteration", "model", "optimizer", "opt_param_scheduler", "rng_state"} <= set(ckpt)
            assert ckpt["iteration"] == it and ckpt["opt_param_scheduler"]["num_steps"] == it * 4
            assert {g["step"] for g in ckpt["optimizer"]["optimizer"]["param_groups"]} == {float(it)}
            param_state = torch.load(d / "distrib_optim.pt", map_location="cpu", weights_only=False)
            assert param_state["buckets_coalesced"] is True
            (buffer,) = param_state[0].values()
            assert buffer["exp_avg"].abs().sum() > 0 and buffer["param"].shape == (buffer["numel_unpadded"],)
    before = torch.load(tmp_path / "init/iter_0000001/mp_rank_00_000/model_optim_rng.pt", weights_only=False)["model"]
    after = torch.load(tmp_path / "run/iter_0000002/mp_rank_00_000/model_optim_rng.pt", weights_only=False)["model"]
    key = "decoder.layers.0.self_attention.linear_qkv.weight"
    assert not torch.equal(before[key], after[key])
