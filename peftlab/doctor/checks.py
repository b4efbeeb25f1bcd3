"""The doctor's checks on the model: trainable counts, targets, alpha, gradients (the gradient
checkpointing trap), merging into a 4-bit base, the learning rate. Each returns its findings,
none when healthy."""

from __future__ import annotations

import functools
import math
from typing import Any

import torch
from torch import nn

from peftlab.doctor.report import Finding
from peftlab.doctor.view import AdapterView, lr_range
from peftlab.inject import AdaptedLayer, adapted_layers, candidate_modules, is_linear, is_quantized, matches
from peftlab.state import peek

DAMPED_SCALING = 0.1  # alpha / r below this: the update is 10x weaker than with alpha = r
MERGE_LOSS = 0.5  # share of the update's norm a 4-bit merge may lose before it is a finding


def check_trainable(model: nn.Module, view: AdapterView) -> list[Finding]:
    params = dict(model.named_parameters())
    trainable = {n: p for n, p in params.items() if p.requires_grad}
    count = sum(p.numel() for p in trainable.values())
    total = sum(p.numel() for p in params.values())
    if view.kind == "none":
        return [Finding("trainable", "warning", "The model carries no adapter: training it updates every "
                        "trainable weight (full fine-tuning), or nothing if all are frozen.",
                        f"{count:,} of {total:,} parameters trainable; no peftlab or peft adapter found.",
                        "Adapt it first: model = peftlab.adapt(model, 'lora', r=8).",
                        {"trainable": count, "total": total})]
    if count == 0:
        return [Finding("trainable", "error", "Nothing is trainable: the optimizer has no parameter to update, so "
                        "the loss cannot move (a PeftModel loaded with from_pretrained is frozen by default).",
                        f"0 of {total:,} parameters require grad; the adapter sits on {len(view.adapted)} layers.",
                        "Load with PeftModel.from_pretrained(base, path, is_trainable=True), or "
                        "peftlab.load_adapter (trainable); or re-run peftlab.adapt.",
                        {"trainable": 0, "total": total})]
    stray = {n: p.numel() for n, p in trainable.items() if not view.owned(n)}
    if not stray:
        return []
    share = sum(stray.values()) / count
    shown = ", ".join(list(stray)[:3]) + (", ..." if len(stray) > 3 else "")
    return [Finding("trainable", "warning", "Base-model weights are left trainable beside the adapter (a "
                    "requires_grad_(True) after adapting, or a weight unfrozen by hand): training updates "
                    "them too, the adapter file does not hold them, and memory grows.",
                    f"{len(stray)} base tensors ({sum(stray.values()):,} parameters, {share:.1%} of the "
                    f"{count:,} trainable) require grad: {shown}.",
                    "Freeze them again (peftlab.adapt does; for peft, model.base_model.requires_grad_(False) "
                    "then re-adapt), or list a head you mean to train in modules_to_save.",
                    {"stray_tensors": len(stray), "stray_parameters": sum(stray.values()), "trainable": count})]


def _leaf(name: str) -> str:
    return name.rsplit(".", 1)[-1]


def _layers(model: nn.Module, view: AdapterView) -> dict[str, nn.Module]:
    """{name: layer} of every module that could be a target, adapted ones as their base layer."""
    if view.kind != "peft":
        return {n: m.base_layer if isinstance(m, AdaptedLayer) else m for n, m in candidate_modules(model).items()}
    from peft.tuners.tuners_utils import BaseTunerLayer

    out, tuned = {}, []
    for name, module in model.get_base_model().named_modules():
        if not name or any(name.startswith(t + ".") for t in tuned):
            continue
        if isinstance(module, BaseTunerLayer):
            tuned.append(name)
        out[name] = module.get_base_layer() if isinstance(module, BaseTunerLayer) else module
    return out


