"""Random-patch streams for PyTorch, read straight from the chunked Zarr arrays of a store.

Each patch is a Zarr slice of just the patch region (only the chunks it touches are read and
decoded), never a whole-volume read.

Sampling (per patch):

* with probability ``foreground_fraction`` (nnU-Net: 1/3) the patch is centred on a foreground
  voxel: a lesion of the chosen label set is drawn uniformly from the shard's rows of the store's
  lesion table (status not ``removed``), its bounding box is read (a few KB), and a foreground voxel
  inside it is drawn uniformly; the patch centre ``origin + patch_size // 2`` is that voxel.
  Drawing the lesion first (rather than a foreground voxel) gives small lesions the same chance
  as large ones, which is the point of this project. Cases without lesions fall back to uniform.
  ``foreground_sampling="voxel"`` draws the lesion with probability proportional to its voxel
  count instead — a uniform foreground voxel of the case, nnU-Net's rule — which puts more
  lesion voxels into each patch (the clean stream of meta reweighting uses it).
* otherwise the origin is uniform over all positions that keep the patch inside the volume
  (or, when the volume is smaller than the patch along an axis, that keep the volume inside the
  patch).

Parts of a patch outside the volume are zero in the image (after normalisation) and zero in the
label.

Normalisation: per-case, per-channel z-score (nnU-Net's MRI scheme), ``(x - mean_c) / std_c``.
The statistics come from the store's per-case attributes when they record them (``channel_mean`` /
``channel_std`` over the whole image, written by ``VolumeStore.write_case``); otherwise each worker process computes them once per case from a strided
subsample of the image (about 32 points per axis) and caches them. The subsample touches every
chunk of the image once per case per process, amortised over the whole (infinite) stream.

Sharding: cases are dealt to Ray Train ranks (``case_ids[rank::world_size]``) and then to
DataLoader workers (``rank_cases[worker::num_workers]``), so shards are disjoint and their union
is every case. When a level has fewer cases than shards, that level does not split: every shard
of it samples from all the cases it has, and the shards differ only by their RNG streams (seeded
by ``(seed, stream, epoch, rank, worker)``), so they are disjoint *sample streams* rather than
disjoint case sets. The same fallback keeps a 1-case clean subset usable by 8 workers.

Each process opens the store lazily in ``__iter__``: the dataset object itself holds only
strings and numbers, so it pickles to Ray Train workers and DataLoader worker processes.

The clean stream's defaults (:func:`make_train_loaders`), measured by
``benchmarks/clean_share.py``: lesion share of the streams (lesion voxels / patch voxels, mean of
300 patches of 40³) on the default brain phantom stores (32 cases at 2 mm, seeds 0/1/2; noisy
stream ``censor-random-0.50-s<seed>`` at foreground fraction 1/3, lesion sampling; 3 clean cases
of the 6 flagged among 21 training cases, lesion-centred patches drawn by voxel)::

                random cases                 lesion-rich cases (default)
    seed   noisy   clean 2/3   clean 1.0   noisy   clean 2/3   clean 1.0 (default)
    0      0.68 %  0.43 %      0.47 %      0.73 %  0.49 %      0.51 %
    1      0.15 %  1.93 %      2.26 %      0.15 %  2.06 %      2.39 %
    2      0.54 %  0.25 %      0.25 %      0.53 %  0.87 %      1.01 %

(The noisy stream leaves the clean cases out, so it changes with them.) The
clean share is bounded by the clean cases' own lesions: with the random draw, seed 2's clean
cases held 74/352/385 lesion voxels and even every patch on a lesion gives 0.25 %. Drawing the
clean cases from the lesion-richer half of the flagged ones (:func:`select_clean_cases`) lifts
seed 2 to 1.9x the noisy share; seed 0's lesion-richest flagged cases (764/775/572 voxels)
still give 0.70x. :class:`noisyseg.reweight.MetaStepResult` reports
both shares per step so a lesion-poor clean stream is visible while it trains.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from noisyseg.errors import NoisysegInputError
from noisyseg.storage.chunk_source import ChunkCache
from noisyseg.storage.clean_subset import (
    DEFAULT_CLEAN_MIN_CASES,
    DEFAULT_CLEAN_SELECTION,
    open_store,
    select_clean_cases,
)
from noisyseg.storage.filesystems import is_remote
from noisyseg.storage.normalise import case_stats
from noisyseg.storage.readahead import read_ahead
from noisyseg.storage.reader import RegionReader
from noisyseg.storage.store import VolumeStore

#: Probability that a clean-stream patch is centred on a lesion voxel: every one. Meta reweighting
#: needs clean batches that carry the lesions (with lesion-poor clean batches the weights switch
#: the lesion voxels off); shares measured on the brain phantom stores in the module docstring.
DEFAULT_CLEAN_FOREGROUND_FRACTION = 1.0
#: How foreground-centred patches pick their lesion (see the module docstring).
FOREGROUND_SAMPLING: tuple[str, ...] = ("lesion", "voxel")
#: The clean stream's rule: lesion voxels uniformly, so large lesions fill the clean batches.
DEFAULT_CLEAN_FOREGROUND_SAMPLING = "voxel"
#: Patches read ahead by background threads on an object store (``read_ahead=None``); local
#: stores read on demand (their reads take milliseconds and already use decoding threads).
DEFAULT_REMOTE_READ_AHEAD = 4
#: Chunk cache per stream process on an object store (``chunk_cache_mb=None``), MB of stored
#: (compressed) chunk objects; 0 on local stores (the OS page cache does it there).
DEFAULT_REMOTE_CHUNK_CACHE_MB = 512.0


class PatchRequest(NamedTuple):
    """One drawn patch, before it is read: the case, the origin and the axes to flip."""

    case_id: str
    origin: np.ndarray
    flips: tuple[int, ...]


def shard_cases(
    case_ids: Sequence[str], *, rank: int, world_size: int, worker: int, num_workers: int
) -> list[str]:
    """The cases one (rank, DataLoader worker) shard samples from.

    Two levels: ``case_ids[rank::world_size]``, then ``[worker::num_workers]`` of that. A level
    with fewer cases than shards is not split (every shard keeps all its cases; the RNG streams
    differ instead), so a shard is never empty.
    """
    cases = list(case_ids)
    if not cases:
        return []
    if len(cases) >= world_size:
        cases = cases[rank::world_size]
    if len(cases) >= num_workers:
        cases = cases[worker::num_workers]
    return cases


class _ShardReader:
    """Per-process state of one shard: the open store, array handles, stats and lesion boxes."""

    def __init__(
        self,
        ds: PatchDataset,
        cases: list[str],
        arrays: dict[str, tuple[Any, Any]] | None = None,
    ) -> None:
        """``arrays`` (benchmarks): per case ``(image, label)`` array-likes to read instead of
        the store's arrays (statistics and lesion boxes still come from the store)."""

        self.ds = ds
        self.store = VolumeStore.open(ds.store_url, mode="r")
        self.cases = cases
        mb = ds.resolved_chunk_cache_mb()
        #: Stored chunk objects kept for this stream (remote stores; None: nothing kept).
        self.cache = ChunkCache(int(mb * (1 << 20))) if mb > 0 else None
        if arrays is None:
            # RegionReader: direct chunk decoding for patch boxes (see its docstring); in a
            # DataLoader worker process or with read-ahead threads those are the parallelism:
            # decode in-thread.
            parallel = get_worker_info() is not None or ds.resolved_read_ahead() > 0
            threads = 1 if parallel else None
            self.images = {
                cid: RegionReader(self.store.image(cid), threads, self.cache) for cid in cases
            }
            self.labels = {
                cid: RegionReader(self.store.labels(cid, ds.label_set), threads, self.cache)
                for cid in cases
            }
        else:
            self.images = {cid: arrays[cid][0] for cid in cases}
            self.labels = {cid: arrays[cid][1] for cid in cases}
        self.stats: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self.nd = len(ds.patch_size)
        for cid in cases:
            if self.labels[cid].ndim != self.nd:
                raise NoisysegInputError(
                    f"patch_size {ds.patch_size} has {self.nd} axes, the volume has "
                    f"{self.labels[cid].ndim}",
                    case=cid,
                    path=ds.store_url,
                )
        self.boxes, self.lesion_odds = self._lesion_boxes()

    def _lesion_boxes(self) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """Per case: int64 array (n_lesions, 2, nd) of [start, stop) boxes of present lesions,
        and float array (n_lesions,) of the lesions' voxel counts over the case's total."""
        table = self.store.lesion_table(self.ds.label_set)
        if len(table) == 0:
            return {}, {}
        table = table[table["case_id"].isin(set(self.cases))]
        if "label_set" in table.columns:
            table = table[table["label_set"] == self.ds.label_set]
        if "status" in table.columns:
            table = table[table["status"] != "removed"]
        if len(table) == 0:
            return {}, {}
        axes = ("z", "y", "x")[-self.nd :]
        # The store's boxes are [bbox_min, bbox_max) per axis (max exclusive).
        lo = table[[f"bbox_min_{a}" for a in axes]].to_numpy(np.int64)
        hi = table[[f"bbox_max_{a}" for a in axes]].to_numpy(np.int64)
        voxels = table["voxels"].to_numpy(np.float64)
        out: dict[str, np.ndarray] = {}
        odds: dict[str, np.ndarray] = {}
        case_col = table["case_id"].to_numpy()
        for cid in np.unique(case_col):
            rows = case_col == cid
            out[str(cid)] = np.stack([lo[rows], hi[rows]], axis=1)
            odds[str(cid)] = voxels[rows] / voxels[rows].sum()
        return out, odds

    def case_stats(self, cid: str) -> tuple[np.ndarray, np.ndarray]:
        """Per-channel (mean, std) of the case image, float32 arrays of shape (C,); see
        :func:`case_stats` (cached per process)."""
        if cid not in self.stats:
            image = self.images[cid]
            self.stats[cid] = case_stats(self.store, cid, getattr(image, "array", image))
        return self.stats[cid]

    def foreground_centre(
        self, cid: str, rng: np.random.Generator, by_volume: bool = False
    ) -> np.ndarray | None:
        """A uniformly drawn foreground voxel of a lesion of ``cid`` (or None without lesions):
        the lesion is drawn uniformly, or with probability ∝ its voxel count (``by_volume``)."""
        boxes = self.boxes.get(cid)
        if boxes is None or len(boxes) == 0:
            return None
        if by_volume:
            lo, hi = boxes[rng.choice(len(boxes), p=self.lesion_odds[cid])]
        else:
            lo, hi = boxes[rng.integers(len(boxes))]
        region = np.asarray(self.labels[cid][tuple(slice(a, b) for a, b in zip(lo, hi))])
        fg = np.argwhere(region > 0)
        if len(fg) == 0:  # table out of step with the array: treat as no lesion
            return None
        return lo + fg[rng.integers(len(fg))]

    def read(self, cid: str, origin: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Image (C,*P) float32 z-scored and label (1,*P) float32 at ``origin``, zero-padded."""
        img_arr, lab_arr = self.images[cid], self.labels[cid]
        shape = np.asarray(lab_arr.shape)
        size = np.asarray(self.ds.patch_size)
        start = np.maximum(origin, 0)
        stop = np.minimum(origin + size, shape)
        n_channels = img_arr.shape[0]
        bshape = (n_channels,) + (1,) * self.nd
        if np.array_equal(start, origin) and np.array_equal(stop, origin + size):
            # patch inside the volume: normalise the freshly read block in place, no padding
            src = tuple(slice(int(a), int(b)) for a, b in zip(start, stop))
            mean, std = self.case_stats(cid)
            image = np.asarray(img_arr[(slice(None),) + src], dtype=np.float32)
            if not (image.flags.owndata and image.flags.writeable and image.flags.c_contiguous):
                image = np.array(image, dtype=np.float32)  # never normalise a caller's array
            image -= mean.reshape(bshape)
            image /= std.reshape(bshape)
            label = np.asarray(lab_arr[src]).astype(np.float32)[None]
            return image, label
        image = np.zeros((n_channels, *self.ds.patch_size), dtype=np.float32)
        label = np.zeros((1, *self.ds.patch_size), dtype=np.float32)
        if np.all(stop > start):
            src = tuple(slice(int(a), int(b)) for a, b in zip(start, stop))
            dst = tuple(slice(int(a - o), int(b - o)) for a, b, o in zip(start, stop, origin))
            mean, std = self.case_stats(cid)
            block = np.asarray(img_arr[(slice(None),) + src], dtype=np.float32)
            image[(slice(None),) + dst] = (block - mean.reshape(bshape)) / std.reshape(bshape)
            label[(0,) + dst] = np.asarray(lab_arr[src])
        return image, label


class PatchDataset(IterableDataset):
    """Infinite stream of random patches of the given cases.

    Args:
        store_url: the store (path or fsspec URL).
        case_ids: cases to sample (before sharding).
        label_set: label set served as ``label`` and used for foreground oversampling.
        patch_size: spatial patch size ``P`` (voxels, store axis order ``z, y, x`` / ``y, x``).
        foreground_fraction: probability that a patch is centred on a lesion voxel.
        foreground_sampling: ``"lesion"`` (each lesion equally likely) or ``"voxel"`` (each
            lesion voxel of the case equally likely) for the foreground-centred patches.
        seed: base seed; the stream is a function of ``(seed, stream, epoch, rank, worker)``.
        rank, world_size: this process's Ray Train rank and the number of ranks.
        augment: random flips along every spatial axis (image and label together).
        stream: extra seed component, so two datasets with the same seed (e.g. the noisy and the
            clean stream) draw independently.
        read_ahead: patches read ahead by background threads while the current one is consumed
            (:func:`~noisyseg.storage.readahead.read_ahead`); 0 reads each patch on demand.
            None: :data:`DEFAULT_REMOTE_READ_AHEAD` on an object store, 0 on a local one.
        chunk_cache_mb: stored chunk objects of an object store kept per stream process, in MB
            (:class:`~noisyseg.storage.chunk_source.ChunkCache`); 0 keeps none. None:
            :data:`DEFAULT_REMOTE_CHUNK_CACHE_MB` on an object store, 0 on a local one.

    Read-ahead and the cache change where and when chunks are read, never what is yielded: the
    stream is bitwise the same with them on or off (the patches are drawn in order in the
    consumer's thread; only the reads run ahead), and every chunk is checked against its
    manifest when it is fetched.

    Yields:
        ``dict(image=float32 tensor (C, *P), label=float32 tensor (1, *P) in {0, 1},
        case_id=str, origin=tuple[int, ...])``; ``origin`` is the volume coordinate of the
        patch's first voxel (may be negative or run past the volume: that part is zero-padded).
        With ``augment=True`` the flip is applied after reading, ``origin`` is unchanged.
    """

    def __init__(
        self,
        store_url: str,
        case_ids: list[str],
        *,
        label_set: str = "truth",
        patch_size: tuple[int, ...],
        foreground_fraction: float = 1 / 3,
        foreground_sampling: str = "lesion",
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        augment: bool = False,
        stream: int = 0,
        read_ahead: int | None = None,
        chunk_cache_mb: float | None = None,
    ) -> None:
        super().__init__()
        if not case_ids:
            raise NoisysegInputError("patch dataset needs at least one case", path=str(store_url))
        if not (0.0 <= float(foreground_fraction) <= 1.0):
            raise NoisysegInputError(
                f"foreground_fraction must lie in [0, 1], got {foreground_fraction!r}"
            )
        if foreground_sampling not in FOREGROUND_SAMPLING:
            raise NoisysegInputError(
                f"foreground_sampling must be one of {FOREGROUND_SAMPLING}, "
                f"got {foreground_sampling!r}"
            )
        if any(int(p) < 1 for p in patch_size):
            raise NoisysegInputError(f"patch_size must be positive, got {tuple(patch_size)}")
        if not (0 <= rank < world_size):
            raise NoisysegInputError(f"rank must lie in [0, world_size), got {rank}/{world_size}")
        self.store_url = str(store_url)
        self.case_ids = [str(c) for c in case_ids]
        self.label_set = label_set
        self.patch_size = tuple(int(p) for p in patch_size)
        self.foreground_fraction = float(foreground_fraction)
        self.foreground_sampling = foreground_sampling
        self.seed = int(seed)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.augment = bool(augment)
        self.stream = int(stream)
        self.read_ahead = None if read_ahead is None else max(0, int(read_ahead))
        self.chunk_cache_mb = None if chunk_cache_mb is None else max(0.0, float(chunk_cache_mb))
        self.epoch = 0

    def resolved_read_ahead(self) -> int:
        """Patches read ahead (``read_ahead``, or its default for this store's location)."""
        if self.read_ahead is not None:
            return self.read_ahead
        return DEFAULT_REMOTE_READ_AHEAD if is_remote(self.store_url) else 0

    def resolved_chunk_cache_mb(self) -> float:
        """Chunk cache budget in MB (``chunk_cache_mb``, or its default for this store)."""
        if self.chunk_cache_mb is not None:
            return self.chunk_cache_mb
        return DEFAULT_REMOTE_CHUNK_CACHE_MB if is_remote(self.store_url) else 0.0

    def set_epoch(self, epoch: int) -> None:
        """Start a fresh stream on the next ``iter()`` (like ``DistributedSampler.set_epoch``).

        Without it, every new iterator replays the same patches (the stream is a pure function of
        the seeds). Call it before creating the DataLoader iterator of each epoch. With
        ``persistent_workers`` the workers keep their copy (and their stream, which is infinite):
        keep one iterator for the whole run instead.
        """
        self.epoch = int(epoch)

    def shard(self, worker: int = 0, num_workers: int = 1) -> list[str]:
        """Cases of this rank's DataLoader worker ``worker`` (see :func:`shard_cases`)."""
        return shard_cases(
            self.case_ids,
            rank=self.rank,
            world_size=self.world_size,
            worker=worker,
            num_workers=num_workers,
        )

    def rng_for(self, worker: int) -> np.random.Generator:
        seq = np.random.SeedSequence([self.seed, self.stream, self.epoch, self.rank, worker])
        return np.random.default_rng(seq)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        # Every per-process resource lives in this generator's frame, never on self.
        reader = _ShardReader(self, self.shard(worker, num_workers))
        rng = self.rng_for(worker)
        return self._generate(reader, rng)

    def _generate(self, reader: _ShardReader, rng: np.random.Generator) -> Iterator[dict[str, Any]]:
        requests = self._requests(reader, rng)
        return read_ahead(requests, lambda r: self._patch(reader, r), self.resolved_read_ahead())

    def _requests(self, reader: _ShardReader, rng: np.random.Generator) -> Iterator[PatchRequest]:
        """The drawn patches, in stream order (every random draw of the stream happens here)."""
        size = np.asarray(self.patch_size)
        half = size // 2
        nd = len(size)
        while True:
            cid = reader.cases[int(rng.integers(len(reader.cases)))]
            shape = np.asarray(reader.labels[cid].shape)
            centre = None
            if rng.random() < self.foreground_fraction:
                by_volume = self.foreground_sampling == "voxel"
                centre = reader.foreground_centre(cid, rng, by_volume)
            if centre is not None:
                origin = centre - half
            else:
                low = np.minimum(0, shape - size)
                high = np.maximum(0, shape - size)
                origin = rng.integers(low, high + 1)
            flips: tuple[int, ...] = ()
            if self.augment:
                flips = tuple(1 + d for d in range(nd) if rng.random() < 0.5)
            yield PatchRequest(cid, origin, flips)

    def _patch(self, reader: _ShardReader, request: PatchRequest) -> dict[str, Any]:
        """Read (and flip) one drawn patch: the stream's item."""
        image, label = reader.read(request.case_id, request.origin)
        if request.flips:
            image = np.ascontiguousarray(np.flip(image, axis=request.flips))
            label = np.ascontiguousarray(np.flip(label, axis=request.flips))
        return {
            "image": torch.from_numpy(image),
            "label": torch.from_numpy(label),
            "case_id": request.case_id,
            "origin": tuple(int(o) for o in request.origin),
        }


@dataclass
class TrainLoaders:
    """The two training streams: noisy-label patches and (optionally) clean-label patches."""

    noisy: DataLoader
    clean: DataLoader | None
    noisy_case_ids: list[str]
    clean_case_ids: list[str]


def make_train_loaders(
    store_url: str,
    *,
    label_set: str,
    patch_size: tuple[int, ...],
    batch_size: int,
    foreground_fraction: float = 1 / 3,
    clean_fraction: float | None = None,
    clean_count: int | None = None,
    clean_min_cases: int = DEFAULT_CLEAN_MIN_CASES,
    clean_selection: str = DEFAULT_CLEAN_SELECTION,
    clean_foreground_fraction: float = DEFAULT_CLEAN_FOREGROUND_FRACTION,
    clean_foreground_sampling: str = DEFAULT_CLEAN_FOREGROUND_SAMPLING,
    clean_batch_size: int | None = None,
    exclude_clean_from_noisy: bool = True,
    train_subset: str = "all",
    rank: int = 0,
    world_size: int = 1,
    num_workers: int = 0,
    seed: int = 0,
    stream_seed: int | None = None,
    augment: bool = False,
    multiprocessing_context: str | None = None,
    read_ahead: int | None = None,
    chunk_cache_mb: float | None = None,
) -> TrainLoaders:
    """DataLoaders over the training split: ``label_set`` patches, plus a ``truth`` clean stream.

    The clean stream exists when ``clean_fraction`` or ``clean_count`` is given
    (:func:`select_clean_cases`, at least ``clean_min_cases`` cases for a fraction when the data
    allow, drawn by ``clean_selection``); it reads the ``truth`` labels of the clean cases,
    centres a patch on a lesion with probability ``clean_foreground_fraction`` (the lesion drawn
    by ``clean_foreground_sampling``, see :class:`PatchDataset`) and batches
    ``clean_batch_size`` patches (default and minimum: ``batch_size``). With ``exclude_clean_from_noisy`` the clean cases are left out
    of the noisy stream.

    The lesion share this gives the batches is measured in the module docstring.
    ``train_subset="clean"`` trains on the clean subset alone: the main stream reads
    ``label_set`` of the clean cases only and there is no separate clean stream (the clean-only
    baseline). ``seed`` draws the clean subset; ``stream_seed`` (default ``seed``) seeds the patch
    streams, so a resumed run can move its streams on while keeping the same clean subset.
    Batches: ``image (B, C, *P)``, ``label (B, 1, *P)``, ``case_id`` list of B strings,
    ``origin`` list of ``nd`` int tensors of shape (B,). ``read_ahead`` and ``chunk_cache_mb``
    (per stream process; None: the defaults for the store's location) are
    :class:`PatchDataset`'s.
    """
    store = open_store(store_url)
    clean_batch = _check_loader_inputs(store, label_set, patch_size, batch_size, clean_batch_size)
    clean = _clean_subset(
        store, clean_fraction, clean_count, seed, clean_min_cases, clean_selection
    )
    noisy, clean = _stream_cases(store, clean, train_subset, exclude_clean_from_noisy)
    common = {
        "patch_size": tuple(patch_size),
        "seed": seed if stream_seed is None else stream_seed,
        "rank": rank,
        "world_size": world_size,
        "augment": augment,
        "read_ahead": read_ahead,
        "chunk_cache_mb": chunk_cache_mb,
    }
    noisy_ds = PatchDataset(
        store.url,
        noisy,
        label_set=label_set,
        stream=0,
        foreground_fraction=foreground_fraction,
        **common,
    )
    workers = {"num_workers": num_workers, "multiprocessing_context": multiprocessing_context}
    return TrainLoaders(
        noisy=_loader(noisy_ds, batch_size, **workers),
        clean=_clean_loader(
            store.url,
            clean,
            common,
            clean_foreground_fraction,
            clean_foreground_sampling,
            loader_kwargs={"size": clean_batch, **workers},
        ),
        noisy_case_ids=noisy,
        clean_case_ids=clean,
    )


def _clean_loader(
    store_url: str,
    clean: list[str],
    common: dict[str, Any],
    foreground_fraction: float,
    foreground_sampling: str,
    loader_kwargs: dict[str, Any],
) -> DataLoader | None:
    """The clean stream's DataLoader: ``truth`` patches of the ``clean`` cases (stream 1), None
    when there are no clean cases."""
    if not clean:
        return None
    clean_ds = PatchDataset(
        store_url,
        clean,
        label_set="truth",
        stream=1,
        foreground_fraction=foreground_fraction,
        foreground_sampling=foreground_sampling,
        **common,
    )
    return _loader(clean_ds, **loader_kwargs)


def _check_loader_inputs(
    store: VolumeStore,
    label_set: str,
    patch_size: Sequence[int],
    batch_size: int,
    clean_batch_size: int | None,
) -> int:
    """Check the label sets (``label_set`` and ``truth``), the patch dims against the store's
    and the batch sizes; returns the clean batch size (default and minimum ``batch_size``)."""
    sets = store.label_sets()
    for wanted in {label_set, "truth"}:
        if wanted not in sets:
            raise NoisysegInputError(
                f"label set {wanted!r} not found (available: {', '.join(sets) or 'none'})",
                path=str(store.url),
            )
    if len(patch_size) != store.spatial_dims:
        raise NoisysegInputError(
            f"patch_size {tuple(patch_size)} has {len(patch_size)} axes, the store has "
            f"{store.spatial_dims} spatial axes",
            path=str(store.url),
        )
    if batch_size < 1:
        raise NoisysegInputError(f"batch_size must be >= 1, got {batch_size}")
    clean_batch = batch_size if clean_batch_size is None else int(clean_batch_size)
    if clean_batch < batch_size:
        raise NoisysegInputError(
            f"clean_batch_size must be >= batch_size ({batch_size}), got {clean_batch}"
        )
    return clean_batch


def _clean_subset(
    store: VolumeStore,
    fraction: float | None,
    count: int | None,
    seed: int,
    min_count: int,
    selection: str,
) -> list[str]:
    """The clean subset of the training split (:func:`select_clean_cases`); ``[]`` when neither
    ``fraction`` nor ``count`` is given."""
    if fraction is None and count is None:
        return []
    return select_clean_cases(
        store,
        fraction=fraction,
        count=count,
        seed=seed,
        split="train",
        min_count=min_count,
        selection=selection,
    )


def _stream_cases(
    store: VolumeStore, clean: list[str], train_subset: str, exclude_clean_from_noisy: bool
) -> tuple[list[str], list[str]]:
    """``(noisy, clean)`` case ids of the two streams from the training split and the chosen
    ``clean`` subset (``train_subset="clean"``: the clean cases are the only stream)."""
    train = list(store.case_ids(split="train"))
    if train_subset not in ("all", "clean"):
        raise NoisysegInputError(f"train_subset must be 'all' or 'clean', got {train_subset!r}")
    if train_subset == "clean":
        if not clean:
            raise NoisysegInputError("train_subset='clean' needs clean_fraction or clean_count")
        noisy, clean = clean, []
    elif exclude_clean_from_noisy:
        noisy = [c for c in train if c not in set(clean)]
    else:
        noisy = train
    if not noisy:
        raise NoisysegInputError(
            "no training cases left for the noisy stream after removing the clean subset",
            path=str(store.url),
        )
    return noisy, clean


def _loader(
    ds: PatchDataset, size: int, *, num_workers: int, multiprocessing_context: str | None
) -> DataLoader:
    """A DataLoader of ``size``-patch batches over ``ds`` (persistent workers when any)."""
    return DataLoader(
        ds,
        batch_size=size,
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
        multiprocessing_context=multiprocessing_context if num_workers > 0 else None,
    )
