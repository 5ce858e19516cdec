"""cellmesh: a sovereign, identity-first, encrypted mesh networking stack.

The public API, imported lazily so that `import cellmesh.wire` stays cheap and layer-pure:

    from cellmesh import Node, Identity, NodeConfig, ControlClient
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = [
    "ControlClient",
    "Identity",
    "Node",
    "NodeConfig",
    "NodeHome",
    "__version__",
    "connect",
]

if TYPE_CHECKING:
    from cellmesh.config import NodeConfig
    from cellmesh.identity.keys import Identity
    from cellmesh.node.connect import connect
    from cellmesh.node.control import ControlClient
    from cellmesh.node.home import NodeHome
    from cellmesh.node.node import Node

_LAZY = {
    "Node": "cellmesh.node.node",
    "NodeConfig": "cellmesh.config",
    "Identity": "cellmesh.identity.keys",
    "ControlClient": "cellmesh.node.control",
    "NodeHome": "cellmesh.node.home",
    "connect": "cellmesh.node.connect",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'cellmesh' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)
