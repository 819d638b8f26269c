"""timm backbones as weak-label classifiers (the blog's weakly supervised profiling, seed 002).

Model type `timm`: any `timm.create_model` name (`model.args.backbone`, default `resnet50`; `resnet18`
or a small ConvNeXt/EfficientNet for CPU) with `in_chans` = the crop channels, random initialisation
or a local weights file (`model.args.weights`; never a download), and one softmax head per weak-label
column (`data.heads`: time, dose, ...). The latent is the backbone's pooled feature vector (2048 for
resnet50): that is the embedding `raycell embed` exports. Trained by the one loop with `WeakLabelPlan`;
`layer_groups` gives the layer-wise learning rates (`train.layer_decay`) through timm's own grouping.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from raycell.errors import UserError
from raycell.forward import ModelOutput
from raycell.models.registry import register_model
from raycell.plans import WeakLabelPlan


class TimmModelError(UserError, ValueError):
    """A timm backbone name or weights file that cannot be used."""


def _check_backbone(name: str) -> None:
    import timm

    if not timm.is_model(name):
        import difflib

        close = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.6)
        raise TimmModelError(
            f"model.args.backbone: {name!r} is not a timm model name"
            + (f"; close names: {', '.join(close)}" if close else "")
            + ' (list them with python -c "import timm; print(timm.list_models())")'
        )


def _prefixed(spec, prefix: str):
    """A timm group-matcher regex (or list of (regex, suffix)) made to match under `prefix`."""
    if isinstance(spec, str):
        return rf"^{prefix}\.(?:{spec.lstrip('^')})"
    if isinstance(spec, (list, tuple)):
        return [(_prefixed(rx, prefix), suffix) for rx, suffix in spec]
    return spec


def load_backbone_weights(backbone: nn.Module, weights: str, in_channels: int) -> None:
    """Load a local timm/torchvision state dict into a backbone built with num_classes=0, strictly.

    By hand rather than timm's `pretrained_cfg_overlay=dict(file=...)`, which loads non-strictly: a
    resnet18 file went into a resnet34 without a word. Here the classifier weights are dropped, the
    first convolution is adapted to the crop channels with timm's `adapt_input_conv` (as timm does for
    ImageNet weights), and any other difference is a one-line error.
    """
    from timm.models import adapt_input_conv, load_state_dict

    f = Path(weights)
    if not f.is_file():
        raise TimmModelError(
            f"model.args.weights: {weights} is not a file (a local timm/torchvision state "
            "dict; raycell never downloads weights)"
        )
    try:
        state = load_state_dict(str(f))
    except Exception as exc:  # noqa: BLE001 - torch/safetensors raise many types for a bad file
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        raise TimmModelError(
            f"model.args.weights: cannot read {weights} as a state dict "
            f"({type(exc).__name__}: {first})"
        ) from None
    cfg = getattr(backbone, "pretrained_cfg", {}) or {}
    own = backbone.state_dict()
    for head in (
        [cfg.get("classifier")]
        if isinstance(cfg.get("classifier"), str)
        else cfg.get("classifier") or []
    ):
        for k in [k for k in state if k.startswith(head + ".") and k not in own]:
            del state[k]
    first = cfg.get("first_conv")
    key = f"{first}.weight" if isinstance(first, str) else None
    if key and key in state and key in own and state[key].shape[1] != own[key].shape[1]:
        state[key] = adapt_input_conv(in_channels, state[key])
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [
        f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
        for k in own
        if k in state and state[k].shape != own[k].shape
    ]
    if missing or unexpected or shapes:
        what = [
            f"{len(v)} {n} (e.g. {v[0]})"
            for n, v in (
                ("missing key(s)", missing),
                ("unexpected key(s)", unexpected),
                ("shape mismatch(es)", shapes),
            )
            if v
        ]
        raise TimmModelError(
            f"model.args.weights: {weights} does not fit timm model "
            f"{type(backbone).__name__}: {'; '.join(what)}"
        )
    backbone.load_state_dict(state, strict=True)


class TimmWeakLabel(nn.Module):
    """A timm backbone (pooled features) and one linear layer holding every head's logits side by side."""

    def __init__(
        self,
        backbone: str,
        in_channels: int,
        head_names: list[str],
        head_sizes: list[int],
        weights: str = "",
        drop_rate: float = 0.0,
    ):
        super().__init__()
        import timm

        _check_backbone(backbone)
        if len(head_names) != len(head_sizes) or not head_sizes or min(head_sizes) < 2:
            raise TimmModelError(
                f"weak-label heads {head_names} need at least 2 classes each, got {head_sizes}"
            )
        self.backbone = timm.create_model(backbone, in_chans=in_channels, num_classes=0)
        if weights:
            load_backbone_weights(self.backbone, weights, in_channels)
        self.head_names, self.head_sizes = list(head_names), [int(k) for k in head_sizes]
        self.latent_dim = self.backbone.num_features
        self.drop = nn.Dropout(drop_rate)
        self.heads = nn.Linear(self.latent_dim, sum(self.head_sizes))

    def encode(self, x: torch.Tensor, z: torch.Tensor | None = None) -> torch.Tensor:
        """Pooled backbone features (the embedding)."""
        return self.backbone(x)

    def forward(self, x: torch.Tensor, z: torch.Tensor | None = None) -> ModelOutput:
        """Features and the heads' logits; no reconstruction (z is ignored: no random effects)."""
        feats = self.backbone(x)
        return ModelOutput(latent=feats, recon=None, logits=self.heads(self.drop(feats)))

    def group_matcher(self, coarse: bool = False) -> dict:
        """Timm's layer grouping of the backbone, per stage (stem, stage 1..n), then the heads last.

        Stages rather than single blocks (timm's coarse grouping), so `layer_decay` lowers the learning
        rate of the early stages as the blog does, without a tiny rate for the stem of a deep network.
        """
        inner = self.backbone.group_matcher(coarse=True)
        return {
            k: _prefixed(v, "backbone") for k, v in inner.items()
        }  # unmatched (heads) come last

    def layer_groups(self, lr: float, weight_decay: float, layer_decay: float) -> list[dict]:
        """Optimiser parameter groups with lr * layer_decay^(stages above), from timm's grouping.

        Uses `timm.optim.param_groups_layer_decay` (which also exempts biases and norms from weight
        decay); timm leaves the scale in `lr_scale` for its own schedulers, so it is applied here.
        """
        from timm.optim import param_groups_layer_decay

        groups = param_groups_layer_decay(self, weight_decay=weight_decay, layer_decay=layer_decay)
        for g in groups:
            g["lr"] = lr * g.get("lr_scale", 1.0)
        return groups


@register_model("timm", plan=WeakLabelPlan, reconstructs=False, weak_labels=True)
def timm_classifier(
    in_channels: int,
    n_classes: int,
    n_batches: int = 1,
    preset: str = "small",
    image_size: int | None = None,
    backbone: str = "resnet50",
    head_names: list[str] | None = None,
    head_sizes: list[int] | None = None,
    weights: str = "",
    drop_rate: float = 0.0,
    output_mean: list | None = None,
) -> nn.Module:
    """A timm backbone with weak-label heads.

    `n_classes` (the label column's classes) is the single head when no heads are given; `preset`,
    `image_size`, `n_batches` and `output_mean` (the AECs' decoder initialisation) do not apply.
    """
    names = list(head_names) if head_names else ["label"]
    sizes = list(head_sizes) if head_sizes else [max(2, n_classes)]
    return TimmWeakLabel(backbone, in_channels, names, sizes, weights=weights, drop_rate=drop_rate)
