"""mygpt: a small, readable and fast GPT in PyTorch."""

from mygpt.utils import CfgNode, set_seed

__all__ = ["CfgNode", "set_seed"]
