"""The one training loop, shared by pretraining and fine-tuning.

A stage describes itself as a `Task` (model, data, evaluation, how to save); `train` does the rest:
optimizer and schedule, gradient accumulation and clipping, logging, evaluation, best-model tracking
with early stopping, resumable checkpoints, and the final save. `Trainer.fit` reads top to bottom.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch import nn
from torch.utils.data import DataLoader, IterableDataset
from tqdm.auto import tqdm
from transformers import get_scheduler

from tlnlp.core import engines
from tlnlp.core.checkpoints import (
    AVERAGE_STATE,
    BEST,
    CHECKPOINTS,
    STATE_FILE,
    STREAM_STATE,
    Checkpoints,
    latest_checkpoint,
    load_checkpoint,
)
from tlnlp.core.config import TrainingConfig, config_to_dict
from tlnlp.core.errors import TrainingError, UserInputError
from tlnlp.core.files import EVAL_HISTORY_FILE
from tlnlp.core.terminal import PROGRESS_LINE_SECONDS, progress_bars
from tlnlp.data.prepare import STREAMING_VALIDATION_DOCS, LengthGroupedSampler
from tlnlp.data.streaming import ShardedStream, stream_loader

logger = logging.getLogger(__name__)


@dataclass
class Task:
    """What a stage hands to the training loop."""

    model: nn.Module  # forward(**batch) returns an output with `.loss`
    train_dataset: Any
    eval_dataset: Any  # None: nothing to evaluate during training (no validation split)
    train_collator: Callable
    eval_collator: Callable
    evaluate: Callable[[Accelerator, nn.Module, DataLoader], dict[str, float]]
    save: Callable[[nn.Module, Path, dict], None] | None  # (unwrapped model, folder, state_dict); None: not kept
    count_unit: str = "tokens"  # what `count` measures, for throughput logs
    count: Callable[[dict], int] = lambda batch: int(batch["attention_mask"].sum())
    param_groups: Callable[[nn.Module], list[dict]] | None = None
    metric_for_best_model: str | None = None  # a key of `evaluate`'s result; None: no best-model tracking
    greater_is_better: bool = True
    restore_best: bool = True  # end with the best evaluated model (when one is tracked), not the last
    early_stopping_patience: int | None = None  # evaluations without improvement before stopping
    # Fewer optimizer steps than this from --num_train_epochs: train whole epochs until there are this many.
    # Ignored with --max_train_steps, which the user set on purpose.
    min_train_steps: int = 0
    # End with the mean of the weights after each optimizer step of the last this-many epochs (0: the last
    # step's weights). Stage 2's --average_last_epochs.
    average_last_epochs: float = 0.0
    before_optimizer_step: Callable[[int, int], None] | None = None  # (completed_steps, epoch)
    # Applied to each training batch inside the loop, on the CPU, before it moves to the device. Random
    # work (MLM masking) belongs here, not in the collator: the data loader prefetches a batch ahead, so
    # randomness drawn in the collator would not be at the step boundary a checkpoint records.
    on_batch: Callable[[dict], dict] | None = None
    # Token count of each training example: with --group_by_length, batches are formed from similar lengths.
    train_lengths: list[int] | None = None
    summary: dict[str, Any] = field(default_factory=dict)  # extra lines for the start-of-run summary


def loader_workers(cfg: TrainingConfig, accelerator: Accelerator) -> int:
    """--dataloader_num_workers, or 0 on a CPU (workers would take its cores from training) and 2 on a GPU."""
    if cfg.dataloader_num_workers is not None:
        return cfg.dataloader_num_workers
    return 0 if accelerator.device.type == "cpu" else 2


def default_param_groups(model: nn.Module, learning_rate: float, weight_decay: float,
                         lr_scale: Callable[[nn.Parameter], float] | None = None) -> list[dict]:
    """AdamW groups by (learning rate, decay). Biases and LayerNorm weights (1-D tensors) get no weight decay;
    frozen parameters are left out, so they carry no optimizer state. `lr_scale` multiplies a parameter's
    rate; it is asked by the parameter itself, because a wrapper (the frozen-feature cache) renames them."""
    groups: dict[tuple[float, float], list] = {}
    for param in model.parameters():
        if not param.requires_grad:
            continue
        decay = 0.0 if param.ndim < 2 else weight_decay
        lr = learning_rate * (lr_scale(param) if lr_scale else 1.0)
        groups.setdefault((lr, decay), []).append(param)
    return [{"params": params, "lr": lr, "weight_decay": decay} for (lr, decay), params in groups.items()]


def _is_better(value: float, best: float | None, greater: bool) -> bool:
    return best is None or (value > best if greater else value < best)


class Trainer:
    """One run of the training loop over a `Task`. `fit` reads top to bottom; each side concern (one
    training step, evaluation with best-model tracking, logging, the final save) is a named method."""

    def __init__(self, cfg: TrainingConfig, task: Task, accelerator: Accelerator, output_dir: Path,
                 checkpoints: bool = True):
        self.cfg, self.task, self.accelerator = cfg, task, accelerator
        self.output_dir = output_dir
        # False for a throwaway run (a search fold): no resumable checkpoints, no resume, no tracker.
        self.keeps_checkpoints = checkpoints
        self.tracking = cfg.with_tracking and checkpoints
        self.start_time = time.time()
        self.grouped = cfg.group_by_length and task.train_lengths is not None
        self.streamed = isinstance(task.train_dataset, ShardedStream)
        workers, pin = loader_workers(cfg, accelerator), accelerator.device.type == "cuda"
        if self.streamed:
            # Already split over processes and workers; Accelerate's preparation would split it again. Its
            # position is saved with each checkpoint, so a resume does not replay the batches before it.
            self.train_dl = stream_loader(task.train_dataset, cfg.per_device_train_batch_size, task.train_collator,
                                          workers, pin)
        else:
            train_dl = DataLoader(
                task.train_dataset,
                batch_size=cfg.per_device_train_batch_size,
                shuffle=not self.grouped and not isinstance(task.train_dataset, IterableDataset),
                sampler=LengthGroupedSampler(task.train_lengths, cfg.per_device_train_batch_size, cfg.seed)
                if self.grouped else None,
                collate_fn=task.train_collator,
                # Its own generator: creating a data-loader iterator then draws nothing from the global RNG, so a
                # resumed run (which creates a fresh iterator) continues the same random stream as an unbroken one.
                generator=torch.Generator().manual_seed(cfg.seed),
                num_workers=workers, pin_memory=pin, persistent_workers=workers > 0,
            )
            # Training batches stay on the CPU until `task.on_batch` (MLM masking) has run; the loop moves them.
            # Prepared on its own, because DeepSpeed refuses per-object device placement.
            self.train_dl = accelerator.prepare_data_loader(train_dl, device_placement=False)
        eval_dl = None if task.eval_dataset is None else DataLoader(
            task.eval_dataset, batch_size=cfg.per_device_eval_batch_size, collate_fn=task.eval_collator)
        groups = task.param_groups(task.model) if task.param_groups else default_param_groups(
            task.model, cfg.learning_rate, cfg.weight_decay
        )
        fused = accelerator.device.type == "cuda"  # one kernel for all parameters: faster on GPUs, absent on CPU
        optimizer = torch.optim.AdamW(groups, lr=cfg.learning_rate, fused=fused)
        engines.prepare_for_engine(accelerator, task.model)
        if eval_dl is None:
            (self.model, self.optimizer), self.eval_dl = accelerator.prepare(task.model, optimizer), None
        else:
            self.model, self.optimizer, self.eval_dl = accelerator.prepare(task.model, optimizer, eval_dl)

        # Counted after `prepare`, which splits the batches between processes: one optimizer step consumes
        # `gradient_accumulation_steps` batches on every process. The scheduler is stepped by hand once per
        # optimizer step, so its length is in optimizer steps whatever the number of processes.
        try:
            self.steps_per_epoch = math.ceil(len(self.train_dl) / cfg.gradient_accumulation_steps)
        except TypeError:  # streaming: no length
            self.steps_per_epoch = None
        if cfg.max_train_steps:
            self.max_steps = cfg.max_train_steps
            self.num_epochs = math.ceil(self.max_steps / self.steps_per_epoch) if self.steps_per_epoch else 1 << 30
        else:
            self.max_steps = math.ceil(cfg.num_train_epochs * self.steps_per_epoch)
            self.num_epochs = math.ceil(cfg.num_train_epochs)
            if self.max_steps < task.min_train_steps:
                self.num_epochs = math.ceil(task.min_train_steps / self.steps_per_epoch)
                logger.info("%g epochs would be %d optimizer steps, fewer than the %d a small training set needs "
                            "(--min_train_steps): training %d epochs (%d steps).", cfg.num_train_epochs, self.max_steps,
                            task.min_train_steps, self.num_epochs, self.num_epochs * self.steps_per_epoch)
                self.max_steps = self.num_epochs * self.steps_per_epoch
        if self.max_steps < 1:
            raise UserInputError("The run would take 0 optimizer steps: give more training data or --max_train_steps.")
        self.scheduler = accelerator.prepare_scheduler(get_scheduler(
            cfg.lr_scheduler_type, optimizer=self.optimizer, num_warmup_steps=cfg.num_warmup_steps,
            num_training_steps=self.max_steps,
        ))
        self.global_batch = cfg.per_device_train_batch_size * accelerator.num_processes * cfg.gradient_accumulation_steps
        self.state = {"completed_steps": 0, "epoch": 0, "batches_in_epoch": 0, "best_metric": None,
                      "best_step": None, "evals_without_improvement": 0, "history": [], "units_seen": 0,
                      "train_loss_sum": 0.0, "train_loss_count": 0}
        # Tail averaging: the weights after every optimizer step past `average_from` are averaged, in fp32, on
        # each process (DDP keeps the same weights everywhere; the engines that shard them are refused).
        self.average_from, self.average = None, None
        if task.average_last_epochs and self.steps_per_epoch:
            self.average_from = max(0, self.max_steps - math.ceil(task.average_last_epochs * self.steps_per_epoch))
            self.averaged_params = [p for p in self.model.parameters() if p.requires_grad]
            self.state["averaged_steps"] = 0
        self.checkpoints = Checkpoints(accelerator, self.output_dir, cfg.save_total_limit)
        self.best_file = self.output_dir / CHECKPOINTS / BEST / "model.safetensors"
        self.restore_best = task.restore_best
        if accelerator.num_processes > 1:
            # Every rank draws its own masks and dropout (one process keeps the stream it always had). Model
            # initialisation, above, used the common seed, so all ranks start from the same weights.
            set_seed(cfg.seed + accelerator.process_index)

    # -- the loop ------------------------------------------------------------------------------------

    def fit(self) -> dict[str, Any]:
        """Train as configured; return the results also written to all_results.json."""
        self._log_summary()
        self._resume_if_asked()
        self.progress = tqdm(total=self.max_steps, initial=self.state["completed_steps"], unit="step",
                             disable=not (self.accelerator.is_local_main_process and progress_bars()), desc="Training",
                             dynamic_ncols=True)
        self.last_progress_line, self.first_step = time.time(), self.state["completed_steps"]
        # For the results: time to the first optimizer step (start-up and any compilation) and waiting for data.
        self.fit_start, self.first_step_seconds, self.data_wait_seconds = time.time(), None, 0.0
        self.model.train()
        self._reset_window()
        # The optimizer step and the first non-finite loss (step, value), kept on the device: no host sync.
        self.device_step = torch.tensor(float(self.state["completed_steps"]), device=self.accelerator.device)
        self.nonfinite = torch.zeros(2, device=self.accelerator.device)
        while self.state["epoch"] < self.num_epochs and not self._should_stop():
            for batch in self._epoch_batches():
                self._train_step(batch)
                if self.accelerator.sync_gradients:
                    self._after_optimizer_step()
                    if self._should_stop():
                        break
            else:  # the epoch ran to its end
                self._end_epoch()
        self.progress.close()
        if self.window["micro"]:
            self._log_window()
        if self.average is not None:
            self._use_average()
            self._evaluate_and_track()
            if self.state["history"]:
                self.state["history"][-1]["averaged_steps"] = self.state["averaged_steps"]
        elif not self.state["history"] or self.state["history"][-1]["step"] != self.state["completed_steps"]:
            self._evaluate_and_track()  # the final model, if its step was not evaluated yet
        self._restore_best()
        results = self._results()
        self._save_final()
        return results

    def _epoch_batches(self):
        """This epoch's batches, on the CPU; after a resume, the first epoch skips the batches already seen."""
        epoch = self.state["epoch"]
        if hasattr(self.train_dl, "set_epoch"):
            self.train_dl.set_epoch(epoch)
        batches = self.train_dl
        if self.state["batches_in_epoch"] and not self.streamed:  # a stream resumes from its saved position
            batches = self.accelerator.skip_first_batches(self.train_dl, self.state["batches_in_epoch"])
        wait_start = time.time()
        for batch in batches:
            self.window["data_wait"] += time.time() - wait_start
            self.state["batches_in_epoch"] += 1
            yield batch
            wait_start = time.time()

    def _train_step(self, batch: dict) -> None:
        """Forward and backward on one micro-batch; an optimizer step when the accumulation is complete."""
        accelerator, cfg = self.accelerator, self.cfg
        if self.task.on_batch:
            batch = self.task.on_batch(batch)
        units = self.task.count(batch)
        batch = {k: v.to(accelerator.device, non_blocking=True) for k, v in batch.items()}
        with accelerator.accumulate(self.model):
            loss = self.model(**batch).loss
            # Skipping a batch must be decided before backward, so --on_nonfinite_loss skip waits for the loss
            # on every micro-batch. The default (stop) only notes it on the device, checked once per log window.
            if cfg.on_nonfinite_loss != "skip" or self._loss_is_finite(loss):
                self._note_if_not_finite(loss)
                accelerator.backward(loss)
                self.window["loss"] += loss.detach()
                self.window["micro"] += 1
            if accelerator.sync_gradients:
                if self.task.before_optimizer_step:
                    self.task.before_optimizer_step(self.state["completed_steps"], self.state["epoch"])
                if cfg.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(self.model.parameters(), cfg.max_grad_norm)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        self.window["units"] += units

    def _loss_is_finite(self, loss: torch.Tensor) -> bool:
        """--on_nonfinite_loss skip: False (and the gradients dropped) when any rank's loss is not finite."""
        finite = torch.isfinite(loss.detach())
        if self.accelerator.num_processes > 1:  # every rank must take the same branch
            finite = self.accelerator.reduce(finite.float(), "sum") == self.accelerator.num_processes
        if bool(finite):
            return True
        logger.warning("Skipping a batch with a non-finite loss at step %d.", self.state["completed_steps"] + 1)
        self.optimizer.zero_grad(set_to_none=True)
        return False

    def _note_if_not_finite(self, loss: torch.Tensor) -> None:
        """Keep, on the device and without waiting for it, the first optimizer step whose loss was not finite."""
        first = ~torch.isfinite(loss.detach()) & (self.nonfinite[0] == 0)
        self.nonfinite = torch.where(first, torch.stack([self.device_step + 1, loss.detach().float()]), self.nonfinite)

    def _stop_if_loss_was_not_finite(self) -> None:
        """Before anything is logged, evaluated or saved: stop if a non-finite loss was noted on any rank."""
        noted = self.accelerator.gather(self.nonfinite.unsqueeze(0))
        noted = noted[noted[:, 0] > 0]
        if len(noted):
            step, value = noted[noted[:, 0].argmin()].tolist()
            raise TrainingError(
                f"The loss became {value} at optimizer step {int(step)} (noticed at step "
                f"{self.state['completed_steps']}). The last saved checkpoint is intact. Lower --learning_rate, "
                "check the data, or pass --on_nonfinite_loss skip to skip such batches."
            )

    def _after_optimizer_step(self) -> None:
        """Schedule, progress, logging, evaluation and checkpoints: what happens once per optimizer step."""
        cfg, state = self.cfg, self.state
        if not self.accelerator.optimizer_step_was_skipped:
            self.scheduler.step()
        state["completed_steps"] += 1
        self.device_step += 1
        if self.average_from is not None and state["completed_steps"] > self.average_from:
            self._add_to_average()
        if self.first_step_seconds is None:
            if self.accelerator.device.type == "cuda":
                torch.cuda.synchronize()  # once: the first step's kernels, compilation included, have finished
            self.first_step_seconds = time.time() - self.fit_start
        self.progress.update(1)
        step = state["completed_steps"]
        if self.progress.disable and time.time() - self.last_progress_line >= PROGRESS_LINE_SECONDS:
            self._log_progress_line()
        if step % cfg.logging_steps == 0 or step == self.max_steps:
            self._log_window()
        if cfg.eval_steps and step % cfg.eval_steps == 0:
            self._evaluate_and_track()
        if cfg.checkpoint_every and self.keeps_checkpoints and step % cfg.checkpoint_every == 0:
            self._save_checkpoint()

    def _add_to_average(self) -> None:
        """One more step in the running mean of the weights (tail averaging)."""
        self.state["averaged_steps"] += 1
        weights = [p.detach().float() for p in self.averaged_params]
        if self.average is None:
            self.average = [w.clone() for w in weights]
        else:
            torch._foreach_lerp_(self.average, weights, 1.0 / self.state["averaged_steps"])

    def _use_average(self) -> None:
        """Put the averaged weights into the model, which the run then evaluates and saves."""
        with torch.no_grad():
            for param, mean in zip(self.averaged_params, self.average):
                param.copy_(mean)
        logger.info("The model is the average of the weights after the last %d optimizer steps "
                    "(--average_last_epochs %g).", self.state["averaged_steps"], self.task.average_last_epochs)

    def _should_stop(self) -> bool:
        """The one place the run decides to stop: the step limit, or early stopping's patience spent. Both
        are read from the state a checkpoint saves, so a resumed run stops where an unbroken one would."""
        state, patience = self.state, self.task.early_stopping_patience
        return state["completed_steps"] >= self.max_steps or bool(
            patience and state["evals_without_improvement"] >= patience)

    def _log_progress_line(self) -> None:
        """What the bar shows, as one log line, for a log without a terminal (see tlnlp.core.terminal)."""
        step, elapsed = self.state["completed_steps"], time.time() - self.start_time
        left = elapsed / max(step - self.first_step, 1) * (self.max_steps - step)
        logger.info("progress: step %d of %d (%.0f%%), %.0f s elapsed, about %.0f s left", step, self.max_steps,
                    100 * step / self.max_steps, elapsed, left)
        self.last_progress_line = time.time()

    def _end_epoch(self) -> None:
        if self.state["batches_in_epoch"] == 0:  # an endless loop over an empty stream otherwise
            raise UserInputError(
                "The training data yielded no batch. A streamed corpus must hold more than the "
                f"{STREAMING_VALIDATION_DOCS} documents held out for validation (or give --validation_file)."
            )
        self.state.update(epoch=self.state["epoch"] + 1, batches_in_epoch=0)
        if not self.cfg.eval_steps:
            self._evaluate_and_track()
        if self.cfg.checkpointing_steps == "epoch" and self.keeps_checkpoints:
            self._save_checkpoint()

    def _save_checkpoint(self) -> None:
        self._stop_if_loss_was_not_finite()  # never checkpoint weights a non-finite loss has touched
        self.checkpoints.save(self.state["completed_steps"], self.state,
                              self.train_dl.state_dict() if self.streamed else None,
                              {str(i): mean for i, mean in enumerate(self.average)} if self.average else None)

    # -- evaluation and the best model ---------------------------------------------------------------

    def _evaluate_and_track(self) -> None:
        """Evaluate, keep the best model on disk, count the evaluations without improvement."""
        accelerator, state, name = self.accelerator, self.state, self.task.metric_for_best_model
        self._stop_if_loss_was_not_finite()
        if self.eval_dl is None:  # no validation data: nothing to evaluate or track
            return
        metrics = self.task.evaluate(accelerator, self.model, self.eval_dl)
        self.model.train()
        step = state["completed_steps"]
        # Epochs done, counted from the steps: the run's last evaluation comes after its last step, which
        # stops the loop before the epoch counter moves on (so counting epochs would repeat the one before).
        epoch = round(step / self.steps_per_epoch, 3) if self.steps_per_epoch else state["epoch"]
        state["history"].append({"step": step, "epoch": epoch, **metrics})
        logger.info("eval at step %d: %s", step, ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
        if self.tracking:
            accelerator.log({f"eval/{k}": v for k, v in metrics.items()}, step=step)
        if name is None:
            return
        if name not in metrics:
            raise UserInputError(f"--metric_for_best_model {name!r} is not computed; choose one of {', '.join(metrics)}.")
        if _is_better(metrics[name], state["best_metric"], self.task.greater_is_better):
            state.update(best_metric=metrics[name], best_step=step, evals_without_improvement=0)
            if self.restore_best:
                self._save_best()
            return
        state["evals_without_improvement"] += 1
        patience = self.task.early_stopping_patience
        if patience and state["evals_without_improvement"] == patience:
            logger.info("Early stopping: %s did not improve for %d evaluations (best %.4f at step %d).", name,
                        patience, state["best_metric"], state["best_step"])

    def _save_best(self) -> None:
        # Every rank takes part: FSDP gathers the shards; only the main process writes.
        state_dict = engines.gather_state_dict(self.accelerator, self.model)
        if self.accelerator.is_main_process:
            self.best_file.parent.mkdir(parents=True, exist_ok=True)
            # Cloned: tied weights (an MLM decoder and its embeddings) would otherwise share storage.
            safetensors.torch.save_file({k: v.detach().cpu().clone().contiguous() for k, v in state_dict.items()},
                                        str(self.best_file))
        self.accelerator.wait_for_everyone()

    def _restore_best(self) -> None:
        """Every rank loads the best weights, so later evaluation (the test split) agrees everywhere."""
        state = self.state
        if not (self.restore_best and self.task.metric_for_best_model) or state["best_step"] in (
                None, state["completed_steps"]):
            return
        self.accelerator.wait_for_everyone()
        engines.load_full_state_dict(self.accelerator, self.model, safetensors.torch.load_file(str(self.best_file)))
        logger.info("Restored the best model (%s=%.4f at step %d).", self.task.metric_for_best_model,
                    state["best_metric"], state["best_step"])

    # -- bookkeeping ---------------------------------------------------------------------------------

    def _log_summary(self) -> None:
        cfg, task, accelerator = self.cfg, self.task, self.accelerator
        trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in self.model.parameters())
        summary = {
            "processes": accelerator.num_processes,
            "machines": engines.machines(accelerator),
            "engine": str(accelerator.distributed_type).split(".")[-1],
            "device": str(accelerator.device),
            "mixed_precision": accelerator.mixed_precision,
            "per-device batch": cfg.per_device_train_batch_size,
            "gradient accumulation": cfg.gradient_accumulation_steps,
            "global batch": self.global_batch,
            "optimizer steps": self.max_steps,
            "epochs": self.num_epochs if self.steps_per_epoch else "streaming",
            "training examples": len(task.train_dataset) if hasattr(task.train_dataset, "__len__") else "streaming",
            "batches": "grouped by length" if self.grouped else "random",
            "parameters": f"{trainable:,} trainable of {total:,}" + (" (this rank's shard)" if
                                                                     engines.uses_fsdp(accelerator) else ""),
            **task.summary,
        }
        logger.info("***** Running training *****\n%s", "\n".join(f"  {k:>22}: {v}" for k, v in summary.items()))
        if self.tracking and not accelerator.trackers:  # a recipe's later runs log to the trackers of its first
            flat = {k: v for k, v in config_to_dict(cfg).items() if isinstance(v, (int, float, str, bool))}
            accelerator.init_trackers("tlnlp", config=flat)

    def _resume_if_asked(self) -> None:
        cfg = self.cfg
        if not cfg.resume_from_checkpoint or not self.keeps_checkpoints:
            return
        path = latest_checkpoint(self.output_dir) if cfg.resume_from_checkpoint == "latest" else Path(
            cfg.resume_from_checkpoint)
        load_checkpoint(self.accelerator, path)
        saved = json.loads((path / STATE_FILE).read_text())
        self.state.update(saved)
        if self.average_from is not None and self.state["completed_steps"] > self.average_from:
            average_file = path / AVERAGE_STATE.format(rank=self.accelerator.process_index)
            if "averaged_steps" not in saved or not average_file.exists():
                raise UserInputError(f"{path} holds no weight average ({average_file.name}), though its step "
                                     f"{self.state['completed_steps']} is inside the --average_last_epochs window: it "
                                     "was written without --average_last_epochs or with other launch settings. "
                                     "Resume with the settings it was written with, or start afresh.")
            average = safetensors.torch.load_file(str(average_file), device=str(self.accelerator.device))
            self.average = [average[str(i)] for i in range(len(self.averaged_params))]
        if self.streamed:
            stream_file = path / STREAM_STATE.format(rank=self.accelerator.process_index)
            if not stream_file.exists():
                raise UserInputError(f"{path} holds no stream position for process {self.accelerator.process_index} "
                                     f"({stream_file.name}): it was not written by a --streaming run with as many "
                                     "processes. Resume with the same launch settings, or start afresh.")
            self.train_dl.load_state_dict(json.loads(stream_file.read_text()))
        logger.info("Resumed from %s at optimizer step %d (epoch %d, batch %d)", path, self.state["completed_steps"],
                    self.state["epoch"], self.state["batches_in_epoch"])

    def _reset_window(self) -> None:
        self.window = {"loss": torch.zeros((), device=self.accelerator.device), "micro": 0, "units": 0,
                       "time": time.time(), "data_wait": 0.0}

    def _log_window(self) -> None:
        """Average the loss and sum the throughput over the window, across processes (every rank calls this)."""
        accelerator, state, window = self.accelerator, self.state, self.window
        self._stop_if_loss_was_not_finite()
        stats = torch.stack([window["loss"], torch.tensor(float(window["micro"]), device=accelerator.device),
                             torch.tensor(float(window["units"]), device=accelerator.device)])
        stats = accelerator.reduce(stats, "sum")
        loss = (stats[0] / stats[1].clamp(min=1)).item()
        units = int(stats[2].item())
        elapsed = time.time() - window["time"]
        state["units_seen"] += units
        state["train_loss_sum"] += stats[0].item()
        state["train_loss_count"] += int(stats[1].item())
        lr = self.scheduler.get_last_lr()[0]
        unit = self.task.count_unit
        self.progress.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}")
        logger.info("step %d: loss %.4f, lr %.3e, %.0f %s/s, waited %.1f%% for data", state["completed_steps"], loss,
                    lr, units / elapsed, unit, 100 * window["data_wait"] / max(elapsed, 1e-9))
        if self.tracking:
            accelerator.log({"train/loss": loss, "train/lr": lr, f"train/{unit}_per_s": units / elapsed},
                            step=state["completed_steps"])
        self.data_wait_seconds += window["data_wait"]
        self._reset_window()

    def _results(self) -> dict[str, Any]:
        state = self.state
        kept = state["best_step"] if self.restore_best and state["best_step"] else state["completed_steps"]
        final = next((h for h in reversed(state["history"]) if h["step"] == kept), {})  # {}: nothing evaluated
        runtime = time.time() - self.start_time
        unit = self.task.count_unit
        results = {
            "train_loss": state["train_loss_sum"] / max(state["train_loss_count"], 1),
            **{f"eval_{k}": v for k, v in final.items() if k not in ("step", "epoch", "averaged_steps")},
            "optimizer_steps": state["completed_steps"],
            "epochs": round(state["completed_steps"] / self.steps_per_epoch, 3) if self.steps_per_epoch else None,
            f"train_{unit}": state["units_seen"],
            "train_runtime_s": runtime,
            f"train_{unit}_per_s": state["units_seen"] / runtime,
            "num_processes": self.accelerator.num_processes,
            "mixed_precision": self.accelerator.mixed_precision,
            "global_batch_size": self.global_batch,
            "best_step": state["best_step"],
            **({"averaged_steps": state["averaged_steps"]} if self.average is not None else {}),
            "time_to_first_step_s": self.first_step_seconds,
            "data_wait_s": self.data_wait_seconds,
            **device_figures(self.accelerator.device, self.cfg.torch_compile),
        }
        state["results"] = results
        return results

    def _save_final(self) -> None:
        """The model the run ends with (the best one, if tracked), saved by the main process from the full
        state dict that every rank helps gather."""
        state_dict = engines.gather_state_dict(self.accelerator, self.model)
        if self.accelerator.is_main_process:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            if self.task.save is not None:
                self.task.save(engines.unwrap(self.accelerator, self.model), self.output_dir, state_dict)
            (self.output_dir / EVAL_HISTORY_FILE).write_text(json.dumps(self.state["history"], indent=2))
        self.accelerator.wait_for_everyone()


