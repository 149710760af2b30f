"""Where a transformer keeps its decoder blocks, whatever the architecture calls them (`model.layers`,
`transformer.h`, ...): the freeze strategy, ReFT and the memory estimate all ask here."""

from __future__ import annotations

from torch import nn

from tunesmith.errors import ConfigError


def transformer_blocks(model: nn.Module) -> nn.ModuleList:
    """The stack of decoder blocks: the ModuleList holding the most parameters."""
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    if not lists:
        raise ConfigError("strategy.freeze.last_n_layers: cannot find the model's stack of transformer blocks")
    return max(lists, key=lambda m: sum(p.numel() for p in m.parameters()))
