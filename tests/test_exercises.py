"""The course's exercise checkers accept the right answer and explain wrong ones."""

from __future__ import annotations

import pytest
import torch

from peftlab import exercises
from peftlab.errors import UnknownNameError


def test_the_checkers_own_reference_is_refused_and_its_copy_passes(capsys):
    for name, exercise in exercises.EXERCISES.items():
        assert not exercises.check(name, exercise.reference), name
        assert "peftlab's own" in capsys.readouterr().out
    # the answers written out in the lessons pass: tests/test_student.py runs every one


def test_hints_guide_without_giving_the_answers_code():
    import inspect

    for name, exercise in exercises.EXERCISES.items():
        try:
            body = inspect.getsource(exercise.reference).split("\n")[1:]
        except (OSError, TypeError):
            continue
        for line in body:
            code = line.split("#")[0].strip().removeprefix("return ").strip()
            if len(code) > 15 and "import" not in code:
                assert code not in exercise.hint, f"{name}: the hint gives away {code!r}"


def test_an_answer_that_skips_the_idea_is_refused_with_the_reason(capsys):
    def dense(x, W, A, B, alpha, r):  # right values, but builds ΔW
        return x @ (W + (alpha / r) * B @ A).T

    assert not exercises.check("lora_forward", dense)
    assert "builds a" in capsys.readouterr().out
    assert not exercises.check("lora_singular_values", lambda A, B, scaling: torch.linalg.svdvals(scaling * B @ A)[: A.shape[0]])
    assert "ΔW" in capsys.readouterr().out
    assert not exercises.check("kronecker", lambda W1, W2: W1.kron(W2))
    assert "torch's kron" in capsys.readouterr().out

    def code_book(offset):
        from peftlab.quant.nf4 import NF4_CODE

        return NF4_CODE.clone()

    assert not exercises.check("nf4_code_book", code_book)
    assert "reads NF4_CODE" in capsys.readouterr().out

    def borrowed(A, B, scaling):
        from peftlab.spectra import factored_svdvals

        return factored_svdvals(scaling * B, A)

    assert not exercises.check("lora_singular_values", borrowed)
    assert "calls peftlab's peftlab.spectra.factored_svdvals" in capsys.readouterr().out


def test_an_input_callable_may_run_peftlab_code(capsys):
    def loftq_step(W, A, B, quantize):  # `quantize` is the checker's NF4 round trip
        r = A.shape[0]
        Q = quantize(W - B @ A)
        U, S, Vh = torch.linalg.svd(W - Q, full_matrices=False)
        root = S[:r].sqrt()
        return Q, root[:, None] * Vh[:r], U[:, :r] * root

    assert exercises.check("loftq_step", loftq_step)


def test_an_unwritten_answer_gets_a_message_not_a_traceback(capsys):
    def lora_forward(x, W, A, B, alpha, r):
        raise NotImplementedError()

    assert not exercises.check("lora_forward", lora_forward)
    out = capsys.readouterr().out
    assert "✗ lora_forward: not written yet" in out and "lora_forward(x, W, A, B, alpha, r) ->" in out


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


def test_a_prediction_is_judged_by_its_relative_error(capsys):
    assert exercises.predicted("trainable numbers", 1000, 1050)  # 4.8% off, inside 10%
    assert "you predicted 1,000, measured 1,050 (-4.8%)" in capsys.readouterr().out
    assert not exercises.predicted("trainable numbers", 700, 1050)
    assert "more than 10% off" in capsys.readouterr().out
    assert not exercises.predicted("rank", 7, 8, tolerance=0)
    assert not exercises.predicted("bytes", "a lot", 8)
    assert "expected a number" in capsys.readouterr().out
    assert exercises.predicted("layer", "v_proj", "v_proj")
