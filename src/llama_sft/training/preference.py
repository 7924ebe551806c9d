"""Preference training (``llama-sft dpo``): DPO, IPO, ORPO and SimPO on chosen/rejected pairs.

Contract:
- ``preference_loss(options, policy, reference)`` is the loss as plain tensor arithmetic on
  per-sequence log-probabilities (``SequenceLogps``: summed answer-token log-probs and answer
  token counts, chosen rows then rejected rows): per-pair losses and the chosen and rejected
  rewards, the same formulas as TRL's ``DPOTrainer`` (sigmoid, ipo), ``ORPOTrainer`` and
  ``CPOTrainer`` (``loss_type="simpo"``, ``cpo_alpha=0``). ``sigmoid`` with ``--label_smoothing``
  is conservative DPO: the label is taken as flipped with that probability.
- ``sequence_logps(model, batch, head)`` runs the model on a batch of ``collate_pairs`` (padded
  rows, or one packed row with ``position_ids``) and returns the ``SequenceLogps`` of its rows.
  The vocabulary projection runs only at labelled positions; with ``head`` (the output projection
  the speed-ups fused with the SFT loss) it and the log-softmax are one autograd function that
  keeps no (tokens, vocabulary) tensor between forward and backward (``HeadLogProbs``).
- The reference is the model as training starts (the base with the ``--peft_path`` LoRA, or a
  merged model): ``attach_reference`` scores every pair once with it, before the first update, and
  the scores ride along in the batches. No second copy of the weights is kept and no adapter is
  switched per step; a resumed run scores again from the same starting model, so it gets the same
  numbers. ``orpo`` and ``simpo`` need no reference and skip the pass.
- ``PreferenceTrainer`` is the run's trainer for the ``dpo`` task. It logs TRL's metric names
  (``rewards/chosen``, ``rewards/rejected``, ``rewards/accuracies``, ``rewards/margins``,
  ``logps/chosen``, ``logps/rejected``; ``nll_loss``, the SFT term, where there is one; ``eval_``
  before each in evaluation) beside ``loss``.
"""

from __future__ import annotations

import logging
import math
from collections import defaultdict
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..data.encode import IGNORE_INDEX
from ..data.preference import collate_pairs
from ..options import ArgumentError
from .args import zero_stage
from .trainer import SftTrainer

logger = logging.getLogger("llama_sft")

LOSSES = ("sigmoid", "ipo", "orpo", "simpo")
# Losses scored without a reference model.
REFERENCE_FREE = frozenset({"orpo", "simpo"})
# Losses whose policy log-probs are per-token averages (ORPO's and SimPO's papers), not sums.
AVERAGED = frozenset({"orpo", "simpo"})
# Defaults where the flag is not given: TRL's (DPOConfig beta, CPOConfig simpo_gamma).
DEFAULTS = {
    "pref_loss": "sigmoid",
    "pref_beta": 0.1,
    "simpo_gamma": 0.5,
    "label_smoothing": 0.0,
    "pref_ftx": 0.0,
}
FLAGS = tuple(DEFAULTS)


@dataclass
class PreferenceOptions:
    loss: str = "sigmoid"
    beta: float = 0.1
    simpo_gamma: float = 0.5
    label_smoothing: float = 0.0
    ftx: float = 0.0

    @property
    def needs_reference(self) -> bool:
        return self.loss not in REFERENCE_FREE