def check_targets(model: nn.Module, view: AdapterView, targets: Any) -> list[Finding]:
    modules = _layers(model, view)
    targets = view.targets if targets is None else targets
    if isinstance(targets, set):
        targets = tuple(sorted(targets))
    adapted = list(view.adapted) if view.kind != "none" else [n for n in modules if targets and matches(n, targets)]
    findings = []
    if isinstance(targets, (tuple, list)):
        dead = [t for t in targets if not any(n == t or n.endswith("." + t) for n in modules)]
        if dead:
            kinds = sorted({_leaf(n) for n, m in modules.items() if is_linear(m)})
            findings.append(Finding(
                "targets", "error" if not adapted else "warning",
                "Target entries match no module, so they are silently skipped: the adapter sits on fewer "
                "layers than you asked for (or on none).",
                f"{len(dead)} of {len(targets)} entries match nothing: {', '.join(map(repr, dead))}; "
                f"{len(adapted)} layers adapted.",
                f"Use this model's layer names: {', '.join(kinds[:8])}; or targets='all-linear'.",
                {"dead_entries": len(dead), "adapted": len(adapted)}))
    elif isinstance(targets, str) and targets != "all-linear" and not adapted:
        findings.append(Finding("targets", "error", "The target regex matches no module: nothing would be adapted.",
                                f"{targets!r} fully matches 0 of {len(modules)} module names.",
                                "peft's rule: a string is a full-name regex (re.fullmatch); "
                                "try r'.*\\.(q_proj|v_proj)'.",
                                {"adapted": 0}))
    findings += _partial_kinds(modules, adapted)
    return findings


def _partial_kinds(modules: dict[str, nn.Module], adapted: list[str]) -> list[Finding]:
    """A layer kind (q_proj, ...) adapted in some blocks but not in others: a regex or a list of
    full names that reaches only part of the model."""
    out = []
    for kind in sorted({_leaf(n) for n in adapted}):
        same = [n for n, m in modules.items() if _leaf(n) == kind
                and (is_linear(m) or isinstance(m, (nn.Embedding, nn.Conv1d, nn.Conv2d)))]
        done = [n for n in adapted if _leaf(n) == kind]
        if len(same) > len(done):
            missing = [n for n in same if n not in done]
            out.append(Finding(
                "targets", "warning",
                f"Only part of the model's {kind!r} layers carry the adapter: the others stay frozen, as "
                "a regex or a list of full names that reaches some blocks does (peft #3554).",
                f"{len(done)} of {len(same)} {kind!r} layers adapted; not: {', '.join(missing[:3])}"
                f"{', ...' if len(missing) > 3 else ''}.",
                f"targets=[{kind!r}] matches every block; keep the subset only if you meant it.",
                {"adapted": len(done), "of": len(same)}))
    return out


def _scaling(view: AdapterView) -> tuple[float, float, int] | None:
    """(scaling, alpha, r) of a LoRA-style config, None for methods without alpha."""
    config = view.config
    if view.kind == "peft":
        alpha, r = getattr(config, "lora_alpha", None), getattr(config, "r", None)
        if not (isinstance(alpha, (int, float)) and isinstance(r, int) and r > 0):
            return None
        rs = getattr(config, "use_rslora", False)
        return alpha / (math.sqrt(r) if rs else r), alpha, r
    alpha, r, scaling = (getattr(config, k, None) for k in ("alpha", "r", "scaling"))
    if not (isinstance(scaling, (int, float)) and isinstance(alpha, (int, float)) and isinstance(r, int)):
        return None
    return float(scaling), alpha, r


def check_alpha(view: AdapterView) -> list[Finding]:
    found = _scaling(view)
    if found is None or found[0] >= DAMPED_SCALING:
        return []
    scaling, alpha, r = found
    return [Finding("alpha", "warning", "alpha is so small next to r that the adapter's update is damped: the "
                    "output changes by scaling x B A x, so the adapter learns as if its learning rate were "
                    f"{scaling:.3g}x smaller.",
                    f"alpha={alpha:g}, r={r}: scaling = {scaling:.4g}, {1 / scaling:.0f}x weaker than alpha = r.",
                    f"alpha={r} (scaling 1) or alpha={2 * r}; or use_rslora=True (alpha / sqrt(r)).",
                    {"scaling": scaling, "alpha": alpha, "r": r})]


