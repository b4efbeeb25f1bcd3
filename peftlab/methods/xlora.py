"""X-LoRA: a mixture of LoRA experts, mixed per token and per layer by a learned router.

Buehler & Buehler 2024, X-LoRA: Mixture of Low-Rank Adapter Experts, https://arxiv.org/abs/2402.07148
(peft's XLoraModel, peft/tuners/xlora/, is the production path this is proven equal to).

Each adapted layer carries n LoRA experts (B_i A_i, trained before, usually on different tasks).
Every forward call runs the model twice:

    1. scaling pass (no gradient): every expert scaled by a constant c (scaling_pass_value, 0 by
       default: the base model) ──▶ last hidden state h (B, T, d)
    2. router: λ = softmax(MLP(h))  (B, T, L, n): one weight per token, adapted layer l, expert i
       (one head shared by all layers unless layerwise_scalings)
    3. the real pass, at adapted layer l:
           y = W0 x + g · Σ_i s_i · B_i A_i (λ_{l,i} ⊙ x)        (g = global_scaling_weight)

Options: ``top_k_lora`` keeps each token's k largest λ (others 0), ``enable_softmax_topk`` then
renormalises the kept ones; ``xlora_depth`` > 1 puts hidden layers of ``xlora_size`` (ReLU,
dropout) in the router. Only the router trains unless ``use_trainable_adapters``.

In peftlab the experts are ordinary named LoRA adapters on the same layers; the X-LoRA adapter
on a layer is a mixer holding no weights of its own; the router lives on the model as
``model.xlora_router.adapters[<name>]`` (the ``adapters.<name>`` path marks it as that adapter's
parameters for freezing and counting). ``peftlab.adapt(model, "xlora")`` with no ``experts``
creates ``n_experts`` fresh LoRA experts and trains them with the router (fresh experts are
zero, so a router alone would have nothing to mix). Pass ``experts=("a", "b")`` (LoRA adapters
already on the model) or ``experts={"a": "path/to/a", ...}`` (saved LoRA adapters) to mix
trained experts: then only the router trains, as in the paper.

``peftlab.save_adapter`` writes a whole X-LoRA adapter in peft's folder format (router at the
top, each expert in a subfolder, peftlab/xlora_io.py); ``peftlab.load_adapter`` and
``peft.PeftModel.from_pretrained`` both load it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from peftlab import inject
from peftlab.errors import ConfigError
from peftlab.methods.base import AdapterConfig, check_range, is_count
from peftlab.state import active_name, records


@dataclass(frozen=True)
class XLoRAConfig(AdapterConfig):
    # LoRA adapters to mix: names of adapters on the model, or {name: saved adapter folder};
    # None: n_experts fresh LoRA experts (r, alpha, targets below), trained with the router
    experts: tuple[str, ...] | dict[str, str] | None = None
    n_experts: int = 2  # fresh experts only
    r: int = 8  # fresh experts' rank
    alpha: float = 16.0  # fresh experts' alpha
    hidden_size: int | None = None  # the router's input size; None: model.config.hidden_size
    enable_softmax: bool = True  # softmax over experts of the router's logits
    enable_softmax_topk: bool = False  # softmax over the top-k kept experts only
    softmax_temperature: float = 1.0  # logits / T before the softmax
    layerwise_scalings: bool = False  # one set of weights per adapted layer (else shared)
    top_k_lora: int | None = None  # keep each token's k largest expert weights
    xlora_depth: int = 1  # router layers (1: a single linear layer)
    xlora_size: int = 2048  # router hidden width when xlora_depth > 1
    xlora_dropout_p: float = 0.2  # dropout between router layers when xlora_depth > 1
    use_trainable_adapters: bool | None = None  # None: True for fresh experts, False for given ones
    scaling_pass_value: float = 0.0  # every expert's weight during the scaling pass
    global_scaling_weight: float = 1.0  # g: multiplies every expert's output

    def __post_init__(self) -> None:
        if self.experts is None and not is_count(self.n_experts):
            raise ConfigError(f"n_experts={self.n_experts!r} is invalid. Expected a positive integer, e.g. 2.")
        if self.xlora_depth < 1:
            raise ConfigError(f"xlora_depth={self.xlora_depth!r} is invalid. Expected 1 or more router layers.")
        check_range("softmax_temperature", self.softmax_temperature, low=0.0, low_open=True)
        check_range("xlora_dropout_p", self.xlora_dropout_p, low=0.0, high=1.0, high_open=True)


class XLoRAState:
    """What the router hands the layers for one forward call (plain object, not a module)."""

    def __init__(self) -> None:
        self.scalings: Tensor | None = None  # (B, T, layers, experts) while a call runs
        self.last_scalings: Tensor | None = None  # the latest router output, to inspect or plot
        self.in_scaling_pass = False


class XLoRAMixer(inject.Adapter):
    """y = W0 x + g · Σ_i s_i B_i A_i (λ_{l,i} ⊙ x): this layer's experts, weighted per token."""

    mergeable = False
    unmergeable_reason = "its experts' weights change with every token (the router's output)"

    def __init__(self, experts: list[tuple[int, nn.Module]], expert_names: tuple[str, ...],
                 layer_number: int, config: XLoRAConfig, state: XLoRAState, trainable: bool) -> None:
        super().__init__()
        self._experts = tuple(experts)  # (position among all experts, LoRA): not registered, the
        self.layer_number = layer_number  # layer owns them under their own names
        self.config = config
        self.state = state
        self.trains_with = expert_names if trainable else ()  # see inject.freeze_all_but_adapters

    def weights(self, scalings: Tensor) -> Tensor:
        """This layer's λ (B, T, n) after the top-k / softmax-top-k options."""
        lam = scalings[:, :, self.layer_number, :]
        if self.config.top_k_lora is not None:
            keep = torch.zeros_like(lam, dtype=torch.bool)
            keep.scatter_(-1, torch.topk(lam, k=self.config.top_k_lora, dim=-1).indices, True)
            lam = lam * keep.to(lam.dtype)
        if self.config.enable_softmax_topk:
            kept = lam != 0
            lam = torch.softmax(lam.masked_fill(~kept, float("-inf")), dim=-1).masked_fill(~kept, 0.0)
        return lam

    def forward(self, x: Tensor, base: nn.Module, result: Tensor) -> Tensor:
        scalings = self.state.scalings
        lam = self.weights(scalings) if scalings is not None else None
        g = self.config.global_scaling_weight if scalings is not None else 1.0  # no router: plain sum
        out_dtype = result.dtype
        for position, lora in self._experts:
            x = x.to(lora.lora_A.dtype)
            x_i = x * lam[:, :, position].unsqueeze(-1) if lam is not None else x  # (B, T, d_in)
            bias = getattr(lora, "lora_B_bias", None)  # an expert with lora_bias: peft's lora_B adds it too
            result = result + F.linear(F.linear(lora.dropout(x_i), lora.lora_A), lora.lora_B, bias) * lora.scaling * g
        return result.to(out_dtype)


