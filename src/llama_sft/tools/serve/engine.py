"""The batching engine of ``llama-sft serve``: one thread decodes every running request together."""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
from dataclasses import dataclass, field

import torch

from ...data.tokenizer import TextTokenizer

# The package's name, so that the server's log lines carry one logger name whichever module writes them.
logger = logging.getLogger(__package__)


# Below this a temperature divides the logits past float32's range (inf, then NaN probabilities): it
# decodes greedily, as temperature 0 does (vLLM draws the same line).
GREEDY_BELOW = 1e-5


@dataclass
class Sampling:
    """One request's generation settings; temperature 0 (or below GREEDY_BELOW) decodes greedily."""

    max_tokens: int
    temperature: float
    top_p: float
    top_k: int
    repetition_penalty: float
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    min_tokens: int = 0

    @property
    def sampled(self) -> bool:
        return self.temperature >= GREEDY_BELOW

    def processors(self):
        from transformers import (
            RepetitionPenaltyLogitsProcessor,
            TemperatureLogitsWarper,
            TopKLogitsWarper,
            TopPLogitsWarper,
        )

        # The order and classes of generate(), so that greedy decoding matches chat's.
        chain = []
        if self.repetition_penalty != 1.0:
            chain.append(RepetitionPenaltyLogitsProcessor(self.repetition_penalty))
        if self.sampled:
            chain.append(TemperatureLogitsWarper(self.temperature))
            if self.top_k > 0:
                chain.append(TopKLogitsWarper(self.top_k))
            if self.top_p < 1.0:
                chain.append(TopPLogitsWarper(self.top_p))
        return chain


class Job:
    """A request in the batch: its prompt, settings, generated ids, and the queue its events go to.

    The answer ends at any of ``stop_ids`` (``Template.stop_ids``: EOS and the template's
    end-of-turn id; EOS alone when not given), which is not part of it. Events put on ``events``
    (from the engine thread, through the event loop): ``("text", piece)``, ``("done",
    finish_reason)``, ``("error", message)``.
    """

    def __init__(
        self,
        prompt: list[int],
        sampling: Sampling,
        tokenizer: TextTokenizer,
        device: torch.device,
        stop_ids: list[int] | None = None,
    ):
        self.prompt, self.sampling, self.tokenizer = prompt, sampling, tokenizer
        self.stop_ids = list(stop_ids or [tokenizer.eos_id])
        self.outbox: list[tuple] = []
        self.generated: list[int] = []
        self.finished = False
        self.cancelled = False
        self.loop = asyncio.get_running_loop()
        self.events: asyncio.Queue = asyncio.Queue()
        self.sent = ""
        self.chain = sampling.processors()
        self.generator = None
        if sampling.sampled:
            self.generator = torch.Generator(device)
            if sampling.seed is None:
                self.generator.seed()
            else:
                self.generator.manual_seed(sampling.seed)

    def cancel(self) -> None:
        self.cancelled = True

    def _put(self, *event) -> None:
        self.outbox.append(event)

    def _deliver(self, events: list[tuple]) -> None:
        for event in events:
            self.events.put_nowait(event)

    def fail(self, message: str) -> None:
        self.finished = True
        self._put("error", message)

    def pick(self, logits: torch.Tensor) -> int:
        """Choose the next token from this row's logits (1, vocab), emit its text, maybe finish."""
        if len(self.generated) < self.sampling.min_tokens:
            logits[:, self.stop_ids] = float("-inf")
        scores, ids = logits, torch.tensor([self.prompt + self.generated], device=logits.device)
        for processor in self.chain:
            scores = processor(ids, scores)
        if self.generator is None:
            token = int(scores.argmax(-1))
        else:
            probs = torch.softmax(scores, dim=-1)
            token = int(torch.multinomial(probs, 1, generator=self.generator))
        self._accept(token)
        return token

    def _accept(self, token: int) -> None:
        if token in self.stop_ids:
            return self._finish(self.tokenizer.decode(self.generated), "stop")
        self.generated.append(token)
        text = self.tokenizer.decode(self.generated)
        cuts = [text.find(stop) for stop in self.sampling.stop if stop in text]
        if cuts:
            return self._finish(text[: min(cuts)], "stop")
        if len(self.generated) >= self.sampling.max_tokens:
            return self._finish(text, "length")
        # Hold back a character still missing bytes (U+FFFD) and a tail that may begin a stop string.
        safe = len(text.rstrip("\ufffd"))
        for stop in self.sampling.stop:
            for size in range(min(len(stop) - 1, safe), 0, -1):
                if text[safe - size : safe] == stop[:size]:
                    safe = min(safe, len(text) - size)
                    break
        self._send(text[:safe])

    def _send(self, text: str) -> None:
        if len(text) > len(self.sent) and text.startswith(self.sent):
            self._put("text", text[len(self.sent) :])
            self.sent = text

    def _finish(self, text: str, reason: str) -> None:
        self._send(text)
        self.finished = True
        self._put("done", reason)


