"""Model conversion: `fuse` rewrites a model's batch norm + activation (+ residual add) into the fused
modules of the op (`tritonbn.modules`, `tritonbn.sync`), and `unfuse` turns them back into plain PyTorch.

The op does not depend on this package: it imports the op's modules, never the other way round.

- `fusion`: `fuse` and its `FuseReport`; `tracing` (the torch.fx tracer, ``forward``'s defaults),
  `fx_patterns` (the activations and the batch norm -> [add] -> activation patterns it recognises),
  `hooks` (which hooks a fused call would bypass) and `timm_layers` (timm's batch norm + activation
  modules, recognised without importing timm).
- What `fuse` returns: a `fused_graph.FusedGraphModule`, or for models torch.fx cannot trace, the model
  with `fused_sequential.FusedSequential` containers.
- `unfusion`: `unfuse`.
"""

from .fused_sequential import FusedSequential
from .fusion import FusedLayer, FuseReport, fuse
from .unfusion import unfuse

__all__ = ["FuseReport", "FusedLayer", "FusedSequential", "fuse", "unfuse"]
