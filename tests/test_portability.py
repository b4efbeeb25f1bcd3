"""The portability pass of `make test` really runs on the instruction set and threads it forces.

Pass 2 sets ATEN_CPU_CAPABILITY (PyTorch's own kernels), ONEDNN_MAX_CPU_ISA, MKL_ENABLE_INSTRUCTIONS
and OMP_NUM_THREADS=1 (Makefile); if PyTorch ignored them, the pass would prove nothing.
"""

from __future__ import annotations

import os

import pytest
import torch

FORCED = os.environ.get("PEFTLAB_PORTABILITY_PASS") == "1"


@pytest.mark.skipif(not FORCED, reason="only in make test's portability pass")
def test_the_forced_instruction_set_and_thread_count_took_effect():
    wanted = os.environ["ATEN_CPU_CAPABILITY"].upper()
    assert torch.backends.cpu.get_cpu_capability().upper() == ("DEFAULT" if wanted == "DEFAULT" else wanted)
    assert torch.get_num_threads() == int(os.environ["OMP_NUM_THREADS"]) == 1