class XLoRARouter(nn.Module):
    """The classifier: last hidden state (B, T, d) -> expert weights λ (B, T, layers, experts)."""

    def __init__(self, config: XLoRAConfig, n_experts: int, n_layers: int) -> None:
        super().__init__()
        self.config, self.n_experts, self.n_layers = config, n_experts, n_layers
        out = n_experts * n_layers if config.layerwise_scalings else n_experts
        width, layers = config.hidden_size, []
        for _ in range(config.xlora_depth - 1):  # peft's layout: Linear, ReLU[, Dropout] ..., Linear
            layers += [nn.Linear(width, config.xlora_size), nn.ReLU()]
            if config.xlora_dropout_p > 0:
                layers.append(nn.Dropout(config.xlora_dropout_p))
            width = config.xlora_size
        self.layers = nn.Sequential(*layers, nn.Linear(width, out))

    def forward(self, hidden: Tensor) -> Tensor:
        batch, seq, _ = hidden.shape
        logits = self.layers(hidden)  # (B, T, n·L) or (B, T, n)
        if not self.config.layerwise_scalings:
            logits = logits.unsqueeze(2).expand(-1, -1, self.n_layers, -1)  # one head for all layers
        scalings = logits.reshape(batch, seq, self.n_layers, self.n_experts)
        if self.config.enable_softmax:
            scalings = torch.softmax(scalings / self.config.softmax_temperature, dim=-1)
        return scalings


class _RouterHome(nn.Module):
    """``model.xlora_router``: routers by adapter name, like a layer's ``adapters``."""

    def __init__(self) -> None:
        super().__init__()
        self.adapters = nn.ModuleDict()
        self.states: dict[str, XLoRAState] = {}


