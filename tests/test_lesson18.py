"""Lesson 18's checker: the first Adam step of a LoRA from B = 0 is -lr · sign(grad_B) in B, so
ΔW = scaling · B A; it equals a real AdamW step on a LoRA layer, and the checker refuses the answer
that forgets Adam's normalisation (a plain SGD step)."""

from __future__ import annotations

import copy

import torch

import peftlab
from peftlab import exercises


def test_the_first_update_is_a_real_adamw_step():
    base, _ = peftlab.load_model("tiny-llama")
    reference = exercises.EXERCISES["first_lora_update"].reference
    ids = torch.randint(0, 1000, (2, 12), generator=torch.Generator().manual_seed(0))
    for rslora in (False, True):
        torch.manual_seed(0)
        adapted = peftlab.adapt(copy.deepcopy(base), "lora", r=8, alpha=16, use_rslora=rslora, targets=("q_proj",))
        optimizer = torch.optim.AdamW([p for p in adapted.parameters() if p.requires_grad], lr=1e-3, eps=1e-12)
        adapted(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        layer = adapted.get_submodule("model.layers.0.self_attn.q_proj")
        lora = layer.adapters["default"]
        assert lora.scaling == (16 / 8**0.5 if rslora else 16 / 8)
        expected = reference(lora.lora_A.detach(), lora.lora_B.grad, 1e-3, lora.scaling)  # A after its decay step
        torch.testing.assert_close(layer.delta_weight(), expected, rtol=1e-4, atol=1e-8)


def test_the_checker_accepts_the_sign_and_refuses_an_sgd_step(capsys):
    def right(A, grad_B, lr, scaling):
        return scaling * (-lr * torch.sign(grad_B)) @ A

    def sgd(A, grad_B, lr, scaling):
        return scaling * (-lr * grad_B) @ A

    assert exercises.check("first_lora_update", right)
    assert not exercises.check("first_lora_update", sgd)
    out = capsys.readouterr().out
    assert "✓" in out and "Hint" in out