def _probe_gradients(model: nn.Module) -> tuple[int, int] | None:
    """(trainable tensors, tensors that got a gradient) after one backward pass on 8 tokens;
    None when the model cannot run on token ids. Gradients, mode and random state are restored."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if not trainable or not isinstance(vocab, int):
        return None
    device = trainable[0].device
    saved, was_training = [p.grad for p in trainable], model.training
    ids = ((torch.arange(1, 9, device=device) * 7919) % vocab).unsqueeze(0)
    try:
        with torch.random.fork_rng(devices=[] if device.type != "cuda" else [device]):
            for p in trainable:
                p.grad = None
            model.train()
            out = model(input_ids=ids)
            logits = out.logits if hasattr(out, "logits") else out[0]
            if logits.requires_grad:  # else no trainable tensor is on the graph at all
                logits.float().square().mean().backward()
            # a fresh LoRA's A gets an all-zero gradient (B = 0): on the graph is what counts
            got = sum(1 for p in trainable if p.grad is not None)
    except Exception:  # noqa: BLE001 (a model that needs other inputs: no probe, no finding)
        return None
    finally:
        for p, g in zip(trainable, saved):
            p.grad = g
        model.train(was_training)
    return len(trainable), got


def _checkpointing(model: nn.Module) -> tuple[int, bool | None, bool] | None:
    """(checkpointed modules, use_reentrant, an input-grad hook is set), or None when off."""
    on = [m for m in model.modules() if getattr(m, "gradient_checkpointing", False) is True]
    if not on:
        return None
    func = getattr(on[-1], "_gradient_checkpointing_func", None)
    reentrant = func.keywords.get("use_reentrant") if isinstance(func, functools.partial) else None
    holders = [model] + [m for m in model.modules() if hasattr(m, "_require_grads_hooks")]
    hooked = any(getattr(m, "_require_grads_hooks", None) or getattr(m, "_require_grads_hook", None)
                 for m in holders)
    return len(on), reentrant, bool(hooked)


def check_gradients(model: nn.Module, probe: bool) -> list[Finding]:
    checkpointing = _checkpointing(model)
    probed = _probe_gradients(model) if probe else None
    if probed is not None and probed[1] == probed[0]:
        return []
    if checkpointing is not None:
        blocks, reentrant, hooked = checkpointing
        if probed is None and (reentrant is False or hooked):
            return []
        numbers = {"checkpointed": blocks}
        evidence = (f"{blocks} checkpointed modules, use_reentrant={reentrant}, input-grad hook "
                    f"{'set' if hooked else 'missing'}")
        if probed is not None:
            numbers.update(trainable_tensors=probed[0], with_gradient=probed[1])
            evidence += f"; one backward pass: {probed[1]} of {probed[0]} trainable tensors got a gradient"
        return [Finding("gradients", "error", "Gradient checkpointing runs the blocks without keeping their "
                        "graph; with reentrant checkpointing and frozen input embeddings no block input "
                        "requires grad, so the recomputed blocks are skipped in backward and the adapter "
                        "inside them gets no gradient (peft #137, transformers #42489).",
                        evidence + ".",
                        "model.enable_input_require_grads(), or gradient_checkpointing_enable("
                        "gradient_checkpointing_kwargs={'use_reentrant': False}).", numbers)]
    if probed is None:
        return []
    return [Finding("gradients", "error" if probed[1] == 0 else "warning",
                    "Trainable tensors get no gradient from the loss: they do not take part in the forward "
                    "pass (adapters disabled, an inactive adapter left trainable, a detached path).",
                    f"one backward pass: {probed[1]} of {probed[0]} trainable tensors got a gradient.",
                    "peftlab.set_disabled(model, False); freeze what you do not train; check the adapter is active.",
                    {"trainable_tensors": probed[0], "with_gradient": probed[1]})]


@torch.no_grad()
def _merge_loss(layer: AdaptedLayer, adapter: str) -> tuple[float, float] | None:
    """(share of ΔW's norm a 4-bit merge loses, share of ΔW's entries rounded back to the same code)."""
    from peftlab.inject import dense_weight
    from peftlab.quant.nf4 import dequantize_4bit, quantize_4bit

    base = layer.base_layer
    weight = base.weight if getattr(base, "is_quantized", False) is True else dense_weight(base)
    delta = layer.delta_weight(adapter)
    if delta is None or not bool(delta.abs().sum() > 0) or delta.shape != weight.shape:
        return None
    state = getattr(base.weight, "quant_state", None)
    kind = getattr(base, "quant_type", None) or getattr(state, "quant_type", "nf4")
    blocksize = getattr(base, "blocksize", None) or getattr(state, "blocksize", 64)
    w = weight.float()
    before = dequantize_4bit(*quantize_4bit(w, kind, blocksize, double_quant=False), dtype=torch.float32)
    after = dequantize_4bit(*quantize_4bit(w + delta.float(), kind, blocksize, double_quant=False),
                            dtype=torch.float32)
    kept = after - before
    lost = float((kept - delta.float()).norm() / delta.float().norm())
    unchanged = float((kept == 0).float().mean())
    return lost, unchanged


def check_merge_4bit(model: nn.Module, view: AdapterView) -> list[Finding]:
    if view.kind != "peftlab":
        return []
    name = peek(model).active
    losses = []
    for layer in adapted_layers(model).values():
        base = layer.base_layer
        four_bit = getattr(base, "is_quantized", False) is True or is_quantized(getattr(base, "weight", torch.empty(0)))
        if four_bit and name in layer.adapters and layer.adapters[name].mergeable:
            found = _merge_loss(layer, name)
            if found is not None:
                losses.append(found)
    if not losses:
        return []
    lost = sum(x for x, _ in losses) / len(losses)
    unchanged = sum(y for _, y in losses) / len(losses)
    if lost < MERGE_LOSS:
        return []
    return [Finding("merge-4bit", "warning", "The base is 4-bit: merging the adapter means re-quantizing W + ΔW, "
                    "and ΔW is smaller than the gap between 4-bit codes, so most of it rounds away and the "
                    "merged model is close to the base model.",
                    f"over {len(losses)} adapted layers, re-quantizing loses {lost:.0%} of ΔW's norm; "
                    f"{unchanged:.0%} of the weights round back to their old code.",
                    "Keep the adapter unmerged for 4-bit inference, or merge into a 16-bit copy of the base "
                    "(load it without quantization, peftlab.load_adapter, then peftlab.merge).",
                    {"lost": lost, "unchanged": unchanged, "layers": len(losses)})]


def check_lr(view: AdapterView, lr: float) -> list[Finding]:
    low, high, typical = lr_range(view.method)
    if low <= lr <= high:
        return []
    far = typical / lr if lr < low else lr / typical
    method = view.method or "this method"
    return [Finding("lr", "warning", f"The learning rate is far {'below' if lr < low else 'above'} the usual "
                    f"range for {method}: " + ("the adapter barely moves in the steps you train."
                                               if lr < low else "the loss jumps or diverges."),
                    f"lr={lr:g} is {far:.0f}x {'below' if lr < low else 'above'} the usual {typical:g} "
                    f"for {method} (usual range {low:g} to {high:g}).",
                    f"Start from lr={typical:g}.", {"lr": lr, "typical": typical, "low": low, "high": high})]


__all__ = ["check_trainable", "check_targets", "check_alpha", "check_gradients", "check_merge_4bit",
           "check_lr"]
