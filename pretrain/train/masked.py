"""The masked-modelling objective (`train.objective: masked`) and its config section `masked`.

VideoMAE's recipe through the trainer's objective seam (pretrain/train/objectives.py):
every micro-batch draws a mask (pretrain/model/masking.py: video `masked.video_ratio`, 0.9,
with `masked.scheme`; images random patches at `masked.image_ratio`, 0.75, as OmniMAE), the
model (pretrain/model/mae.py MaskedAutoencoder: encoder on the visible tokens, a light
decoder over all) returns the mean squared error of the per-token normalised pixels of the
masked tokens: that is `train/loss`.

Masks are a function of (train.seed, rank, draws so far): before each draw the generator is
seeded from those three, and `draws` is the objective's resumable state (saved in every
checkpoint's extra state). A stopped and resumed run therefore draws the same masks, and a
run resumed on another worker count continues each rank's sequence where the counter says.

Evaluation (at every eval point, including step 0, so a run's monitor starts from the
random-init baseline), per modality with labelled data:
- `eval/knn_<modality>_top1`: k-NN top-1 of the frozen, pooled encoder features
  (pretrain/train/knn.py); memory bank = the first `masked.knn_bank` samples of the train
  split (centre views, labelled ones only), queries = the held-out split;
- `eval/<modality>_recon_loss`: the reconstruction loss on the held-out split with fixed
  masks (the same at every eval point);
- a PNG (input / masked / reconstruction of `masked.grid_samples` held-out samples) that the
  trainer stores in MLflow under reconstructions/ (pretrain/train/recon_grid.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Mapping

import torch
import torch.distributed as dist

from pretrain.config_loader import config_field
from pretrain.data.metadata import DataInfo
from pretrain.errors import UserError
from pretrain.model.mae import DecoderConfig, MaskedAutoencoder
from pretrain.model.masking import MASK_SCHEMES, mask_tokens
from pretrain.train.knn import gather_features, knn_top1

EVAL_MASK_SEED = 2**31 - 1   # the held-out masks: fixed, so eval points compare


@dataclass
class MaskedConfig:
    """Masked-modelling settings (used when train.objective is masked)."""

    video_ratio: float = config_field(
        0.9, "share of a clip's tokens hidden from the encoder (VideoMAE: 0.9)",
        min=0.0, less_than=1.0)
    image_ratio: float = config_field(
        0.75, "share of an image's tokens hidden (random patches; MAE/OmniMAE: 0.75)",
        min=0.0, less_than=1.0)
    scheme: str = config_field(
        "auto", "video mask scheme: tube (one spatial mask repeated along time, VideoMAE; "
        "dense cube tokenizers), random (per token), aligned (sparse tubes: a hidden region is "
        "hidden in every tube), auto (tube for one token grid, else aligned); see "
        "pretrain/model/masking.py", choices=MASK_SCHEMES)
    decoder: DecoderConfig = config_field(
        help="the light decoder that reconstructs the masked tokens (pretrain/model/mae.py)",
        factory=DecoderConfig)
    knn_k: int = config_field(20, "neighbours voting in the kNN monitor", min=1)
    knn_temperature: float = config_field(
        0.07, "temperature of the kNN vote weights exp(cosine / T)", min=1e-6)
    knn_bank: int = config_field(
        2048, "training samples per modality in the kNN memory bank (the first ones of the "
        "train split, centre views; unlabelled ones are left out)", min=1)
    grid_samples: int = config_field(
        4, "held-out samples in the input/masked/reconstruction PNG per eval point (0 = none)",
        min=0)

    def validate(self) -> None:
        for key in ("video_ratio", "image_ratio"):
            if getattr(self, key) <= 0.0:
                raise UserError(f"config key 'masked.{key}' is {getattr(self, key)}; a mask ratio "
                                "must be in (0, 1), e.g. 0.9 for videos, 0.75 for images")


def training_model(encoder: torch.nn.Module, cfg, pretrained: bool = False) -> torch.nn.Module:
    """The module an experiment config `cfg` trains around `encoder`: the encoder itself
    (supervised), or a MaskedAutoencoder with a new decoder per `masked.decoder` (masked).
    `pretrained`: the encoder's weights come from a file and are kept (building the wrapper
    initialises every parameter). The driver builds the same on the meta device to check a
    resume point's architecture."""
    from pretrain.train.objectives import MASKED, canonical

    if canonical(cfg.train.objective) != MASKED:
        return encoder
    kept = {k: v.detach().clone() for k, v in encoder.state_dict().items()} if pretrained else None
    model = MaskedAutoencoder(encoder, cfg.masked.decoder)
    if kept is not None:
        model.encoder.load_state_dict(kept)
    return model


def mask_seed(seed: int, rank: int, draw: int) -> int:
    """The generator seed of mask draw `draw` on `rank` (distinct across ranks and draws)."""
    return ((seed * 1_000_003 + rank) * 2_147_483_647 + draw) % (2**63 - 1)


def _module(model):
    """The MaskedAutoencoder behind a DeepSpeed engine (or itself)."""
    return getattr(model, "module", model)


