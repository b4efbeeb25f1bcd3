"""peft's own test cases load in peftlab exactly, and peftlab's save of them loads back in peft.

Each case of ``tests/peft_cases.py`` (peft's ``TEST_CASES`` for the methods peftlab has) is
built by peft 0.21.2 with random adapter weights (``init_weights=False``, as peft's tests do),
saved, loaded with ``peftlab.load_adapter`` and compared; then saved by peftlab and loaded by
``peft.PeftModel.from_pretrained``. A case peftlab cannot rebuild would be listed in GAPS with
the refusal it gets; peft itself is never weakened.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

import peftlab
from tests.peft_cases import CASES, TOYS, toy_input

peft = pytest.importorskip("peft")

# the field that turns peft's random adapter init on, where it is not ``init_weights``
RANDOM_INIT = {"LoraConfig": "init_lora_weights", "AdaLoraConfig": "init_lora_weights",
               "IA3Config": "init_ia3_weights"}

# case name -> the refusal peftlab gives instead of loading it (the configurations still missing)
GAPS: dict[str, str] = {}


def _peft_config(config_class: str, kwargs: dict):
    kwargs = {RANDOM_INIT.get(config_class, "init_weights"): False, **kwargs}
    if config_class == "AdaLoraConfig":
        kwargs.setdefault("total_step", 4)  # AdaLoRA's schedule needs a length
    return getattr(peft, config_class)(**kwargs)


def _ids(case) -> str:
    return case[0]


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_peft_saved_case_loads_in_peftlab_and_back(case, tmp_path):
    name, toy, config_class, kwargs = case
    torch.manual_seed(0)
    base = TOYS[toy]().eval()
    x = toy_input(toy)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft's notes about CUDA kernels and redundant ranks
        production = peft.get_peft_model(copy.deepcopy(base), _peft_config(config_class, kwargs)).eval()
        with torch.no_grad():
            want = production(x)
        production.save_pretrained(tmp_path / "peft")
        if name in GAPS:
            with pytest.raises(peftlab.PeftlabError, match=GAPS[name]):
                peftlab.load_adapter(copy.deepcopy(base), tmp_path / "peft")
            return
        mine = peftlab.load_adapter(copy.deepcopy(base), tmp_path / "peft").eval()
        with torch.no_grad():
            got = mine(x)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)

        peftlab.save_adapter(mine, tmp_path / "mine")
        back = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "mine").eval()
        with torch.no_grad():
            torch.testing.assert_close(back(x), want, rtol=0, atol=1e-6)
