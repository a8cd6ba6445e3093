"""Runs a tlnlp stage, then has every rank write its world size, a digest of its final parameters and
(pretraining) the unpadded token ids of every training row it saw, before masking, and the positions masked.

Test-side only: it wraps the public `main` functions, so nothing in tlnlp knows about tests.
Usage: rank_report.py REPORT_DIR pretrain|finetune [script args...]
"""

import hashlib
import json
import os
import sys
from pathlib import Path

import torch

import tlnlp.core.run
import tlnlp.finetune
import tlnlp.pretrain
import tlnlp.stage1.pretrain
from tlnlp.core.cli import run
from tlnlp.core.config import FinetuneConfig, PretrainConfig

report_dir, stage, args = Path(sys.argv[1]), sys.argv[2], sys.argv[3:]
module = tlnlp.pretrain if stage == "pretrain" else tlnlp.finetune
original_finish = tlnlp.core.run.finish
original_mask_batch = tlnlp.stage1.pretrain.mask_batch
original_mlm_rows = tlnlp.stage1.pretrain.mlm_rows
seen_rows: list[list[int]] = []
masked_positions: list[list[list[int]]] = []  # per batch, per row: the positions chosen for the MLM loss


def recording_mask_batch(batch, masker):
    for ids, mask in zip(batch["input_ids"], batch["attention_mask"]):
        seen_rows.append(ids[mask.bool()].tolist())
    masked = original_mask_batch(batch, masker)
    masked_positions.append([row.nonzero().flatten().tolist() for row in masked["labels"] != -100])
    return masked


def recording_mlm_rows(texts, *args, **kwargs):
    """Streaming: which documents this process (or loader worker, a forked child) tokenized."""
    with (report_dir / f"tokenized-{os.getpid()}.txt").open("a") as f:
        f.write("".join(text.replace("\n", " ") + "\n" for text in texts))
    return original_mlm_rows(texts, *args, **kwargs)


def finish_with_report(accelerator):
    model = accelerator.unwrap_model(accelerator._models[0])
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    report = {"world_size": accelerator.num_processes, "rank": accelerator.process_index,
              "digest": digest.hexdigest(), "frozen": len(frozen),
              "trainable_in_optimizer": sum(p.numel() for g in accelerator._optimizers[0].param_groups
                                            for p in g["params"]),
              "optimizer_state_tensors": len(accelerator._optimizers[0].state)}
    (report_dir / f"rank{accelerator.process_index}.json").write_text(json.dumps(report))
    torch.save(frozen, report_dir / f"frozen{accelerator.process_index}.pt")
    (report_dir / f"rows{accelerator.process_index}.json").write_text(json.dumps(seen_rows))
    (report_dir / f"masks{accelerator.process_index}.json").write_text(json.dumps(masked_positions))
    original_finish(accelerator)


tlnlp.core.run.finish = finish_with_report  # end_run calls it last, on every rank
tlnlp.stage1.pretrain.mask_batch = recording_mask_batch  # called by the training loop on every batch
tlnlp.stage1.pretrain.mlm_rows = recording_mlm_rows  # called by the stream's workers on each group of documents
sys.exit(run(module.main, PretrainConfig if stage == "pretrain" else FinetuneConfig, args))
