"""The support matrix: every registered method on tiny random models of the common architectures.

Each cell runs four checks on one (architecture, method) pair, the method with its own defaults
(or, where a default cannot fit the 32-wide models, ``SMALL_MODEL_SETTINGS``):

- **trains**: ``peftlab.adapt`` (reference backend), one forward and backward on a random batch:
  the loss is finite and every trainable tensor gets a gradient that is not all zero;
- **peft**: the adapter (moved away from its init) saved by ``peftlab.save_adapter`` loads in
  Hugging Face peft with the same logits, and one saved by peft (``backend="peft"``) loads back
  through ``peftlab.load_adapter`` with the same logits;
- **fused**: ``backend="fused"`` with the same weights gives the same loss and gradients;
- **memory**: ``peftlab.estimate_memory`` from the config alone is within 15% of
  ``peftlab.measure_memory`` on the adapted model (every ledger category and the total).

A cell is ``ok``, a refusal (a ``PeftlabError`` at ``adapt`` / ``estimate_memory`` time, its
message kept), ``n/a`` (no production path of that kind), or ``FAIL`` with what went wrong.
``python -m tests.support_matrix`` prints the table; ``--write`` puts it into the README between
the ``support-matrix`` markers; tests/test_support_matrix.py checks both.
"""

from __future__ import annotations

import copy
import math
import sys
import tempfile
import warnings
from collections.abc import Callable
from typing import Any
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from tests.test_contract import fresh_base, randomise

VOCAB = 128
TOLERANCE = 0.15  # the memory estimate, as tests/test_memory.py
ATOL = 1e-5
README = Path(__file__).resolve().parents[1] / "README.md"
BEGIN, END = "<!-- support-matrix:begin -->", "<!-- support-matrix:end -->"


@dataclass(frozen=True)
class Arch:
    name: str  # as the README prints it
    build: Callable[[], nn.Module]
    kind: str  # "causal", "classify" or "seq2seq"


def _seeded(cls, config) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = cls(config)
    return model.eval()


def _decoder(config_name: str, model_name: str, **fields) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import transformers

        config = getattr(transformers, config_name)(**fields)
        return _seeded(getattr(transformers, model_name), config)

    return build


_LLAMA_LIKE = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
_ENCODER = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                intermediate_size=64, max_position_embeddings=64, num_labels=2)

ARCHS: tuple[Arch, ...] = (
    Arch("Llama", _decoder("LlamaConfig", "LlamaForCausalLM", **_LLAMA_LIKE), "causal"),
    Arch("Qwen2", _decoder("Qwen2Config", "Qwen2ForCausalLM", **_LLAMA_LIKE), "causal"),
    Arch("Qwen3", _decoder("Qwen3Config", "Qwen3ForCausalLM", **_LLAMA_LIKE, head_dim=8), "causal"),
    Arch("Mistral", _decoder("MistralConfig", "MistralForCausalLM", **_LLAMA_LIKE), "causal"),
    Arch("Gemma 2", _decoder("Gemma2Config", "Gemma2ForCausalLM", **_LLAMA_LIKE, head_dim=8), "causal"),
    Arch("Gemma 3", _decoder("Gemma3TextConfig", "Gemma3ForCausalLM", **_LLAMA_LIKE, head_dim=8), "causal"),
    Arch("Phi-3", _decoder("Phi3Config", "Phi3ForCausalLM", **_LLAMA_LIKE, pad_token_id=0), "causal"),
    Arch("GPT-2", _decoder("GPT2Config", "GPT2LMHeadModel", vocab_size=VOCAB, n_positions=64, n_embd=32,
                           n_layer=2, n_head=4), "causal"),
    Arch("GPT-NeoX", _decoder("GPTNeoXConfig", "GPTNeoXForCausalLM", vocab_size=VOCAB, hidden_size=32,
                              intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                              max_position_embeddings=64), "causal"),
    Arch("OPT", _decoder("OPTConfig", "OPTForCausalLM", vocab_size=VOCAB, hidden_size=32, ffn_dim=64,
                         num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64,
                         word_embed_proj_dim=32), "causal"),
    Arch("Falcon", _decoder("FalconConfig", "FalconForCausalLM", vocab_size=VOCAB, hidden_size=32,
                            num_hidden_layers=2, num_attention_heads=4), "causal"),
    Arch("BERT", _decoder("BertConfig", "BertForSequenceClassification", **_ENCODER), "classify"),
    Arch("RoBERTa", _decoder("RobertaConfig", "RobertaForSequenceClassification", **_ENCODER,
                             pad_token_id=1), "classify"),
    Arch("DistilBERT", _decoder("DistilBertConfig", "DistilBertForSequenceClassification", vocab_size=VOCAB,
                                dim=32, n_layers=2, n_heads=4, hidden_dim=64, max_position_embeddings=64,
                                num_labels=2), "classify"),
    # encoder-decoders: the labels are the decoder's targets
    Arch("T5", _decoder("T5Config", "T5ForConditionalGeneration", vocab_size=VOCAB, d_model=32, d_kv=8,
                        d_ff=64, num_layers=2, num_heads=4, decoder_start_token_id=0, pad_token_id=0), "seq2seq"),
    Arch("BART", _decoder("BartConfig", "BartForConditionalGeneration", vocab_size=VOCAB, d_model=32,
                          encoder_layers=2, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
                          encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64), "seq2seq"),
)

