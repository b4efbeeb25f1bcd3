"""LoRA+: a larger learning rate for B than for A.

Hayou, Ghosh & Yu 2024, "LoRA+: Efficient Low Rank Adaptation of Large Models",
https://arxiv.org/abs/2402.12354. With B = 0 at the start and A random, the two factors play
different roles, and at large widths one learning rate cannot suit both: LoRA+ sets

        η_B = λ · η_A,   λ = loraplus_lr_ratio (the paper suggests 2^4 = 16)

The groups are peft 0.21.2's (``peft.optimizers.create_loraplus_optimizer``), so one model gets
the same four groups under either backend:

        A            every other trainable tensor          lr = η,      weight decay wd
        embedding    LoRA factors on an nn.Embedding       lr = 1e-6,   weight decay wd
        B            "lora_B" tensors, and every 1-D one   lr = λ η,    weight decay wd
        B, no decay  those of B named "bias" / in a LayerNorm  lr = λ η, weight decay 0

(peft's rule: a 1-D tensor, such as DoRA's magnitude or a bias, goes with B.)
"""

from __future__ import annotations

from torch import nn

from peftlab.errors import ConfigError

LORAPLUS_LR_EMBEDDING = 1e-6  # peft's default loraplus_lr_embedding


def check_loraplus_ratio(ratio: object) -> None:
    """None (plain AdamW groups) or a number >= 1."""
    if ratio is None:
        return
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not ratio >= 1:
        raise ConfigError(f"loraplus_lr_ratio={ratio!r} is invalid. Expected None (off) or a number >= 1, "
                          "the ratio η_B / η_A; try 16 (the LoRA+ paper's choice).")


def _embedding_tensors(model: nn.Module) -> set[int]:
    """ids of the LoRA factors on embeddings: peftlab's adapters flag them, peft names them."""
    ids = set()
    for module in model.modules():
        if getattr(module, "is_embedding", False) and hasattr(module, "lora_A"):
            ids.update(id(p) for p in module.parameters())
    for name, param in model.named_parameters():
        if "lora_embedding_" in name:
            ids.add(id(param))
    return ids


def loraplus_param_groups(model: nn.Module, lr: float, ratio: float, weight_decay: float = 0.0,
                          lr_embedding: float = LORAPLUS_LR_EMBEDDING) -> list[dict]:
    """The four AdamW parameter groups of LoRA+ for the model's trainable tensors (table above)."""
    check_loraplus_ratio(ratio)
    no_decay = {id(p) for m in model.modules() if isinstance(m, nn.LayerNorm) for p in m.parameters()}
    embedding = _embedding_tensors(model)
    groups: dict[str, list] = {"A": [], "embedding": [], "B": [], "B_no_decay": []}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if id(param) in embedding:
            groups["embedding"].append(param)
        elif "lora_B" in name or param.ndim == 1:
            decays = "bias" not in name and id(param) not in no_decay
            groups["B" if decays else "B_no_decay"].append(param)
        else:
            groups["A"].append(param)
    return [{"params": groups["A"], "weight_decay": weight_decay, "lr": lr},
            {"params": groups["embedding"], "weight_decay": weight_decay, "lr": lr_embedding},
            {"params": groups["B"], "weight_decay": weight_decay, "lr": lr * ratio},
            {"params": groups["B_no_decay"], "weight_decay": 0.0, "lr": lr * ratio}]
