"""The course's exercise checkers accept the right answer and explain wrong ones."""

from __future__ import annotations

import pytest
import torch

from peftlab import exercises
from peftlab.errors import UnknownNameError


def test_every_reference_answer_passes_its_own_checker(capsys):
    for name, exercise in exercises.EXERCISES.items():
        assert exercises.check(name, exercise.reference), name
    assert capsys.readouterr().out.count("✓") == len(exercises.EXERCISES)


def test_a_wrong_scale_is_reported_with_the_size_of_the_error(capsys):
    def forgot_scaling(x, W, A, B, alpha, r):
        return x @ W.T + (x @ A.T) @ B.T

    assert not exercises.check("lora_forward", forgot_scaling)
    out = capsys.readouterr().out
    assert "✗ lora_forward: values differ" in out and "Hint:" in out and "x=(3," in out


def test_a_wrong_shape_and_an_exception_are_reported(capsys):
    assert not exercises.check("lora_delta_weight", lambda x, W, A, B, alpha, r: (alpha / r) * (B @ A).T)
    out = capsys.readouterr().out
    assert "shape (" in out or "values differ" in out
    assert not exercises.check("lora_param_count", lambda d_in, d_out, r: 1 / 0)
    assert "raised ZeroDivisionError" in capsys.readouterr().out


def test_nf4_exercise_matches_peftlab_quantizer():
    from peftlab.quant.nf4 import quantize_nf4

    w = torch.randn(256, generator=torch.Generator().manual_seed(1))
    codes, absmax = exercises.EXERCISES["nf4_absmax_quantize"].reference(w, 64)
    packed, state = quantize_nf4(w, blocksize=64, double_quant=False)
    assert torch.equal(absmax, state.absmax.reshape(-1))
    assert torch.equal(((codes[0::2] << 4) | codes[1::2]).reshape(-1), packed.reshape(-1))


def test_unknown_exercise_suggests_the_closest():
    with pytest.raises(UnknownNameError, match="lora_forward"):
        exercises.check("lora_forwrd", lambda: None)
