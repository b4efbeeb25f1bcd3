"""Finding target layers by module name and type (peft's rules: exact names, suffixes, a regex,
"all-linear")."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence

from torch import nn

from peftlab.errors import ConfigError
from peftlab.inject.adapter import AdaptedLayer, TrainableCopy, base_of
from peftlab.inject.layers import is_linear

Targets = str | Sequence[str]


def output_head_names(model: nn.Module) -> set[str]:
    """Names of the modules that produce the model's outputs (LM head, classifier)."""
    names = set()
    get_out = getattr(model, "get_output_embeddings", None)
    head = get_out() if callable(get_out) else None
    for name, module in model.named_modules():
        if head is not None and module is head:
            names.add(name)
    return names


def candidate_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Every module that could be a target, in named_modules' order (each module once): skips the
    insides of already adapted layers without visiting them, so a model carrying many adapters
    costs no more to search than a bare one."""
    out: dict[str, nn.Module] = {}
    seen = {id(model)}

    def walk(module: nn.Module, prefix: str) -> None:
        for child_name, child in module.named_children():
            if id(child) in seen:
                continue
            seen.add(id(child))
            name = f"{prefix}.{child_name}" if prefix else child_name
            out[name] = child
            if not isinstance(child, (AdaptedLayer, TrainableCopy)):
                walk(child, name)

    walk(model, "")
    return out


def matches(name: str, targets: Targets) -> bool:
    """peft's matching rule: a string is a full regex; a list matches a name or a name suffix."""
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def find_targets(
    model: nn.Module,
    targets: Targets,
    accept: Callable[[nn.Module], bool] = lambda m: is_linear(m) or isinstance(m, nn.Embedding),
    exclude: Iterable[str] = (),
    expected: str = "a linear layer (nn.Linear, Conv1D) or, for some methods, an nn.Embedding",
) -> list[str]:
    """Names of the modules a method should adapt.

    ``targets`` is ``"all-linear"`` (every linear layer except the output head), a regex string,
    or a list of module names / name suffixes. Raises :class:`ConfigError` listing the available
    names when nothing matches, or when a match is the output head or a type ``accept`` refuses
    (``expected`` says, in words, what it accepts).
    """
    # a layer that already carries an adapter is judged by its base layer, so that a second
    # named adapter can go on the same layers
    modules = {n: base_of(m) for n, m in candidate_modules(model).items()}
    heads = output_head_names(model) | set(exclude)
    # nn.MultiheadAttention never calls its out_proj (it reads out_proj.weight itself), so an
    # adapter there would be ignored: the attention block is the target instead
    inside_attention = {f"{n}.out_proj" for n, m in modules.items() if isinstance(m, nn.MultiheadAttention)}
    if targets == "all-linear":
        found = [n for n, m in modules.items() if is_linear(m) and n not in heads | inside_attention
                 and not any(n.startswith(h + ".") for h in heads)]
    else:
        found = [n for n in modules if matches(n, targets)]
        for name in found:
            if name in inside_attention:
                raise ConfigError(
                    f"Target {name!r} is the out_proj of an nn.MultiheadAttention, which never calls it "
                    "(it reads the weight directly), so an adapter there would change nothing. Expected "
                    f"the attention module itself; try targets=[{name.rsplit('.', 1)[0].rsplit('.', 1)[-1]!r}] "
                    "with method 'lora' (it adapts in_proj and out_proj together)."
                )
            if name in heads:
                raise ConfigError(
                    f"Target {name!r} is the model's output head. Adapting it is rarely intended "
                    "and peft refuses it too. Expected attention/MLP layers; try 'all-linear' or "
                    "names such as 'q_proj', 'v_proj'. To train the head fully, pass "
                    f"modules_to_save=[{name.rsplit('.', 1)[-1]!r}]."
                )
            if not accept(modules[name]):
                raise ConfigError(
                    f"Target {name!r} is a {type(modules[name]).__name__}, which this method cannot "
                    f"adapt. Expected {expected}. Try a more specific pattern."
                )
    if not found:
        raise ConfigError(
            f"Targets {targets!r} matched no module. Expected names (or name suffixes) of linear "
            f"layers such as: {_summarise_linear_names(modules)}. Try one of these, or 'all-linear'."
        )
    return found


def _summarise_linear_names(modules: dict[str, nn.Module]) -> str:
    """Distinct last name parts of linear layers, e.g. 'q_proj, k_proj, ...' (the useful ones)."""
    seen: dict[str, None] = {}
    for name, module in modules.items():
        if is_linear(module) or isinstance(module, nn.Embedding):
            seen.setdefault(name.rsplit(".", 1)[-1], None)
    return ", ".join(seen) or "(none: the model has no linear layers)"
