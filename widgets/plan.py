"""The Lab's preview, widget side: the numbers from ``peftlab.preview``, drawn as the Lab shows them.

What a choice costs before any weight is loaded (trainable parameters per layer type, memory per
category) is arithmetic on models and configs, so it lives in the analysis layer,
:mod:`peftlab.preview`; it is re-exported here under the names the Lab and the notebooks use
(``plan.Choice``, ``plan.estimate``, ``plan.meta_model``, ...). This module only turns those
numbers into the HTML of the preview box and the labels of the module picker.
"""

from __future__ import annotations

from peftlab.preview import (
    ADAMW_BYTES,
    NF4_BYTES,
    Choice,
    Estimate,
    estimate,
    is_classifier,
    linear_modules,
    memory_estimate,
    meta_model,
    per_layer_params,
)


def fmt_int(n: float) -> str:
    """A count with thousands separators: 7168 -> "7,168"."""
    return f"{int(n):,}"


def mib(n: float) -> str:
    """Bytes in MiB, one decimal: "158.4 MiB"."""
    return f"{n / 2**20:,.1f} MiB"


def module_options(modules: dict[str, tuple[int, int, int]], choice: Choice) -> list[tuple[str, str]]:
    """The module picker's (label, suffix) options: each linear-layer name with its shape, how
    many there are and the parameters the choice's method adds to each one.

    ``modules`` is :func:`linear_modules` of the model: {suffix: (d_in, d_out, how many)}.
    """
    options = []
    for suffix, (d_in, d_out, n) in modules.items():
        try:
            per = per_layer_params(choice.method, d_in, d_out, choice)
        except Exception:  # noqa: BLE001 (e.g. r larger than this layer)
            per = None
        adds = f"+{fmt_int(per)} each" if per is not None else "method-specific"
        options.append((f"{suffix}  {d_in}→{d_out}  ×{n}  {adds}", suffix))
    return options


def preview_html(choice: Choice, est: Estimate) -> str:
    """The preview box: trainable parameters (% of the model, per layer type), the notes, and the
    estimated memory per category."""
    c = est.count
    rows = "".join(
        f"<tr><td>{kind}</td><td style='text-align:right'>{fmt_int(v['trainable'])}</td>"
        f"<td style='text-align:right'>{fmt_int(v['total'])}</td></tr>"
        for kind, v in sorted(c.by_type.items(), key=lambda kv: -kv[1]["trainable"]))
    memory = "".join(f"<tr><td>{k}</td><td style='text-align:right'>{mib(v)}</td></tr>"
                     for k, v in est.memory.items())
    total = sum(est.memory.values())
    notes = "".join(f"<br><small>{n}</small>" for n in est.notes)
    return (
        f"<div class='peftlab-preview'><b class='peftlab-trainable'>{fmt_int(c.trainable)}</b> "
        f"trainable parameters = <b>{c.percent:.3f}%</b> of {fmt_int(c.total)}"
        f" ({choice.method}, {choice.model}{', NF4' if choice.quantization else ''}){notes}"
        "<table><tr><th>layer type</th><th>trainable</th><th>total</th></tr>"
        f"{rows}</table><b>Estimated memory</b>: {mib(total)}<table>{memory}</table></div>")


__all__ = ["ADAMW_BYTES", "NF4_BYTES", "Choice", "Estimate", "estimate", "fmt_int", "is_classifier",
           "linear_modules", "memory_estimate", "meta_model", "mib", "module_options", "per_layer_params",
           "preview_html"]
