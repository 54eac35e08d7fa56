"""LoRA merging from MindSpeed-LLM-style checkpoints (adapters in the checkpoint or via --lora-load)."""

from __future__ import annotations

import argparse

import pytest
import torch

from ckpt_lib.families import QKV
from ckpt_lib.layout.sharding import COLUMN, GATED, ROW, split
from util import convert_inprocess, make_hf_model, read_mcore_dir, read_safetensors_dir

R, ALPHA = 8, 16.0
MD = argparse.Namespace(num_attention_heads=4, num_query_groups=2, kv_channels=16)


def hf_adapters(hf: dict[str, torch.Tensor], layers: int, seed: int = 3) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Random LoRA per HF module; fused modules share one lora_A as MindSpeed-LLM's fused linears do."""
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return (0.05 * torch.randn(*shape, generator=gen)).to(torch.bfloat16)

    out = {}
    for i in range(layers):
        p = f"model.layers.{i}."
        a_qkv, a_fc1 = rnd(R, 64), rnd(R, 64)
        for m in ("q_proj", "k_proj", "v_proj"):
            out[p + f"self_attn.{m}"] = (a_qkv, rnd(hf[p + f"self_attn.{m}.weight"].shape[0], R))
        for m in ("gate_proj", "up_proj"):
            out[p + f"mlp.{m}"] = (a_fc1, rnd(96, R))
        out[p + "self_attn.o_proj"] = (rnd(R, 64), rnd(64, R))
        out[p + "mlp.down_proj"] = (rnd(R, 96), rnd(64, R))
    return out


def add_adapters(mc_dir, adapters, tp: int, layers: int, lora_only_dir=None):
    """Write MindSpeed-LLM LoRA keys into each rank file (base -> base_layer), sharded by the TP rules."""
    files = sorted(mc_dir.glob("iter_*/mp_rank_*/model_optim_rng.pt"))
    for f in files:
        tp_rank = int(f.parent.name[8:10])
        ckpt = torch.load(f, weights_only=False)
        sd = ckpt["model"]
        lora_sd = {}
        for i in range(layers):
            p, h = f"decoder.layers.{i}.", f"model.layers.{i}."
            q, k, v = (adapters[h + f"self_attn.{m}"] for m in ("q_proj", "k_proj", "v_proj"))
            (b_qkv,) = QKV.forward((q[1], k[1], v[1]), MD)
            gate, up = adapters[h + "mlp.gate_proj"], adapters[h + "mlp.up_proj"]
            mods = {
                "self_attention.linear_qkv": (q[0], split(b_qkv, COLUMN, tp)[tp_rank]),
                "mlp.linear_fc1": (gate[0], split((gate[1], up[1]), GATED, tp)[tp_rank]),
                "self_attention.linear_proj": (split(adapters[h + "self_attn.o_proj"][0], ROW, tp)[tp_rank], adapters[h + "self_attn.o_proj"][1]),
                "mlp.linear_fc2": (split(adapters[h + "mlp.down_proj"][0], ROW, tp)[tp_rank], adapters[h + "mlp.down_proj"][1]),
            }
            for mod, (a, b) in mods.items():
                sd[p + mod + ".base_layer.weight"] = sd.pop(p + mod + ".weight")
                lora_sd[p + mod + ".lora_A.default.weight"] = a.clone()
                lora_sd[p + mod + ".lora_B.default.weight"] = b.clone()
        sd.update(lora_sd)
        torch.save(ckpt, f)
        if lora_only_dir is not None:
            target = lora_only_dir / f.relative_to(mc_dir)
            target.parent.mkdir(parents=True, exist_ok=True)
            torch.save({**ckpt, "model": dict(lora_sd)}, target)
    if lora_only_dir is not None:
        (lora_only_dir / "latest_checkpointed_iteration.txt").write_text((mc_dir / "latest_checkpointed_iteration.txt").read_text())


