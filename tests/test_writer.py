"""The incremental rank-file writer: plain torch.load (also mmap) reads exactly what was added."""

from __future__ import annotations

import argparse

import torch

from ckpt_lib.io.megatron_io import RankFileWriter, load_rank_file


def test_rank_file_writer_matches_torch_load(tmp_path):
    gen = torch.Generator().manual_seed(0)
    full = torch.randn(12, 10, generator=gen).to(torch.bfloat16)
    chunks = [{"row_shard": full[4:8], "column_shard": full[:, 5:], "scalar": torch.tensor(2.5), "none": None},
              {"ints": torch.arange(7), "fp32": torch.randn(3, 4, generator=gen)}]
    path = tmp_path / "mp_rank_00" / "model_optim_rng.pt"
    writer = RankFileWriter(path, len(chunks))
    for index, chunk in enumerate(chunks):
        for name, value in chunk.items():
            writer.add(index, name, value)
    assert set(writer.described()) == {f"model{i}/{n}" for i, c in enumerate(chunks) for n in c}
    size = writer.close(argparse.Namespace(tensor_model_parallel_size=1), 42)
    assert writer.finished.result() is not None
    assert size == path.stat().st_size
    for state in (torch.load(path, weights_only=False), torch.load(path, weights_only=False, mmap=True), load_rank_file(path)):
        assert state["iteration"] == 42 and state["checkpoint_version"] == 3.0
        assert state["args"].tensor_model_parallel_size == 1
        for index, chunk in enumerate(chunks):
            got = state[f"model{index}"]
            assert list(got) == list(chunk)
            for name, value in chunk.items():
                if value is None:
                    assert got[name] is None
                else:
                    assert got[name].dtype == value.dtype and torch.equal(got[name], value), name
                    assert got[name].is_contiguous()


def test_single_chunk_is_stored_as_model(tmp_path):
    writer = RankFileWriter(tmp_path / "f.pt", 1)
    writer.add(0, "w", torch.ones(2, 2))
    writer.close(argparse.Namespace(), "release")
    writer.finished.result()
    state = torch.load(tmp_path / "f.pt", weights_only=False)
    assert state["iteration"] == 0 and torch.equal(state["model"]["w"], torch.ones(2, 2))


def test_reading_a_rank_file_keeps_megatrons_allowed_globals(tmp_path):
    """torch's safe_globals context drops on exit what it was given; reading a rank file must not strip
    what megatron.core registered, or its own loads (torch_dist common.pt) fail later (seen in CI)."""
    import megatron.core  # noqa: F401  registers argparse.Namespace and friends

    writer = RankFileWriter(tmp_path / "f.pt", 1)
    writer.add(0, "w", torch.ones(2))
    writer.close(argparse.Namespace(), 1)
    writer.finished.result()
    assert argparse.Namespace in torch.serialization.get_safe_globals()
    load_rank_file(tmp_path / "f.pt")
    assert argparse.Namespace in torch.serialization.get_safe_globals()