CHECKS = ("trains", "peft", "fused", "memory")


@dataclass
class Cell:
    status: str  # "ok", "refused", "n/a", "FAIL"
    detail: str = ""

    def short(self) -> str:
        return {"ok": "ok", "refused": "refused", "n/a": "-", "FAIL": "FAIL"}[self.status]


# the matrix's models are 32 wide (v_proj 16): defaults sized for real models that do not fit them
# (peft refuses them too) give way to the nearest setting that does
SMALL_MODEL_SETTINGS: dict[str, dict] = {
    "adalora": {"total_step": 4},
    "road": {"group_size": 8},  # group_size=64 must divide every adapted d_out
    "miss": {"r": 16},  # r=64 must not exceed d_in
    "c3a": {"block_size": 8},  # block_size=256 must divide every adapted d_in and d_out
    "fourierft": {"n_frequency": 256},  # n_frequency=1000 must not exceed d_in · d_out
    "shira": {"r": 4},  # r=32 asks for r · (d_in + d_out) entries, more than a 16 x 32 layer has
    "vblora": {"num_vectors": 32, "vector_length": 8},  # vector_length=256 must divide every d_in, d_out
    # any model: peft's default (no ids) trains nothing; ids that both of check_trains' batches hold
    "trainable_tokens": {"token_indices": (119, 47, 98)},
}


# methods that start from data (LoRA-GA's gradient estimate): given one batch of the arch's kind
NEEDS_DATA = frozenset({"lora_ga", "eva", "corda"})


def _hyperparameters(method: str, arch: Arch | None = None) -> dict:
    hp = dict(SMALL_MODEL_SETTINGS.get(method, {}))
    if method in NEEDS_DATA and arch is not None:
        rows = _batch(arch.kind, seed=3)  # CorDA reads one row per batch (as peft's preprocess_corda)
        hp["data"] = [{k: v[i:i + 1] for k, v in rows.items()} for i in range(2)] if method == "corda" else [rows]
    return hp


def _batch(kind: str, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (2, 8), generator=g)
    mask = torch.ones_like(ids)
    if kind == "classify":
        return {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([0, 1])}
    if kind == "seq2seq":  # the decoder reads its targets shifted right (given, so logits need no labels)
        targets = torch.randint(3, VOCAB, (2, 6), generator=g)
        decoder_ids = torch.cat([torch.zeros(2, 1, dtype=targets.dtype), targets[:, :-1]], dim=1)
        return {"input_ids": ids, "attention_mask": mask, "decoder_input_ids": decoder_ids, "labels": targets}
    return {"input_ids": ids, "attention_mask": mask, "labels": ids}


@torch.no_grad()
def _logits(model: nn.Module, inputs: dict) -> torch.Tensor:
    """The logits; for a classifier also what its head reads (a random tiny classifier's two
    logits hardly move when an adapter changes; the features under them do). A hook on the
    head, not output_hidden_states: peft 0.21's prefix tuning on RoBERTa breaks with that."""
    inputs = {k: v for k, v in inputs.items() if k != "labels"}
    heads = [m for n, m in model.named_modules() if n.rsplit(".", 1)[-1] in ("classifier", "score")]
    if not heads:
        return model(**inputs).logits
    seen: list[torch.Tensor] = []
    handle = heads[0].register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    try:
        logits = model(**inputs).logits
    finally:
        handle.remove()
    return torch.cat([logits.flatten(), seen[0].flatten()])


