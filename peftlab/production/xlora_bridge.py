"""X-LoRA in peft: peft's XLoraModel reads its experts from saved folders (peftlab/xlora_io.py
writes them); these build its XLoraConfig for a reference X-LoRA adapter and copy the router."""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from peftlab.methods.xlora import peft_kwargs, router_of
from peftlab.production.hf_peft import import_peft, task_type
from peftlab.state import records


def xlora_peft_config(model: nn.Module, adapter_name: str, expert_folders: list[str], **extra):
    """``peft.XLoraConfig`` for a reference X-LoRA adapter whose experts are saved, in router
    order, in ``expert_folders``; ``extra``: further peft config fields."""
    peft = import_peft()
    config = records(model)[adapter_name].config
    trainable = config.experts is None if config.use_trainable_adapters is None else config.use_trainable_adapters
    kwargs = peft_kwargs(dataclasses.replace(config, experts=dict(enumerate(expert_folders)),
                                             use_trainable_adapters=trainable,
                                             hidden_size=router_of(model, adapter_name).config.hidden_size), model)
    return peft.XLoraConfig(task_type=task_type(model), **kwargs, **extra)


@torch.no_grad()
def copy_xlora_router(model: nn.Module, peft_model: nn.Module, adapter_name: str = "default") -> None:
    """Give peft's X-LoRA classifier exactly the reference router's weights."""
    theirs = peft_model.base_model.internal_xlora_classifier.layers
    for mine, other in zip(router_of(model, adapter_name).layers.parameters(), theirs.parameters()):
        other.copy_(mine)
