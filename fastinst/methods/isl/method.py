"""ISL (Wang et al. 2021, "Instance Similarity Learning"; reference code ZiweiWangTHU/ISL).

Rounds of three stages (the formulas: fastinst/methods/isl/loss.py and gan.py):

1. ``train<r>``: the backbone on the neighbour loss over a full-softmax memory bank (NPID's
   bank, momentum update after each step). Round 0 has every A(i) = {i}: NPID's full softmax.
2. ``gan<r>``: backbone frozen (eval mode, no gradients); G and D on their own Adams. The
   triplet is a = the view's feature, p = M_i, n = the row most similar to a among K uniform
   rows outside A(i) (masked, not redrawn). Ends at its epoch budget or earlier by
   `fastinst.methods.isl.gan.StoppingRule`. Mining uses the last epoch's (G, D) pair (the seed's), or with
   ``gan_keep=best`` the pair of the epoch with the best G-loss EMA.
3. ``mine<r>``: no gradients. p′ = G(a, p, n), s = D(a, p′, n); where s > τ, the top-k rows
   of M by cosine with p′ (i excluded) above r = R + (1 − s)(1 − R) become neighbours, both
   ways (`fastinst.methods.isl.table.NeighbourTable`). Ends once Σ(|A(i)| − 1) > (r + 1)·per·N, or at
   its epoch cap.

The last round trains the backbone only (the seed also runs its GAN and mining, whose
results are never used). All state (bank, table, G, D, optimisers, the stopping rule, the
kept G and D) is in the checkpoint, so a run resumes inside any stage; the stage and round are
the engine's (they follow from the loader epoch).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Dict, List, Literal, Optional, Sequence

import torch
from torch import nn

from ...config import check
from ...core import dist as fdist
from ...core.runtime import generator
from ..base import BuildContext, Method, Stage, check_row_layout, unwrap
from ..npid.bank import ShardedMemoryBank
from ..npid.method import bank_features
from ..registry import register
from .gan import Discriminator, Generator, StoppingRule, d_loss, g_loss, mining_radius, triplet_logits
from .loss import isl_loss
from .table import NeighbourTable


@dataclass(frozen=True, kw_only=True)
class ISLConfig:
    """ISL. Defaults: the seed's ImageNet values (small sets: T 0.1, tau 0.5, R 0.6)."""

    T: float = 0.07
    momentum: float = 0.5  # bank update, as NPID's
    rounds: int = 4  # each: train.epochs backbone passes, then (except the last) GAN and mining
    kl_weight: float = 0.5
    gan_epochs: float = 200  # GAN budget per round (passes)
    gan_lr: float = 1e-4  # Adam, G and D
    gan_patience: int = 0  # GAN epochs without a better G-loss EMA that end the stage (0: budget only)
    gan_ema: float = 0.5  # EMA factor of the per-epoch mean G loss
    # the (G, D) pair mining uses: the last GAN epoch's (the seed) or the best by the G-loss EMA
    gan_keep: Literal["last", "best"] = "last"
    negatives: int = 4096  # uniform rows the GAN's hard negative is picked from
    mine_epochs: float = 200  # mining cap per round (passes)
    tau: float = 0.3  # D score above which a generated positive mines neighbours
    R: float = 0.3  # smallest mining radius (cosine)
    topk: int = 10  # candidates per generated positive
    per: float = 0.5  # mining stops once sum(|A(i)| - 1) > (round + 1) * per * N
    cap: int = 64  # neighbours kept per row (the most similar on overflow)

    def __post_init__(self):
        check(self.T > 0, "method.isl.T", "temperature must be > 0 (ISL: 0.1 small sets, 0.07 ImageNet)")
        check(0.0 <= self.momentum < 1.0, "method.isl.momentum", "must lie in [0, 1) (ISL uses 0.5)")
        check(self.rounds >= 1, "method.isl.rounds", "must be >= 1 (ISL uses 4)")
        check(self.gan_epochs > 0 and self.mine_epochs > 0, "method.isl.gan_epochs",
              "gan_epochs and mine_epochs must be > 0")
        check(self.gan_patience >= 0, "method.isl.gan_patience", "must be >= 0 (0 = the budget only)")
        check(0.0 <= self.gan_ema < 1.0, "method.isl.gan_ema", "must lie in [0, 1)")
        check(0.0 < self.tau < 1.0, "method.isl.tau", "must lie in (0, 1)")
        check(0.0 <= self.R < 1.0, "method.isl.R", "must lie in [0, 1)")
        check(self.topk >= 1 and self.cap >= 1 and self.negatives >= 1, "method.isl.topk",
              "topk, cap and negatives must be >= 1")