def _close(a: torch.Tensor, b: torch.Tensor, what: str, atol: float = ATOL) -> str | None:
    if a.shape != b.shape:
        return f"{what}: shapes {tuple(a.shape)} vs {tuple(b.shape)}"
    err = (a - b).abs().max().item()
    return None if err <= atol + 1e-5 * b.abs().max().item() else f"{what} differ by {err:.2e}"


def _peft_base(base: nn.Module, peft_model: nn.Module, method: str) -> nn.Module:
    """A copy of the base a peft model sits on (for LoftQ: with its NF4-quantised weights; for
    LoRA-GA: the residual, which peft saves it for; PiSSA and OLoRA re-derive theirs from W)."""
    if method in ("loftq", "lora_ga", "corda"):
        return copy.deepcopy(peft_model).unload().eval()
    return copy.deepcopy(base).eval()


def _fail(err: BaseException) -> Cell:
    return Cell("FAIL", f"{type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}")


def _attempt(step: Callable[[], Any]) -> tuple[Any, Cell | None]:
    """Run ``step``: (its value, None), or (None, the cell it ends in): a PeftlabError is a
    refusal (its message kept), anything else a failure (the matrix records every failure)."""
    from peftlab.errors import PeftlabError

    try:
        return step(), None
    except PeftlabError as err:
        return None, Cell("refused", str(err))
    except Exception as err:  # noqa: BLE001
        return None, _fail(err)


def _adapt(arch: Arch, method: str, backend: str = "reference"):
    import peftlab

    base = arch.build()
    torch.manual_seed(0)
    return base, peftlab.adapt(copy.deepcopy(base), method, backend=backend, **_hyperparameters(method, arch))


def check_trains(arch: Arch, method: str) -> Cell:
    from peftlab.train import method_loss, run_step_hooks

    adapted, ended = _attempt(lambda: _adapt(arch, method))
    if ended:
        return ended
    model = adapted[1]
    try:  # two steps: zero-initialised factors (LoRA's B, a gate) hold the others' gradient at 0
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=1e-2)
        for step in range(2):
            optimizer.zero_grad()
            loss = model(**_batch(arch.kind, seed=step)).loss + method_loss(model)
            if not math.isfinite(loss.item()):
                return Cell("FAIL", f"loss {loss.item()} at step {step}")
            loss.backward()
            if step == 0:
                optimizer.step()
                run_step_hooks(model, 0)
        # every trainable tensor is in the graph; a few may hold a zero gradient on a random
        # tiny model (a bottleneck's two ReLU units both off), but not the adapter as a whole
        trained = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
        missing = [n for n, g in trained.items() if g is None]
        if missing:
            return Cell("FAIL", f"no gradient reaches {len(missing)} trainable tensors, e.g. {missing[0]}")
        if not any(g.any() for g in trained.values()):
            return Cell("FAIL", "every gradient of the adapter is zero: nothing trains")
    except Exception as err:  # noqa: BLE001
        return _fail(err)
    return Cell("ok")


def _peft_side(arch: Arch, method: str, tmp: Path):
    """(base, peft-backend model): X-LoRA on peft loads its experts from folders, so two LoRA
    experts are saved first (peft's own X-LoRA recipe)."""
    import peftlab

    extra = {}
    if method == "xlora":
        experts = {}
        for i in range(2):
            torch.manual_seed(10 + i)
            expert = peftlab.adapt(arch.build(), "lora")
            randomise(expert, seed=10 + i)
            experts[f"e{i}"] = peftlab.save_adapter(expert, tmp / f"expert{i}")
        extra = {"experts": experts}
    base = arch.build()
    torch.manual_seed(0)
    return base, peftlab.adapt(copy.deepcopy(base), method, backend="peft", **_hyperparameters(method, arch), **extra)


# methods whose peft side can be checked one way only, and why
ONE_WAY = {"xlora": "peft 0.21 saves no X-LoRA router (its adapter_model.safetensors is empty), so a "
                    "peft-trained X-LoRA cannot be loaded by anyone; peftlab -> peft is checked"}