def preference_options(training) -> PreferenceOptions:
    """The --pref_* flags of a ``dpo`` run, defaults filled in and ranges checked."""
    values = {name: getattr(training, name) for name in FLAGS}
    values = {name: DEFAULTS[name] if value is None else value for name, value in values.items()}
    if values["pref_loss"] not in LOSSES:
        raise ArgumentError(f"--pref_loss {values['pref_loss']}: choose one of {', '.join(LOSSES)}")
    if not (math.isfinite(values["pref_beta"]) and values["pref_beta"] > 0):
        raise ArgumentError(f"--pref_beta {values['pref_beta']}: must be above 0 (0.1 is usual)")
    if not 0 <= values["label_smoothing"] < 0.5:
        raise ArgumentError(
            f"--label_smoothing {values['label_smoothing']}: give a probability from 0 to below 0.5 (0 is usual)"
        )
    if not (math.isfinite(values["pref_ftx"]) and values["pref_ftx"] >= 0):
        raise ArgumentError(f"--pref_ftx {values['pref_ftx']}: must be 0 or more (0 to 1 is usual)")
    if not math.isfinite(values["simpo_gamma"]):
        raise ArgumentError(f"--simpo_gamma {values['simpo_gamma']}: must be a finite number (0.5 is usual)")
    return PreferenceOptions(
        values["pref_loss"],
        values["pref_beta"],
        values["simpo_gamma"],
        values["label_smoothing"],
        values["pref_ftx"],
    )


def check_preference_flags(args, task: str) -> None:
    """The preference flags belong to ``dpo``; elsewhere they would silently change nothing, and
    ``dpo`` cannot split a pair across passes."""
    if task != "dpo":
        given = [name for name in FLAGS if getattr(args.training, name) is not None]
        if given:
            raise ArgumentError(
                f"--{given[0]} is for preference training (llama-sft dpo, run_dpo.sh); drop it from this run"
            )
        return
    options = preference_options(args.training)
    if options.needs_reference and zero_stage(args.training.deepspeed) == 3:
        raise ArgumentError(
            f"--pref_loss {options.loss} with ZeRO-3: the reference pass runs before DeepSpeed gathers the "
            "sharded weights; use a ZeRO-2 config (scripts/training/ds_zero2_no_offload.json), or --pref_loss "
            "orpo or simpo, which need no reference"
        )
    if args.training.max_tokens_per_pass is not None:
        raise ArgumentError(
            "--max_tokens_per_pass: preference training scores each pair's chosen and rejected answers in one "
            "pass; lower --per_device_train_batch_size instead"
        )


# --- the loss, on per-sequence log-probabilities ---------------------------------------------


@dataclass
class SequenceLogps:
    """Per-sequence answer log-probs (summed over answer tokens, float32) and answer token counts,
    the chosen rows first, then the rejected ones."""

    sums: torch.Tensor
    counts: torch.Tensor

    def halves(self, averaged: bool) -> tuple[torch.Tensor, torch.Tensor]:
        values = self.sums / self.counts.clamp_min(1) if averaged else self.sums
        return values.chunk(2)


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, each branch where it loses no precision."""
    return torch.where(x < -math.log(2), torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def smoothed_sigmoid_loss(logits: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    return -F.logsigmoid(logits) * (1 - label_smoothing) - F.logsigmoid(-logits) * label_smoothing


def preference_loss(
    options: PreferenceOptions, policy: SequenceLogps, reference: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss per pair, chosen rewards, rejected rewards). ``reference``: the reference model's
    summed log-probs of the same rows (None for a reference-free loss)."""
    beta = options.beta
    if options.loss in REFERENCE_FREE:
        chosen, rejected = policy.halves(averaged=True)
        if options.loss == "orpo":
            log_odds = (chosen - rejected) - (log1mexp(chosen) - log1mexp(rejected))
            losses = -beta * F.logsigmoid(log_odds)
        else:
            margin = chosen - rejected - options.simpo_gamma / beta
            losses = smoothed_sigmoid_loss(beta * margin, options.label_smoothing)
        return losses, beta * chosen.detach(), beta * rejected.detach()
    ratios = policy.sums - reference
    chosen_ratio, rejected_ratio = ratios.chunk(2)
    if options.loss == "ipo":
        # IPO compares per-token log-ratios (as TRL does), so beta does not depend on answer length.
        chosen_count, rejected_count = policy.counts.clamp_min(1).chunk(2)
        delta = chosen_ratio / chosen_count - rejected_ratio / rejected_count
        losses = (delta - 1 / (2 * beta)) ** 2
    else:
        losses = smoothed_sigmoid_loss(beta * (chosen_ratio - rejected_ratio), options.label_smoothing)
    return losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