@register("isl")
class ISL(Method):
    """ISL; trains ``encoder`` (backbone stages), ``gen`` and ``disc`` (GAN stages). This
    module's state: the bank, the neighbour table, the kept G and D and the stopping rule."""

    Config = ISLConfig
    needs_views = 1
    views_are = "one augmented view: the anchor of the loss, the GAN and mining"

    def __init__(self, encoder: nn.Module, num_samples: int, c: ISLConfig, *, embed_dim: int = 128,
                 rank: int = 0, world_size: int = 1, seed: int = 0, device=None,
                 labels: Optional[torch.Tensor] = None):
        super().__init__(encoder=encoder, gen=Generator(embed_dim), disc=Discriminator(embed_dim))
        self.c, self.seed, self.num_samples = c, seed, num_samples
        self.bank = ShardedMemoryBank(num_samples, embed_dim, c.momentum, rank=rank, world_size=world_size,
                                      device=device, seed=seed)
        self.table = NeighbourTable(num_samples, c.cap, rank=rank, world_size=world_size, device=device)
        # the (G, D) pair mining uses: copies, not trained, of the last GAN epoch's or of the best
        # one by the stopping rule (method.isl.gan_keep), always as a pair (a D that trained on
        # past the kept G would reject its positives)
        self.kept_gen, self.kept_disc = Generator(embed_dim), Discriminator(embed_dim)
        self.kept_gen.requires_grad_(False)
        self.kept_disc.requires_grad_(False)
        self.rule = StoppingRule(c.gan_patience, c.gan_ema)
        # [N] train labels: kNN on the bank rows and the neighbour precision (reports only)
        self.all_labels = None if labels is None else labels.clone()
        self._step = 0
        self._epoch = self._zero_meters(device)

    @classmethod
    def from_config(cls, c: ISLConfig, encoder: nn.Module, ctx: BuildContext) -> "ISL":
        check_row_layout(ctx, key="method.isl.negatives", k=c.negatives, rows="uniform rows per hard negative",
                         fix="lower method.isl.negatives", sharded="the memory bank")
        return cls(encoder, ctx.num_samples, c, embed_dim=ctx.embed_dim, rank=ctx.env.rank,
                   world_size=ctx.env.world, seed=ctx.seed, device=ctx.env.device, labels=ctx.labels)

    # ---- what the engine trains ------------------------------------------------------------
    def optimizers(self, make):
        enc = [p for p in self.nets["encoder"].parameters() if p.requires_grad]
        opt, sched = make.default(enc)
        # train.epochs is one round's backbone length; the schedule spans every round's
        if hasattr(sched, "epochs"):
            sched = dataclasses.replace(sched, epochs=sched.epochs * self.c.rounds)
        gen = make.adam(list(self.nets["gen"].parameters()), self.c.gan_lr)
        disc = make.adam(list(self.nets["disc"].parameters()), self.c.gan_lr)
        return {"model": (opt, sched), "gen": gen, "disc": disc}

    def stages(self, passes: float, optimizer_names: Sequence[str]) -> List[Stage]:
        out = []
        for r in range(self.c.rounds):
            out.append(Stage(f"train{r}", passes, ("encoder",), ("model",), step=self._train_step))
            if r < self.c.rounds - 1:
                out.append(Stage(f"gan{r}", self.c.gan_epochs, ("gen", "disc"), ("gen", "disc"),
                                 step=self._gan_step))
                out.append(Stage(f"mine{r}", self.c.mine_epochs, (), (), step=self._mine_step))
        return out

    # ---- shared pieces ---------------------------------------------------------------------
    @staticmethod
    def _zero_meters(device) -> torch.Tensor:
        # per-epoch sums on the device: [steps, G loss, D real acc, D fake acc, triplets kept, pairs added]
        return torch.zeros(6, dtype=torch.float64, device=device)

    def before_step(self, step: int) -> None:
        self._step = step

    def _features(self, batch: dict) -> tuple:
        """(local features [b, D] L2-normalised, local index [b], global index [B])."""
        device = self.bank.shard.device
        index = batch["index"].to(device, non_blocking=True)
        view = batch["views"][0].to(device, non_blocking=True)
        f = self.nets["encoder"](view).float()  # [b, D]
        return f, index, fdist.all_gather_no_grad(index)

    def _local(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's slice of a global-batch tensor (ranks' batches are equal, in rank order)."""
        if self.bank.world_size == 1:
            return x
        b = x.shape[0] // self.bank.world_size
        return x[self.bank.rank * b:(self.bank.rank + 1) * b]

    @torch.no_grad()
    def _triplet(self, a_g: torch.Tensor, index_g: torch.Tensor) -> tuple:
        """(p = M_i [B, D], n [B, D]): n is the row most similar to the anchor among
        ``negatives`` uniform rows (drawn per step, the same on every rank) outside A(i)."""
        device = a_g.device
        g = generator(self.seed, "isl-negatives", self._step, device=device)
        cand = torch.randint(0, self.num_samples, (self.c.negatives,), generator=g, device=device)  # [K]
        rows = self.bank.rows(cand)  # [K, D]
        sim = a_g @ rows.t()  # [B, K]
        inside = self.table.contains(index_g, cand.unsqueeze(0).expand(index_g.shape[0], -1))  # [B, K]
        n = rows[sim.masked_fill(inside, float("-inf")).argmax(1)]  # [B, D]
        return self.bank.rows(index_g), n

    # ---- the three steps -------------------------------------------------------------------
    def _train_step(self, method, batch: dict, backward) -> dict:
        f, index, index_g = self._features(batch)
        f_g = fdist.all_gather_with_grad(f)  # [B, D]
        nbrs = self.table.neighbours(index_g)  # [B, cap]
        out = isl_loss(f_g, index_g, nbrs, self.bank, self.c.T, self.c.kl_weight)
        backward(out["loss"])
        return {"loss": out["loss"], "feats": f_g.detach(), "index": index_g}

    def _gan_step(self, method, batch: dict, backward) -> dict:
        with torch.no_grad():
            a, _, index_g = self._features(batch)  # frozen backbone (eval mode)
            a_g = fdist.all_gather_no_grad(a)
            p_g, n_g = self._triplet(a_g, index_g)
        p, n = self._local(p_g), self._local(n_g)
        fake = self.nets["gen"](a, p, n)  # [b, D]
        logits = triplet_logits(self.nets["disc"], a, p, n, fake.detach())
        ld = d_loss(logits)
        backward(ld, ["disc"])
        logits_g = triplet_logits(self.nets["disc"], a, p, n, fake)  # D after its step
        lg = g_loss(logits_g)
        ok = backward(lg, ["gen"])
        with torch.no_grad():
            acc = torch.stack([(logits[0] > 0).double().mean(), (logits[1:] < 0).double().mean()])
            upd = torch.cat([torch.ones(1, dtype=torch.float64, device=acc.device), lg.detach().double().view(1),
                             acc, torch.zeros(2, dtype=torch.float64, device=acc.device)])
            self._epoch += torch.where(ok, upd, torch.zeros_like(upd))
        shown = torch.stack([lg.detach(), ld.detach()])  # the global batch's means (DDP averages the gradients)
        if self.bank.world_size > 1:
            shown = fdist.all_reduce_no_grad(shown, "sum") / self.bank.world_size
        return {"loss": shown[0], "d_loss": shown[1]}

    @torch.no_grad()
    def _mine_step(self, method, batch: dict, backward) -> dict:
        a, _, index_g = self._features(batch)
        a_g = fdist.all_gather_no_grad(a)  # [B, D]
        p_g, n_g = self._triplet(a_g, index_g)
        fake = self.kept_gen(a_g, p_g, n_g)  # [B, D], the same on every rank
        score = torch.sigmoid(self.kept_disc(a_g, fake, n_g).float())  # [B]
        radius = mining_radius(score, self.c.R)  # [B]
        sim, cols = self._topk(fake, index_g)  # [B, k]
        take = (score > self.c.tau).unsqueeze(1) & (sim > radius.unsqueeze(1)) & (cols >= 0)
        i = index_g.unsqueeze(1).expand_as(cols)[take]
        added = self.table.add_pairs(i, cols[take], sim[take])
        kept = (score > self.c.tau).double().sum()
        upd = torch.stack([torch.ones((), dtype=torch.float64, device=kept.device), score.double().mean(),
                           torch.zeros((), dtype=torch.float64, device=kept.device),
                           torch.zeros((), dtype=torch.float64, device=kept.device), kept,
                           torch.tensor(float(added), dtype=torch.float64, device=kept.device)])
        if self.bank.rank == 0:  # every rank mined the same global batch: count it once
            self._epoch += upd
        return {"loss": score.mean()}

    def _topk(self, q: torch.Tensor, index_g: torch.Tensor) -> tuple:
        """Top-k bank rows by cosine with q [B, D], each sample's own row excluded: (sim [B, k],
        global ids [B, k]; −1 where fewer exist). Shard-local top-k, then the global one."""
        shard = self.bank.shard.float()
        bank_n = shard / shard.norm(dim=1, keepdim=True).clamp_min(1e-12)
        sim = q @ bank_n.t()  # [B, R]
        own = self.bank.owner_mask(index_g)
        sim[own.nonzero().squeeze(1), self.bank.local_index(index_g[own])] = float("-inf")
        k = min(self.c.topk, sim.shape[1])
        v, j = sim.topk(k, dim=1)
        j = j + self.bank.start
        if self.bank.world_size > 1:
            v = torch.cat(fdist.all_gather_no_grad(v.contiguous()).chunk(self.bank.world_size), 1)  # [B, W*k]
            j = torch.cat(fdist.all_gather_no_grad(j.contiguous()).chunk(self.bank.world_size), 1)
        k = min(self.c.topk, v.shape[1])
        v, pos = v.topk(k, dim=1)
        j = j.gather(1, pos)
        return v, torch.where(torch.isfinite(v), j, -1)

    @torch.no_grad()
    def after_step(self, out: dict, ok: torch.Tensor) -> None:
        if "feats" in out:  # backbone stages: the momentum update of the owned bank rows
            self.bank.update(out["index"], out["feats"], ok)

    # ---- stage ends --------------------------------------------------------------------------
    def stage_done(self, stage: Stage) -> bool:
        if stage.name.startswith("gan"):
            return self.rule.stopped
        if stage.name.startswith("mine"):
            return self._mined_enough(int(stage.name[4:]))
        return False

    def _mined_enough(self, rnd: int) -> bool:
        st = self.table.stats()
        return 2 * st["pairs"] > (rnd + 1) * self.c.per * self.num_samples

    def stage_start(self, stage: Stage) -> None:
        """A GAN stage starts a fresh stopping rule (G, D and their Adams carry over)."""
        if stage.name.startswith("gan"):
            self.rule.reset()

    def end_epoch(self, stage: Stage, last: bool) -> Dict[str, float]:
        """Per-epoch bookkeeping on the host (one read): the stopping rule after a GAN epoch
        (keeping G and D for mining), the neighbour statistics after a mining epoch."""
        m = self._epoch
        if self.bank.world_size > 1:
            m = fdist.all_reduce_no_grad(m, "sum")
        steps, g, real, fake, kept, added = m.tolist()
        self._epoch.zero_()
        rec: Dict[str, float] = {}
        if stage.name.startswith("gan") and steps:
            g /= steps
            is_best, stop = self.rule.update(g)
            if is_best or self.c.gan_keep == "last":
                self.kept_gen.load_state_dict(unwrap(self.nets["gen"]).state_dict())
                self.kept_disc.load_state_dict(unwrap(self.nets["disc"]).state_dict())
            rec = {"g_loss": g, "g_loss_ema": self.rule.ema, "d_acc_real": real / steps, "d_acc_fake": fake / steps,
                   "best": bool(is_best), "stopped": bool(stop)}
        elif stage.name.startswith("mine") and steps:
            st = self.table.stats()
            rec = {"mean_score": g / steps, "triplets_kept": int(kept), "pairs_added": int(added), **st}
            precision = self.neighbour_precision()
            if precision is not None:
                rec["nbr_precision"] = precision
        return rec

    @torch.no_grad()
    def neighbour_precision(self) -> Optional[float]:
        """The share of neighbour pairs whose two images have the same label (a report: labels
        are never used in training); None without labels or pairs."""
        if self.all_labels is None:
            return None
        nbr = self.table.nbr
        rows = torch.arange(self.table.start, self.table.end, device=nbr.device).unsqueeze(1).expand_as(nbr)
        valid = nbr >= 0
        labels = self.all_labels.to(nbr.device)
        same = (labels[rows[valid]] == labels[nbr[valid]]).sum()
        counts = torch.stack([same, valid.sum()]).double()
        if self.bank.world_size > 1:
            counts = fdist.all_reduce_no_grad(counts, "sum")
        same, total = counts.tolist()
        return same / total if total else None

    # ---- state -------------------------------------------------------------------------------
    def get_extra_state(self) -> dict:
        return {"rule": self.rule.state(), "epoch_meters": self._epoch.cpu()}

    def set_extra_state(self, state: dict) -> None:
        self.rule.load(state["rule"])
        self._epoch.copy_(state["epoch_meters"])

    def train_features(self):
        labels = None if self.all_labels is None else self.all_labels[self.bank.start:self.bank.end]
        return bank_features(self.bank, labels)

    def extra_repr(self) -> str:
        return f"T={self.c.T}, rounds={self.c.rounds}, cap={self.c.cap}"
