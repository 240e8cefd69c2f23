"""Language-model scoring: token-level cross-entropy of ``[batch, tokens, vocab]`` logits.

Hugging Face's conventions, so a score matches ``model(input_ids, labels=labels).loss``:
a label ``-100`` (:data:`IGNORE_INDEX`) is no target; a causal LM predicts token t+1
from tokens up to t, so its logits are compared with the labels shifted by one
(``--shift-labels``); positions whose ``attention_mask`` is 0 are no targets either.
Sums are kept per token over the whole set, so ``loss`` is the mean over every scored
token (not a mean of batch means) and ``perplexity`` is ``exp(loss)`` of that mean.

>>> logits = torch.tensor([[[2.0, 0.0], [0.0, 2.0], [2.0, 0.0]]])
>>> sums = token_sums(logits, torch.tensor([[0, 1, 1]]), shift=True)
>>> sums.tokens, sums.correct
(2, 1)
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch

from .errors import InputError
from .notices import note

#: Hugging Face's "no target here" label.
IGNORE_INDEX = -100
#: ``--shift-labels``: ``auto`` shifts for a causal LM whose labels are its input ids.
SHIFT_CHOICES = ("auto", "yes", "no")
#: the language-model metrics, in the order evaluation.csv lists them
LM_METRICS = ("loss", "perplexity", "accuracy")


class TokenSums(NamedTuple):
    """One batch's summed token loss (float64), scored tokens and right next-token guesses."""

    loss: float
    tokens: int
    correct: int


def is_token_output(outputs: torch.Tensor, targets: torch.Tensor) -> bool:
    """True for logits ``[B, T, V]`` against integer labels ``[B, T]``: a language model's output.

    >>> is_token_output(torch.zeros(2, 5, 7), torch.zeros(2, 5, dtype=torch.long))
    True
    >>> is_token_output(torch.zeros(2, 7), torch.zeros(2, dtype=torch.long))
    False
    """
    return (outputs.dim() == 3 and targets.dim() == 2 and not targets.is_floating_point()
            and outputs.shape[:2] == targets.shape)


def token_sums(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor | None = None,
               shift: bool = False) -> TokenSums:
    """Summed cross-entropy, token count and next-token hits of one batch.

    ``labels`` ``-100`` and ``mask`` 0 positions are skipped; with ``shift`` the logits at
    position t are scored against the label at t + 1 (the mask of the label's position
    decides). Cross-entropy in float32 as transformers computes it, summed in float64.

    >>> token_sums(torch.zeros(1, 2, 4), torch.tensor([[1, -100]])).tokens
    1
    """
    if logits.shape[:2] != labels.shape:
        raise InputError(f"outputs of shape {list(logits.shape)} do not fit token labels of shape "
                         f"{list(labels.shape)} (expected [batch, tokens, vocab] against [batch, tokens])")
    labels = labels.to(logits.device).long()
    if mask is not None:
        labels = labels.masked_fill(mask.to(labels.device).reshape(labels.shape) == 0, IGNORE_INDEX)
    if shift:
        logits, labels = logits[:, :-1], labels[:, 1:]
    flat_logits = logits.reshape(-1, logits.shape[-1]).float()
    flat = labels.reshape(-1)
    keep = flat != IGNORE_INDEX
    if not bool(keep.any()):
        return TokenSums(0.0, 0, 0)
    chosen = flat[keep]
    if int(chosen.min()) < 0 or int(chosen.max()) >= logits.shape[-1]:
        raise InputError(f"a token label is outside the model's vocabulary of {logits.shape[-1]} "
                         f"(labels from {int(chosen.min())} to {int(chosen.max())}; -100 marks no target)")
    scored = flat_logits[keep]
    loss = torch.nn.functional.cross_entropy(scored, chosen, reduction="none")
    return TokenSums(float(loss.double().sum()), int(keep.sum()), int((scored.argmax(-1) == chosen).sum()))


def lm_result(loss_sum: float, tokens: int, correct: int) -> dict[str, float]:
    """``loss`` (mean per token), ``perplexity`` (exp of that mean) and next-token ``accuracy``.

    >>> lm_result(2 * math.log(2), 2, 1)
    {'loss': 0.6931471805599453, 'perplexity': 2.0, 'accuracy': 0.5}
    """
    if tokens == 0:
        raise InputError("no token was scored: every label is -100 or masked out")
    loss = loss_sum / tokens
    return {"loss": loss, "perplexity": math.exp(loss) if loss < 700 else math.inf, "accuracy": correct / tokens}


def decide_shift(choice: str, causal: bool, inputs: Any, labels: torch.Tensor, said: set[str] | None = None) -> bool:
    """Whether to compare logits at t with labels at t + 1.

    ``yes``/``no`` as told; ``auto``: shift when the model is a causal LM and the labels
    are its input ids (where a label is not -100), as transformers' causal LMs do with
    ``labels``. Where that guess could be wrong, a note says what was done (once: ``said``).

    >>> ids = torch.tensor([[5, 6, 7]])
    >>> decide_shift("auto", True, {"input_ids": ids}, ids), decide_shift("auto", False, {"input_ids": ids}, ids)
    (True, False)
    """
    if choice not in SHIFT_CHOICES:
        raise InputError(f"--shift-labels {choice!r}: use auto, yes or no")
    if choice != "auto":
        return choice == "yes"
    ids = inputs.get("input_ids") if isinstance(inputs, dict) else inputs
    same = (isinstance(ids, torch.Tensor) and ids.shape == labels.shape
            and bool(((labels.to(ids.device) == ids) | (labels.to(ids.device) == IGNORE_INDEX)).all()))
    said = said if said is not None else set()

    def once(text: str) -> None:
        if text not in said:
            said.add(text)
            note(text)

    if causal and same:
        return True
    if causal:
        once("--shift-labels auto: the labels are not the input ids, so they are taken as already aligned with "
             "the logits (not shifted); transformers' causal LMs shift their labels: pass --shift-labels yes "
             "if these are meant the same way")
    elif same:
        once("--shift-labels auto: the labels are the input ids but the model is not known to be a causal LM, so "
             "they are not shifted (each position scored against its own token); pass --shift-labels yes for "
             "next-token prediction")
    return False