def chosen_nll(policy: SequenceLogps) -> torch.Tensor:
    """Mean cross-entropy over every chosen answer token of the batch: ORPO's SFT term and
    --pref_ftx's."""
    sums, _ = policy.sums.chunk(2)
    counts, _ = policy.counts.chunk(2)
    return -sums.sum() / counts.sum().clamp_min(1)


def total_loss(options: PreferenceOptions, policy: SequenceLogps, reference: torch.Tensor | None):
    """(the batch's loss, per-pair losses, chosen rewards, rejected rewards, the SFT term or None)."""
    losses, chosen_rewards, rejected_rewards = preference_loss(options, policy, reference)
    loss, nll = losses.mean(), None
    sft_weight = options.ftx + (1.0 if options.loss == "orpo" else 0.0)
    if sft_weight:
        nll = chosen_nll(policy)
        loss = loss + sft_weight * nll
    return loss, losses, chosen_rewards, rejected_rewards, nll


# --- per-sequence log-probabilities --------------------------------------------------------------

# Float32 logits made at a time (rows x vocabulary): 2**24 values are 64 MiB, whatever the vocabulary.
LOGIT_CHUNK_VALUES = 2**24


def chunk_rows(vocab: int) -> int:
    return max(1, LOGIT_CHUNK_VALUES // vocab)


class HeadLogProbs(torch.autograd.Function):
    """log softmax(hidden @ weight.T)[target] per row, in chunks of rows.

    The forward keeps only each row's log-sum-exp; the backward makes each chunk's logits again
    and turns them into gradients at once. Preference losses weight each sequence's tokens by a
    factor known only after both answers are scored, so the SFT head's trick of making the
    gradient in the forward does not apply; one more head product is cheaper than keeping
    (tokens, vocabulary) float32 values from forward to backward.
    """

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        dtype = (
            torch.get_autocast_dtype(hidden.device.type)
            if torch.is_autocast_enabled(hidden.device.type)
            else hidden.dtype
        )
        with torch.autocast(hidden.device.type, enabled=False):
            low = weight.to(dtype)
            out = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
            lse = torch.empty_like(out)
            rows = chunk_rows(weight.shape[0])
            for start in range(0, hidden.shape[0], rows):
                logits = (hidden[start : start + rows].to(dtype) @ low.t()).float()
                lse[start : start + rows] = torch.logsumexp(logits, dim=-1)
                picked = logits.gather(1, targets[start : start + rows, None]).squeeze(1)
                out[start : start + rows] = picked - lse[start : start + rows]
        ctx.dtype = dtype
        ctx.save_for_backward(hidden, weight, targets, lse)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
        hidden, weight, targets, lse = ctx.saved_tensors
        need_hidden, need_weight = ctx.needs_input_grad[:2]
        dtype = ctx.dtype
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if need_weight else None
        with torch.autocast(hidden.device.type, enabled=False):
            low = weight.to(dtype)
            rows = chunk_rows(weight.shape[0])
            for start in range(0, hidden.shape[0], rows):
                block = hidden[start : start + rows].to(dtype)
                logits = (block @ low.t()).float()
                # d logp / d logits = one_hot(target) - softmax: scaled by each row's upstream gradient.
                grad = torch.exp_(logits.sub_(lse[start : start + rows, None]))
                grad.mul_(-grad_out[start : start + rows, None])
                grad.scatter_add_(
                    1, targets[start : start + rows, None], grad_out[start : start + rows, None]
                )
                grad = grad.to(dtype)
                if need_hidden:
                    grad_hidden[start : start + rows] = (grad @ low).to(hidden.dtype)
                if need_weight:
                    grad_weight.addmm_(grad.t().float(), block.float())
        return grad_hidden, None if grad_weight is None else grad_weight.to(weight.dtype), None


def logits_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[target] per row, a chunk of rows upcast to float32 at a time."""
    rows = chunk_rows(logits.shape[-1])
    return torch.cat(
        [
            chunk.float().log_softmax(-1).gather(1, target[:, None]).squeeze(1)
            for chunk, target in zip(logits.split(rows), targets.split(rows), strict=True)
        ]
    )


def sequence_index(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """(rows, length) index of the sequence each position belongs to: the row in a padded batch,
    the record in a packed row (``position_ids`` restart at 0 at each)."""
    input_ids = batch["input_ids"]
    if "position_ids" in batch and input_ids.shape[0] == 1:
        return (batch["position_ids"] == 0).long().cumsum(-1) - 1
    rows = torch.arange(input_ids.shape[0], device=input_ids.device)
    return rows[:, None].expand_as(input_ids)


def sequence_logps(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], head: torch.nn.Linear | None = None
) -> SequenceLogps:
    """Summed answer-token log-probs of each sequence of ``batch`` (see the module's contract)."""
    labels = batch["labels"]
    inputs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "position_ids")}
    targets = labels[:, 1:]
    owners = sequence_index(batch)[:, 1:]
    sequences = int(owners.max()) + 1
    keep = (targets != IGNORE_INDEX).any(dim=0).nonzero().squeeze(-1)
    picked, owners = targets[:, keep], owners[:, keep]
    valid = picked != IGNORE_INDEX
    if head is None:
        outputs = model(**inputs, logits_to_keep=keep, use_cache=False)
        token_logps = logits_logprobs(outputs.logits[valid], picked[valid])
    else:
        # The model stops at its last hidden state; the head projects only the labelled positions.
        outputs = model(**inputs, logits_to_keep=keep[:0], output_hidden_states=True, use_cache=False)
        hidden = outputs.hidden_states[-1][:, keep][valid]
        token_logps = HeadLogProbs.apply(hidden, head.weight, picked[valid])
    index = owners[valid]
    sums = torch.zeros(sequences, dtype=torch.float32, device=labels.device).index_add(0, index, token_logps)
    counts = torch.zeros(sequences, dtype=torch.long, device=labels.device).index_add_(
        0, index, torch.ones_like(index)
    )
    return SequenceLogps(sums, counts)


