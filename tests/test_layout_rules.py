"""Unit tests for the pure layout rules: pipeline placement, TP split/gather, q/k/v interleave."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest
import torch

from ckpt_lib.errors import ConversionError
from ckpt_lib.families import QKV, concat, stack
from ckpt_lib.layout.pipeline import layout_from_counts, make_layout, parse_layer_list
from ckpt_lib.layout.sharding import (
    COLUMN,
    GATED,
    REPLICATED,
    ROW,
    gather,
    materialize,
    pad_vocab,
    padded_vocab_size,
    split,
    split_stacked,
)


def placements(layout):
    return [(s.pp_rank, s.chunk, local) for layer in range(layout.num_layers) for s, local in [layout.locate(layer)]]


def test_even_pipeline():
    layout = make_layout(8, 4)
    assert layout.layers_per_stage() == [2, 2, 2, 2]
    assert layout.locate(5)[0].pp_rank == 2 and layout.locate(5)[1] == 1


def test_uneven_pipeline():
    layout = make_layout(7, 3, [1, 4, 2])
    assert placements(layout) == [(0, 0, 0), (1, 0, 0), (1, 0, 1), (1, 0, 2), (1, 0, 3), (2, 0, 0), (2, 0, 1)]
    assert layout.last_layer_of_rank(1) == 4


def test_virtual_pipeline_matches_megatron_rule():
    # chunk v on rank p holds layers [(v*PP+p)*S, +S)
    layout = make_layout(8, 2, layers_per_virtual_stage=2)
    assert placements(layout) == [(0, 0, 0), (0, 0, 1), (1, 0, 0), (1, 0, 1), (0, 1, 0), (0, 1, 1), (1, 1, 0), (1, 1, 1)]
    assert layout.num_chunks == 2 and layout.last_layer_of_rank(0) == 5


@pytest.mark.parametrize("counts,pp", [({(0, 0): 1, (1, 0): 3}, 2), ({(0, 0): 2, (1, 0): 2, (0, 1): 2, (1, 1): 2}, 2)])
def test_layout_detection_inverts_construction(counts, pp):
    layout = layout_from_counts(counts, pp)
    rebuilt = {(s.pp_rank, s.chunk): s.count for s in layout.segments}
    assert rebuilt == counts


@pytest.mark.parametrize("args,message", [
    ((8, 3), "do not split evenly"),
    ((8, 2, [3, 4]), "sums to 7"),
    ((8, 2, [8]), "has 1 entries"),
    ((8, 2, [4, 4], 2), "cannot be used together"),
    ((8, 2, None, 3), "does not divide"),
    ((8, 1, None, 2), "at least 2"),
])
def test_layout_errors(args, message):
    with pytest.raises(ConversionError, match=message):
        make_layout(*args)


def test_parse_layer_list():
    assert parse_layer_list("4,3,3") == [4, 3, 3]
    with pytest.raises(ConversionError):
        parse_layer_list("4,x")


@pytest.mark.parametrize("rule", [COLUMN, ROW, REPLICATED])
def test_split_gather_inverse(rule):
    t = torch.randn(8, 6)
    shards = split(t, rule, 2)
    assert torch.equal(gather(shards, rule), t)


def test_gated_split_puts_gate_then_up_per_rank():
    gate, up = torch.arange(8.0).reshape(4, 2), 100 + torch.arange(8.0).reshape(4, 2)
    shards = split((gate, up), GATED, 2)
    assert torch.equal(shards[0], torch.cat([gate[:2], up[:2]]))
    g, u = gather(shards, GATED)
    assert torch.equal(g, gate) and torch.equal(u, up)


def test_split_rejects_indivisible():
    with pytest.raises(ConversionError, match="not divisible"):
        split(torch.randn(6, 4), COLUMN, 4, "x")


def test_split_stacked_equals_split_per_matrix():
    gen = torch.Generator().manual_seed(0)
    gate, up, down = (torch.randn(3, 8, 4, generator=gen) for _ in range(3))
    for rule, stacked, one in ((GATED, (gate, up), lambda e: (gate[e], up[e])), (ROW, down, lambda e: down[e]),
                               (COLUMN, gate, lambda e: gate[e])):
        shards, joined = split_stacked(stacked, rule, 2), split_stacked(stacked, rule, 2, joined=True)
        for e in range(3):
            for tp, (shard, lazy) in enumerate(zip(split(one(e), rule, 2), split(one(e), rule, 2, joined=True))):
                assert torch.equal(shards[tp][e], shard)
                assert torch.equal(materialize(joined[tp][e]), shard) and torch.equal(materialize(lazy), shard)


def test_vocab_padding_repeats_last_row_and_trims():
    table = torch.arange(10.0).reshape(5, 2)
    assert padded_vocab_size(5, 2, 2) == 8
    padded = pad_vocab(table, 8)
    assert torch.equal(padded[5:], table[-1:].expand(3, 2))
    assert torch.equal(pad_vocab(padded, 5), table)


def test_qkv_interleave_per_group_and_inverse():
    md = argparse.Namespace(num_attention_heads=4, num_query_groups=2, kv_channels=1)
    q, k, v = torch.tensor([[0.], [1.], [2.], [3.]]), torch.tensor([[10.], [11.]]), torch.tensor([[20.], [21.]])
    (fused,) = QKV.forward((q, k, v), md)
    # group 0: q0 q1 k0 v0, group 1: q2 q3 k1 v1
    assert fused.flatten().tolist() == [0, 1, 10, 20, 2, 3, 11, 21]
    back = QKV.backward((fused,), md)
    assert all(torch.equal(materialize(a), b) for a, b in zip(back, (q, k, v)))
    # each group's rows written from where they lie in the fused tensor, never gathered into a copy
    assert all(part.untyped_storage().data_ptr() == fused.untyped_storage().data_ptr() for part in back[0].parts)


def test_concat_and_stack_match_torch_without_importing_dynamo():
    """The family tables' joins: equal to torch.cat / torch.stack, large results in shared memory (the
    queue passes them without a copy), meta inputs (validation) by shape alone, without torch's meta
    cat that imports torch._dynamo (a second per conversion)."""
    a, b = torch.randn(512, 1024), torch.randn(256, 1024)
    assert torch.equal(concat([a, b]), torch.cat([a, b])) and concat([a, b]).is_shared()
    assert torch.equal(stack([a, a], dim=1), torch.stack([a, a], dim=1))
    assert concat([a.to("meta"), b.to("meta")]).shape == (768, 1024)
    assert stack([b.to("meta")] * 3, dim=1).shape == (256, 3, 1024)
    with pytest.raises(ConversionError, match="cannot join tensors of shapes"):
        concat([a.to("meta"), torch.empty(2, 3, device="meta")])
    probe = ("import sys, torch; sys.path.insert(0, 'plugins'); from ckpt_lib.families import concat; "
             "concat([torch.empty(2, 3, device='meta')] * 2); print('torch._dynamo' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout.strip() == "False"


def test_pending_parts_are_read_into_place(tmp_path):
    """Joins of tensors not read yet (the HF loaders' reads) equal joins of the read tensors: contiguous
    parts (stacked experts), strided parts (the per-group QKV interleave), a dtype mix; a destination
    that does not fit fails with the tensor's name."""
    from safetensors.torch import save_file

    from ckpt_lib.io.safetensors_io import SafetensorsSource

    gen = torch.Generator().manual_seed(0)
    tensors = {"q": torch.randn(8 * 16, 4096, generator=gen).bfloat16(), "k": torch.randn(2 * 16, 4096, generator=gen).bfloat16(),
               "v": torch.randn(2 * 16, 4096, generator=gen).bfloat16(), "f": torch.randn(2 * 16, 4096, generator=gen)}
    save_file(tensors, tmp_path / "m.safetensors")
    source = SafetensorsSource.from_dir(tmp_path)
    md = argparse.Namespace(num_attention_heads=8, num_query_groups=2, kv_channels=16)
    (fused,) = QKV.forward(tuple(source.pending(n) for n in "qkv"), md)
    assert torch.equal(fused, QKV.forward(tuple(tensors[n] for n in "qkv"), md)[0]) and fused.is_shared()
    assert torch.equal(stack([source.pending("k"), source.pending("v")]), torch.stack([tensors["k"], tensors["v"]]))
    assert torch.equal(concat([source.pending("k"), tensors["v"]], dim=1), torch.cat([tensors["k"], tensors["v"]], dim=1))
    assert torch.equal(concat([source.pending("k"), source.pending("f")]), torch.cat([tensors["k"], tensors["f"]]))
    with pytest.raises(ConversionError, match="tensor 'q' .* cannot be read into"):
        source.pending("q").read_into(torch.empty(3, 4096, dtype=torch.bfloat16))
