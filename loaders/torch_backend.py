"""torchvision / PIL backend: the seeds' loader, with the same config and outputs as DALI.

Every seed (lemniscate, PIC, CMC, MoCo) decodes with PIL in DataLoader workers and applies
torchvision transforms; this backend does the same (decoding once per image, as DALI does,
so the comparison in ``launch.py profile`` is about the pipeline, not about decode counts).
It is also the fallback where DALI is not installed.

Augmentation randomness is a pure function of (seed, epoch, index): a resumed run reproduces
the uninterrupted one bit for bit.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch
import torch.utils.data as tud

from fastinst.core.runtime import derive_seed

from .base import LoaderBase, default_threads
from .colour import convert, normalisation
from .mixture import MixPlans, apply_plan, partners, prune
from .randaugment import RandAugmentParams, apply_pil
from .sources import DataError, PIL_decode_check, Source


def view_transform(crop, aug):
    """The view's torchvision transform; with RandAugment (aug.randaugment.n > 0) a (before,
    after) pair around it: grey moves after RandAugment (PIC's order)."""
    import torchvision.transforms as T

    ops = [T.RandomResizedCrop(crop.size, scale=tuple(crop.scale), ratio=tuple(crop.ratio)),
           T.RandomHorizontalFlip(p=aug.flip_p)]
    b, c, s, h = aug.jitter
    if aug.jitter_p > 0 and max(b, c, s, h) > 0:
        ops.append(T.RandomApply([T.ColorJitter(b, c, s, h)], p=aug.jitter_p))
    grey = [T.RandomGrayscale(p=aug.grey_p)] if aug.grey_p > 0 else []
    randaugment = aug.randaugment.n > 0
    ops += [] if randaugment else grey
    if aug.blur_p > 0:
        # SimCLR: kernel 10% of the crop side (odd)
        k = max(3, int(0.1 * crop.size) // 2 * 2 + 1)
        ops.append(T.RandomApply([T.GaussianBlur(k, sigma=tuple(aug.blur_sigma))], p=aug.blur_p))
    if aug.solarize_p > 0:
        ops.append(T.RandomSolarize(128, p=aug.solarize_p))
    return (T.Compose(ops), T.Compose(grey)) if randaugment else T.Compose(ops)


def eval_transform(aug):
    import torchvision.transforms as T

    return T.Compose([T.Resize(aug.eval_resize), T.CenterCrop(aug.eval_crop)])


class MultiViewDataset(tud.Dataset):
    """Decode once with PIL, apply each view transform, normalise (``raw``: leave the views
    uint8, for normalising on the GPU after a 4x smaller copy). Items are (views, index,
    label), or None for a bad sample when on_error=skip."""

    def __init__(self, source: Source, aug, mode: str, seed: int, channels_last: bool, fp16: bool,
                 on_error: str, raw: bool = False):
        self.source, self.aug, self.mode, self.seed = source, aug, mode, seed
        self.channels_last, self.fp16, self.on_error, self.raw = channels_last, fp16, on_error, raw
        if mode == "train":
            self.transforms = [view_transform(c, aug) for c in aug.view_crops]
        elif mode == "decode":  # profiling: the decode stage alone
            self.transforms = []
        else:
            self.transforms = [eval_transform(aug)]
        mean, std = normalisation(aug)
        self.mean, self.std = torch.tensor(mean).view(3, 1, 1), torch.tensor(std).view(3, 1, 1)
        self.colorspace = aug.colorspace
        self.plans = MixPlans(aug, seed, len(source)) if mode == "train" and aug.mix.kind != "none" else None
        self.randaugment = RandAugmentParams(aug, seed) if mode == "train" and aug.randaugment.n > 0 else None
        self.epoch = 0

    def __len__(self):
        return len(self.source)

    def _to_tensor(self, img, half: bool) -> torch.Tensor:  # (3, H, W) float, or uint8 when raw
        arr = np.asarray(img, dtype=np.uint8)  # (H, W, 3) RGB
        if self.colorspace != "rgb":
            arr = convert(arr, self.colorspace)  # float32 (H, W, 3)
        arr = torch.from_numpy(arr.copy())
        if self.raw:
            return arr.permute(2, 0, 1)
        t = arr.permute(2, 0, 1).float().sub_(self.mean).div_(self.std)
        return t.half() if half else t

    def __getitem__(self, key):
        epoch, i = key
        try:
            img = PIL_decode_check(self.source.read_checked(i), self.source.describe(i))
        except DataError:
            if self.on_error == "raise":
                raise
            return None
        # torchvision's transforms draw from torch's global RNG: seed it per (seed, epoch, index)
        torch.manual_seed(derive_seed(self.seed, "view", epoch, i))
        mixed = self.plans is not None  # mixed in float32, then stored as fp16 (as DALI does)
        views = [self._to_tensor(self._cut(img, epoch, i, v), self.fp16 and not mixed)
                 for v in range(len(self.transforms))]
        if mixed:
            views = [self._mixed(epoch, i, v, x) for v, x in enumerate(views)]
            views = [x.half() for x in views] if self.fp16 else views
        return views, i, int(self.source.labels[i])

    def _cut(self, img, epoch: int, i: int, v: int):
        """View ``v`` of image ``img`` (sample ``i``): its transform, with RandAugment's ops of
        (epoch, i, v) between the two halves where they are on (loaders/randaugment.py)."""
        t = self.transforms[v]
        if self.randaugment is None:
            return t(img)
        before, after = t
        return after(apply_pil(before(img), self.randaugment.rows(epoch, i, v), self.aug.randaugment.fill))

    def _mixed(self, epoch: int, i: int, v: int, x: torch.Tensor) -> torch.Tensor:
        """View ``v`` of sample ``i`` through its mixture plan (loaders/mixture.py): each partner
        decoded and cut by the same view transform, seeded per (seed, epoch, index, view, partner)."""
        ops = self.plans.plan(epoch, i, v)
        cut = {}
        for k, p in enumerate(partners(ops)):
            try:
                img = PIL_decode_check(self.source.read_checked(p.index), self.source.describe(p.index))
            except DataError as e:
                if self.on_error == "raise":
                    raise DataError(f"{e} (a mixture partner of {self.source.describe(i)})") from None
                continue  # that pass does not mix
            torch.manual_seed(derive_seed(self.seed, "mix-view", epoch, i, v, k))
            cut[id(p)] = self._to_tensor(self._cut(img, epoch, p.index, v), False)
        ops = prune(ops, lambda p: id(p) not in cut)
        return apply_plan(x, ops, lambda p: cut[id(p)])


def collate(items, channels_last: bool):
    items = [x for x in items if x is not None]
    if not items:
        return None
    nv = len(items[0][0])  # 0 in decode-only profiling
    views = []
    for v in range(nv):
        t = torch.stack([it[0][v] for it in items])  # (B, 3, H, W)
        views.append(t.contiguous(memory_format=torch.channels_last) if channels_last else t)
    index = torch.tensor([it[1] for it in items], dtype=torch.int64)
    label = torch.tensor([it[2] for it in items], dtype=torch.int64)
    return {"views": views, "index": index, "label": label}


class _Collate:
    def __init__(self, channels_last):
        self.channels_last = channels_last

    def __call__(self, items):
        return collate(items, self.channels_last)


class _PlanSampler(tud.Sampler):
    """Yields the remaining batches of the loader's current epoch as (epoch, index) keys."""

    def __init__(self, loader: "TorchLoader"):
        self.loader = loader

    def __iter__(self):
        ld = self.loader
        for b in ld.plan(ld.epoch)[ld.next_batch:]:
            yield [(ld.epoch, int(i)) for i in b]

    def __len__(self):
        return len(self.loader) - self.loader.next_batch


class TorchLoader(LoaderBase):
    backend = "torch"

    def __init__(self, source: Source, sampler, *, aug, batch_size: int, mode: str = "train",
                 num_workers: int = 0, prefetch: int = 2, channels_last: bool = True, fp16: bool = False,
                 drop_last: bool = True, on_error: str = "raise", seed: int = 0, rank: int = 0,
                 local_world: int = 1, pin_memory: Optional[bool] = None, device: str = "auto"):
        super().__init__(source, sampler, batch_size=batch_size, drop_last=drop_last, on_error=on_error,
                         seed=seed, rank=rank)
        self.num_workers = num_workers or default_threads(local_world)
        use_cuda = torch.cuda.is_available() and device != "cpu"
        self.to_gpu = use_cuda
        # On a GPU: uint8 views into pinned memory, copied asynchronously, normalised there.
        # rank-free: the same views at any world size; mixed views are mixed after normalising
        self.dataset = MultiViewDataset(source, aug, mode, seed, channels_last, fp16, on_error,
                                        raw=use_cuda and aug.colorspace == "rgb" and aug.mix.kind == "none")
        self.fp16 = fp16
        if self.dataset.raw:
            self._mean = self.dataset.mean.view(1, 3, 1, 1).cuda()
            self._std = self.dataset.std.view(1, 3, 1, 1).cuda()
        self._dl_kwargs = dict(batch_sampler=_PlanSampler(self), num_workers=self.num_workers,
                               collate_fn=_Collate(channels_last),
                               pin_memory=use_cuda if pin_memory is None else pin_memory,
                               prefetch_factor=prefetch if self.num_workers > 0 else None,
                               persistent_workers=self.num_workers > 0)
        self._dl = None

    @property
    def dl(self) -> tud.DataLoader:
        if self._dl is None:  # built lazily, again after close()
            self._dl = tud.DataLoader(self.dataset, **self._dl_kwargs)
        return self._dl

    def close(self) -> None:
        """Stop the persistent worker processes (dropping the DataLoader shuts them down)."""
        self._dl = None

    def _iter_epoch(self):
        plan = self.plan(self.epoch)
        for batch in self.dl:
            expected = plan[self.next_batch]
            if batch is None:
                raise DataError(f"every sample of batch {self.next_batch} (epoch {self.epoch}) was bad; first: "
                                f"{self.source.describe(int(expected[0]))}")
            if len(batch["index"]) != len(expected):
                self._record_skips(expected, batch["index"].numpy())
            if self.to_gpu:
                batch["views"] = [v.cuda(non_blocking=True) for v in batch["views"]]
                if self.dataset.raw:
                    batch["views"] = [self._normalise(v) for v in batch["views"]]
            yield batch

    def _normalise(self, v: torch.Tensor) -> torch.Tensor:
        """uint8 [B, 3, H, W] on the GPU -> (x − 255·mean) / (255·std), float (half when fp16),
        keeping the memory format (channels-last from collate)."""
        out = (v.float() - self._mean) / self._std  # the workers' CPU formula, on the GPU
        return out.half() if self.fp16 else out