# --- batches and the reference ------------------------------------------------------------------


class PairSet(torch.utils.data.Dataset):
    """The pairs of one split; ``reference`` (pairs, 2): the reference's summed log-probs of each
    pair's chosen and rejected answers, once ``attach_reference`` has scored them."""

    def __init__(self, pairs: list):
        self.pairs = pairs
        self.reference: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> dict:
        return {"index": index, "pair": self.pairs[index], "set": self}

    def lengths(self) -> list[int]:
        """Tokens of each pair as trained: prompt twice, both answers."""
        return [2 * len(p.prompt) + len(p.chosen) + len(p.rejected) for p in self.pairs]

    def labelled(self) -> int:
        return sum(len(p.chosen) + len(p.rejected) for p in self.pairs)


@dataclass
class PairCollator:
    """A micro-batch of pairs: ``collate_pairs``' rows (chosen, then rejected), packed into one
    padding-free row with restarting ``position_ids`` when ``packed``, and ``ref_logps`` (2B,)
    when the reference has scored the pairs."""

    pad_id: int
    packed: bool = True

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        batch = collate_pairs([e["pair"] for e in examples], self.pad_id)
        if self.packed:
            batch = pack_rows(batch)
        reference = examples[0]["set"].reference
        if reference is not None:
            rows = reference[[e["index"] for e in examples]]
            batch["ref_logps"] = torch.cat([rows[:, 0], rows[:, 1]])
        return batch