class Engine:
    """Runs every request's decoding in one batch on one thread (see the package docstring)."""

    def __init__(self, model, tokenizer: TextTokenizer, max_batch_size: int):
        self.model, self.tokenizer, self.max_batch_size = model, tokenizer, max_batch_size
        self.device = next(model.parameters()).device
        self.waiting: collections.deque[Job] = collections.deque()
        self.running: list[Job] = []
        self.cache = None
        self.mask: torch.Tensor | None = None  # (rows, cached length): 1 for a real token, 0 for padding
        self.pending: list[int] = []  # each row's token chosen last step, not yet in the cache
        self.touched: list[Job] = []  # the jobs of this step, whose events go out after it
        self.peak_running = 0
        self.wake = threading.Condition()
        self.stopped = False
        self.thread = threading.Thread(target=self._run, name="llama-sft-engine", daemon=True)
        self.thread.start()

    def submit(self, job: Job) -> None:
        with self.wake:
            self.waiting.append(job)
            self.wake.notify()

    def stats(self) -> dict:
        return {"running": len(self.running), "waiting": len(self.waiting)}

    def close(self) -> None:
        with self.wake:
            self.stopped = True
            self.wake.notify()
        self.thread.join(timeout=10)

    def _run(self) -> None:
        while True:
            with self.wake:
                self.wake.wait_for(lambda: self.stopped or self.waiting or self.running)
                if self.stopped:
                    return
            self.touched = list(self.running)
            try:
                with torch.inference_mode():
                    self._step()
            except Exception as exc:  # a failed forward must not leave requests waiting forever
                logger.exception("generation failed")
                with self.wake:
                    self.touched += self.waiting
                    self.waiting.clear()
                for job in self.touched:
                    job.fail(f"generation failed: {exc}")
                self._keep([])
            self._flush(self.touched)

    @staticmethod
    def _flush(jobs: list[Job]) -> None:
        """Hand each job's new events to its event loop: one wake-up per loop and step, not per token."""
        by_loop: dict = {}
        for job in jobs:
            if job.outbox:
                by_loop.setdefault(job.loop, []).append((job, job.outbox))
                job.outbox = []
        for loop, batch in by_loop.items():
            try:
                loop.call_soon_threadsafe(lambda batch=batch: [job._deliver(events) for job, events in batch])
            except RuntimeError:  # the event loop is closed: the server is shutting down
                for job, _ in batch:
                    job.cancelled = True

    def _step(self) -> None:
        self._keep([row for row, job in enumerate(self.running) if not (job.finished or job.cancelled)])
        while self.waiting and len(self.running) < self.max_batch_size:
            with self.wake:
                job = self.waiting.popleft()
            if not job.cancelled:
                self._admit(job)
        if self.running:
            self._decode()

    def _keep(self, rows: list[int]) -> None:
        """Drop every row not in ``rows``, then the padding columns no remaining row needs."""
        if len(rows) == len(self.running):
            return
        self.running = [self.running[row] for row in rows]
        self.pending = [self.pending[row] for row in rows]
        if not rows:
            self.cache, self.mask = None, None
            return
        index = torch.tensor(rows, device=self.device)
        self.cache.batch_select_indices(index)
        self.mask = self.mask[index]
        first = int(self.mask.any(0).int().argmax())
        if first:
            self.mask = self.mask[:, first:]
            for layer in self.cache.layers:
                layer.keys, layer.values = layer.keys[:, :, first:], layer.values[:, :, first:]

    def _admit(self, job: Job) -> None:
        from transformers import DynamicCache

        self.touched.append(job)
        cache = DynamicCache(config=self.model.config)
        # Prefilled alone, as generate() does for one prompt: a batch-of-one answer is chat's answer.
        output = self.model(
            input_ids=torch.tensor([job.prompt], device=self.device),
            cache=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        token = job.pick(output.logits[:, -1].float())
        if job.finished:
            return
        mask = torch.ones(1, len(job.prompt), dtype=torch.long, device=self.device)
        if self.cache is None:
            self.cache, self.mask = cache, mask
        else:
            width = max(self.mask.shape[1], mask.shape[1])
            for mine, theirs in zip(self.cache.layers, cache.layers, strict=True):
                mine.keys = torch.cat([_pad_left(mine.keys, width, 2), _pad_left(theirs.keys, width, 2)])
                mine.values = torch.cat(
                    [_pad_left(mine.values, width, 2), _pad_left(theirs.values, width, 2)]
                )
            self.mask = torch.cat([_pad_left(self.mask, width, 1), _pad_left(mask, width, 1)])
        self.running.append(job)
        self.pending.append(token)
        self.peak_running = max(self.peak_running, len(self.running))

    def _decode(self) -> None:
        mask = torch.cat([self.mask, self.mask.new_ones(len(self.running), 1)], dim=1)
        output = self.model(
            input_ids=torch.tensor(self.pending, device=self.device)[:, None],
            attention_mask=mask,
            # Each row's own position: the count of its real tokens, whatever padding precedes them.
            position_ids=self.mask.sum(1, keepdim=True),
            cache=self.cache,
            use_cache=True,
        )
        self.mask = mask
        logits = output.logits[:, -1].float()
        for row, job in enumerate(self.running):
            if not (job.finished or job.cancelled):
                self.pending[row] = job.pick(logits[row : row + 1])


def _pad_left(tensor: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    missing = width - tensor.shape[dim]
    if missing == 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)
