"""NVIDIA DALI backend: decode each image once, cut every view from it.

The augmentation graphs are plain functions (``decode``, ``train_view``, ``eval_view``,
loaders/dali_graph.py) that take DALI data nodes; the same functions build the GPU pipeline
(``device='mixed'`` decoding, hardware JPEG decoder where present, all ops on the GPU) and the
CPU-only one (every op on the CPU, ``device_id=None``). Samples enter through a parallel ``external_source`` whose
callback reads the bytes chosen by our resumable sampler, so the order is ours, not DALI's.

The graph draws no random numbers. The same callback supplies, per sample and view, a row of
augmentation parameters (``loaders/view_params.py``): a pure function of (seed, epoch, index,
view) from a counter-based Philox stream, with the crop window computed by torchvision's
RandomResizedCrop rule on the size read from the encoded header. The graph applies the row
with per-sample argument inputs (resize ROI, colour-twist factors, blur sigma, conditionals on
the blur / solarize gates, the mirror flag), so a view does not depend on the batch it is in,
the rank, the world size or a resume: on the CPU it is bit-identical across all of them (on
the GPU the parameters are the same; pixels not compared: the hardware JPEG decoder takes a
share of each batch and need not match the CUDA decoder bit for bit).

This module, loaders/dali_graph.py and loaders/dali_randaugment.py are the only ones that import
``nvidia.dali``.
"""
from __future__ import annotations

import re
from typing import Optional

import numpy as np
import torch

from fastinst.core.runtime import derive_seed

from .base import LoaderBase, default_threads
from .dali_graph import decode, eval_view, train_views
from .mixture import MixPlans, MixRows, max_partners, partners, prune
from .randaugment import RandAugmentParams
from .sources import DataError, Source, log
from .view_params import ViewParams, image_size, view_params

try:  # DALI is optional at import time so the torch backend works without it
    import nvidia.dali.fn as fn
    import nvidia.dali.types as types
    from nvidia.dali import pipeline_def
    from nvidia.dali.plugin.pytorch import feed_ndarray

    HAVE_DALI = True
except ImportError:  # pragma: no cover - exercised only where DALI is missing
    HAVE_DALI = False


# --------------------------------------------------------------------------- sample feed


