"""The memory ledger: where the bytes of a training step go, predicted and measured.

    est = peftlab.estimate_memory("smollm2-135m", "lora", r=16, batch=2, seq_len=64, targets="all-linear")
    model = peftlab.adapt(peftlab.load_model("smollm2-135m")[0], "lora", r=16, targets="all-linear")
    got = peftlab.measure_memory(model, batch=2, seq_len=64)
    print(est.table(got))

Categories (bytes), the same for both:

    weights          frozen base weights as stored: dense, or 4-bit codes + their constants
    adapter_weights  trainable parameters (the adapter; every weight for full fine-tuning)
    gradients        one gradient per trainable parameter, same dtype
    optimizer        AdamW: two moments per trainable parameter, in the parameter's dtype
                     (fp32 for peftlab's adapters), plus a one-element step counter each
    activations      tensors saved by the forward pass for backward (logits included)
    temporaries      the biggest short-lived buffer of backward: the logits' gradient, or
                     with gradient checkpointing a recomputed block if that is larger
                     (estimate only: nothing saves it, so the measurement cannot see it)

The package:

    ledger.py       MemoryLedger (the categories, tables, relative errors)
    estimate.py     estimate_memory: a config and a meta-device model, no weights loaded;
                    NF4's bytes
    activations.py  the activations in closed form, block by block (the formula, with
                    references); each adapter reports what it saves for backward
                    (``saved_activations``, peftlab/methods/base.py), so no method is named here
    traced.py       the activations of a meta-device step, where the formula does not reach
    measure.py      measure_memory: one real step; the process's resident and peak memory
"""

from peftlab.memory.activations import (FORMULA_ARCHITECTURES, FORMULA_METHODS, Fusion,  # noqa: F401
                                        activation_bytes, formula_models)
from peftlab.memory.estimate import (NESTED_BLOCK, NF4_BLOCK, estimate_memory, meta_model,  # noqa: F401
                                     nf4_bytes, resolve_config)
from peftlab.memory.ledger import CATEGORIES, MemoryLedger
from peftlab.memory.measure import (measure_memory, peak_memory_mb, process_rss_bytes,  # noqa: F401
                                    reset_peak_memory, tensor_bytes)
from peftlab.memory.traced import traced_activation_bytes  # noqa: F401

__all__ = ["CATEGORIES", "MemoryLedger", "estimate_memory", "measure_memory", "nf4_bytes",
           "activation_bytes", "process_rss_bytes", "resolve_config", "tensor_bytes"]