def device_figures(device: torch.device, compiled: bool) -> dict[str, Any]:
    """This process's peak GPU memory, and with torch.compile what the compiler did in the real run: graph
    breaks (each splits the model into more graphs) and the graphs compiled (more than the frames means
    recompiles: new shapes or modes)."""
    figures: dict[str, Any] = {}
    if device.type == "cuda":
        figures["peak_memory_allocated_gb"] = torch.cuda.max_memory_allocated(device) / 1e9
        figures["peak_memory_reserved_gb"] = torch.cuda.max_memory_reserved(device) / 1e9
    if compiled:
        from torch._dynamo.utils import counters

        # Newer torch counts graph breaks under "unimplemented", older under "graph_break".
        breaks = counters.get("graph_break") or counters.get("unimplemented") or {}
        figures["compile_graph_breaks"] = sum(breaks.values())
        figures["compile_graph_break_reasons"] = [reason.splitlines()[0][:160] for reason in breaks][:5]
        figures["compile_frames"] = counters["frames"].get("total", 0)
        figures["compile_unique_graphs"] = counters["stats"].get("unique_graphs", 0)
    return figures


def train(cfg: TrainingConfig, task: Task, accelerator: Accelerator, output_dir: Path | None = None,
          checkpoints: bool = True) -> tuple[dict[str, Any], nn.Module]:
    """Train `task.model` as configured, into `output_dir` (default --output_dir); return the results and
    the prepared model, ready for evaluation on every rank. `checkpoints` False: a throwaway run."""
    trainer = Trainer(cfg, task, accelerator, Path(output_dir or cfg.output_dir), checkpoints)
    return trainer.fit(), trainer.model
