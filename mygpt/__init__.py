"""mygpt: a small, readable and fast GPT in PyTorch."""

from mygpt.bpe import BPETokenizer, Encoder, get_encoder
from mygpt.bpe_train import train_bpe
from mygpt.download import download
from mygpt.model import GPT
from mygpt.trainer import Trainer, load_checkpoint
from mygpt.utils import CfgNode, set_seed

__all__ = [
    "GPT", "Trainer", "load_checkpoint",
    "Encoder", "get_encoder", "BPETokenizer", "train_bpe", "download",
    "CfgNode", "set_seed",
]
