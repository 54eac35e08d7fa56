"""Bit-exact round trips: HF -> mcore -> HF at every layout, and mcore -> mcore resharding."""

from __future__ import annotations

import json

import pytest
import torch

from util import assert_same_tensors, convert_inprocess, make_hf_model, read_mcore_dir, read_safetensors_dir

LAYOUTS = {
    "tp1pp1": [],
    "tp2": ["--target-tensor-parallel-size", "2"],
    "pp2": ["--target-pipeline-parallel-size", "2"],
    "tp2pp2": ["--target-tensor-parallel-size", "2", "--target-pipeline-parallel-size", "2"],
    "uneven": ["--target-pipeline-parallel-size", "2", "--num-layer-list", "1,3"],
    "vpp": ["--target-pipeline-parallel-size", "2", "--num-layers-per-virtual-pipeline-stage", "1"],
}


@pytest.mark.parametrize("impl", ["local", "transformer_engine"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_hf_mcore_hf_is_bit_exact(tmp_path, family, layout, impl):
    hf = tmp_path / "hf"
    make_hf_model(family, hf)
    convert_inprocess("hf", "core_ext", hf, tmp_path / "mc", "--saver-transformer-impl", impl, *LAYOUTS[layout])
    convert_inprocess("core_ext", "hf", tmp_path / "mc", tmp_path / "back")
    assert_same_tensors(read_safetensors_dir(hf), read_safetensors_dir(tmp_path / "back"))
    assert json.loads((tmp_path / "back" / "config.json").read_text())["architectures"] == \
        json.loads((hf / "config.json").read_text())["architectures"]


def test_bf16_round_trip_keeps_dtype(tmp_path):
    make_hf_model("llama", tmp_path / "hf", dtype=torch.bfloat16)
    convert_inprocess("hf", "core_ext", tmp_path / "hf", tmp_path / "mc", "--target-tensor-parallel-size", "2")
    assert all(t.dtype == torch.bfloat16 for sd in read_mcore_dir(tmp_path / "mc").values() for t in sd.values())
    convert_inprocess("core_ext", "hf", tmp_path / "mc", tmp_path / "back")
    assert_same_tensors(read_safetensors_dir(tmp_path / "hf"), read_safetensors_dir(tmp_path / "back"))


def test_params_dtype_rounds_fp32_to_bf16_once(tmp_path):
    make_hf_model("llama", tmp_path / "hf")
    convert_inprocess("hf", "core_ext", tmp_path / "hf", tmp_path / "mc", "--params-dtype", "bf16")
    convert_inprocess("core_ext", "hf", tmp_path / "mc", tmp_path / "back")
    src, back = read_safetensors_dir(tmp_path / "hf"), read_safetensors_dir(tmp_path / "back")
    for name, t in src.items():
        assert back[name].dtype == torch.bfloat16
        assert torch.equal(back[name], t.to(torch.bfloat16)), name


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_mcore_reshard_is_bit_exact(tmp_path, family):
    make_hf_model(family, tmp_path / "hf")
    tp2pp2 = ["--target-tensor-parallel-size", "2", "--target-pipeline-parallel-size", "2", "--saver-transformer-impl", "local"]
    convert_inprocess("hf", "core_ext", tmp_path / "hf", tmp_path / "a", *tp2pp2)
    convert_inprocess("core_ext", "core_ext", tmp_path / "a", tmp_path / "b", "--target-tensor-parallel-size", "1",
                      "--target-pipeline-parallel-size", "4", "--saver-transformer-impl", "local")
    assert len(read_mcore_dir(tmp_path / "b")) == 4
    convert_inprocess("core_ext", "core_ext", tmp_path / "b", tmp_path / "c", *tp2pp2)
    assert_same_tensors_nested(read_mcore_dir(tmp_path / "a"), read_mcore_dir(tmp_path / "c"))
    # and through VPP and TE naming and back
    convert_inprocess("core_ext", "core_ext", tmp_path / "c", tmp_path / "d", "--target-pipeline-parallel-size", "2",
                      "--num-layers-per-virtual-pipeline-stage", "1", "--saver-transformer-impl", "transformer_engine")
    convert_inprocess("core_ext", "core_ext", tmp_path / "d", tmp_path / "e", *tp2pp2)
    assert_same_tensors_nested(read_mcore_dir(tmp_path / "a"), read_mcore_dir(tmp_path / "e"))


def assert_same_tensors_nested(a, b):
    assert sorted(a) == sorted(b)
    for k in a:
        assert_same_tensors(a[k], b[k])


def test_rank_files_hold_only_their_stage(tmp_path):
    make_hf_model("llama", tmp_path / "hf")
    convert_inprocess("hf", "core_ext", tmp_path / "hf", tmp_path / "mc", "--target-pipeline-parallel-size", "2",
                      "--num-layer-list", "1,3", "--saver-transformer-impl", "local")
    files = read_mcore_dir(tmp_path / "mc")
    first, last = files["mp_rank_00_000/model"], files["mp_rank_00_001/model"]
    assert "embedding.word_embeddings.weight" in first and "output_layer.weight" not in first
    assert {k.split(".")[2] for k in first if k.startswith("decoder.layers")} == {"0"}
    assert {k.split(".")[2] for k in last if k.startswith("decoder.layers")} == {"0", "1", "2"}
    assert "output_layer.weight" in last and "decoder.final_layernorm.weight" in last
    # padded vocabulary: 100 -> 128, new rows repeat the last row
    emb = first["embedding.word_embeddings.weight"]
    assert emb.shape[0] == 128 and torch.equal(emb[100:], emb[99:100].expand(28, -1))


# Fields Megatron-LM's load_args_from_checkpoint (--use-checkpoint-args) copies for a dense GPT,
# and those Megatron asserts on load; dropouts are deliberately left to the training command line.
MEGATRON_ARGS_READ = (
    "num_layers", "hidden_size", "ffn_hidden_size", "seq_length", "num_attention_heads", "num_query_groups",
    "group_query_attention", "kv_channels", "max_position_embeddings", "position_embedding_type", "add_position_embedding",
    "use_rotary_position_embeddings", "rotary_base", "rotary_percent", "rotary_interleaved", "add_bias_linear", "add_qkv_bias",
    "squared_relu", "swiglu", "untie_embeddings_and_output_weights", "apply_layernorm_1p", "normalization",
    "apply_query_key_layer_scaling", "tensor_model_parallel_size", "pipeline_model_parallel_size", "padded_vocab_size",
    "params_dtype", "fp16", "bf16", "norm_epsilon", "make_vocab_size_divisible_by", "tokenizer_type",
    "virtual_pipeline_model_parallel_size", "num_layers_per_virtual_pipeline_stage", "sequence_parallel",
)


def test_args_namespace_is_complete(tmp_path):
    make_hf_model("qwen3", tmp_path / "hf")
    convert_inprocess("hf", "core_ext", tmp_path / "hf", tmp_path / "mc", "--target-pipeline-parallel-size", "2",
                      "--num-layers-per-virtual-pipeline-stage", "1")
    ckpt = torch.load(next((tmp_path / "mc").glob("*/mp_rank_00_000/model_optim_rng.pt")), weights_only=False)
    args = ckpt["args"]
    missing = [f for f in MEGATRON_ARGS_READ if not hasattr(args, f)]
    assert not missing
    assert (args.num_layers, args.hidden_size, args.kv_channels, args.num_query_groups) == (4, 64, 24, 2)
    assert args.virtual_pipeline_model_parallel_size == 2 and args.pipeline_model_parallel_size == 2
    assert ckpt["checkpoint_version"] == 3.0 and ckpt["iteration"] == 1 and "model0" in ckpt and "model1" in ckpt
