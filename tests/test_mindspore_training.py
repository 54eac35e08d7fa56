"""loader_core_mf on MindSpore Transformers training output (Checkpoint 1.0 rank files + strategy files,
Checkpoint 2.0), cut by MindSpore's own transform_checkpoints (tests/fixtures/mindspore_training/make_fixtures.py,
which also asserts that MindSpore's merge of every fixture gives the merged checkpoint of tests/fixtures/mindspore
bit for bit)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from mcore_harness import mcore_logits, mcore_outputs
from util import assert_same_tensors, convert_cli, convert_inprocess, read_safetensors_dir

FIXTURES = Path(__file__).resolve().parent / "fixtures"
TRAINING = FIXTURES / "mindspore_training"
MERGED = FIXTURES / "mindspore"
DEEPSEEK = ["--model-config", str(MERGED / "hf_deepseek3")]
QWEN3_MOE = ["--model-config", str(MERGED / "hf_qwen3_moe")]
CASES = {  # fixture -> (merged checkpoint of the same weights, HF original, loader flags)
    "qwen3_tp2": ("qwen3_interleaved", "hf_qwen3", []),
    "qwen3_pp2tp2": ("qwen3_interleaved", "hf_qwen3", []),
    "qwen3_dp2tp2_opt": ("qwen3_interleaved", "hf_qwen3", []),
    "qwen3_ckpt2": ("qwen3_interleaved", "hf_qwen3", []),
    "deepseek3_tp2": ("deepseek3", "hf_deepseek3", DEEPSEEK),
    "deepseek3_pp2tp2": ("deepseek3", "hf_deepseek3", DEEPSEEK),
    "deepseek3_ckpt2": ("deepseek3", "hf_deepseek3", DEEPSEEK),
    "qwen3_moe_tp2": ("qwen3_moe", "hf_qwen3_moe", QWEN3_MOE),
}
TOKENS = torch.randint(0, 100, (2, 10), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("fixture", list(CASES))
def test_training_output_to_hf_equals_the_merged_checkpoint(tmp_path, fixture):
    """Bit-identical to converting the merged checkpoint, and so to the HF original (fp32 throughout)."""
    merged, original, flags = CASES[fixture]
    convert_inprocess("core_mf", "hf", TRAINING / fixture, tmp_path / "hf", "--params-dtype", "fp32", *flags)
    convert_inprocess("core_mf", "hf", MERGED / merged, tmp_path / "merged", "--params-dtype", "fp32", *flags)
    got = read_safetensors_dir(tmp_path / "hf")
    assert_same_tensors(read_safetensors_dir(tmp_path / "merged"), got)
    assert_same_tensors(read_safetensors_dir(MERGED / original), got)


def test_checkpoint_1_reports_the_step_and_skips_optimizer_states(tmp_path):
    """rank_0 also holds an older step (-1_2, zeros): the newest step every rank has is read."""
    result = convert_cli("--loader", "core_mf", "--saver", "hf", "--load-dir", str(TRAINING / "qwen3_tp2" / "checkpoint"),
                         "--save-dir", str(tmp_path / "hf"))
    assert result.returncode == 0, result.stderr
    assert "Checkpoint 1.0, 2 ranks, epoch 1 step 4" in result.stdout and "skipped 10 non-weight entries" in result.stdout


def test_expert_moments_are_skipped_whole(tmp_path):
    """adam_m / adam_v of the grouped experts are skipped, not split into experts (in qwen3_moe_tp2 they are a rank's
    slice, which failed the expert shape check; merged, their expert parts were 'unmapped tensors')."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(MERGED / "qwen3_moe" / "ms.safetensors")
    for moment in ("adam_m", "adam_v"):
        tensors[f"{moment}.decoder.layers.0.mlp.experts.weight1"] = torch.zeros(512, 32)
    (tmp_path / "ms").mkdir()
    save_file(tensors, tmp_path / "ms" / "ms.safetensors", metadata={"format": "ms"})
    convert_inprocess("core_mf", "hf", tmp_path / "ms", tmp_path / "hf", "--params-dtype", "fp32", *QWEN3_MOE)
    assert_same_tensors(read_safetensors_dir(MERGED / "hf_qwen3_moe"), read_safetensors_dir(tmp_path / "hf"))


