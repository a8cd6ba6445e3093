"""Runs a tlnlp script under Accelerate's DeepSpeed path on CPU processes (gloo).

Without a GPU, Accelerate starts DeepSpeed's process group (world size N) but leaves its own state at
one process (num_processes 1, process_index 0 on every rank), so each rank would think it trains alone.
This wrapper copies the real rank and world size from torch.distributed into Accelerate's state right
after it is built; everything else is Accelerate's and DeepSpeed's own code (`deepspeed.initialize`,
ZeRO stage 2, `engine.backward`/`step`, DeepSpeed checkpoints).

Test-side only. Usage (under `accelerate launch --config_file configs/accelerate/deepspeed_zero2.yaml`,
without ACCELERATE_USE_CPU, which would turn DeepSpeed off):
    deepspeed_on_cpu.py SCRIPT [script args...]
"""

import os
import runpy
import sys

import torch
from accelerate.state import PartialState

original_init = PartialState.__init__


def init_with_real_ranks(self, *args, **kwargs):
    original_init(self, *args, **kwargs)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        self.num_processes = torch.distributed.get_world_size()
        self.process_index = torch.distributed.get_rank()
        self.local_process_index = int(os.environ.get("LOCAL_RANK", self.process_index))


PartialState.__init__ = init_with_real_ranks
script, sys.argv = sys.argv[1], sys.argv[1:]
runpy.run_path(script, run_name="__main__")