class BatchFeed:
    """The external_source callback: batch ``info.iteration`` of epoch ``start_epoch + info.epoch_idx``.

    With ``view_params`` (train mode) it also returns, per sample, its (views, N_PARAMS) float32
    parameter rows, a function of (seed, epoch, index, view) only (a header it cannot read is a
    bad sample, like an unreadable file). With ``mix_plans`` (aug.mix) the batch is extended: the
    sampled anchors first, then every partner their mixture plans read (index and label -1), and
    each sample gets its (views, MixRows.width) mixing rows.
    Picklable (it runs in DALI's worker processes); the sampler is recomputed there, which is
    cheap and exact because samplers are pure functions of (seed, epoch, rank, world).
    Bad samples raise a DataError naming the file, or (on_error=skip) are left out of the batch:
    the loader sees the shorter batch and records which index is missing. A bad partner (or one
    in ``blocklist``) with on_error=skip leaves its pass unmixed.
    """

    def __init__(self, source: Source, sampler, batch_size: int, drop_last: bool, on_error: str,
                 start_epoch: int, start_batch: int, blocklist=(), view_params=None, mix_plans=None,
                 randaugment=None):
        self.source, self.sampler, self.view_params = source, sampler, view_params
        self.batch_size, self.drop_last, self.on_error = batch_size, drop_last, on_error
        self.start_epoch, self.start_batch = start_epoch, start_batch
        self.blocklist = frozenset(int(i) for i in blocklist)
        self.mix_plans, self.randaugment = mix_plans, randaugment
        self.mix_rows = MixRows(mix_plans.mix) if mix_plans is not None else None
        self._plan_epoch, self._plan = None, None

    def plan(self, epoch: int):
        from .samplers import batch_plan

        if self._plan_epoch != epoch:
            self._plan = batch_plan(self.sampler, epoch, self.batch_size, self.drop_last)
            self._plan_epoch = epoch
        return self._plan

    def __call__(self, info):
        epoch = self.start_epoch + info.epoch_idx
        b = info.iteration + (self.start_batch if info.epoch_idx == 0 else 0)
        plan = self.plan(epoch)
        if b >= len(plan):
            raise StopIteration
        bufs, idx, lab, rows = [], [], [], []
        for i in plan[b].tolist():
            if i in self.blocklist:
                continue
            try:
                buf = self.source.read_checked(i)
                if self.view_params is not None:
                    rows.append(self.view_params.for_sample(epoch, i, buf, self.source.describe(i)))
            except DataError:
                if self.on_error == "raise":
                    raise
                continue
            bufs.append(buf)
            idx.append(np.array(i, dtype=np.int64))
            lab.append(np.array(self.source.labels[i], dtype=np.int64))
        if not bufs:
            raise DataError(f"every sample of batch {b} (epoch {epoch}) was bad; first: "
                            f"{self.source.describe(int(plan[b][0]))}")
        owners = [int(i) for i in idx]  # the data-set index each sample's views are cut from
        out = [bufs, idx, lab] + ([rows] if self.view_params is not None else [])
        if self.mix_plans is not None:
            mix, partner_indices = self._with_partners(epoch, bufs, idx, lab, rows)
            out.append(mix)
            owners += partner_indices
        if self.randaugment is not None:  # per sample (views, n, WIDTH), a partner's from its own index
            out.append([self.randaugment.all_views(epoch, i) for i in owners])
        return tuple(out)

    def _with_partners(self, epoch: int, bufs: list, idx: list, lab: list, rows: list):
        """Appends the anchors' mixture partners to ``bufs`` / ``idx`` / ``lab`` / ``rows`` (each
        partner's view cut by the view function of the view it is mixed into, its parameter row
        copied to every view); returns (the mixing rows, the partners' data-set indices)."""
        read = {}  # id(partner) -> (bytes, (height, width)) of the partners that read

        def readable(p, anchor: int) -> bool:
            if id(p) not in read and p.index not in self.blocklist:
                where = self.source.describe(p.index)
                try:
                    buf = self.source.read_checked(p.index)
                    read[id(p)] = buf, image_size(buf, where)
                except DataError as e:
                    if self.on_error == "raise":
                        raise DataError(f"{e} (a mixture partner of {self.source.describe(anchor)})") from None
            return id(p) in read

        views = range(self.view_params.num_views)
        plans = [[prune(self.mix_plans.plan(epoch, a, v), lambda p, a=a: not readable(p, a)) for v in views]
                 for a in (int(i) for i in idx)]
        found, mix = self.mix_rows.batch(plans)
        for p, v in found:
            buf, (h, w) = read[id(p)]
            row = view_params(p.uniforms, h, w, self.view_params.crops[v], self.view_params.aug)
            bufs.append(buf)
            idx.append(np.array(-1, dtype=np.int64))
            lab.append(np.array(-1, dtype=np.int64))
            rows.append(np.stack([row] * len(views)))
        return list(mix), [p.index for p, _ in found]


# --------------------------------------------------------------------------- loader


def _dali_error_message(e: Exception) -> Optional[str]:
    """Recover a DataError raised inside a DALI worker (DALI re-raises a generic Exception)."""
    m = re.search(r"DataError: (.+)", str(e))
    return m.group(1).strip() if m else None