def reference_merge(hf, adapters):
    scale = ALPHA / R
    out = dict(hf)
    for module, (a, b) in adapters.items():
        w = hf[module + ".weight"]
        out[module + ".weight"] = (w.float() + scale * (b.float() @ a.float())).to(w.dtype)
    return out


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    make_hf_model("llama", root / "hf", dtype=torch.bfloat16)
    hf = read_safetensors_dir(root / "hf")
    return root, hf, hf_adapters(hf, 4)


@pytest.mark.parametrize("tp", [1, 2])
def test_merge_in_checkpoint_and_from_lora_load_are_exact(tmp_path, base, tp):
    root, hf, adapters = base
    for name in ("with_lora", "base_only"):
        convert_inprocess("hf", "core_ext", root / "hf", tmp_path / name, "--target-tensor-parallel-size", str(tp),
                          "--saver-transformer-impl", "local")
    add_adapters(tmp_path / "with_lora", adapters, tp, 4, lora_only_dir=tmp_path / "lora_only")
    lora = ["--lora-r", str(R), "--lora-alpha", str(ALPHA), "--lora-target-modules", "linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"]
    convert_inprocess("core_ext", "hf", tmp_path / "with_lora", tmp_path / "merged", *lora)
    convert_inprocess("core_ext", "hf", tmp_path / "base_only", tmp_path / "merged2", "--lora-load", str(tmp_path / "lora_only"), *lora)
    expected = reference_merge(hf, adapters)
    for out in ("merged", "merged2"):
        got = read_safetensors_dir(tmp_path / out)
        assert sorted(got) == sorted(expected)
        for name, t in expected.items():
            assert got[name].dtype == torch.bfloat16, name  # no fp16 detour, base dtype kept
            assert torch.equal(got[name], t), name
    # merging into mcore at another layout gives the same weights
    convert_inprocess("core_ext", "core_ext", tmp_path / "with_lora", tmp_path / "merged_mc", *lora,
                      "--target-tensor-parallel-size", str(3 - tp), "--saver-transformer-impl", "local")
    convert_inprocess("core_ext", "hf", tmp_path / "merged_mc", tmp_path / "merged3")
    got = read_safetensors_dir(tmp_path / "merged3")
    assert all(torch.equal(got[n], t) for n, t in expected.items())


@pytest.mark.parametrize("flags,message", [
    (["--lora-r", "4", "--lora-alpha", "16"], "LoRA rank 8 but --lora-r is 4"),
    (["--lora-r", "8", "--lora-alpha", "16", "--lora-target-modules", "linear_qkv"], "not in --lora-target-modules"),
    ([], "pass --lora-r and --lora-alpha"),
])
def test_wrong_lora_options_fail(tmp_path, base, flags, message, capsys):
    root, _, adapters = base
    convert_inprocess("hf", "core_ext", root / "hf", tmp_path / "mc", "--saver-transformer-impl", "local")
    add_adapters(tmp_path / "mc", adapters, 1, 4)
    with pytest.raises(SystemExit):
        convert_inprocess("core_ext", "hf", tmp_path / "mc", tmp_path / "out", *flags)
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("tp", [1, 2])
def test_peft_export_matches_merge(tmp_path, tp):
    """The exported PEFT adapter loads without missing keys; PEFT's merge equals ours bit for bit
    (fp32 base, where PEFT merges without an intermediate rounding); unmerged logits match."""
    import warnings

    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    make_hf_model("llama", tmp_path / "hf")
    hf = read_safetensors_dir(tmp_path / "hf")
    adapters = {k: (a.float(), b.float()) for k, (a, b) in hf_adapters(hf, 4).items()}
    convert_inprocess("hf", "core_ext", tmp_path / "hf", tmp_path / "mc", "--target-tensor-parallel-size", str(tp),
                      "--saver-transformer-impl", "local")
    add_adapters(tmp_path / "mc", adapters, tp, 4, lora_only_dir=tmp_path / "lora_only")
    lora = ["--lora-r", str(R), "--lora-alpha", str(ALPHA)]
    convert_inprocess("core_ext", "hf", tmp_path / "lora_only", tmp_path / "peft", "--save-lora-to-hf", *lora,
                      "--hf-config-dir", str(tmp_path / "hf"))
    convert_inprocess("core_ext", "hf", tmp_path / "mc", tmp_path / "merged", *lora)
    exported = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    assert len(exported) == 2 * 7 * 4

    base = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        peft_model = PeftModel.from_pretrained(base, tmp_path / "peft")
    assert not [w for w in caught if "missing" in str(w.message).lower()]
    tokens = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        unmerged = peft_model(tokens).logits
    merged_model = peft_model.merge_and_unload()
    ours = read_safetensors_dir(tmp_path / "merged")
    for name, t in merged_model.state_dict().items():
        assert torch.equal(t, ours[name]), name
    with torch.no_grad():
        merged_logits = merged_model(tokens).logits
    assert (unmerged - merged_logits).abs().max() < 1e-4


