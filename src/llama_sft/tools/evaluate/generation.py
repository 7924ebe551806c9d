"""``llama-sft eval --task generate``: greedy answers to a validation file, scored against its answers.

Contract: ``run_generation(loaded, validation_file, batch_size=, max_new_tokens=, progress=)``
returns ``(results, rows)``: ``results`` the averages of ``metrics.METRICS`` over the records and
what produced them (for results.json), ``rows`` one dict per record in file order (for
predictions.jsonl): ``id`` (the record's index in the file), ``prompt``, ``reference``,
``prediction``, the record's scores, and ``hit_max_new_tokens``. The caller writes both.

The file is read as training reads it (``data.records.load_numbered``, any bad record a
``DataError`` naming the file and record). Each record's prompt is what training puts before its
last answer (``templates.prompt_ids`` over the record's earlier turns, its system prompt or the
template's) and the reference is that last answer: an Alpaca record's ``output``, a conversation's
last assistant turn. ``read_examples`` does this alone, so a caller can check the file before it
loads the weights.

Answers are greedy (``do_sample=False``), ``batch_size`` prompts at a time, left-padded, each
ending at one of the template's stop ids (``Template.stop_ids``, not part of the answer) or after
``max_new_tokens``. In float32 a batch gives each prompt the answer it gets alone; half precision
may break near-ties between logits differently. A prompt longer than the model's context leaves
room for has its beginning cut, BOS kept, as ``chat`` does.
"""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ...data.records import DataError, load_numbered
from ...data.templates import Template, prompt_ids, render_text
from ...data.tokenizer import TextTokenizer
from ...loading import Loaded
from ...options import ArgumentError
from ..chat import cut_at_stop
from .metrics import Scorer, average, require_libraries

logger = logging.getLogger(__name__)

DEFAULT_CONTEXT = 2048


@dataclass(frozen=True)
class Example:
    number: int  # the record's index in the file
    prompt: str  # the prompt as text, BOS and end-of-turn tokens written out
    prompt_ids: list[int]
    reference: str


def token_text(tokenizer: TextTokenizer, token_id: int) -> str:
    if tokenizer.sp is not None:
        return tokenizer.sp.id_to_piece(token_id)
    return tokenizer.hf.convert_ids_to_tokens(token_id)


def read_examples(path: str | Path, template: Template, tokenizer: TextTokenizer) -> list[Example]:
    """The file's records as prompts and reference answers; raises ``DataError`` at the first bad one."""
    path = Path(path)
    bos, eos = token_text(tokenizer, tokenizer.bos_id), token_text(tokenizer, tokenizer.eos_id)
    examples = []
    for number, record in load_numbered(path):
        where = f"{path}, record {number}"
        if not record.output.strip():
            raise DataError(
                f"{where}: the answer ('output', or the last assistant turn) is empty, so there is nothing "
                "to score the generated answer against; give the reference answer or remove the record"
            )
        if record.history and not template.multi_turn:
            raise DataError(
                f"{where}: the record has {len(record.history)} earlier turn(s) but the prompt template "
                f"{template.name!r} has no multi-turn format; evaluate with a multi-turn template "
                "(--prompt_template llama2-chat) or keep only the last exchange"
            )
        turns = [*record.history, (record.full_instruction, None)]
        examples.append(
            Example(
                number,
                render_text(template, turns, record.system, bos, eos),
                prompt_ids(template, tokenizer, record.full_instruction, record.history, record.system),
                record.output,
            )
        )
    return examples


def fit_prompts(prompts: list[list[int]], bos_id: int, room: int) -> tuple[list[list[int]], int]:
    """Each prompt cut to its last ``room`` tokens, BOS kept in front; and how many were cut."""
    fitted = [ids if len(ids) <= room else [bos_id, *ids[len(ids) - room + 1 :]] for ids in prompts]
    return fitted, sum(len(ids) > room for ids in prompts)


