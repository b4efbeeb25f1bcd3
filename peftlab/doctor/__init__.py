"""``peftlab.doctor(model, ...)``: why isn't it learning? The silent failures, found before training.

A PEFT run can go wrong without an error: the loss moves a little or not at all, and the saved
adapter is close to nothing. These are the failures users report most, each checked here with
numbers taken from the model (and, when given, the data and the learning rate):

    check                  the failure                                       reported in
    gradients              gradient checkpointing (reentrant) with frozen    peft #137,
                           input embeddings: no adapter weight gets a grad   transformers #42489
    targets                a target entry matches no module, or a layer      peft #3554
                           kind is adapted in only some blocks
    alpha                  alpha so small next to r that the update is damped
    trainable              nothing trainable (a PeftModel loaded without     peft #1526, #1020
                           is_trainable), or base weights left trainable
    merge-4bit             merging into a 4-bit base rounds the update away
    lr                     a learning rate far from the method's usual range
    truncation             the chat template's prompt fills max_length, so no answer token is left
    labels                 every label is -100: no token enters the loss

Each :class:`Finding` names the cause, the evidence (numbers) and the fix; the
:class:`DoctorReport` prints as text and as an HTML table in a notebook. The model is left as it
was: the gradient probe (one backward pass on 8 tokens) restores the gradients, the train/eval
mode and the random state.
"""

from __future__ import annotations

import sys
import types
from typing import Any, Callable

from torch import nn

from peftlab.doctor.checks import (check_alpha, check_gradients, check_lr, check_merge_4bit, check_targets,
                                   check_trainable)
from peftlab.doctor.data import check_data
from peftlab.doctor.report import SEVERITIES, DoctorReport, Finding
from peftlab.doctor.view import USUAL_LR, view_of


def doctor(
    model: nn.Module,
    data: Any = None,
    *,
    tokenizer: Any = None,
    max_length: int = 128,
    lr: float | None = None,
    targets: Any = None,
    probe: bool = True,
) -> DoctorReport:
    """Look for the silent failures of a PEFT setup (module docstring) and report them.

    Args:
        model: an adapted model (``peftlab.adapt``, any backend, or a ``peft.PeftModel``), or a
            plain model together with the ``targets`` you mean to adapt.
        data: the training rows (a ``datasets.Dataset``, a DatasetDict's "train", or a list of
            dicts): "question"/"answer" rows are checked against ``max_length`` with the
            tokenizer's chat template, tokenized rows for labels that are all -100.
        tokenizer: the tokenizer, for question/answer rows.
        max_length: tokens per row in training (``peftlab.train``'s, or TRL's max_length).
        lr: the peak learning rate you mean to train with.
        targets: targets to check (default: those the adapter was built with).
        probe: run one forward and backward pass on 8 tokens to see which trainable tensors get a
            gradient (the model's gradients, mode and random state are restored).

    Returns:
        A :class:`DoctorReport`; ``report.ok`` is True for a clean bill.
    """
    view = view_of(model)
    checks: list[tuple[str, Callable[[], list[Finding]]]] = [
        ("trainable", lambda: check_trainable(model, view)),
        ("targets", lambda: check_targets(model, view, targets)),
        ("alpha", lambda: check_alpha(view)),
        ("gradients", lambda: check_gradients(model, probe)),
        ("merge-4bit", lambda: check_merge_4bit(model, view)),
    ]
    if lr is not None:
        checks.append(("lr", lambda: check_lr(view, lr)))
    if data is not None:
        checks.append(("data", lambda: check_data(model, data, tokenizer, max_length)))
    findings: list[Finding] = []
    for _name, check in checks:
        findings += check()
    names = [n for n, _ in checks]
    if "data" in names:
        names[names.index("data")] = "truncation, labels"
    return DoctorReport(tuple(findings), tuple(names))


class _CallableModule(types.ModuleType):
    """``peftlab.doctor`` names both this package and the function :func:`doctor` (as
    ``peftlab.train`` does): importing a submodule binds the package attribute to the module, so
    the module forwards calls and ``peftlab.doctor(model)`` works either way."""

    def __call__(self, *args: Any, **kwargs: Any) -> DoctorReport:
        return doctor(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule

__all__ = ["doctor", "DoctorReport", "Finding", "USUAL_LR", "SEVERITIES"]