@pytest.mark.parametrize("fixture", ["qwen3_tp2", "qwen3_pp2tp2", "qwen3_dp2tp2_opt", "qwen3_ckpt2", "qwen3_moe_tp2"])
def test_training_output_to_mcore_tp2_matches_transformers(tmp_path, fixture):
    """Every Qwen3 fixture (TP2, two pipeline stages, optimizer parallel, Checkpoint 2.0) and Qwen3-MoE (grouped
    experts split by expert and by column) from TP2."""
    from transformers import AutoModelForCausalLM

    _, original, flags = CASES[fixture]
    convert_inprocess("core_mf", "core_ext", TRAINING / fixture, tmp_path / "mc", "--params-dtype", "fp32", *flags,
                      "--target-tensor-parallel-size", "2", "--saver-transformer-impl", "local")
    model = AutoModelForCausalLM.from_pretrained(MERGED / original, dtype=torch.float32).eval()
    with torch.no_grad():
        reference = model(TOKENS).logits
    assert (mcore_logits(tmp_path / "mc", TOKENS)[..., :100] - reference).abs().max().item() < 1e-4


@pytest.mark.parametrize("fixture", ["deepseek3_tp2", "deepseek3_pp2tp2", "deepseek3_ckpt2"])
def test_deepseek3_to_mcore_tp2_matches_transformers_with_mtp(tmp_path, fixture):
    """DeepSeek-V3 from two pipeline stages (MTP on the last; Checkpoint 1.0) and from Checkpoint 2.0."""
    from transformers import AutoModelForCausalLM

    from test_parity import mtp_reference

    convert_inprocess("core_mf", "core_ext", TRAINING / fixture, tmp_path / "mc", "--params-dtype", "fp32", *DEEPSEEK,
                      "--saver-transformer-impl", "local", "--target-tensor-parallel-size", "2")
    model = AutoModelForCausalLM.from_pretrained(MERGED / "hf_deepseek3", dtype=torch.float32).eval()
    layers = model.config.num_hidden_layers
    mtp = {k.removeprefix(f"model.layers.{layers}."): v for k, v in read_safetensors_dir(MERGED / "hf_deepseek3").items()
           if k.startswith(f"model.layers.{layers}.")}
    out = mcore_outputs(tmp_path / "mc", TOKENS)
    with torch.no_grad():
        diff = (out["logits"][..., :100] - model(TOKENS).logits).abs().max().item()
    mtp_diff = (out["mtp_logits"][..., :100] - mtp_reference(model, mtp, TOKENS)).abs().max().item()
    assert diff < 1e-4 and mtp_diff < 1e-4, (diff, mtp_diff)


# Bad input: one error line naming what is wrong, a non-zero exit, nothing written.

def _copy(tmp_path: Path, fixture: str) -> Path:
    return Path(shutil.copytree(TRAINING / fixture, tmp_path / fixture))


def _fails(tmp_path: Path, src: Path, *flags: str) -> str:
    result = convert_cli("--loader", "core_mf", "--saver", "core_ext", "--load-dir", str(src), "--save-dir", str(tmp_path / "out"),
                         "--saver-transformer-impl", "local", *flags)
    assert result.returncode != 0
    assert not (tmp_path / "out").exists()
    errors = [line for line in result.stderr.splitlines() if line.startswith("error")]
    assert len(errors) == 1, result.stderr
    return errors[0]


def test_missing_rank_file_is_named(tmp_path):
    src = _copy(tmp_path, "qwen3_pp2tp2")
    (src / "checkpoint" / "rank_3" / "qwen3_rank_3-1_4.safetensors").unlink()
    assert "rank_3 has no checkpoint file" in _fails(tmp_path, src)