class DaliLoader(LoaderBase):
    backend = "dali"

    def __init__(self, source: Source, sampler, *, aug, batch_size: int, mode: str = "train",
                 device: str = "auto", device_id: Optional[int] = None, num_threads: int = 0,
                 num_workers: int = 0, prefetch: int = 2, hw_decoder_load: float = 0.65,
                 channels_last: bool = True, fp16: bool = False, drop_last: bool = True,
                 on_error: str = "raise", seed: int = 0, rank: int = 0, local_world: int = 1):
        if not HAVE_DALI:
            raise RuntimeError("loader.backend=dali needs nvidia-dali (pip install nvidia-dali-cuda130); "
                               "or use loader.backend=torch")
        super().__init__(source, sampler, batch_size=batch_size, drop_last=drop_last, on_error=on_error,
                         seed=seed, rank=rank)
        if device == "auto":
            device = "gpu" if torch.cuda.is_available() else "cpu"
        if device == "gpu" and not torch.cuda.is_available():
            raise RuntimeError("loader.device=gpu but CUDA is not available; use loader.device=cpu")
        self.aug, self.mode, self.device = aug, mode, device
        self.device_id = (device_id if device_id is not None else torch.cuda.current_device()) if device == "gpu" else None
        self.num_threads = num_threads or default_threads(local_world)
        self.num_workers = num_workers or (2 if device == "gpu" else 1)
        self.prefetch, self.hw_decoder_load = prefetch, hw_decoder_load
        self.channels_last, self.fp16 = channels_last, fp16
        if mode not in ("train", "eval", "decode"):
            raise ValueError(f"mode must be train, eval or decode, got {mode!r}")
        self.num_views = aug.num_views if mode == "train" else 1
        self._pipe = None
        self._pipe_pos = None  # (epoch, batch) the built pipeline will produce next

    # -- pipeline ------------------------------------------------------------------------
    def _build(self):
        train = self.mode == "train"
        mixing = train and self.aug.mix.kind != "none"
        augmenting = train and self.aug.randaugment.n > 0
        feed = BatchFeed(self.source, self.sampler, self.batch_size, self.drop_last, self.on_error,
                         self.epoch, self.next_batch, blocklist=self.skipped.keys(),
                         view_params=ViewParams(self.aug, self.seed) if train else None,
                         mix_plans=MixPlans(self.aug, self.seed, len(self.source)) if mixing else None,
                         randaugment=RandAugmentParams(self.aug, self.seed) if augmenting else None)
        aug, mode = self.aug, self.mode
        decode_device = "mixed" if self.device == "gpu" else "cpu"
        out_dtype = types.FLOAT16 if self.fp16 else types.FLOAT
        layout = "HWC" if self.channels_last else "CHW"
        hw_load = self.hw_decoder_load

        @pipeline_def(enable_conditionals=True)
        def pipe_fn():
            dtypes = [types.UINT8, types.INT64, types.INT64] + [types.FLOAT] * (train + mixing + augmenting)
            jpegs, index, label, *params = fn.external_source(source=feed, num_outputs=len(dtypes), batch=True,
                                                              batch_info=True, parallel=True, dtype=dtypes)
            images = decode(jpegs, decode_device, hw_load)
            if mode == "train":  # view v reads row v of the sample's (views, N_PARAMS) parameters
                hw = fn.cast(fn.peek_image_shape(jpegs)[0:2], dtype=types.FLOAT)  # header parse, on the CPU
                views = train_views(images, hw, params, feed.view_params.crops, aug, feed.mix_rows, layout=layout,
                                    out_dtype=out_dtype, on_gpu=decode_device == "mixed")
            elif mode == "decode":  # profiling: the decode stage alone (outputs stay in DALI)
                views = [images]
            else:
                views = [eval_view(images, aug, out_dtype=out_dtype, layout=layout)]
            return (*views, index, label)

        # The graph has no random op (the parameters come from the feed): DALI's seed is moot.
        pipe_seed = derive_seed(self.seed, "dali") % (2 ** 31)
        pipe = pipe_fn(batch_size=self.batch_size * (1 + self.num_views * self.partners_per_view()),
                       num_threads=self.num_threads, device_id=self.device_id,
                       prefetch_queue_depth=self.prefetch, py_num_workers=self.num_workers,
                       py_start_method="spawn", seed=pipe_seed, exec_dynamic=True)
        pipe.build()
        self._pipe, self._pipe_pos = pipe, (self.epoch, self.next_batch)

    def partners_per_view(self) -> int:
        """The most partners one view can read (the extended batch's bound), 0 without a mixture."""
        return max_partners(self.aug.mix) if self.mode == "train" else 0

    def _partners_of(self, batches) -> list:
        """[the data-set indices the mixture plans of ``batches``' samples read] (a bad partner
        fails the pipeline too: it is found, named and, with on_error=skip, left unmixed)."""
        if self.partners_per_view() == 0:
            return []
        plans = MixPlans(self.aug, self.seed, len(self.source))
        found = {p.index for b in batches for i in b.tolist() for v in range(self.num_views)
                 for p in partners(plans.plan(self.epoch, i, v))}
        return [np.array(sorted(found), dtype=np.int64)]

    def _restart(self) -> None:
        if self._pipe is not None and self._pipe_pos != (self.epoch, self.next_batch):
            self.close()

    def close(self) -> None:
        if self._pipe is not None:
            del self._pipe
            self._pipe, self._pipe_pos = None, None

    # -- conversion ----------------------------------------------------------------------
    def _to_torch(self, tl, dtype=None) -> torch.Tensor:
        if self.device == "gpu" and hasattr(tl, "as_tensor") and type(tl).__name__.endswith("GPU"):
            t = tl.as_tensor()
            out = torch.empty(t.shape(), dtype=dtype or _torch_dtype(t), device=f"cuda:{self.device_id}")
            feed_ndarray(t, out, cuda_stream=torch.cuda.current_stream(self.device_id))
            return out
        return torch.from_numpy(tl.as_array())  # as_array() copies, so no buffer is reused

    def _convert(self, outs) -> dict:
        index = outs[self.num_views].as_array().reshape(-1).astype(np.int64)
        n = int((index >= 0).sum())  # the anchors; a mixture's partners (index -1) follow them
        views = []
        for tl in outs[: self.num_views if self.mode != "decode" else 0]:
            t = self._to_torch(tl)[:n]
            views.append(t.permute(0, 3, 1, 2) if self.channels_last else t)  # NHWC storage, NCHW shape
        label = outs[self.num_views + 1].as_array().reshape(-1).astype(np.int64)[:n]
        return {"views": views, "index": torch.from_numpy(index[:n]), "label": torch.from_numpy(label)}

    # -- iteration -----------------------------------------------------------------------
    def _iter_epoch(self):
        plan = self.plan(self.epoch)
        while self.next_batch < len(plan):
            if self._pipe is None or self._pipe_pos != (self.epoch, self.next_batch):
                self.close()
                self._build()
            try:
                outs = self._pipe.run()
            except StopIteration:  # pragma: no cover - the plan length already bounds the loop
                self.close()
                return
            except Exception as e:  # a bad sample: name it, or skip it and rebuild from here
                self.close()
                self._handle_pipeline_error(e, plan)
                continue
            batch = self._convert(outs)
            self._pipe_pos = (self.epoch, self.next_batch + 1)
            if self.on_error == "skip" and len(batch["index"]) != len(plan[self.next_batch]):
                self._record_skips(plan[self.next_batch], batch["index"].numpy())
            yield batch
        # finish DALI's epoch so the pipeline is reusable for the next one
        if self._pipe is not None:
            try:
                self._pipe.run()
                self.close()  # more output than planned: rebuild next time
            except StopIteration:
                self._pipe.reset()
                self._pipe_pos = (self.epoch + 1, 0)
            except Exception:
                self.close()

    def _handle_pipeline_error(self, e: Exception, plan) -> None:
        msg = _dali_error_message(e)
        if msg is not None and self.on_error == "raise":
            raise DataError(msg) from None
        # DALI reports the error of any prefetched batch: inspect the batches in flight.
        in_flight = plan[self.next_batch:self.next_batch + self.prefetch + 1]
        bad = self.find_undecodable(in_flight + self._partners_of(in_flight))
        if not bad:
            raise RuntimeError(f"DALI pipeline failed at epoch {self.epoch}, batch {self.next_batch} and no "
                               f"sample of the batches in flight fails to decode with PIL: {e}") from e
        names = ", ".join(self.source.describe(i) for i in bad)
        if self.on_error == "raise":
            raise DataError(f"cannot decode {names}") from None
        for i in bad:
            self.skipped[i] = self.source.describe(i)
            log(f"skipped undecodable sample {self.source.describe(i)} (total skipped: {len(self.skipped)})")


def _torch_dtype(t) -> torch.dtype:
    name = str(t.dtype).split(".")[-1].lower()
    return {"float": torch.float32, "float16": torch.float16, "uint8": torch.uint8,
            "int64": torch.int64, "int32": torch.int32}.get(name, torch.float32)