def build_xlora(model: nn.Module, config: XLoRAConfig, adapter_name: str) -> None:
    """Find or create the experts, put a mixer on every layer that has one, add the router."""
    check_one_stack(model)
    names = expert_names_given(model, config, adapter_name)
    trainable = config.use_trainable_adapters
    trainable = config.experts is None if trainable is None else trainable
    layers = [layer for layer in inject.adapted_layers(model).values() if any(n in layer.adapters for n in names)]
    state = XLoRAState()
    for number, layer in enumerate(layers):  # model order: peft numbers its layers the same way
        experts = [(i, layer.adapters[n]) for i, n in enumerate(names) if n in layer.adapters]
        if any(getattr(lora, "is_embedding", False) or not hasattr(lora, "lora_A") for _, lora in experts):
            raise ConfigError("X-LoRA experts must be LoRA adapters on linear layers. Expected experts "
                              "added with method 'lora' on linear targets.")
        layer.adapters[adapter_name] = XLoRAMixer(experts, names, number, config, state, trainable)
    hidden = config.hidden_size or getattr(getattr(model, "config", None), "hidden_size", None)
    if hidden is None:
        raise ConfigError("X-LoRA's router needs the model's hidden size. Expected model.config.hidden_size; "
                          "try hidden_size=... .")
    config = dataclasses.replace(config, hidden_size=hidden)
    home = getattr(model, "xlora_router", None)
    if home is None:
        home = model.xlora_router = _RouterHome()
        model.register_forward_pre_hook(_scaling_pass, with_kwargs=True)
        model.register_forward_hook(_end_of_call, always_call=True)
    weight = next(model.parameters())
    home.adapters[adapter_name] = XLoRARouter(config, len(names), len(layers)).to(weight.device, weight.dtype)
    home.states[adapter_name] = state
    turn_off_cache(model)


def expert_names_given(model: nn.Module, config: XLoRAConfig, adapter_name: str) -> tuple[str, ...]:
    """The experts' names, each a LoRA adapter on the model already: fresh ones are
    ``<adapter>_expert<i>``, saved ones named by the keys of ``experts``. The method's ``prepare``
    hook (peftlab/xlora_io.py) puts those on the model before the build."""
    names = fresh_expert_names(config, adapter_name) if config.experts is None else tuple(config.experts)
    recs = records(model)
    wrong = [n for n in names if n not in recs or recs[n].method != "lora"]
    if wrong:
        raise ConfigError(
            f"X-LoRA experts {wrong} are not LoRA adapters on this model (it has: "
            f"{', '.join(f'{n} ({r.method})' for n, r in recs.items()) or 'none'}). Expected names of "
            "LoRA adapters, a {name: folder} dict of saved ones, or no experts (fresh ones are made)."
        )
    return names


def expert_names(model: nn.Module, adapter_name: str = "default") -> tuple[str, ...]:
    """An X-LoRA adapter's expert names in router order (read back from the mixers)."""
    order: dict[int, str] = {}
    for layer in inject.adapted_layers(model).values():
        if adapter_name in layer.adapters:
            by_id = {id(m): n for n, m in layer.adapters.items()}
            for position, lora in layer.adapters[adapter_name]._experts:
                order[position] = by_id[id(lora)]
    return tuple(order[i] for i in sorted(order))


def fresh_expert_names(config: XLoRAConfig, adapter_name: str) -> tuple[str, ...]:
    return tuple(f"{adapter_name}_expert{i}" for i in range(config.n_experts))


def turn_off_cache(model: nn.Module) -> None:
    """X-LoRA's scaling pass needs the whole sequence at every step: no key/value cache (peft
    refuses X-LoRA with one)."""
    if getattr(getattr(model, "config", None), "use_cache", False):
        model.config.use_cache = False


def _scaling_pass(model: nn.Module, args: tuple, kwargs: dict):
    """Before each call of the model: run it once with constant expert weights and no gradient,
    and let the router turn its last hidden state into the weights the real call uses."""
    name = active_name(model)
    home = model.xlora_router
    if name not in home.adapters or home.states[name].in_scaling_pass:
        return None
    if any(layer.disabled for layer in inject.adapted_layers(model).values()):
        return None
    state, router = home.states[name], home.adapters[name]
    tokens = kwargs.get("input_ids", args[0] if args else None)
    if tokens is None:
        tokens = kwargs["inputs_embeds"]
    batch, seq = tokens.shape[:2]
    state.scalings = torch.full((batch, seq, router.n_layers, router.n_experts), router.config.scaling_pass_value,
                                device=tokens.device, dtype=next(router.parameters()).dtype)
    state.in_scaling_pass = True
    try:
        with torch.no_grad():
            out = model(*args, **{**kwargs, "output_hidden_states": True, "return_dict": True})
    finally:
        state.in_scaling_pass = False
    state.scalings = state.last_scalings = router(out.hidden_states[-1])
    return None


def _end_of_call(model: nn.Module, args: tuple, output):
    for state in model.xlora_router.states.values():
        if not state.in_scaling_pass:
            state.scalings = None
    return output


def remove_router(model: nn.Module, adapter_name: str) -> None:
    """Delete one X-LoRA adapter's router (peftlab.compose.delete_adapter calls this)."""
    del model.xlora_router.adapters[adapter_name]
    del model.xlora_router.states[adapter_name]


def router_of(model: nn.Module, adapter_name: str = "default") -> XLoRARouter:
    """The router (classifier) of an X-LoRA adapter."""
    return model.xlora_router.adapters[adapter_name]