def check_peft(arch: Arch, method: str) -> Cell:
    """Refused where peft cannot build the method on this model (backend="peft" says why);
    otherwise both directions of the file format, with equal logits."""
    import peftlab
    from peftlab.methods import METHODS

    if METHODS[method].peft_type is None:
        return Cell("n/a", "peft lacks the method")
    inputs = _batch(arch.kind)
    with tempfile.TemporaryDirectory() as tmp:
        sides, ended = _attempt(lambda: _peft_side(arch, method, Path(tmp)))
        if ended:
            return ended
        base, peft_model = sides
        try:  # peft -> peftlab
            if method in ONE_WAY:
                raise _Skip
            peft_model.eval()
            randomise(peft_model, seed=2)
            expected = _logits(peft_model, inputs)
            folder = peftlab.save_adapter(peft_model, Path(tmp) / "theirs")
            ours = peftlab.load_adapter(_peft_base(base, peft_model, method), folder).eval()
            if problem := _close(_logits(ours, inputs), expected, "peft -> peftlab logits"):
                return Cell("FAIL", problem)
        except _Skip:
            pass
        except Exception as err:  # noqa: BLE001
            return _fail(err)
        try:  # peftlab -> peft
            from peft import PeftModel

            base, model = _adapt(arch, method)
            model.eval()
            randomise(model)
            expected = _logits(model, inputs)
            folder = peftlab.save_adapter(model, Path(tmp) / "ours")
            plain = fresh_base(base, model)
            if method == "xlora":
                plain.config.use_cache = False
            theirs = PeftModel.from_pretrained(plain, str(folder)).eval()
            if problem := _close(_logits(theirs, inputs), expected, "peftlab -> peft logits"):
                return Cell("FAIL", problem)
        except Exception as err:  # noqa: BLE001
            return _fail(err)
    return Cell("ok", ONE_WAY.get(method, ""))


class _Skip(Exception):
    pass


def check_fused(arch: Arch, method: str) -> Cell:
    import peftlab
    from peftlab.train import method_loss

    adapted, ended = _attempt(lambda: _adapt(arch, method, backend="fused"))
    if ended:
        return ended
    base, fused = adapted
    try:
        torch.manual_seed(0)
        ref = peftlab.adapt(copy.deepcopy(base), method, **_hyperparameters(method, arch))
        randomise(ref)
        fused.load_state_dict(ref.state_dict())
        inputs = _batch(arch.kind)
        losses, grads = [], []
        for model in (ref, fused):
            model.train()
            torch.manual_seed(0)
            loss = model(**inputs).loss + method_loss(model)
            loss.backward()
            losses.append(loss.detach())
            grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
        if problem := _close(losses[1], losses[0], "loss"):
            return Cell("FAIL", problem)
        for name, g in grads[0].items():
            if problem := _close(grads[1][name], g, f"gradient of {name}", atol=1e-4):
                return Cell("FAIL", problem)
    except Exception as err:  # noqa: BLE001
        return _fail(err)
    return Cell("ok")


def check_memory(arch: Arch, method: str) -> Cell:
    import peftlab

    base = arch.build()
    est, ended = _attempt(lambda: peftlab.estimate_memory(base.config, method, batch=2, seq_len=32,
                                                          **_hyperparameters(method)))
    if ended:
        return ended

    def measure():
        torch.manual_seed(0)
        return peftlab.measure_memory(peftlab.adapt(base, method, **_hyperparameters(method, arch)), batch=2, seq_len=32)

    got, ended = _attempt(measure)
    if ended:
        return Cell("refused", f"adapt: {ended.detail}") if ended.status == "refused" else ended
    errors = est.relative_error(got)
    bad = {k: f"{v:+.0%}" for k, v in errors.items() if abs(v) > TOLERANCE}
    if bad:
        return Cell("FAIL", f"estimate off: {bad}")
    return Cell("ok", f"total {errors.get('total', 0):+.1%}")


CHECK_FUNCTIONS = {"trains": check_trains, "peft": check_peft, "fused": check_fused, "memory": check_memory}


def run_cell(arch: Arch, method: str) -> dict[str, Cell]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return {check: CHECK_FUNCTIONS[check](arch, method) for check in CHECKS}


def matrix(methods=None, archs=ARCHS) -> dict[tuple[str, str], dict[str, Cell]]:
    from peftlab.methods import METHODS

    return {(a.name, m): run_cell(a, m) for a in archs for m in (methods or list(METHODS))}


_MARK = {"ok": "✓", "refused": "R", "n/a": "–", "FAIL": "FAIL"}