def test_strategy_from_another_run_is_caught(tmp_path):
    """The DP2xTP2 optimizer-parallel ranks read with the PP2xTP2 run's strategy (as many ranks): rank 2 holds
    slices of layer 0, which the pipeline strategy puts on stage 0 only."""
    line = _fails(tmp_path, TRAINING / "qwen3_dp2tp2_opt", "--strategy-path", str(TRAINING / "qwen3_pp2tp2" / "strategy"))
    assert "'decoder.layers.0.input_layernorm.weight': rank_2 holds [32]" in line and "strategy file from another run" in line


def test_strategy_of_another_size_is_caught(tmp_path):
    """The TP2 ranks read with the 4-rank strategy: the ranks it expects are missing."""
    line = _fails(tmp_path, TRAINING / "qwen3_tp2", "--strategy-path", str(TRAINING / "qwen3_dp2tp2_opt" / "strategy"))
    assert "rank_2 has no checkpoint file" in line and "the run has 4 ranks" in line


def test_truncated_slice_is_named(tmp_path):
    src = _copy(tmp_path, "qwen3_tp2")
    rank_file = src / "checkpoint" / "rank_1" / "qwen3_rank_1-1_4.safetensors"
    rank_file.write_bytes(rank_file.read_bytes()[:-1000])
    assert "rank_1/qwen3_rank_1-1_4.safetensors: truncated file" in _fails(tmp_path, src)


def test_missing_chunk_file_of_checkpoint_2_is_named(tmp_path):
    src = _copy(tmp_path, "qwen3_ckpt2")
    (src / "iteration_00000004" / "model-0000001-0000002.safetensors").unlink()
    assert "model-0000001-0000002.safetensors is missing" in _fails(tmp_path, src)


def test_replicas_that_disagree_are_named(tmp_path):
    from safetensors.torch import load_file, save_file

    src = _copy(tmp_path, "qwen3_tp2")
    rank_file = src / "checkpoint" / "rank_1" / "qwen3_rank_1-1_4.safetensors"
    tensors = load_file(rank_file)
    tensors["decoder.final_layernorm.weight"][0] += 1
    save_file(tensors, rank_file, metadata={"format": "ms"})
    line = _fails(tmp_path, src)
    assert "decoder.final_layernorm.weight" in line and "rank_0 and rank_1 differ" in line


def test_strategy_layouts_decode_without_mindspore():
    """The project's protobuf reader: TP2 column / row / replicated layouts, pipeline stages, optimizer shards."""
    from ckpt_lib.engine.ms_distributed import read_strategy

    tp = read_strategy(TRAINING / "qwen3_tp2" / "strategy" / "ckpt_strategy_rank_0.ckpt")
    fc1, fc2, norm = (tp[f"decoder.layers.0.{n}.weight"] for n in ("mlp.linear_fc1", "mlp.linear_fc2", "input_layernorm"))
    assert (fc1.dev_matrix, fc1.tensor_map, fc2.tensor_map, norm.tensor_map) == ((1, 2), ((0,), ()), ((), (0,)), ((),))
    assert fc1.slice_of(1, (192, 64)) == ((96, 0), (96, 64)) and fc2.slice_of(1, (64, 96)) == ((0, 48), (64, 48))
    stage1 = read_strategy(TRAINING / "qwen3_pp2tp2" / "strategy" / "ckpt_strategy_rank_2.ckpt")
    assert "embedding.word_embeddings.weight" not in stage1 and stage1["output_layer.weight"].stage == 1
    assert stage1["output_layer.weight"].slice_of(1, (100, 64)) is None
    deepseek = read_strategy(TRAINING / "deepseek3_pp2tp2" / "strategy" / "ckpt_strategy_rank_3.ckpt")
    assert "decoder.layers.1.mlp.experts.weight1" not in deepseek and deepseek["mtp.layers.0.eh_proj.weight"].stage == 1
    assert deepseek["decoder.layers.2.mlp.experts.weight1"].slice_of(3, (512, 64)) == ((256, 0), (256, 64))
    opt = read_strategy(TRAINING / "qwen3_dp2tp2_opt" / "strategy" / "ckpt_strategy.ckpt")["decoder.layers.0.mlp.linear_fc1.weight"]
    assert [opt.slice_of(r, (192, 64))[0][0] for r in range(4)] == [0, 96, 48, 144]