def last_scalings(model: nn.Module, adapter_name: str = "default") -> Tensor | None:
    """λ of the latest call, (B, T, layers, experts): which expert each token used, per layer."""
    return model.xlora_router.states[adapter_name].last_scalings


# the router's options, named alike in XLoRAConfig and peft's XLoraConfig
ROUTER_OPTIONS = ("enable_softmax", "enable_softmax_topk", "softmax_temperature", "layerwise_scalings", "top_k_lora",
                  "xlora_depth", "xlora_size", "xlora_dropout_p", "scaling_pass_value", "global_scaling_weight")


# --------------------------------------------------------------------------------------------
# Counting, and the peft config for backend="peft"
# --------------------------------------------------------------------------------------------
def xlora_parameter_count(model: nn.Module, config: XLoRAConfig) -> int:
    """Trainable parameters: the router (Linear layers of the classifier), plus the experts' LoRA
    factors when they train. ``model`` is the base (fresh experts) or carries the given experts."""
    trainable = config.experts is None if config.use_trainable_adapters is None else config.use_trainable_adapters
    if config.experts is None:
        names = inject.find_targets(model, config.targets or "all-linear", exclude=config.modules_to_save or ())
        n_experts, n_layers = config.n_experts, len(names)
        experts = n_experts * sum(config.r * sum(inject.layer_dims(inject.base_of(model.get_submodule(n)))) for n in names)
    else:
        given = tuple(config.experts)
        n_experts = len(given)
        layers = [m for m in inject.adapted_layers(model).values() if any(e in m.adapters for e in given)]
        n_layers = len(layers)
        experts = sum(p.numel() for m in layers for e in given if e in m.adapters for p in m.adapters[e].parameters())
        if any(e not in records(model) for e in given):
            raise ConfigError("Counting X-LoRA's parameters with given experts needs them on the model.")
    hidden = config.hidden_size or model.config.hidden_size
    out = n_experts * n_layers if config.layerwise_scalings else n_experts
    widths = [hidden] + [config.xlora_size] * (config.xlora_depth - 1) + [out]
    router = sum(a * b + b for a, b in zip(widths, widths[1:]))  # weight + bias per Linear
    return router + (experts if trainable else 0)


def check_one_stack(model: nn.Module) -> None:
    """The router reads ``hidden_states[-1]`` of the scaling pass: an encoder-decoder returns two
    stacks (encoder_ and decoder_hidden_states) and no ``hidden_states`` (peft fails there too)."""
    if getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        raise ConfigError(
            f"X-LoRA's router reads the last hidden state of every token, which an encoder-decoder "
            f"({type(model).__name__}) does not return as one sequence (its encoder and decoder have "
            "their own); peft 0.21's X-LoRA fails there too. Expected a decoder-only or encoder model; "
            "try method 'lora' (or several LoRA adapters with peftlab.add_weighted_adapter)."
        )


def check_peft_can_load(model: nn.Module) -> None:
    """peft 0.21's X-LoRA loader renames the experts' weights as if the transformer sat at
    ``model.``: on other models (GPT-2's ``transformer.``, BERT's ``bert.``) peft refuses the very
    folder it saved, so a peft X-LoRA model there could not be kept."""
    if isinstance(getattr(model, "model", None), nn.Module):
        return
    raise ConfigError(
        f"peft 0.21's X-LoRA cannot load its own saved adapters on a {type(model).__name__}: its "
        "loader rewrites the experts' weight names as if the transformer sat at `model.` (as in "
        f"Llama, Qwen, Mistral, OPT), and this model keeps it at "
        f"`{getattr(model, 'base_model_prefix', '?')}.`, so peft refuses the names it wrote. "
        "Expected backend='reference': peftlab's X-LoRA trains, saves and loads on this model."
    )


def peft_kwargs(config: XLoRAConfig, model: nn.Module | None) -> dict:
    """peft.XLoraConfig's fields for ``backend="peft"``: peft loads its experts from folders, so
    ``experts`` must be {name: folder}. (A reference X-LoRA model: see peftlab.xlora_io.to_peft_config.)"""
    if not isinstance(config.experts, dict) or model is None:
        raise ConfigError(
            "peft's X-LoRA loads its experts from saved adapter folders. Expected backend='peft' with "
            "experts={name: folder}. For a reference X-LoRA model, save it with peftlab.save_adapter(model, "
            "folder) and load that folder with peft (peftlab.load_adapter(base, folder, backend='peft'))."
        )
    turn_off_cache(model)
    # peft names the experts "0", "1", ... internally and activates them under those names
    return {"hidden_size": config.hidden_size or model.config.hidden_size,
            "adapters": {str(i): str(path) for i, path in enumerate(config.experts.values())},
            "use_trainable_adapters": bool(config.use_trainable_adapters),
            **{f: getattr(config, f) for f in ROUTER_OPTIONS}}
