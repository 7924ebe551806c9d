"""Scores of a generated answer against its reference, by the libraries that define them.

Contract: ``Scorer().score(reference, prediction) -> {metric: value}`` with every value from 0 to
100, one for each of ``METRICS``; ``average(rows)`` is their mean over records. Both texts are cut
as LLaMA-Factory's ``predict`` scores them, so its numbers and these compare:

* ``exact_match``: 100 when the stripped texts are equal, else 0;
* ``bleu-4``: ``nltk.translate.bleu_score.sentence_bleu`` over the characters of the stripped texts,
  uniform 1- to 4-gram weights, smoothing method 3 (an answer without a matching 4-gram still scores
  above 0);
* ``rouge-1``, ``rouge-2``, ``rouge-l``: the F1 of ``rouge_score.rouge_scorer.RougeScorer`` over
  words cut by ``segment`` (jieba's accurate mode, whitespace dropped), since Chinese has no spaces
  (rouge-score's own tokenizer keeps only ASCII letters and digits, so Chinese would vanish).

jieba, nltk and rouge-score are the optional extra ``llama-sft[eval]``; ``require_libraries`` says
how to install them when one is missing.
"""

from __future__ import annotations

import importlib.util
import logging

from ...options import ArgumentError

METRICS = ("exact_match", "bleu-4", "rouge-1", "rouge-2", "rouge-l")
LIBRARIES = {"jieba": "jieba", "nltk": "nltk", "rouge_score": "rouge-score"}
ROUGE_TYPES = {"rouge-1": "rouge1", "rouge-2": "rouge2", "rouge-l": "rougeL"}


def require_libraries() -> None:
    """Raises ``ArgumentError`` naming the install command when a metric library is missing; cheap
    enough to call before a model is loaded."""
    missing = [package for module, package in LIBRARIES.items() if importlib.util.find_spec(module) is None]
    if missing:
        raise ArgumentError(
            f"--task generate scores answers with jieba, nltk and rouge-score, and {', '.join(missing)} "
            "is not installed: pip install 'llama-sft[eval]'"
        )


def segment(text: str) -> list[str]:
    """The words of ``text`` as jieba cuts them; the spaces between English words are no words."""
    import jieba

    return [word for word in jieba.cut(text) if word.strip()]


class Words:
    """The tokenizer ``RougeScorer`` calls: jieba's words in place of its ASCII-only default."""

    def tokenize(self, text: str) -> list[str]:
        return segment(text)


class Scorer:
    def __init__(self):
        require_libraries()
        import jieba
        from nltk.translate.bleu_score import SmoothingFunction
        from rouge_score import rouge_scorer

        # jieba announces on stderr, through its own logger, how it builds its dictionary.
        jieba.setLogLevel(logging.WARNING)
        jieba.initialize()
        self.smoothing = SmoothingFunction().method3
        self.rouge = rouge_scorer.RougeScorer(list(ROUGE_TYPES.values()), tokenizer=Words())

    def score(self, reference: str, prediction: str) -> dict[str, float]:
        from nltk.translate.bleu_score import sentence_bleu

        scores = {"exact_match": 100.0 if reference.strip() == prediction.strip() else 0.0}
        scores["bleu-4"] = 100 * sentence_bleu(
            [list(reference.strip())], list(prediction.strip()), smoothing_function=self.smoothing
        )
        rouge = self.rouge.score(reference, prediction)
        scores.update({name: 100 * rouge[key].fmeasure for name, key in ROUGE_TYPES.items()})
        return {name: float(value) for name, value in scores.items()}


def average(rows: list[dict[str, float]]) -> dict[str, float]:
    """Each metric's mean over ``rows`` (0 for none), to four decimals."""
    return {name: round(sum(row[name] for row in rows) / len(rows), 4) if rows else 0.0 for name in METRICS}