def test_deepseek_lora_merge_mla_and_experts(tmp_path):
    """DeepSeek-V3 at TP2 x EP2 (megatron-core local names): LoRA on an MLA up projection, the
    attention output, the shared expert and a routed expert merges into the HF weights exactly."""
    from util import make_deepseek_model

    make_deepseek_model(tmp_path / "hf", num_nextn_predict_layers=0)
    hf = read_safetensors_dir(tmp_path / "hf")
    convert_inprocess("hf_deepseek3", "core_ext", tmp_path / "hf", tmp_path / "mc", "--target-tensor-parallel-size", "2",
                      "--target-expert-parallel-size", "2", "--saver-transformer-impl", "local")
    gen = torch.Generator().manual_seed(5)

    def rnd(*shape):
        return 0.05 * torch.randn(*shape, generator=gen)

    h = "model.layers.1."
    a_up, b_up = rnd(R, 24), rnd(hf[h + "self_attn.q_b_proj.weight"].shape[0], R)
    a_o, b_o = rnd(R, 64), rnd(64, R)
    a_sh, b_sg, b_su = rnd(R, 64), rnd(32, R), rnd(32, R)
    a_ex, b_eg, b_eu = rnd(R, 64), rnd(32, R), rnd(32, R)  # routed expert 5 = EP rank 1, local 1
    for f in sorted((tmp_path / "mc").glob("iter_*/mp_rank_*/model_optim_rng.pt")):
        tp_rank, ep_rank = int(f.parent.name[8:10]), int(f.parent.name[11:14])
        ckpt = torch.load(f, weights_only=False)
        sd, p = ckpt["model"], "decoder.layers.1."
        mods = {
            "self_attention.linear_q_up_proj": (a_up, split(b_up, COLUMN, 2)[tp_rank]),
            "self_attention.linear_proj": (split(a_o, ROW, 2)[tp_rank], b_o),
            "mlp.shared_experts.linear_fc1": (a_sh, split((b_sg, b_su), GATED, 2)[tp_rank]),
        }
        if ep_rank == 1:
            mods["mlp.experts.local_experts.1.linear_fc1"] = (a_ex, split((b_eg, b_eu), GATED, 2)[tp_rank])
        for mod, (a, b) in mods.items():
            sd[p + mod + ".base_layer.weight"] = sd.pop(p + mod + ".weight")
            sd[p + mod + ".lora_A.default.weight"], sd[p + mod + ".lora_B.default.weight"] = a.clone(), b.clone()
        torch.save(ckpt, f)
    convert_inprocess("core_ext", "hf", tmp_path / "mc", tmp_path / "merged", "--lora-r", str(R), "--lora-alpha", str(ALPHA))
    expected = reference_merge(hf, {
        h + "self_attn.q_b_proj": (a_up, b_up), h + "self_attn.o_proj": (a_o, b_o),
        h + "mlp.shared_experts.gate_proj": (a_sh, b_sg), h + "mlp.shared_experts.up_proj": (a_sh, b_su),
        h + "mlp.experts.5.gate_proj": (a_ex, b_eg), h + "mlp.experts.5.up_proj": (a_ex, b_eu),
    })
    got = read_safetensors_dir(tmp_path / "merged")
    assert sorted(got) == sorted(expected)
    for name, t in expected.items():
        assert torch.equal(got[name], t), name


