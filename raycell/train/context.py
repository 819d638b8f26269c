"""TrainContext: what the training loop needs from its surroundings, with a Ray and a local version.

The loop asks the context for its rank, device, minibatches, the checkpoint to resume from, gradient
synchronisation and reporting. `RayTrainContext` wires these to Ray Train; `LocalContext` runs the same loop
in-process over the shards (unit tests, debugging), so the loop itself is tested without a cluster.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import weakref
from pathlib import Path
from typing import Iterator

import torch

from raycell.data.dataset import CropCollate, local_batches, train_batches
from raycell.formats.shards import ShardDataset


class TrainContext:
    """Interface (and single-process defaults) used by `loop.run_training`."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    def minibatches(self, split: str, epoch: int, train: bool) -> Iterator[dict[str, torch.Tensor]]:
        """Collated minibatches of one split for this worker, already on `device`."""
        raise NotImplementedError

    def resume_from(self) -> Path | None:
        """Checkpoint folder to resume from, or None."""
        return None

    def report(self, metrics: dict, checkpoint_dir: str | None) -> None:
        """Publish the epoch's metrics (and checkpoint, rank 0)."""
        raise NotImplementedError

    def sync_gradients(self, params: list[torch.nn.Parameter]) -> None:
        """Average gradients over workers (no-op with one worker)."""

    def broadcast_parameters(self, module: torch.nn.Module) -> None:
        """Make every worker start from rank 0's weights (no-op with one worker)."""

    def agree(self, flag: bool) -> bool:
        """Rank 0's `flag`, on every rank (with one worker, `flag` itself)."""
        return flag


class LocalContext(TrainContext):
    """In-process context over a shard data set; reports are collected in `self.history`."""

    def __init__(
        self,
        ds: ShardDataset,
        collate: CropCollate,
        batch_size: int,
        eval_batch_size: int,
        checkpoint_root: str | os.PathLike,
        seed: int = 0,
        resume: str | None = None,
    ):
        self.ds, self.collate = ds, collate
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.root = Path(checkpoint_root)
        self.seed = seed
        self._resume = Path(resume) if resume else None
        self.history: list[dict] = []
        self.checkpoints: list[Path] = []

    def minibatches(self, split, epoch, train):
        """Shuffled (train) or ordered minibatches from the shards."""
        bs = self.batch_size if train else self.eval_batch_size
        yield from local_batches(
            self.ds, split, bs, self.collate, shuffle=train, seed=self.seed + epoch, drop_last=train
        )

    def resume_from(self):
        """The checkpoint given at construction."""
        return self._resume

    def report(self, metrics, checkpoint_dir):
        """Keep metrics; copy the checkpoint to `<root>/checkpoint_<epoch>`."""
        self.history.append(dict(metrics))
        if checkpoint_dir:
            dst = self.root / f"checkpoint_{metrics['epoch']:04d}"
            shutil.copytree(checkpoint_dir, dst, dirs_exist_ok=True)
            self.checkpoints.append(dst)


class RayTrainContext(TrainContext):
    """Context inside a Ray Train worker: dataset shards, `ray.train.report`, torch.distributed."""

    def __init__(
        self,
        collate: CropCollate,
        batch_size: int,
        eval_batch_size: int,
        shuffle_buffer: int,
        prefetch_batches: int,
        shuffle_seed: int = -1,
        fetch_batches: int = 1,
    ):
        import ray.train
        import ray.train.torch

        ctx = ray.train.get_context()
        self.rank, self.world_size = ctx.get_world_rank(), ctx.get_world_size()
        self.device = ray.train.torch.get_device()
        self.collate = collate
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.shuffle_buffer, self.prefetch = shuffle_buffer, prefetch_batches
        self.shuffle_seed, self.fetch = shuffle_seed, fetch_batches
        self._drop_copy: weakref.finalize | None = None  # removes a temporary checkpoint copy

    def minibatches(self, split, epoch, train):
        """`iter_torch_batches` over this worker's shard (train is split across workers, val is not); training
        batches come `data.fetch_batches` at a time from Ray and are cut here (`train_batches`).

        With `data.shuffle_seed`, the local shuffle is seeded by (seed, epoch, rank): the same order after
        a restart from a checkpoint as in an undisturbed run.
        """
        import ray.train

        seed = None
        if train and self.shuffle_seed >= 0:
            seed = (self.shuffle_seed * 1_000_003 + epoch * 1_009 + self.rank) % 2**31
        it = ray.train.get_dataset_shard(split)
        pin = self.device.type == "cuda"
        if train:
            yield from train_batches(
                it,
                self.batch_size,
                self.collate,
                self.fetch,
                self.shuffle_buffer,
                seed,
                self.prefetch,
                pin,
            )
            return
        yield from it.iter_torch_batches(
            batch_size=self.eval_batch_size,
            collate_fn=self.collate,
            prefetch_batches=self.prefetch,
            drop_last=False,
            pin_memory=pin,
        )

    def resume_from(self):
        """Latest checkpoint of this run (a retry after a failure, or `--resume`).

        On local storage visible to this worker the checkpoint folder itself (the loop only reads it);
        otherwise a temporary copy, deleted at the first report (the loop has loaded it by then) or when
        the worker exits.
        """
        import pyarrow.fs
        import ray.train

        ck = ray.train.get_checkpoint()
        if ck is None:
            return None
        if isinstance(ck.filesystem, pyarrow.fs.LocalFileSystem) and Path(ck.path).is_dir():
            return Path(ck.path)
        tmp = tempfile.mkdtemp(prefix="raycell-resume-")
        self._drop_copy = weakref.finalize(self, shutil.rmtree, tmp, True)
        return Path(ck.to_directory(tmp))

    def report(self, metrics, checkpoint_dir):
        """Every rank must call ray.train.report (it is a barrier); only rank 0 passes a checkpoint."""
        import ray.train

        if self._drop_copy is not None:
            self._drop_copy()  # idempotent; the resumed state is loaded by the first report
        ck = ray.train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        ray.train.report(metrics, checkpoint=ck)

    def sync_gradients(self, params):
        """All-reduce the gradients of exactly the parameters about to be stepped, in one flat buffer.

        Used instead of DDP because the ARMED plans step several optimisers over different sub-networks
        per batch (adversary on detached features, then the main network); DDP's reducer assumes one
        backward over a fixed parameter set per iteration.
        """
        if self.world_size == 1:
            return
        import torch.distributed as dist
        from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

        grads = [p.grad for p in params if p.grad is not None]
        if not grads:
            return
        flat = _flatten_dense_tensors(grads)
        dist.all_reduce(flat)
        flat /= self.world_size
        for g, s in zip(grads, _unflatten_dense_tensors(flat, grads)):
            g.copy_(s)

    def broadcast_parameters(self, module):
        """Copy rank 0's parameters and buffers to every worker."""
        if self.world_size == 1:
            return
        import torch.distributed as dist

        for t in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(t.data, src=0)

    def agree(self, flag):
        """Broadcast rank 0's flag (a tensor on the device: nccl cannot send CPU tensors)."""
        if self.world_size == 1:
            return flag
        import torch.distributed as dist

        t = torch.tensor([int(flag)], dtype=torch.int64, device=self.device)
        dist.broadcast(t, src=0)
        return bool(t.item())


__all__ = ["TrainContext", "LocalContext", "RayTrainContext"]
