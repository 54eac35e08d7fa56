"""Logits parity: converted checkpoints loaded into real megatron-core GPTModels on CPU (one process
per rank, strict loading) against transformers, in fp32; and a negative control."""

from __future__ import annotations

import pytest
import torch

from ckpt_lib.families import Op, Relation, Section, dense
from mcore_harness import mcore_logits, read_args
from util import DEEPSEEK_LAYOUTS, convert_inprocess, hf_logits, make_hf_model, read_mcore_dir

TOKENS = torch.randint(0, 100, (2, 10), generator=torch.Generator().manual_seed(0))
CASES = {
    "llama-tp1pp1": ("llama", []),
    "llama-tp2": ("llama", ["--target-tensor-parallel-size", "2"]),
    "llama-pp2": ("llama", ["--target-pipeline-parallel-size", "2"]),
    "llama-tp2pp2": ("llama", ["--target-tensor-parallel-size", "2", "--target-pipeline-parallel-size", "2"]),
    "llama-uneven": ("llama", ["--target-pipeline-parallel-size", "2", "--num-layer-list", "1,3"]),
    "llama-vpp": ("llama", ["--target-pipeline-parallel-size", "2", "--num-layers-per-virtual-pipeline-stage", "1"]),
    "qwen2-tp2pp2-tied": ("qwen2", ["--target-tensor-parallel-size", "2", "--target-pipeline-parallel-size", "2"]),
    "qwen2-tp2": ("qwen2", ["--target-tensor-parallel-size", "2"]),
    "qwen3-tp2": ("qwen3", ["--target-tensor-parallel-size", "2"]),
    "qwen3-vpp": ("qwen3", ["--target-pipeline-parallel-size", "2", "--num-layers-per-virtual-pipeline-stage", "1"]),
}


def parity(tmp_path, family, flags, impl="local"):
    model = make_hf_model(family, tmp_path / "hf")
    convert_inprocess("hf", "core_ext", tmp_path / "hf", tmp_path / "mc", "--saver-transformer-impl", impl, *flags)
    if impl == "transformer_engine":
        te_to_local(tmp_path / "mc")
    ours = mcore_logits(tmp_path / "mc", TOKENS)
    reference = hf_logits(model, TOKENS)
    return (ours[..., : reference.shape[-1]] - reference).abs().max().item()


TE_NORMS = {"self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
            "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight"}


def te_to_local(directory):
    """TE fuses the norms into the next linear; everything else is named as in the local spec."""
    for f in directory.glob("*/mp_rank_*/model_optim_rng.pt"):
        ckpt = torch.load(f, weights_only=False)
        for key in [k for k in ckpt if k.startswith("model")]:
            renamed = {}
            for name, t in ckpt[key].items():
                for te, local in TE_NORMS.items():
                    name = name.replace(te, local)
                renamed[name] = t
            ckpt[key] = renamed
        ckpt["args"].transformer_impl = "local"
        torch.save(ckpt, f)


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_transformers(tmp_path, case):
    family, flags = CASES[case]
    assert parity(tmp_path, family, flags) < 1e-4


def test_transformer_engine_names(tmp_path):
    """TE naming: exactly the local keys with the two norms fused, same shapes, and the same logits."""
    make_hf_model("qwen3", tmp_path / "hf")
    flags = ["--target-tensor-parallel-size", "2", "--target-pipeline-parallel-size", "2"]
    convert_inprocess("hf", "core_ext", tmp_path / "hf", tmp_path / "local", "--saver-transformer-impl", "local", *flags)
    convert_inprocess("hf", "core_ext", tmp_path / "hf", tmp_path / "te", "--saver-transformer-impl", "transformer_engine", *flags)
    local, te = read_mcore_dir(tmp_path / "local"), read_mcore_dir(tmp_path / "te")
    for rank, sd in te.items():
        as_local = {}
        for name, t in sd.items():
            for te_name, local_name in TE_NORMS.items():
                name = name.replace(te_name, local_name)
            as_local[name] = t.shape
        assert as_local == {k: t.shape for k, t in local[rank].items()}
        assert any("linear_qkv.layer_norm_weight" in k for k in sd) and not any("input_layernorm" in k for k in sd)
    assert read_args(tmp_path / "te")[0].transformer_impl == "transformer_engine"
    assert parity(tmp_path / "run", "qwen3", flags, impl="transformer_engine") < 1e-4