def test_qlora_nf4_round_trip_and_merge(tmp_path, base):
    """--qlora-nf4 stores each TP shard of the linears in bitsandbytes' NF4 layout; reading it back
    gives exactly bitsandbytes' dequantization; a QLoRA adapter merges onto the dequantized base."""
    bnb = pytest.importorskip("bitsandbytes.functional")
    root, hf, adapters = base
    flags = ["--target-tensor-parallel-size", "2", "--saver-transformer-impl", "local"]
    convert_inprocess("hf", "core_ext", root / "hf", tmp_path / "plain", *flags)
    convert_inprocess("hf", "core_ext", root / "hf", tmp_path / "nf4", *flags, "--qlora-nf4")
    plain, nf4 = read_mcore_dir(tmp_path / "plain"), read_mcore_dir(tmp_path / "nf4")
    name = "decoder.layers.1.mlp.linear_fc1.weight"
    packed = nf4["mp_rank_01/model"]
    assert packed[name].dtype == torch.uint8 and name + ".quant_state.bitsandbytes__nf4" in packed
    expected = {}
    for rank, sd in plain.items():
        expected[rank] = {}
        for key, t in sd.items():
            if key + ".quant_map" in nf4[rank]:
                q, state = bnb.quantize_4bit(t, quant_type="nf4", blocksize=64)
                t = bnb.dequantize_4bit(q, state)
            expected[rank][key] = t
    assert any(k + ".absmax" in nf4["mp_rank_00/model"] for k in expected["mp_rank_00/model"])
    convert_inprocess("core_ext", "core_ext", tmp_path / "nf4", tmp_path / "dequantized", *flags)
    got = read_mcore_dir(tmp_path / "dequantized")
    for rank in expected:
        for key, t in expected[rank].items():
            assert torch.equal(got[rank][key], t), (rank, key)
    # QLoRA: adapters trained on the NF4 base merge onto its dequantization
    add_adapters(tmp_path / "nf4", adapters, 2, 4)
    convert_inprocess("core_ext", "hf", tmp_path / "nf4", tmp_path / "merged", "--lora-r", str(R), "--lora-alpha", str(ALPHA))
    convert_inprocess("core_ext", "hf", tmp_path / "dequantized", tmp_path / "deq_hf")
    want = reference_merge(read_safetensors_dir(tmp_path / "deq_hf"), adapters)
    merged = read_safetensors_dir(tmp_path / "merged")
    assert all(torch.equal(merged[n], t) for n, t in want.items())


def test_deepseek_lora_on_mindspeed_fused_down_projection(tmp_path):
    """MindSpeed-LLM names at TP2: LoRA on the fused MLA down projection `linear_qkv` (lora_A shared,
    lora_B rows [q_a; kv_a]) merges into q_a_proj and kv_a_proj_with_mqa."""
    from util import make_deepseek_model

    make_deepseek_model(tmp_path / "hf", num_nextn_predict_layers=0)
    hf = read_safetensors_dir(tmp_path / "hf")
    convert_inprocess("hf_deepseek3", "core_ext", tmp_path / "hf", tmp_path / "mc", "--naming", "mindspeed",
                      "--target-tensor-parallel-size", "2")
    gen = torch.Generator().manual_seed(9)
    a, b = 0.05 * torch.randn(R, 64, generator=gen), 0.05 * torch.randn(24 + 24, R, generator=gen)
    for f in sorted((tmp_path / "mc").glob("iter_*/mp_rank_*/model_optim_rng.pt")):
        ckpt = torch.load(f, weights_only=False)
        sd, mod = ckpt["model"], "decoder.layers.2.self_attention.linear_qkv"
        sd[mod + ".base_layer.weight"] = sd.pop(mod + ".weight")
        sd[mod + ".lora_A.default.weight"], sd[mod + ".lora_B.default.weight"] = a.clone(), b.clone()
        torch.save(ckpt, f)
    convert_inprocess("core_ext", "hf", tmp_path / "mc", tmp_path / "merged", "--lora-r", str(R), "--lora-alpha", str(ALPHA))
    p = "model.layers.2.self_attn."
    want = reference_merge(hf, {p + "q_a_proj": (a, b[:24]), p + "kv_a_proj_with_mqa": (a, b[24:])})
    got = read_safetensors_dir(tmp_path / "merged")
    assert all(torch.equal(got[n], t) for n, t in want.items())