class MaskedModelling:
    """train.objective: masked (see the module docstring)."""

    eval_splits = ("train", "held_out")
    eval_at_start = True

    def __init__(self, cfg: MaskedConfig, seed: int = 0, rank: int = 0) -> None:
        self.cfg, self.seed, self.rank = cfg, seed, rank
        self.draws = 0          # masks drawn so far on this rank: the mask RNG's position
        self.pictures: dict[str, bytes] = {}   # modality -> PNG of the last evaluation

    # -- training ------------------------------------------------------------------------

    def check_data(self, info: DataInfo) -> None:
        """Any data trains (labels are not read); nothing to check."""

    def masking(self) -> dict[str, tuple[float, str]]:
        """Modality -> (mask ratio, scheme): what a sample's FLOPs (MFU) depend on."""
        return {"video": (self.cfg.video_ratio, self.cfg.scheme),
                "image": (self.cfg.image_ratio, "random")}

    def ratio(self, x: torch.Tensor) -> float:
        return self.cfg.video_ratio if x.ndim == 5 else self.cfg.image_ratio

    def next_generator(self) -> torch.Generator:
        g = torch.Generator()
        g.manual_seed(mask_seed(self.seed, self.rank, self.draws))
        self.draws += 1
        return g

    def loss(self, model, batch) -> torch.Tensor:
        mask = mask_tokens(model, batch.x, self.ratio(batch.x), self.cfg.scheme,
                           self.next_generator())                             # (B, N) bool
        return model(batch.x, mask)

    def state_dict(self) -> dict[str, Any]:
        return {"draws": self.draws}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.draws = int(state.get("draws", 0))

    # -- evaluation ----------------------------------------------------------------------

    def evaluate(self, model, modality: str, splits: Mapping[str, Iterable], world: int,
                 step: int = 0) -> dict[str, float]:
        mae = _module(model)
        bank_f, bank_y = self._features(mae, splits["train"], world, limit=self.cfg.knn_bank)
        bank = gather_features(bank_f, bank_y, world)
        query_f, query_y, loss_sum, loss_n = self._held_out(mae, splits["held_out"], modality)
        out: dict[str, float] = {}
        stats = torch.tensor([loss_sum, loss_n], dtype=torch.float64, device=query_f.device)
        if world > 1 and dist.is_initialized():
            dist.all_reduce(stats)
        if stats[1] > 0:
            out[f"eval/{modality}_recon_loss"] = (stats[0] / stats[1]).item()
        if len(bank):
            top1 = knn_top1(bank, query_f, query_y, world, self.cfg.knn_k, self.cfg.knn_temperature)
            if top1 is not None:
                out[f"eval/knn_{modality}_top1"] = top1
        return out

    @staticmethod
    def _pooled(mae, batch) -> torch.Tensor:
        """(B, D) features of a batch, its views averaged."""
        f = mae.features(batch.x).float()                                  # (B*V, D)
        return f.view(len(batch.y), batch.views, -1).mean(1)              # (B, D)

    @staticmethod
    def _keep(batch) -> torch.Tensor:
        """(B,) bool: real (not padding) and labelled samples."""
        keep = batch.y >= 0
        if batch.valid is not None:
            keep = keep & batch.valid.bool().to(keep.device)
        return keep

    def _features(self, mae, batches: Iterable, world: int, limit: int):
        """This rank's share of the first `limit` samples (all ranks stop at the same batch:
        the eval loaders give every rank batches of the same sizes)."""
        feats, labels, seen = [], [], 0
        for batch in batches:
            keep = self._keep(batch)
            feats.append(self._pooled(mae, batch)[keep])
            labels.append(batch.y[keep])
            seen += len(batch.y) * world
            if seen >= limit:
                break
        if not feats:
            return self._none(mae)
        return torch.cat(feats), torch.cat(labels)

    @staticmethod
    def _none(mae) -> tuple[torch.Tensor, torch.Tensor]:
        """No samples: (0, D) features and (0,) labels, shaped and placed like real ones (the
        bank's all-gather needs the same width and device on every rank)."""
        device = next(mae.parameters()).device
        return (torch.zeros(0, mae.encoder.config.dim, device=device),
                torch.zeros(0, dtype=torch.int64, device=device))

    def _held_out(self, mae, batches: Iterable, modality: str):
        """Query features and labels, and the reconstruction loss (sum, count) with fixed
        masks; the PNG from the first batch."""
        g = torch.Generator()
        g.manual_seed(EVAL_MASK_SEED)
        feats, labels, loss_sum, loss_n = [], [], 0.0, 0
        self.pictures.pop(modality, None)
        for i, batch in enumerate(batches):
            keep = self._keep(batch)
            feats.append(self._pooled(mae, batch)[keep])
            labels.append(batch.y[keep])
            x = batch.x[::batch.views]                       # (B, ...) first view of each sample
            mask = mask_tokens(mae, x, self.ratio(x), self.cfg.scheme, g)
            valid = (batch.valid.bool() if batch.valid is not None
                     else torch.ones(len(x), dtype=torch.bool)).to(x.device)
            n = int(valid.sum())
            # Padding only: the same forward as the other ranks (ZeRO-3), counted nowhere.
            loss = mae(x[valid], mask[valid]) if n else mae(x, mask)
            loss_sum, loss_n = loss_sum + float(loss) * n, loss_n + n
            if i == 0 and self.cfg.grid_samples:
                self._picture(mae, modality, x[:self.cfg.grid_samples], mask[:self.cfg.grid_samples])
        if not feats:
            return (*self._none(mae), loss_sum, loss_n)
        return torch.cat(feats), torch.cat(labels), loss_sum, loss_n

    def _picture(self, mae, modality: str, x: torch.Tensor, mask: torch.Tensor) -> None:
        from pretrain.train.recon_grid import recon_grid, visible_pixels

        recon = mae.reconstruct(x, mask)                     # like x
        if self.rank == 0:
            self.pictures[modality] = recon_grid(x, visible_pixels(mae.encoder, tuple(x.shape), mask), recon)
