"""Records when each process enters and leaves `engines.first_on_each_node` (test-side only).

Usage (under `accelerate launch`): node_order_probe.py REPORT_DIR
"""

import json
import sys
import time
from pathlib import Path

from accelerate import Accelerator

from tlnlp.core.engines import first_on_each_node

report_dir = Path(sys.argv[1])
accelerator = Accelerator(cpu=True)
with first_on_each_node(accelerator):
    entered = time.time()
    time.sleep(0.5)  # long enough that an overlap with another process would show
    left = time.time()
record = {"rank": accelerator.process_index, "local_main": accelerator.is_local_main_process, "entered": entered,
          "left": left}
(report_dir / f"rank{accelerator.process_index}.json").write_text(json.dumps(record))
accelerator.wait_for_everyone()
accelerator.end_training()