def pack_rows(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Padded rows -> one row of their real tokens, ``position_ids`` restarting at each."""
    mask = batch["attention_mask"].bool()
    lengths = mask.sum(dim=1).tolist()
    return {
        "input_ids": batch["input_ids"][mask][None],
        "labels": batch["labels"][mask][None],
        "position_ids": torch.cat([torch.arange(n) for n in lengths])[None],
    }


@torch.no_grad()
def score_pairs(trainer, dataset: PairSet, head) -> torch.Tensor:
    """(pairs, 2) summed log-probs of every pair's answers under the model as it is now, in
    evaluation mode (no dropout) and the run's autocast."""
    model = trainer.model
    device = trainer.args.device
    if next(model.parameters()).device != device:
        # Under DeepSpeed the Trainer leaves the model where it was loaded until training starts.
        model.to(device)
    was_training = model.training
    model.eval()
    collator = trainer.data_collator
    size = max(1, trainer.args.per_device_eval_batch_size)
    scores = []
    try:
        for start in range(0, len(dataset), size):
            batch = collator([dataset[i] for i in range(start, min(start + size, len(dataset)))])
            batch = {k: v.to(device) for k, v in batch.items() if k != "ref_logps"}
            with trainer.autocast_smart_context_manager():
                logps = sequence_logps(model, batch, head).sums
            chosen, rejected = logps.chunk(2)
            scores.append(torch.stack([chosen, rejected], dim=1).cpu())
    finally:
        model.train(was_training)
    return torch.cat(scores)


def attach_reference(trainer, datasets: list[PairSet | None]) -> None:
    """Score every pair with the starting model, once, before training (see the module's
    contract): the reference costs one no-grad pass instead of a second model or a second forward
    each step."""
    if not trainer.options.needs_reference:
        return
    for dataset in datasets:
        if dataset is not None and len(dataset):
            dataset.reference = score_pairs(trainer, dataset, trainer.head)
    logger.info(
        "reference log-probs: scored %d pairs with the starting model", sum(len(d or []) for d in datasets)
    )


class PreferenceTrainer(SftTrainer):
    """The trainer of a ``dpo`` run: ``compute_loss`` is the preference loss (a mean over the
    micro-batch's pairs, which the Trainer divides by the accumulation steps), and ``log`` adds
    the averaged reward metrics under TRL's names."""

    def __init__(self, *args, options: PreferenceOptions, head: torch.nn.Linear | None = None, **kwargs):
        # A batch's examples are pairs, not model inputs: the Trainer must hand them to the collator whole.
        kwargs["args"].remove_unused_columns = False
        super().__init__(*args, **kwargs)
        self.options = options
        self.head = head
        self.model_accepts_loss_kwargs = False
        self.loss_is_scaled_for_ga = False
        self.metrics = {"train": defaultdict(list), "eval": defaultdict(list)}

    def training_step(self, model, inputs, num_items_in_batch=None):
        # A pair is never split across passes: skip SftTrainer's token budget.
        return super(SftTrainer, self).training_step(model, inputs, num_items_in_batch)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        reference = inputs.get("ref_logps")
        if self.options.needs_reference and reference is None:
            raise RuntimeError("the reference log-probs are missing: attach_reference was not run")
        policy = sequence_logps(model, inputs, self.head)
        loss, _, chosen_rewards, rejected_rewards, nll = total_loss(self.options, policy, reference)
        self.record("train" if model.training else "eval", policy, chosen_rewards, rejected_rewards, nll)
        return (loss, {}) if return_outputs else loss

    def record(self, mode: str, policy: SequenceLogps, chosen_rewards, rejected_rewards, nll) -> None:
        chosen_logps, rejected_logps = policy.halves(averaged=self.options.loss in AVERAGED)
        values = {
            "rewards/chosen": chosen_rewards,
            "rewards/rejected": rejected_rewards,
            "rewards/accuracies": (chosen_rewards > rejected_rewards).float(),
            "rewards/margins": chosen_rewards - rejected_rewards,
            "logps/chosen": chosen_logps.detach(),
            "logps/rejected": rejected_logps.detach(),
        }
        if nll is not None:
            values["nll_loss"] = nll.detach()  # ORPOTrainer's name for the SFT term
        for name, value in values.items():
            self.metrics[mode][name].append(self.accelerator.gather_for_metrics(value).float().mean().item())

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    def log(self, logs: dict, start_time: float | None = None) -> None:
        # Beside each logged loss, the averages over the steps (or evaluation batches) it covers.
        for mode, prefix in (("train", ""), ("eval", "eval_")):
            if prefix + "loss" in logs:
                for name, values in self.metrics[mode].items():
                    if values:
                        logs[prefix + name] = sum(values) / len(values)
                self.metrics[mode].clear()
        super().log(logs, start_time)
