"""Lesson 19's checker: the similarity test of intruder dimensions equals peftlab.spectra's, and the
checker refuses the answers that forget a cosine's sign or compare with the wrong singular vectors."""

from __future__ import annotations

import torch

from peftlab import exercises, spectra


def test_the_reference_is_the_spectra_modules_test():
    reference = exercises.EXERCISES["intruder_similarity"].reference
    g = torch.Generator().manual_seed(0)
    w = torch.randn(30, 20, generator=g, dtype=torch.float64)
    tuned = w + 3.0 * torch.randn(30, 2, generator=g, dtype=torch.float64) @ torch.randn(2, 20, generator=g,
                                                                                        dtype=torch.float64)
    found = spectra.intruder_dimensions(w, tuned, top_k=6)
    torch.testing.assert_close(reference(w, tuned, 6), found.similarity)
    assert found.count >= 1  # a strong rank-2 update brings directions W did not have


def test_the_checker_accepts_the_abs_cosine_and_refuses_its_mistakes(capsys):
    def right(W, W_tuned, top_k):
        u = torch.linalg.svd(W, full_matrices=False).U
        t = torch.linalg.svd(W_tuned, full_matrices=False).U[:, :top_k]
        return (t.T @ u).abs().max(dim=1).values

    def signed(W, W_tuned, top_k):  # a singular vector's sign is arbitrary: -u is as good as u
        u = torch.linalg.svd(W, full_matrices=False).U
        t = torch.linalg.svd(W_tuned, full_matrices=False).U[:, :top_k]
        return (t.T @ u).max(dim=1).values

    def right_vectors(W, W_tuned, top_k):  # V (the input side) instead of U
        v = torch.linalg.svd(W, full_matrices=False).Vh
        t = torch.linalg.svd(W_tuned, full_matrices=False).Vh[:top_k]
        return (t @ v.T).abs().max(dim=1).values

    assert exercises.check("intruder_similarity", right)
    assert not exercises.check("intruder_similarity", signed)
    assert not exercises.check("intruder_similarity", right_vectors)
    out = capsys.readouterr().out
    assert "✓" in out and "Hint" in out
