"""Runs a tlnlp script with Accelerate's FSDP path switched on for CPU processes (gloo).

Accelerate keeps `distributed_type` at MULTI_CPU when there is no GPU, so an FSDP config silently
becomes plain data parallelism on a CPU machine. This wrapper changes that one flag after Accelerate has
built its state, then leaves everything else to Accelerate and torch: `prepare` shards the model with
FSDP2's `fully_shard`, `get_state_dict` gathers it, `save_state`/`load_state` use FSDP's own code.

Test-side only. Usage (under `accelerate launch --config_file configs/accelerate/fsdp.yaml`):
    fsdp_on_cpu.py SCRIPT [script args...]
"""

import runpy
import sys

from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import DistributedType

original_init = AcceleratorState.__init__


def init_with_fsdp_on_cpu(self, *args, fsdp_plugin=None, **kwargs):
    original_init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
    if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
        self.distributed_type = DistributedType.FSDP
        self.fsdp_plugin = fsdp_plugin
        # AcceleratorState copies PartialState's fields again whenever it is constructed anew: set both.
        PartialState._shared_state["distributed_type"] = DistributedType.FSDP


AcceleratorState.__init__ = init_with_fsdp_on_cpu
script, sys.argv = sys.argv[1], sys.argv[1:]
runpy.run_path(script, run_name="__main__")
