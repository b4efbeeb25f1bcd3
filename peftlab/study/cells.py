"""One cell of a study: train one method at one learning rate and seed, then measure it.

``measure_base`` scores the untrained model; ``run_cell`` trains from the same pretrained weights
and records the validation and test metric, forgetting, parameters, memory and time (see the
package docstring, :mod:`peftlab.study`); with ``updates``, what training did to those layers'
weights (:func:`peftlab.spectra.update_report`); with ``reduce_intruders``, a LoRA cell measured
again after its intruder dimensions are scaled down (:func:`peftlab.spectra.reduce_intruders`).
"""

from __future__ import annotations

import math
import statistics
from typing import Any

from peftlab.study.config import FULL, StudyConfig, study_task
from peftlab.study.specs import parse_spec


def measure_base(config: StudyConfig) -> dict[str, Any]:
    """The untrained model's metrics (its classifier head, if any, is freshly initialised)."""
    task = study_task(config)
    model, tokenizer = _load(config, task, seed=0)
    if config.updates:
        from peftlab.spectra import snapshot

        snapshot(model, config.updates)  # refuses layer names the model does not have, before any cell
    return _scores(model, task, tokenizer, config)


def run_cell(config: StudyConfig, method: str, lr: float, seed: int, keep_model: bool = False,
             gradient_checkpointing: bool = False):
    """Train one cell from the pretrained weights and measure it (see the module docstring).

    Returns the cell's record; with ``keep_model``, ``(record, model, tokenizer)`` (a lesson reruns
    a cell live and then inspects the trained model). ``gradient_checkpointing`` recomputes
    activations in the backward pass: the same steps in less memory (a lesson within 2 GB).
    """
    import torch

    import peftlab
    from peftlab.train import model_device, start_data

    spec = parse_spec(method)  # "lora", or "lora:r=64:rslora" with its own settings
    training = {"steps": config.steps, "batch_size": config.batch_size, **spec.train,
                "gradient_checkpointing": gradient_checkpointing}
    task = study_task(config)
    model, tokenizer = _load(config, task, seed)
    probe = _ForgettingProbe(model, tokenizer, task, config.forgetting_rows)
    before = None
    if config.updates and spec.method == FULL:  # an adapter keeps W; full fine-tuning overwrites it
        from peftlab.spectra import snapshot

        before = snapshot(model, config.updates)
    train_rows = task.training_data(f"train[:-{config.validation_rows}]")
    torch.manual_seed(seed)  # the adapter's initial weights
    if spec.method == FULL:
        for p in model.parameters():
            p.requires_grad_(True)
    else:
        from peftlab.methods import get_method

        kwargs = {"r": config.rank} if "r" in get_method(spec.method).config.field_names() else {}
        kwargs.update(spec.adapt)
        kwargs.update(start_data(model, spec.method, train_rows, tokenizer, max_length=config.max_length,
                                  batch_size=training["batch_size"], seed=seed))
        model = peftlab.adapt(model, spec.method, backend=config.backend, **kwargs)
    params = peftlab.count_parameters(model)
    result = peftlab.train(model, train_rows, tokenizer=tokenizer, lr=lr, max_length=config.max_length,
                           warmup_ratio=config.warmup_ratio, seed=seed, progress=False, **training)
    losses = result.losses
    cell = {"method": method, "lr": lr, "seed": seed,
            "status": "ok" if result.stop_reason == "completed" else result.stop_reason,
            "trainable_params": params.trainable, "total_params": params.total,
            "peak_memory_mb": round(result.peak_memory_mb, 1),
            "step_time_s": round(statistics.median(r["step_time_s"] for r in result.history), 4),
            "time_s": round(result.time_s, 1), "final_loss": result.final_loss,
            "device": model_device(model).type,
            "losses": [round(x, 4) for x in losses]}
    if result.stop_reason == "completed":
        scores = _scores(model, task, tokenizer, config)
        cell.update({f"{part}_{task.metric}": scores[part][task.metric] for part in ("valid", "test")})
        cell["forgetting"] = probe.after(model)
        if config.updates:
            from peftlab.spectra import update_report

            cell["updates"] = update_report(model, before, layers=config.updates)
        if config.reduce_intruders and spec.method == "lora":
            cell["reduced"] = _reduced(model, task, tokenizer, config, probe)
    return (cell, model, tokenizer) if keep_model else cell


