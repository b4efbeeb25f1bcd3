"""Write notebooks/19_learning_and_forgetting.ipynb (unexecuted); `python tools/nb.py build` runs it.

    python tools/build_lesson19.py && python tools/nb.py build notebooks/19_learning_and_forgetting.ipynb

The texts that read the stored study's numbers live in tools/lesson19_texts.json, written after the
study ran (its numbers are printed by the cells above each text).
"""

from __future__ import annotations

import json
from pathlib import Path

import nbformat
from nbformat.v4 import new_notebook
from nbkit import Cells  # tools/nbkit.py (this folder is on the path of a script run from it)

ROOT = Path(__file__).resolve().parents[1]
PATH = ROOT / "notebooks" / "19_learning_and_forgetting.ipynb"
_first = nbformat.read(ROOT / "notebooks" / "18_choosing_rank_alpha_lr.ipynb", 4).cells[1].source
INSTALL = _first[:_first.rindex("check=True)\n") + len("check=True)\n")]  # the Colab install lines, as lesson 18's
TEXTS = json.loads((ROOT / "tools" / "lesson19_texts.json").read_text())

cells = Cells()
md, code = cells.md, cells.code


md(TEXTS["intro"])
code(INSTALL + '''import copy
import gc
import math
import statistics
import warnings

import torch

import peftlab
from peftlab import compose, exercises, plots, spectra
from peftlab.study import StudyConfig, load_study, run_cell

warnings.filterwarnings("ignore", category=UserWarning)
warnings.filterwarnings("ignore", category=FutureWarning)
torch.manual_seed(0)
print("torch", torch.__version__)
''')
md(TEXTS["equation"])
md("## From scratch: does a direction of the tuned weight exist in W?")
code('''
print(exercises.describe("intruder_similarity"))


def intruder_similarity(W, W_tuned, top_k):
    ### BEGIN SOLUTION
    U = torch.linalg.svd(W, full_matrices=False).U  # W's left singular vectors
    U_tuned = torch.linalg.svd(W_tuned, full_matrices=False).U[:, :top_k]  # the tuned weight's leading ones
    return (U_tuned.T @ U).abs().max(dim=1).values
    ### END SOLUTION


exercises.check("intruder_similarity", intruder_similarity)
''', solution="ex-intruder_similarity")
md(TEXTS["demo_intro"])
code('''
model, tokenizer = peftlab.load_model("smollm2-135m")
W = model.get_submodule("model.layers.15.self_attn.q_proj").weight.detach().clone()  # (576, 576)
del model
gc.collect()
U, S, Vh = torch.linalg.svd(W, full_matrices=False)
print(f"layer 15's q_proj: sigma_1 = {S[0]:.2f}, sigma_10 = {S[9]:.2f}, sigma_576 = {S[-1]:.3f}, ||W||_F = {W.norm():.1f}")
g = torch.Generator().manual_seed(0)
new, new_in = torch.randn(576, 1, generator=g), torch.randn(576, 1, generator=g)
new, new_in = new / new.norm(), new_in / new_in.norm()  # random unit directions: |cos| about 1/sqrt(576) with W's
print(f"\\n{'rank-1 update s * u v^T, size s':<34}{'along u_1 of W':>16}{'a new direction':>18}")
for size in (1.0, 5.0, 20.0, 40.0):
    own = W + size * U[:, :1] @ Vh[:1]  # along W's own first direction
    other = W + size * new @ new_in.T  # a direction W does not have
    cos_own, cos_new = intruder_similarity(W, own, 10), intruder_similarity(W, other, 10)
    print(f"s = {size:<6g} ({size / S[0].item():.2f} sigma_1){'':<10}"
          f"{int((cos_own < 0.5).sum()):>8} intruders{int((cos_new < 0.5).sum()):>9} intruders")
''')
md(TEXTS["demo_read"])
md(TEXTS["grid_intro"])
code('''
study = load_study("study/forgetting/study.json")
prov = study["provenance"]
print("command:", prov["command"][:170], "...")
print(f"ran on: {prov['cpu']}, torch {prov['torch']}, {prov['date']}; {len(study['cells'])} runs, all finished:",
      all(c["status"] == "ok" for c in study["cells"]))
base = study["base"]["test"]["perplexity"]
NAMES = {"full": "full fine-tuning", "lora:r=4:alpha=8:targets=all-linear": "LoRA r=4",
         "lora:r=16:alpha=32:targets=all-linear": "LoRA r=16", "lora:r=64:alpha=128:targets=all-linear": "LoRA r=64",
         "oft": "OFT"}


def cells_of(method, lr=None):
    return [c for c in study["cells"] if c["method"] == method and (lr is None or c["lr"] == lr)]


def mean(key, cells):
    return statistics.mean(c[key] for c in cells)


def best_lr(method):  # the rate with the lowest mean validation perplexity (never the test set)
    return min({c["lr"] for c in cells_of(method)}, key=lambda lr: mean("valid_perplexity", cells_of(method, lr)))


print(f"\\nuntrained SmolLM2-135M: test perplexity {base:.1f} on Shakespeare")
print(f"{'method':<18}{'trainable':>12}{'lr':>9}{'test ppl':>10}{'forgetting':>12}{'loss, last 10':>15}")
for method in study["config"]["methods"]:
    for lr in sorted({c["lr"] for c in cells_of(method)}):
        group = cells_of(method, lr)
        late = statistics.mean(statistics.mean(c["losses"][-10:]) for c in group)
        mark = "  <- best on validation" if lr == best_lr(method) else ""
        print(f"{NAMES[method]:<18}{group[0]['trainable_params']:>12,}{lr:>9g}{mean('test_perplexity', group):>10.2f}"
              f"{mean('forgetting', group):>12.4f}{late:>15.3f}{mark}")
print("(forgetting: the rise of cross-entropy on BBC News, nats per token; negative: it fell)")
''')
code('''
plots.show(plots.study_learning_forgetting(
    study["cells"], "perplexity", base=base, labels=NAMES,
    title="SmolLM2-135M on Shakespeare, 30 steps of 8: forgetting against learning (labels: learning rates)"))
''')
md(TEXTS["grid_read"])
md(TEXTS["updates_intro"])
code('''
KINDS = ("q_proj", "v_proj", "down_proj")


def layer_stats(cell, kind, key):
    return [report[key] for name, report in cell["updates"].items() if name.endswith(kind)]


def median_of(cell, kind, key, fmt):
    values = layer_stats(cell, kind, key)
    return format(statistics.median(values), fmt) if values else "-"  # OFT adapts q_proj and v_proj only


print(f"{'at the validation-picked rate':<30}" + "".join(f"{k:>30}" for k in KINDS) + f"{'|dW|/|W|':>10}")
print(f"{'':<30}" + f"{'eff. rank / rank_90':>30}" * len(KINDS))
for method in study["config"]["methods"]:
    cell = cells_of(method, best_lr(method))[0]
    row = "".join(f"{median_of(cell, k, 'effective_rank', '.1f'):>22} / {median_of(cell, k, 'rank_90', 'g'):<5}"
                  for k in KINDS)
    relative = statistics.median(r["relative_norm"] for r in cell["updates"].values())
    print(f"{NAMES[method]:<30}{row}{relative:>10.4f}")
print("(medians over the 30 layers; rank_90: the directions holding 90% of the update's energy;\\n"
      " q_proj is 576 x 576, v_proj 192 x 576, down_proj 576 x 1536)")

layer = "model.layers.15.self_attn.q_proj"
series = {}
for method in study["config"]["methods"]:
    values = cells_of(method, best_lr(method))[0]["updates"][layer]["singular_values"]
    series[NAMES[method]] = [v / values[0] for v in values]
fig = plots.singular_values(series, title=f"Singular values of each update of {layer}, divided by the largest (top 64)")
plots.show(fig)
''')
md(TEXTS["updates_read"])
code('''
print(f"{'at the validation-picked rate':<30}{'intruders (top 10 of each matrix)':>36}{'lowest similarity':>20}"
      f"{'median similarity':>20}")
for method in study["config"]["methods"]:
    cell = cells_of(method, best_lr(method))[0]
    similarity = [s for report in cell["updates"].values() for s in report["similarity"]]
    intruders = sum(report["intruders"] for report in cell["updates"].values())
    print(f"{NAMES[method]:<30}{intruders:>36}{min(similarity):>20.3f}{statistics.median(similarity):>20.3f}")
print("\\nat every rate, the lowest similarity of any leading direction (and the number of intruders, below 0.5):")
for method in study["config"]["methods"]:
    line = []
    for lr in sorted({c["lr"] for c in cells_of(method)}):
        reports = [r for c in cells_of(method, lr) for r in c["updates"].values()]
        line.append(f"{lr:g}: {min(s for r in reports for s in r['similarity']):.3f} "
                    f"({sum(r['intruders'] for r in reports)})")
    print(f"  {NAMES[method]:<18}" + "   ".join(line))
''')
md(TEXTS["intruders_read"])
md(TEXTS["live_intro"])
code('''
config = StudyConfig(**{**study["config"], "methods": tuple(study["config"]["methods"]),
                        "seeds": tuple(study["config"]["seeds"]), "updates": (),
                        "lrs": tuple((m, tuple(v)) for m, v in study["config"]["lrs"].items())})
method, lr = LIVE_METHOD, LIVE_LR
live, model, tokenizer = run_cell(config, method, lr, 0, keep_model=True, gradient_checkpointing=True)
stored = cells_of(method, lr)[0]
print(f"live: test perplexity {live['test_perplexity']:.2f}, forgetting {live['forgetting']:.4f}")
print(f"stored: test perplexity {stored['test_perplexity']:.2f}, forgetting {stored['forgetting']:.4f}")
assert abs(live["test_perplexity"] / stored["test_perplexity"] - 1) < 0.02, "the live run left the stored one"
assert abs(live["forgetting"] - stored["forgetting"]) < 0.01, "the live run forgot differently"
print("the stored run again: yes")
'''.replace("LIVE_METHOD", repr(TEXTS["live_method"])).replace("LIVE_LR", repr(TEXTS["live_lr"])), tags=("nbval-ignore-output",))
code('''
found = spectra.find_intruders(model, layers=KINDS)
name = "model.layers.15.self_attn.q_proj"
layer = model.get_submodule(name)
W = layer.base_layer.weight.detach()
mine = intruder_similarity(W, W + layer.delta_weight(), 10)
torch.testing.assert_close(mine, found[name].similarity, rtol=1e-4, atol=1e-4)
stored_counts = {n: r["intruders"] for n, r in stored["updates"].items()}
print(f"your similarity test on {name}: the same as peftlab.spectra's")
print(f"intruders found live: {sum(f.count for f in found.values())} in {sum(f.count > 0 for f in found.values())} "
      f"of {len(found)} matrices (the stored run: {sum(stored_counts.values())})")
print("lowest similarity live:", f"{min(float(f.similarity.min()) for f in found.values()):.3f}")
''', tags=("nbval-ignore-output",))
md(TEXTS["reduce_intro"])
code('''
reduced = load_study("study/intruders/study.json")
print("command:", reduced["provenance"]["command"][:150], "...")
print(f"{'run':<22}{'intruders':>10}{'':>4}{'test perplexity':^27}{'forgetting':^30}")
print(f"{'':<36}{'trained':>9}{'x 0.75':>9}{'x 0':>9}{'trained':>10}{'x 0.75':>10}{'x 0':>10}")
for cell in reduced["cells"]:
    after = cell["reduced"]
    print(f"{NAMES[cell['method']] + ' at ' + format(cell['lr'], 'g'):<22}{after['0.75']['intruders']:>10}{'':>4}"
          f"{cell['test_perplexity']:>9.2f}{after['0.75']['test_perplexity']:>9.2f}{after['0']['test_perplexity']:>9.2f}"
          f"{cell['forgetting']:>10.4f}{after['0.75']['forgetting']:>10.4f}{after['0']['forgetting']:>10.4f}")
print("\\nthe same runs as in the first study (same seed, same steps):",
      all(abs(c["test_perplexity"] - cells_of(c["method"], c["lr"])[0]["test_perplexity"]) < 1e-6 for c in reduced["cells"]))
''')
md(TEXTS["reduce_read"])
md(TEXTS["predict_intro"])
code('''
prediction = None  # trainable parameters of LoRA r=4 on every linear layer of SmolLM2-135M
### BEGIN SOLUTION
per_layer = 4 * ((576 + 576) + (576 + 192) + (576 + 192) + (576 + 576) + 3 * (576 + 1536))  # q, k, v, o, gate, up, down
prediction = 30 * per_layer
### END SOLUTION
''', solution="predict-forgetting", stub="# YOUR PREDICTION HERE (replace None above)")
code('''
from peftlab.inject import adapted_layers

lora_params = sum(layer.adapters["default"].lora_A.numel() + layer.adapters["default"].lora_B.numel()
                  for layer in adapted_layers(model).values())
full_params = cells_of("full")[0]["trainable_params"]
exercises.predicted("trainable parameters of LoRA r=4 on all linear layers of SmolLM2-135M", prediction, lora_params)
print(f"full fine-tuning trains {full_params:,}: LoRA r=4 is {lora_params / full_params:.2%} of that")
''')
md("## Compare with production: peft's `reduce_intruder_dimension`")
md(TEXTS["production_intro"])
code('''
from peftlab.production.hf_peft import import_peft

import_peft()  # peft, with bitsandbytes' CPU notice kept out of the cell
from peft.tuners.lora.intruders import reduce_intruder_dimension

base, _ = peftlab.load_model("smollm2-135m")
theirs = peftlab.adapt(base, "lora", backend="peft", r=4, alpha=8, targets=("v_proj",))
for name, layer in theirs.named_modules():  # peft's LoRA on every v_proj, with our trained A and B
    if name.endswith("v_proj") and hasattr(layer, "lora_A"):
        ours = model.get_submodule(name.removeprefix("base_model.model.")).adapters["default"]
        layer.lora_A["default"].weight.data.copy_(ours.lora_A)
        layer.lora_B["default"].weight.data.copy_(ours.lora_B)
reduce_intruder_dimension(theirs, threshold_epsilon=EPSILON, mitigation_lambda=0.75, logging_sink=None)
counts = spectra.reduce_intruders(model, epsilon=EPSILON, mitigation=0.75, adapter_name="default",
                                  new_adapter_name="peft check", layers=("v_proj",))
gap = 0.0
for n in counts:  # the largest difference of the new updates, relative to the update's largest entry
    mine = model.get_submodule(n).delta_weight("peft check")
    peft_new = theirs.get_submodule("base_model.model." + n).get_delta_weight("intruder_reduced")
    gap = max(gap, ((mine - peft_new).abs().max() / peft_new.abs().max()).item())
print(f"{sum(counts.values())} directions reduced in {sum(c > 0 for c in counts.values())} of {len(counts)} v_proj "
      f"matrices; the new updates, ours vs peft's: largest difference {gap:.1e} of the largest entry")
assert sum(counts.values()) > 0 and gap < 1e-3
del theirs, base
gc.collect()
'''.replace("EPSILON", repr(TEXTS["epsilon"])), tags=("nbval-ignore-output",))
md(TEXTS["summary"])

nb = new_notebook(cells=cells, metadata={"kernelspec": {"display_name": "Python 3", "language": "python",
                                                         "name": "python3"},
                                         "language_info": {"name": "python"}})
nbformat.write(nb, PATH)
print("wrote", PATH.relative_to(ROOT))