@torch.no_grad()
def greedy_answers(
    model,
    prompts: list[list[int]],
    stop_ids: list[int],
    *,
    batch_size: int,
    max_new_tokens: int,
    progress: bool = False,
) -> list[tuple[list[int], bool]]:
    """Per prompt, in order: the greedy answer's ids without the stop id that ended it, and whether
    it ran to ``max_new_tokens`` instead."""
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    # The first stop id fills the left padding and the rows that finished early: every model has a
    # row for it, unlike a pad token the tokenizer added, and it is cut from the answer anyway.
    filler = stop_ids[0]
    # Longest first, so that prompts of like length share a batch and padding stays short.
    order = sorted(range(len(prompts)), key=lambda index: -len(prompts[index]))
    answers: list[tuple[list[int], bool]] = [([], False)] * len(prompts)
    with tqdm(
        total=len(prompts), desc="generating", unit="record", disable=not progress, file=sys.stderr
    ) as bar:
        for start in range(0, len(order), batch_size):
            chosen = order[start : start + batch_size]
            width = max(len(prompts[index]) for index in chosen)
            input_ids = torch.full((len(chosen), width), filler, dtype=torch.long)
            attention_mask = torch.zeros_like(input_ids)
            for row, index in enumerate(chosen):
                ids = prompts[index]
                input_ids[row, width - len(ids) :] = torch.tensor(ids)
                attention_mask[row, width - len(ids) :] = 1
            output = model.generate(
                input_ids=input_ids.to(device),
                attention_mask=attention_mask.to(device),
                do_sample=False,
                max_new_tokens=max_new_tokens,
                eos_token_id=stop_ids,
                pad_token_id=filler,
                # The model's generation_config may carry sampling values, which greedy search would
                # warn about, and a repetition penalty, which would make the answers other than greedy.
                temperature=None,
                top_k=None,
                top_p=None,
                repetition_penalty=1.0,
            )
            for row, index in enumerate(chosen):
                answer, stopped = cut_at_stop(output[row, width:].tolist(), stop_ids)
                answers[index] = (answer, not stopped)
            bar.update(len(chosen))
    return answers


def run_generation(
    loaded: Loaded, validation_file: Path, *, batch_size: int, max_new_tokens: int, progress: bool
) -> tuple[dict, list[dict]]:
    if batch_size < 1:
        raise ArgumentError(f"--batch_size {batch_size}: give 1 or more")
    if max_new_tokens < 1:
        raise ArgumentError(f"--max_new_tokens {max_new_tokens}: give 1 or more")
    require_libraries()
    model, tokenizer, template = loaded.model, loaded.tokenizer, loaded.template
    context = getattr(model.config, "max_position_embeddings", None) or DEFAULT_CONTEXT
    if max_new_tokens >= context:
        raise ArgumentError(
            f"--max_new_tokens {max_new_tokens} leaves no room for a prompt in the model's context of "
            f"{context} tokens; lower it"
        )
    examples = read_examples(validation_file, template, tokenizer)
    prompts, cut = fit_prompts(
        [example.prompt_ids for example in examples], tokenizer.bos_id, context - max_new_tokens
    )
    if cut:
        logger.warning(
            "%d prompt(s) of %s are longer than the %d tokens the context of %d leaves beside --max_new_tokens "
            "%d; their beginnings were cut",
            cut,
            validation_file,
            context - max_new_tokens,
            context,
            max_new_tokens,
        )
    scorer = Scorer()
    began = time.perf_counter()
    answers = greedy_answers(
        model,
        prompts,
        template.stop_ids(tokenizer),
        batch_size=batch_size,
        max_new_tokens=max_new_tokens,
        progress=progress,
    )
    seconds = time.perf_counter() - began
    rows, scores = [], []
    for example, (ids, hit_limit) in zip(examples, answers, strict=True):
        prediction = tokenizer.decode(ids).strip()
        score = scorer.score(example.reference, prediction)
        scores.append(score)
        rows.append(
            {
                "id": example.number,
                "prompt": example.prompt,
                "reference": example.reference,
                "prediction": prediction,
                **score,
                "hit_max_new_tokens": hit_limit,
            }
        )
    results = {
        **average(scores),
        "records": len(rows),
        "validation_file": str(validation_file),
        "template": template.name,
        "max_new_tokens": max_new_tokens,
        "batch_size": batch_size,
        "hit_max_new_tokens": sum(hit for _, hit in answers),
        "prompts_cut": cut,
        "generated_tokens": sum(len(ids) for ids, _ in answers),
        "generation_seconds": round(seconds, 3),
    }
    return results, rows
