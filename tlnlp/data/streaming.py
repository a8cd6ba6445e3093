"""Streamed pretraining data, split over processes and loader workers, resumable without redoing work.

Document i of the stream (counted from its start, the validation head included but never used) belongs to
slot (i - held_out) mod S, with S = processes x loader workers; each slot tokenizes and packs only its own
documents, so every document is tokenized exactly once in the whole job. The stream repeats endlessly,
pass after pass, so every process yields as many batches as it is asked for: none runs out while the others
are still inside a training collective (which would hang them).

A slot's position is a small JSON-able state: the pass, the source's own position (datasets'
`IterableDataset.state_dict()`) just before its current group of documents, and how many blocks of that
group were handed out. torchdata's StatefulDataLoader gathers it from every worker; a resume re-tokenizes at
most that one group (`GROUP_DOCS` documents) instead of replaying every batch before the checkpoint.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from typing import Any

import torch
from datasets import IterableDataset as HfIterableDataset
from torch.utils.data import get_worker_info
from torchdata.stateful_dataloader import StatefulDataLoader

GROUP_DOCS = 256  # documents a slot tokenizes at once (about): a batch for the fast tokenizer, the most a resume redoes


class ShardedStream(torch.utils.data.IterableDataset):
    """One process's training stream: its slots' documents, turned into rows by `prepare` a group at a time."""

    def __init__(self, source: HfIterableDataset, prepare: Callable[[list[str]], dict[str, list]], text_column: str,
                 *, rank: int, world_size: int, held_out: int, group_docs: int | None = None):
        self.source, self.prepare, self.text_column = source, prepare, text_column
        self.rank, self.world_size, self.held_out = rank, world_size, held_out
        self.group_docs = group_docs or GROUP_DOCS
        self._state = self._pass_start(0)

    @staticmethod
    def _pass_start(pass_number: int) -> dict[str, Any]:
        return {"pass": pass_number, "source": None, "index": 0, "emitted": 0}

    # torchdata's Stateful protocol, called in the worker process that iterates this copy.
    def state_dict(self) -> dict[str, Any]:
        return copy.deepcopy(self._state)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._state = copy.deepcopy(state)

    def _slot(self) -> tuple[int, int]:
        worker = get_worker_info()
        workers, worker_id = (worker.num_workers, worker.id) if worker else (1, 0)
        return self.rank * workers + worker_id, self.world_size * workers

    def __iter__(self) -> Iterator[dict[str, list]]:
        slot, slots = self._slot()
        while True:  # one pass over the source per turn
            from_start = self._state["source"] is None
            source = copy.deepcopy(self.source)
            if not from_start:
                source.load_state_dict(self._state["source"])
            # `iter(batch_size=...)`, not `iter(source)`: inside a loader worker datasets would split the source
            # by worker itself (by shard: one file is one shard, so all but one worker would idle).
            index, produced = self._state["index"], False
            for raw in source.iter(batch_size=self.group_docs * slots):
                texts = [text if isinstance(text, str) else "" for j, text in enumerate(raw[self.text_column])
                         if index + j >= self.held_out and (index + j - self.held_out) % slots == slot]
                index += len(raw[self.text_column])
                if texts:
                    group = self.prepare(texts)
                    count = len(next(iter(group.values())))
                    for i in range(self._state["emitted"], count):
                        self._state["emitted"] = i + 1
                        produced = True
                        yield {name: values[i] for name, values in group.items()}
                self._state.update(source=source.state_dict(), index=index, emitted=0)  # the next group starts here
            if from_start and not produced:
                raise ValueError(
                    f"Stream slot {slot} of {slots} received no document in a whole pass: the corpus needs more than "
                    f"{self.held_out} documents (held out for validation) plus one per process and loader worker."
                )
            self._state = self._pass_start(self._state["pass"] + 1)


def stream_loader(stream: ShardedStream, batch_size: int, collate_fn: Callable, num_workers: int,
                  pin_memory: bool) -> StatefulDataLoader:
    """A loader whose `state_dict()` holds every worker's stream position (saved with each checkpoint)."""
    return StatefulDataLoader(stream, batch_size=batch_size, collate_fn=collate_fn, num_workers=num_workers,
                              pin_memory=pin_memory, persistent_workers=num_workers > 0,
                              # Its own generator: starting an iterator then draws nothing from the global RNG,
                              # which a resume restores and MLM masking draws from.
                              generator=torch.Generator().manual_seed(0))
