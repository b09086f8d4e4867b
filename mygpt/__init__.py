"""mygpt: a small, readable and fast GPT in PyTorch."""

from mygpt.bpe import Encoder, get_encoder
from mygpt.bpe_train import train_bpe
from mygpt.checkpoint import CheckpointError, checkpoint_file, load_checkpoint, open_checkpoint
from mygpt.data import ShardError, TokenDataset, read_header, write_shard
from mygpt.downloads import DownloadError, download, tiny_shakespeare
from mygpt.evals import Example, score_examples
from mygpt.evaluate import score, score_batches
from mygpt.export import export_gguf, export_hf
from mygpt.inference import INFERENCE_PRECISIONS, inference_precision, precision_context
from mygpt.generate import SAMPLE_SEPARATOR, check_sampling_args, document_start, generate_texts, stream
from mygpt.model import GPT, KVCache
from mygpt.plot import plot_history, write_history
from mygpt.prepare import prepare_corpus
from mygpt.pretrained import GPT2_NAMES
from mygpt.quantize import Int8Linear, is_quantized, load_quantized, save_quantized
from mygpt.recipes import apply_recipe, merge_args
from mygpt.tasks import TASKS, TaskCallback, TaskDataError, core_score, eval_task, task_and_file
from mygpt.tokenizer import BPETokenizer, describe_tokenizer, load_tokenizer
from mygpt.trainer import Trainer, check_new_run
from mygpt.utils import (CfgNode, InUseError, UsageError, atomic_path, check_device, exclusive, resolve_device, run_main,
                         set_seed, setup_logging, setup_script)

__all__ = [
    # the model and sampling from it
    "GPT", "KVCache", "GPT2_NAMES", "stream", "generate_texts", "document_start", "SAMPLE_SEPARATOR",
    "check_sampling_args", "inference_precision", "precision_context", "INFERENCE_PRECISIONS",
    # int8 inference (model.quantize()), export, plots
    "Int8Linear", "is_quantized", "save_quantized", "load_quantized", "export_hf", "export_gguf", "plot_history",
    "write_history",
    # training, and scoring a model on held-out windows (loss, bits per byte)
    "Trainer", "check_new_run", "exclusive", "InUseError", "load_checkpoint", "open_checkpoint", "checkpoint_file",
    "CheckpointError", "score", "score_batches",
    # configs: named recipes (--model.preset=modern) and command-line overrides
    "apply_recipe", "merge_args",
    # benchmarks: multiple-choice accuracy as lm-eval scores it
    "eval_task", "core_score", "TASKS", "TaskDataError", "TaskCallback", "task_and_file", "score_examples", "Example",
    # token corpora on disk
    "prepare_corpus", "TokenDataset", "write_shard", "read_header", "ShardError",
    # tokenizers
    "Encoder", "get_encoder", "BPETokenizer", "train_bpe", "describe_tokenizer", "load_tokenizer",
    # helpers
    "download", "DownloadError", "tiny_shakespeare", "CfgNode", "set_seed", "setup_logging", "atomic_path",
    # scripts: errors as one line and an exit status, as the mygpt command gives them
    "run_main", "UsageError", "check_device", "resolve_device", "setup_script",
]
