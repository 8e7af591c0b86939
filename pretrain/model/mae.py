"""Masked autoencoding around any registered encoder (VideoMAE's asymmetric design).

    mae = MaskedAutoencoder(create_model("videomae-b"), DecoderConfig())
    mask = mask_tokens(mae, clip, 0.9, "tube", generator)     # pretrain/model/masking.py
    loss = mae(clip, mask)                                      # scalar, differentiable
    picture = mae.reconstruct(clip, mask)                       # same shape as clip
    feats = mae.features(clip)                                  # (B, D), for the kNN monitor

The encoder runs on the visible tokens only (position embedding added before the tokens are
dropped, so each keeps its place); a light decoder embeds the encoder's outputs to its own
width, adds mask tokens for the hidden ones, gives every token its position (the encoder's
fixed embedding at the decoder's width), runs its blocks over all tokens and predicts each
hidden token's pixels. The loss is the mean squared error on hidden tokens only, of targets
normalised per token (MAE's norm_pix_loss): a token's pixels minus their mean, over
sqrt(variance + 1e-6), all channels and positions of the token together. Targets are taken
from the model's input as given (already normalised per channel by the loader; per-token
normalisation makes that scale immaterial up to the per-channel std ratio).

Targets of TubeViT's sparse tubes: a token's target is every pixel its tube reads (the
kernel, or with space-to-depth the combined extent; positions a tube zero-pads past the clip
end are 0), laid out (t, h, w) then channel. Tubes differ in extent, so the decoder has one
linear output head per tube ("group"): `decoder.heads.<g>` maps the decoder width to tube g's
C x span values. A token's loss is its mean over its own values, then the loss is the mean
over hidden tokens, so every hidden token weighs the same whatever its tube's size. Images
go through the image tube's head. VideoMAE has one group (2x16x16x3 = 1536 values).

What an encoder family provides (TubeViT and VideoMAE do): `tokens(x)` (B, N, D) with
positions; `encode(tokens)` blocks + final norm on any subset; `token_groups(shape)` (group,
TubeSpec, grid) in token order; `pixel_volume(shape)` the pixel id of each input position
the tubes index; `group_target_sizes()`; `position_table(shape, dim)`; `pool_tokens`.

Decoder defaults (DecoderConfig): width 384, 4 blocks, 6 heads, MLP 4x: VideoMAE-B's decoder
(its paper found 4 blocks enough and the light decoder is where the asymmetric design saves,
at 1568 tokens it costs about a tenth of ViT-B's forward). A tiny encoder wants a smaller one
(the smoke configs set it).

Features for the kNN monitor are the mean of the encoder's output tokens (all tokens, no
mask), not the family's classification pool: TubeViT's attention pool gets no training
signal from reconstruction, so its output would be a random projection.

Masked autoencoders are model files too: `config` is a MaskedAutoencoderConfig (the
encoder's family key and config plus the decoder's), registered in registry.py as the
"masked-autoencoder" family, so `model_from_config(mae.config)` rebuilds it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from pretrain import config_loader
from pretrain.config_loader import config_field
from pretrain.errors import UserError
from pretrain.model.family import ModelConfig
from pretrain.model.tubes import tube_pixel_index
from pretrain.model.vit import Block, init_linear_and_norm


@dataclass
class DecoderConfig:
    """The masked autoencoder's decoder (defaults: VideoMAE-B's, see the module docstring)."""

    dim: int = config_field(384, "decoder token width (a multiple of heads)", min=1)
    depth: int = config_field(4, "decoder blocks", min=1)
    heads: int = config_field(6, "decoder attention heads", min=1)
    mlp_ratio: float = config_field(4.0, "decoder MLP hidden width / dim", min=0.0)
    norm_pix: bool = config_field(True, "normalise each token's target pixels by their own mean "
                                  "and std (MAE's norm_pix_loss)")
    norm_eps: float = config_field(1e-6, "LayerNorm epsilon", min=0.0)

    def validate(self) -> None:
        if self.dim % self.heads:
            raise UserError(f"decoder: dim={self.dim} must be divisible by heads={self.heads}")
        if int(self.dim * self.mlp_ratio) < 1:
            raise UserError(f"decoder: mlp_ratio={self.mlp_ratio} gives an empty MLP at dim={self.dim}")


@dataclass
class MaskedAutoencoderConfig(ModelConfig):
    """What rebuilds a MaskedAutoencoder: the encoder's family and config, the decoder's."""

    encoder_family: str = config_field("tubevit", "registry family key of the encoder")
    encoder: dict[str, Any] = config_field(help="the encoder's architecture config (to_dict)",
                                           factory=dict)
    decoder: DecoderConfig = config_field(help="the decoder", factory=DecoderConfig)


class Decoder(nn.Module):
    """Encoder width -> decoder width, mask tokens, blocks over all tokens, one head per group.

    Its forward reads `mask_token` (and calls every layer but the heads), so hooks that
    gather a module's parameters around its forward (DeepSpeed ZeRO-3) see them used; the
    heads are called per group by the wrapper, each inside its own module call.
    """

    def __init__(self, encoder_dim: int, c: DecoderConfig, target_sizes: list[int]):
        super().__init__()
        self.embed = nn.Linear(encoder_dim, c.dim)
        self.mask_token = nn.Parameter(torch.empty(1, 1, c.dim))
        norm = lambda d: nn.LayerNorm(d, eps=c.norm_eps)  # noqa: E731
        self.blocks = nn.ModuleList(Block(c.dim, c.heads, int(c.dim * c.mlp_ratio), norm_layer=norm)
                                    for _ in range(c.depth))
        self.norm = norm(c.dim)
        self.heads = nn.ModuleList(nn.Linear(c.dim, p) for p in target_sizes)
        self.grad_checkpointing = False

    def forward(self, latent: torch.Tensor, pos_visible: torch.Tensor, pos_masked: torch.Tensor) -> torch.Tensor:
        """Encoded visible tokens (B, n_v, D) and the positions (B, n, d) of the visible and
        masked tokens -> decoder output of the masked tokens (B, n_m, d)."""
        B, n_masked = pos_masked.shape[:2]
        h = torch.cat([self.embed(latent) + pos_visible,
                       self.mask_token.to(pos_masked.dtype).expand(B, n_masked, -1) + pos_masked], dim=1)
        use_ckpt = self.grad_checkpointing and torch.is_grad_enabled()
        for block in self.blocks:
            h = checkpoint(block, h, use_reentrant=False) if use_ckpt else block(h)
        return self.norm(h)[:, latent.shape[1]:]


class MaskedAutoencoder(nn.Module):
    def __init__(self, encoder: nn.Module, decoder: DecoderConfig | None = None):
        super().__init__()
        decoder = decoder if decoder is not None else DecoderConfig()
        config_loader.check(decoder, source="the masked autoencoder's decoder config")
        if getattr(encoder.config, "class_token", False):
            raise UserError("masked autoencoding needs an encoder without a CLS token (class_token="
                            "false); a bootstrapped image ViT with one cannot be masked-pretrained")
        self.encoder = encoder
        self.decoder_config = decoder
        self.decoder = Decoder(encoder.config.dim, decoder, encoder.group_target_sizes())
        self.all_parameters_in_forward = False
        self._cache: dict[tuple, Any] = {}
        self.init_weights()

    # ---- identity ------------------------------------------------------------------------

    @property
    def config(self) -> MaskedAutoencoderConfig:
        from pretrain.model.registry import family_key

        return MaskedAutoencoderConfig(encoder_family=family_key(self.encoder.config),
                                       encoder=self.encoder.config.to_dict(),
                                       decoder=self.decoder_config)

    @classmethod
    def from_config(cls, config: MaskedAutoencoderConfig) -> "MaskedAutoencoder":
        from pretrain.model.registry import model_from_config, stored_config

        return cls(model_from_config(stored_config(config.encoder_family, config.encoder)), config.decoder)

    @property
    def datasets(self) -> list[str]:
        return self.encoder.datasets

    # ---- geometry (cached per input shape and device) -------------------------------------

    def _layout(self, shape: tuple[int, ...], device: torch.device):
        """(group of each token (N,), [(group, first token, pixel ids (N_g, V_g))], n_pixels)."""
        key = ("layout", tuple(shape[1:]), len(shape), str(device))
        hit = self._cache.get(key)
        if hit is None:
            volume = self.encoder.pixel_volume(shape)
            parts, groups, start = [], [], 0
            for g, spec, grid in self.encoder.token_groups(shape):
                ids = tube_pixel_index(spec, grid, volume).to(device)
                parts.append((g, start, ids))
                groups.append(torch.full((ids.shape[0],), g, dtype=torch.long))
                start += ids.shape[0]
            hit = self._cache[key] = (torch.cat(groups).to(device), parts, math.prod(shape[2:]))
        return hit

    def _positions(self, shape: tuple[int, ...], device, dtype) -> torch.Tensor:
        key = ("pos", tuple(shape[1:]), len(shape), str(device), dtype)
        hit = self._cache.get(key)
        if hit is None:
            hit = self._cache[key] = self.encoder.position_table(shape, self.decoder_config.dim).to(device, dtype)
        return hit                                                     # (N, d_dec)

    # ---- pixels ----------------------------------------------------------------------------

    @staticmethod
    def _flat(x: torch.Tensor) -> torch.Tensor:
        """(B, C, ...) -> (B, pixels + 1, C) with a zero row at the end for id -1 (padding)."""
        flat = x.flatten(2).transpose(1, 2)                          # (B, P, C)
        return torch.cat([flat, flat.new_zeros(flat.shape[0], 1, flat.shape[2])], dim=1)

    def _pixels(self, flat: torch.Tensor, batch: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Rows (M,) of batch index and (M, V) pixel ids -> (M, V * C) pixel values."""
        ids = torch.where(ids < 0, flat.shape[1] - 1, ids)
        return flat[batch[:, None], ids].flatten(1)                  # (M, V, C) -> (M, V*C)

    @staticmethod
    def _normalise(target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-token (row) normalisation: (normalised, mean, std)."""
        mean = target.mean(-1, keepdim=True)
        std = (target.var(-1, keepdim=True) + 1e-6).sqrt()
        return (target - mean) / std, mean, std

    def token_targets(self, x: torch.Tensor) -> list[tuple[int, torch.Tensor]]:
        """Every token's reconstruction target, per group in token order: [(group, (B, N_g,
        P_g))], normalised per token when the decoder's norm_pix is on."""
        _, parts, _ = self._layout(tuple(x.shape), x.device)
        flat = self._flat(x.float())
        B, out = x.shape[0], []
        for g, _, ids in parts:
            n = ids.shape[0]
            batch = torch.arange(B, device=x.device).repeat_interleave(n)
            t = self._pixels(flat, batch, ids.repeat(B, 1))           # (B*n, P_g)
            if self.decoder_config.norm_pix:
                t = self._normalise(t)[0]
            out.append((g, t.view(B, n, -1)))
        return out

    # ---- the masked forward ------------------------------------------------------------------

    def _split(self, mask: torch.Tensor, n_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Mask (B, N) -> visible token ids (B, n_v), masked token ids (B, n_m), each ascending."""
        if mask.dtype != torch.bool or mask.ndim != 2 or mask.shape[1] != n_tokens:
            raise UserError(f"mask must be bool (B, {n_tokens}) for this input, got {mask.dtype} "
                            f"{tuple(mask.shape)} (make it with pretrain.model.masking.mask_tokens)")
        counts = mask.sum(1)
        if (counts != counts[0]).any() or not 0 < int(counts[0]) < n_tokens:
            raise UserError(f"every sample must hide the same number of tokens, at least one and not "
                            f"all; got {counts.tolist()} of {n_tokens}")
        order = mask.to(torch.int8).argsort(dim=1, stable=True)    # visible first, then masked
        n_visible = n_tokens - int(counts[0])
        return order[:, :n_visible], order[:, n_visible:]

    def _decode(self, x: torch.Tensor, mask: torch.Tensor):
        """-> (decoder output of the masked tokens (B, n_m, d), masked ids (B, n_m), encoded visible)."""
        tokens = self.encoder.tokens(x)                                  # (B, N, D)
        B, N, D = tokens.shape
        visible, masked = self._split(mask, N)
        latent = self.encoder.encode(tokens.gather(1, visible[..., None].expand(-1, -1, D)))  # (B, n_v, D)
        pos = self._positions(tuple(x.shape), x.device, latent.dtype)   # (N, d)
        return self.decoder(latent, pos[visible], pos[masked]), masked, latent

    def _predictions(self, x: torch.Tensor, mask: torch.Tensor):
        """([(group, predictions (M, P_g), raw target pixels (M, P_g), batch (M,), pixel ids
        (M, V)) for each group with masked tokens], encoded visible tokens, decoder output of
        the masked tokens flattened (B * n_m, d))."""
        h, masked, latent = self._decode(x, mask)
        group_of, parts, _ = self._layout(tuple(x.shape), x.device)
        flat = self._flat(x.float())
        B, n_m = masked.shape
        batch = torch.arange(B, device=x.device).repeat_interleave(n_m)       # (B*n_m,)
        token = masked.reshape(-1)                                            # (B*n_m,)
        h = h.reshape(B * n_m, -1)
        out = []
        for g, start, ids in parts:
            rows = (group_of[token] == g).nonzero().squeeze(1)               # this group's rows
            pix = ids[token[rows] - start]                                     # (M, V)
            pred = self.decoder.heads[g](h[rows]).float()                      # (M, P_g)
            out.append((g, pred, self._pixels(flat, batch[rows], pix), batch[rows], pix))
        return out, latent, h

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Scalar loss: per-token MSE of the (normalised) pixels, mean over the masked tokens."""
        parts, latent, h = self._predictions(x, mask)
        total = torch.zeros((), device=x.device)
        for _, pred, target, _, _ in parts:
            if self.decoder_config.norm_pix:
                target = self._normalise(target)[0]
            total = total + F.mse_loss(pred, target, reduction="none").mean(-1).sum()
        loss = total / h.shape[0]
        if self.all_parameters_in_forward and self.training and torch.is_grad_enabled():
            loss = loss + 0.0 * self._idle(x, latent, h, {g for g, *_ in parts})
        return loss

    def set_all_parameters_in_forward(self, enable: bool = True) -> None:
        """Every parameter takes part in each training forward, the idle ones (the encoder's
        pool and classification heads, the heads of tubes with no masked token, on images
        the video-only tubes) with a zero contribution: ZeRO-3 would otherwise reuse a stale
        gradient partition (see TubeViT.set_all_parameters_in_forward)."""
        self.all_parameters_in_forward = enable

    def _idle(self, x, latent, h, used: set[int]) -> torch.Tensor:
        enc = self.encoder
        pooled = enc.pool_tokens(latent)                                   # (B, D)
        idle = sum(head(pooled).sum() for head in enc.heads.values())
        idle = idle + sum(head(h[:1]).sum() for g, head in enumerate(self.decoder.heads) if g not in used)
        smallest = getattr(enc, "_smallest_clip", None)
        if x.ndim == 4 and smallest is not None:                         # TubeViT's idle 3-D tubes
            idle = idle + enc.tokenizer(x.new_zeros(smallest())).sum()
        return idle

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """x with every pixel a masked token reads replaced by the prediction (the average
        where several masked tokens read it), un-normalised with each token's own mean and
        std; all other pixels are x's. Same shape as x (for the input/masked/reconstruction grid)."""
        parts, _, _ = self._predictions(x, mask)
        flat = self._flat(x.float())                                       # (B, P+1, C)
        canvas, count = torch.zeros_like(flat), torch.zeros_like(flat[..., :1])
        for _, pred, target, batch, pix in parts:
            if self.decoder_config.norm_pix:
                _, mean, std = self._normalise(target)
                pred = pred * std + mean
            rows = batch[:, None].expand_as(pix)
            ids = torch.where(pix < 0, flat.shape[1] - 1, pix)
            canvas.index_put_((rows, ids), pred.view(*pix.shape, -1), accumulate=True)
            count.index_put_((rows, ids), torch.ones_like(pix, dtype=count.dtype)[..., None], accumulate=True)
        out = torch.where(count > 0, canvas / count.clamp(min=1), flat)[:, :-1]   # (B, P, C)
        return out.transpose(1, 2).reshape(x.shape).to(x.dtype)

    @torch.no_grad()
    def masked_pixels(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(B, 1, [T,] H, W) bool: the pixels some masked token reads (what reconstruct fills)."""
        group_of, parts, n_pixels = self._layout(tuple(x.shape), x.device)
        hit = torch.zeros(x.shape[0], n_pixels + 1, dtype=torch.bool, device=x.device)
        for _, start, ids in parts:
            b, t = mask[:, start:start + ids.shape[0]].nonzero(as_tuple=True)
            pix = torch.where(ids[t] < 0, n_pixels, ids[t])
            hit[b[:, None].expand_as(pix), pix] = True
        return hit[:, :-1].view(x.shape[0], 1, *x.shape[2:])

    @torch.no_grad()
    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, D): the mean of the encoder's output tokens over all tokens (kNN features)."""
        return self.encoder.forward_features(x).mean(1)

    # ---- training hooks --------------------------------------------------------------------

    def no_weight_decay(self) -> set[str]:
        """The encoder's own set (prefixed), the decoder's 1-dim parameters and mask token."""
        names = {f"encoder.{n}" for n in self.encoder.no_weight_decay()}
        return names | {f"decoder.{n}" for n, p in self.decoder.named_parameters()
                        if len(getattr(p, "ds_shape", p.shape)) <= 1 or n == "mask_token"}

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute the encoder's and the decoder's block activations in backward."""
        self.encoder.set_grad_checkpointing(enable)
        self.decoder.grad_checkpointing = enable

    @torch.no_grad()
    def init_weights(self) -> None:
        """(Re)initialise every parameter (encoder first, then decoder); no-op on meta tensors."""
        self.encoder.init_weights()
        init_linear_and_norm(self.decoder)
        nn.init.trunc_normal_(self.decoder.mask_token, std=0.02)