class _ForgettingProbe:
    """Forgetting on BBC News text: cross-entropy rise (causal LM) or embedding drift (encoder)."""

    def __init__(self, model, tokenizer, task, rows: int):
        from peftlab.tasks import CLASSIFY, load_task

        self.tokenizer, self.rows = tokenizer, rows
        self.encoder = task.framing == CLASSIFY
        self.probe = load_task("forgetting")
        self.before = self._embeddings(model) if self.encoder else self._cross_entropy(model)

    def after(self, model) -> float:
        import torch

        if not self.encoder:
            return round(self._cross_entropy(model) - self.before, 5)
        cos = torch.nn.functional.cosine_similarity(self._embeddings(model), self.before, dim=-1)
        return round(1.0 - float(cos.mean()), 6)

    def _cross_entropy(self, model) -> float:
        import peftlab

        ppl = peftlab.evaluate(model, self.probe, tokenizer=self.tokenizer, limit=self.rows)["perplexity"]
        return math.log(ppl)

    def _embeddings(self, model):
        import torch

        texts = [self.probe.input_text(r) for r in self.probe.rows("test", self.rows)]
        device = next(model.parameters()).device
        was_training = model.training
        model.eval()
        out = []
        with torch.no_grad():
            for start in range(0, len(texts), 16):
                enc = self.tokenizer(texts[start:start + 16], truncation=True, max_length=128,
                                     padding=True, return_tensors="pt").to(device)
                hidden = model(**enc, output_hidden_states=True).hidden_states[-1]  # (B, T, D)
                mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                out.append((hidden * mask).sum(1) / mask.sum(1))
        model.train(was_training)
        return torch.cat(out).float()


def _reduced(model, task, tokenizer, config: StudyConfig, probe: _ForgettingProbe) -> dict[str, dict[str, Any]]:
    """For each lambda of ``config.reduce_intruders``: the intruders scaled (a new adapter, made
    active), the test metric and forgetting measured, then the trained adapter active again."""
    import peftlab
    from peftlab.compose import delete_adapter, set_adapter
    from peftlab.spectra import reduce_intruders

    out = {}
    for mitigation in config.reduce_intruders:
        counts = reduce_intruders(model, mitigation=mitigation, adapter_name="default", new_adapter_name="reduced")
        test = peftlab.evaluate(model, task, tokenizer=tokenizer, limit=config.test_rows)[task.metric]
        out[f"{mitigation:g}"] = {"intruders": sum(counts.values()), "matrices": sum(c > 0 for c in counts.values()),
                                  f"test_{task.metric}": test, "forgetting": probe.after(model)}
        set_adapter(model, "default")
        delete_adapter(model, "reduced")
    return out


def _load(config: StudyConfig, task, seed: int):
    import torch

    import peftlab

    torch.manual_seed(seed)  # a classifier's new head
    return peftlab.load_model(config.model or task.model, num_labels=task.num_labels)


def _valid_split(config: StudyConfig) -> str:
    return f"train[-{config.validation_rows}:]"


def _scores(model, task, tokenizer, config: StudyConfig) -> dict[str, dict[str, float]]:
    """``peftlab.evaluate`` on the validation rows (the first ``eval_limit``) and the test rows."""
    import peftlab

    return {"valid": peftlab.evaluate(model, task, tokenizer=tokenizer, split=_valid_split(config),
                                      limit=task.eval_limit),
            "test": peftlab.evaluate(model, task, tokenizer=tokenizer, limit=config.test_rows)}
