"""mygpt: a small, readable and fast GPT in PyTorch."""

from mygpt.model import GPT
from mygpt.utils import CfgNode, set_seed

__all__ = ["GPT", "CfgNode", "set_seed"]
