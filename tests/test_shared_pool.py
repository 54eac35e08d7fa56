"""The loader's shared-memory buffers are used again only when neither this process, nor a message
still on its way, nor the saver's process can see them; conversions through them are exact."""

from __future__ import annotations

import multiprocessing
import os
import re

import torch

from ckpt_lib.io.safetensors_io import SharedPool
from ckpt_lib.transport import runtime
from util import assert_same_tensors, convert_cli, convert_inprocess, make_hf_model, read_mcore_dir

MB = 1 << 20


def _inode(buffer: torch.UntypedStorage | torch.Tensor) -> int:
    storage = buffer.untyped_storage() if isinstance(buffer, torch.Tensor) else buffer
    return os.fstat(storage._share_fd_cpu_()[0]).st_ino


def _used(storage: torch.UntypedStorage) -> torch.Tensor:
    """A tensor on the buffer, as `empty_shared` makes (the pool keeps the storage object itself)."""
    return torch.empty(0, dtype=torch.uint8).set_(storage, 0, (storage.nbytes(),))


def _hold(inbox, outbox) -> None:
    """A stand-in saver process: map the buffer it is sent, hold it until told, then drop it."""
    storage = inbox.get()
    outbox.put("mapped")
    inbox.get()
    del storage
    outbox.put("dropped")


def test_buffers_are_used_again_only_when_nobody_sees_them():
    messages = [0, 0]  # put, received by the saver
    pool = SharedPool(os.getpid(), lambda: (messages[0], messages[1]), budget=64 * MB)
    view = _used(pool.storage(2 * MB))
    inode = _inode(view)
    messages[:] = [5, 5]
    kept = [_used(pool.storage(2 * MB))]  # buffers still in use, so that only `first` can come back
    assert _inode(kept[-1]) != inode  # a tensor here still uses it
    del view
    kept.append(_used(pool.storage(MB)))  # notes that this process let go while 5 messages were out
    kept.append(_used(pool.storage(2 * MB)))
    assert _inode(kept[-1]) != inode  # the saver may not have unpickled message 5 yet
    messages[:] = [6, 6]
    again = _used(pool.storage(2 * MB))
    assert _inode(again) == inode and pool.reused == 1

    ctx = multiprocessing.get_context("spawn")
    inbox, outbox = ctx.Queue(), ctx.Queue()
    saver = ctx.Process(target=_hold, args=(inbox, outbox))
    saver.start()
    try:
        pool.saver_pid = saver.pid
        inbox.put(again)
        assert outbox.get(timeout=60) == "mapped"
        del again
        messages[:] = [8, 8]
        _used(pool.storage(MB))
        messages[:] = [9, 9]
        kept.append(_used(pool.storage(2 * MB)))
        assert _inode(kept[-1]) != inode  # the saver's process still maps it
        inbox.put("drop")
        assert outbox.get(timeout=60) == "dropped"
        kept.append(_used(pool.storage(2 * MB)))
        assert _inode(kept[-1]) != inode  # its maps are read again only once it has taken another message
        messages[:] = [10, 10]
        assert _inode(_used(pool.storage(2 * MB))) == inode and pool.reused == 2
    finally:
        saver.join(timeout=60)
        pool.close()


def test_conversion_through_reused_buffers_is_exact(tmp_path, monkeypatch):
    """Layers big enough for shared memory (>= 1 MiB tensors): the driver's conversion, whose loader
    reuses buffers across processes, equals one with fresh buffers only, bit for bit."""
    make_hf_model("llama", tmp_path / "hf", num_layers=8, hidden_size=512, intermediate_size=1024,
                  num_attention_heads=8, num_key_value_heads=2, vocab_size=1000)
    flags = ["--loader", "hf", "--saver", "core_ext", "--target-tensor-parallel-size", "2",
             "--target-pipeline-parallel-size", "2", "--saver-transformer-impl", "local"]
    monkeypatch.setenv("CKPT_DEBUG", "1")
    for _attempt in range(3):  # reuse needs the saver to keep up; on a loaded machine a run may reuse nothing
        result = convert_cli(*flags, "--load-dir", str(tmp_path / "hf"), "--save-dir", str(tmp_path / "pooled"), "--overwrite")
        assert result.returncode == 0, result.stderr
        reused = re.search(r"loader: (\d+) reads into reused shared memory", result.stderr)
        if reused and int(reused.group(1)) > 0:
            break
    assert reused and int(reused.group(1)) > 0, result.stderr
    monkeypatch.setattr(runtime, "_shared_pool", lambda paced: None)
    convert_inprocess("hf", "core_ext", tmp_path / "hf", tmp_path / "fresh", *flags[4:])
    pooled, fresh = read_mcore_dir(tmp_path / "pooled"), read_mcore_dir(tmp_path / "fresh")
    assert sorted(pooled) == sorted(fresh)
    for rank in pooled:
        assert_same_tensors({k: v for k, v in pooled[rank].items() if isinstance(v, torch.Tensor)},
                            {k: v for k, v in fresh[rank].items() if isinstance(v, torch.Tensor)})