def test_wrong_qkv_mapping_fails_parity(tmp_path, monkeypatch):
    """Negative control: a plain [Q;K;V] concatenation instead of the per-group interleave must fail."""
    plain = Op("plain-concat", lambda t, md: (torch.cat(t, dim=0),), lambda t, md: t)
    wrong = tuple(Relation(r.source, r.keys, plain, r.when) if r.keys == ("qkv weight",) else r for r in dense.LAYER.relations)
    monkeypatch.setattr(dense, "LAYER", Section(None, dense.LAYER.prefix, wrong))
    assert parity(tmp_path, "llama", ["--target-tensor-parallel-size", "2"]) > 1e-3


# Noop layers run as weightless placeholders in megatron-core blocks, dualpipev chunks in their forward order
# (mcore_runner); both are MindSpeed-LLM layouts megatron-core does not build by itself.
DEEPSEEK_CASES = DEEPSEEK_LAYOUTS


def mtp_reference(model, mtp: dict[str, torch.Tensor], tokens: torch.Tensor) -> torch.Tensor:
    """What megatron-core's MTP layer computes, built from the HF model's own modules and the MTP
    tensors of the checkpoint: roll the ids left (last id 0), enorm(embedding) and hnorm(final
    hidden state) concatenated, eh_proj, one decoder layer (same RoPE positions), shared-head norm,
    output head."""
    import copy

    eps = model.config.rms_norm_eps

    def rms(x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w

    with torch.no_grad():
        hidden = model.model(tokens).last_hidden_state
        rolled = torch.roll(tokens, -1, dims=-1)
        rolled[:, -1] = 0
        x = torch.cat([rms(model.model.embed_tokens(rolled), mtp["enorm.weight"]), rms(hidden, mtp["hnorm.weight"])], dim=-1)
        x = x @ mtp["eh_proj.weight"].t()
        layer = copy.deepcopy(model.model.layers[-1])
        state = {k: v for k, v in mtp.items() if k.startswith(("self_attn.", "mlp.", "input_layernorm", "post_attention_layernorm"))
                 and ".experts." not in k.replace("shared_experts", "")}
        experts = range(model.config.n_routed_experts)
        state["mlp.experts.gate_up_proj"] = torch.stack([torch.cat([mtp[f"mlp.experts.{e}.gate_proj.weight"],
                                                                    mtp[f"mlp.experts.{e}.up_proj.weight"]]) for e in experts])
        state["mlp.experts.down_proj"] = torch.stack([mtp[f"mlp.experts.{e}.down_proj.weight"] for e in experts])
        layer.load_state_dict(state, strict=True)
        s = tokens.shape[1]
        position_ids = torch.arange(s).unsqueeze(0)
        mask = torch.full((s, s), float("-inf")).triu(1)[None, None]
        out = layer(x, attention_mask=mask, position_ids=position_ids, position_embeddings=model.model.rotary_emb(x, position_ids))
        out = out[0] if isinstance(out, tuple) else out
        return rms(out, mtp["shared_head.norm.weight"]) @ model.lm_head.weight.t()


@pytest.mark.parametrize("case", list(DEEPSEEK_CASES))
def test_deepseek_logits_match_transformers(tmp_path, case):
    """MLA + MoE (shared expert, sigmoid group routing with expert bias) and the MTP layer in real
    megatron-core models, every rank loaded strict (MTP in its MultiTokenPredictionBlock on the last
    stage, with its embedding copy where that is another chunk): main logits match transformers, MTP
    logits the reference."""
    from mcore_harness import mcore_outputs
    from util import make_deepseek_model

    model, mtp = make_deepseek_model(tmp_path / "hf")
    convert_inprocess("hf_deepseek3", "core_ext", tmp_path / "hf", tmp_path / "mc", "--saver-transformer-impl", "local",
                      "--mtp-num-layers", "1", *DEEPSEEK_CASES[case])
    out = mcore_outputs(tmp_path / "mc", TOKENS)
    main_diff = (out["logits"][..., :100] - hf_logits(model, TOKENS)).abs().max().item()
    mtp_diff = (out["mtp_logits"][..., :100] - mtp_reference(model, mtp, TOKENS)).abs().max().item()
    print(f"{case}: logits max abs diff {main_diff:.2e}, MTP logits {mtp_diff:.2e}")
    assert main_diff < 1e-4 and mtp_diff < 1e-4