# one note per kind of refusal (the errors themselves name the model and say what to try)
REASONS = (
    ("has kernels for", ""),  # the fused backend has kernels for LoRA and DoRA: no such path ("–")
    ("has no bias parameters", "BitFit: the model has no bias to train (include_norms=True trains its norm gains instead)"),
    ("AdaptionPrompt knows", "LLaMA-Adapter: peft's AdaptionPrompt knows Llama, Mistral and GPT-2 attention only"),
    ("on transformers' Conv1D layers", "peft's OFT, BOFT, LoHa, LoKr, HRA, RoAd, MiSS and SHiRA do not adapt "
                                        "GPT-2's Conv1D layers (peftlab's reference does; its adapters load in peftlab)"),
    ("cannot build prefix tuning", "peft sizes a prefix for every attention head; Falcon's multi-query attention "
                                    "has one key/value head (peftlab's reference sizes it right)"),
    ("reads past keys and values", "prefix tuning needs a key/value cache; DistilBERT's attention takes none "
                                    "(peft refuses it too)"),
    ("X-LoRA's router reads the last hidden state", "X-LoRA's router reads one stack of hidden states; an "
                                                    "encoder-decoder returns two (peft fails there too)"),
    ("init='olora' on transformers' Conv1D", "OLoRA on GPT-2's Conv1D: peft 0.21 decomposes the stored (d_in, d_out) "
                                              "W and builds a B of the wrong shape (peftlab refuses it on both backends)"),
    ("LoRA-GA gradient estimate fails", "LoRA-GA in peft: its backward hooks break on Falcon's fused qkv, which is "
                                        "changed in place (peftlab's reference estimate runs)"),
    ("EVA on an encoder-decoder", "EVA picks each layer's input tokens by the positions of input_ids; an "
                                  "encoder-decoder's decoder sees other positions (peft fails there too)"),
    ("X-LoRA cannot load its own", "X-LoRA in peft: peft 0.21's loader assumes the transformer at `model.` and "
                                    "refuses the folder it saved itself"),
)


def _reason(detail: str) -> str:
    """The note for a refusal: its kind from REASONS, else its first sentence."""
    for key, note in REASONS:
        if key in detail:
            return note
    return detail.split(". ")[0].rstrip(".")


def render(cells: dict[tuple[str, str], dict[str, Cell]], archs=ARCHS) -> str:
    """The README table: a row per method, a column per architecture, four marks per cell."""
    from peftlab.methods import METHODS

    reasons: dict[str, int] = {}
    lines = ["| method | " + " | ".join(a.name for a in archs) + " |",
             "|---|" + "---|" * len(archs)]
    for method in METHODS:
        row = []
        for arch in archs:
            marks = []
            for check in CHECKS:
                cell = cells[(arch.name, method)][check]
                mark, reason = _MARK[cell.status], _reason(cell.detail)
                if cell.status == "refused" and not reason:
                    mark = _MARK["n/a"]
                elif cell.status == "refused":
                    mark += f"<sup>{reasons.setdefault(reason, len(reasons) + 1)}</sup>"
                marks.append(mark)
            row.append(" ".join(marks))
        lines.append(f"| {method} | " + " | ".join(row) + " |")
    notes = [f"{n}. {reason}." for reason, n in reasons.items()]
    one_way = [f"X-LoRA's peft check is one way: {ONE_WAY['xlora']}."]
    return "\n".join(lines + [""] + notes + [""] + one_way)


def readme_section(text: str) -> str | None:
    """What the README holds between the markers (None: no markers)."""
    if BEGIN not in text or END not in text:
        return None
    return text.split(BEGIN, 1)[1].split(END, 1)[0].strip("\n")


if __name__ == "__main__":
    torch.set_num_threads(1)
    if "--write" in sys.argv:  # the whole matrix into the README
        table = render(matrix())
        text = README.read_text()
        before, rest = text.split(BEGIN, 1)
        after = rest.split(END, 1)[1]
        README.write_text(f"{before}{BEGIN}\n{table}\n{END}{after}")
        print(table)
        sys.exit(0)
    names = [a for a in sys.argv[1:] if not a.startswith("-")]
    archs = tuple(a for a in ARCHS if not names or a.name in names)
    for arch in archs:
        from peftlab.methods import METHODS

        for method in METHODS:
            cells = run_cell(arch, method)
            line = " ".join(f"{c}={cells[c].short()}" for c in CHECKS)
            print(f"{arch.name:10} {method:14} {line}", flush=True)
            for c in CHECKS:
                if cells[c].status in ("FAIL", "refused"):
                    print(f"    {c}: {cells[c].detail[:300]}", flush=True)