def test_deepseek_peft_export(tmp_path):
    """MindSpeed names at TP2, adapters on the fused MLA down projection, q up projection and attention
    output: the PEFT adapter (q_a_proj, kv_a_proj_with_mqa, q_b_proj, o_proj) loads without missing keys
    and PEFT's merge equals ours bit for bit (fp32 base)."""
    import warnings

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from util import make_deepseek_model

    make_deepseek_model(tmp_path / "hf", num_nextn_predict_layers=0)
    convert_inprocess("hf_deepseek3", "core_ext", tmp_path / "hf", tmp_path / "mc", "--naming", "mindspeed",
                      "--target-tensor-parallel-size", "2")
    gen = torch.Generator().manual_seed(11)

    def rnd(*shape):
        return 0.05 * torch.randn(*shape, generator=gen)

    per_layer = {i: {"linear_qkv": (rnd(R, 64), rnd(48, R)), "linear_q_up_proj": (rnd(R, 24), rnd(96, R)),
                     "linear_proj": (rnd(R, 64), rnd(64, R))} for i in range(4)}
    lora_only = tmp_path / "lora_only"
    for f in sorted((tmp_path / "mc").glob("iter_*/mp_rank_*/model_optim_rng.pt")):
        tp_rank = int(f.parent.name[8:10])
        ckpt = torch.load(f, weights_only=False)
        sd, lora_sd = ckpt["model"], {}
        for i, mods in per_layer.items():
            for mod, (a, b) in mods.items():
                name = f"decoder.layers.{i}.self_attention.{mod}"
                shard_a = split(a, ROW, 2)[tp_rank] if mod == "linear_proj" else a
                shard_b = split(b, COLUMN, 2)[tp_rank] if mod == "linear_q_up_proj" else b
                sd[name + ".base_layer.weight"] = sd.pop(name + ".weight")
                lora_sd[name + ".lora_A.default.weight"], lora_sd[name + ".lora_B.default.weight"] = shard_a.clone(), shard_b.clone()
        sd.update(lora_sd)
        torch.save(ckpt, f)
        target = lora_only / f.relative_to(tmp_path / "mc")
        target.parent.mkdir(parents=True, exist_ok=True)
        torch.save({**ckpt, "model": lora_sd}, target)
    (lora_only / "latest_checkpointed_iteration.txt").write_text((tmp_path / "mc" / "latest_checkpointed_iteration.txt").read_text())
    lora = ["--lora-r", str(R), "--lora-alpha", str(ALPHA)]
    convert_inprocess("core_ext", "hf", lora_only, tmp_path / "peft", "--save-lora-to-hf", *lora, "--hf-config-dir", str(tmp_path / "hf"))
    convert_inprocess("core_ext", "hf", tmp_path / "mc", tmp_path / "merged", *lora)
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        peft_model = PeftModel.from_pretrained(base, tmp_path / "peft")
    assert not [w for w in caught if "missing" in str(w.message).lower()]
    ours = read_safetensors_dir(tmp_path / "merged")
    merged = peft_model.merge_and_unload().state_dict()
    for name in ("model.layers.1.self_attn.q_a_proj.weight", "model.layers.1.self_attn.kv_a_proj_with_mqa.weight",
                 "model.layers.3.self_attn.q_b_proj.weight", "model.layers.2.self_attn.o_proj.weight"):
        assert torch.equal(merged[name], ours[name]), name
