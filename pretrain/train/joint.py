"""Joint image + video steps under ZeRO: every parameter takes part in every step.

A video step leaves the image head without a gradient, an image step leaves the 3-D tubes
and the video head without one. ZeRO-1/2 fill such gradients with zeros, but ZeRO-3
(DeepSpeed 0.19) reuses the parameter's last gradient partition, so an image step would
apply the previous video step's tube gradient again (measured: losses drift ~1e-3 from
the reference after the first image step; tests/test_train_zero_equivalence.py).

The fix keeps the semantics of "zero gradient" explicitly and identically on every stage:
in training, the forward also runs the idle parts (the other heads on the pooled
features, the tubes on a minimal dummy clip) and adds `0 * their sum` to the logits. The
extra work is one tiny linear per extra head and the tube convolutions on one minimal
clip. Installed per instance (`model.forward` attribute), so parameter names and the
state_dict stay those of the plain model.
"""
from __future__ import annotations

import types

import torch


def _min_clip(model) -> tuple[int, int, int]:
    """Smallest (T, H, W) on which every tube yields a token."""
    specs = model.tokenizer.specs
    return tuple(max(s.offset[a] + s.span[a] for s in specs) for a in range(3))  # type: ignore


def use_all_parameters(model) -> None:
    """Make `model(x, dataset=...)` give every parameter a gradient (zero if idle)."""
    probe_shape = (1, model.config.in_chans, *_min_clip(model))

    def forward(self, x: torch.Tensor, dataset: str | None = None) -> torch.Tensor:
        name = self._dataset(dataset)
        pooled = self.head_drop(self.pool(self.forward_features(x)))   # (B, d)
        logits = self.heads[name](pooled)                               # (B, classes)
        if not (self.training and torch.is_grad_enabled()):
            return logits
        idle = logits.new_zeros(())
        for other, head in self.heads.items():
            if other != name:
                idle = idle + head(pooled).sum()
        if x.ndim == 4:  # image step: the video-only tubes are idle
            probe = x.new_zeros(probe_shape)                            # (1, 3, T, H, W)
            idle = idle + self.tokenizer(probe).sum()
        return logits + 0.0 * idle

    model.forward = types.MethodType(forward, model)
