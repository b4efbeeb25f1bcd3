"""The pieces of the exported script that depend on the run's settings, filled into
``template.py``'s placeholders by :func:`peftlab.export.script.render_script`.

Placeholders are written as in the template (``__NAME__``); ``MODEL__LOAD_KWARGS__`` is the name
MODEL followed by the ``__LOAD_KWARGS__`` placeholder (e.g. ``, quantization="nf4"``). These stay
strings rather than code: two of them import peftlab, which a module of this package may not do
at any level (the layers of ARCHITECTURE.md), and each exists in two versions of one function.
"""

from __future__ import annotations

# --------------------------------------------------------------------------------------------
# load_model(accelerator): a bundled model through peftlab, or a hub model through transformers
# --------------------------------------------------------------------------------------------
LOAD_BUNDLED_MODEL = '''\
def load_model(accelerator):
    """The bundled model __MODEL_NAME__, found by peftlab (it ships inside a pip package, offline)."""
    import peftlab

    # peftlab.load_model returns a plain transformers model and its tokenizer (pad token set).__NF4_NOTE__
    model, tokenizer = peftlab.load_model(MODEL__LOAD_KWARGS__, device=accelerator.device)
    return model, tokenizer
'''

LOAD_HUB_MODEL = '''\
def load_model(accelerator):
    """__MODEL_NAME__ from the Hugging Face hub (or a local folder), with transformers."""
    from transformers import __AUTO_CLASS__, AutoTokenizer
    __NF4_CONFIG_LINES__
    model = __AUTO_CLASS__.from_pretrained(MODEL__HUB_KWARGS__)
    tokenizer = AutoTokenizer.from_pretrained(MODEL)
    if tokenizer.pad_token is None:  # many causal LMs have none; padding is masked anyway
        tokenizer.pad_token = tokenizer.eos_token
    model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer
'''

# inside LOAD_HUB_MODEL for a 4-bit base (a block: indented like its placeholder)
NF4_HUB_CONFIG = '''\
from transformers import BitsAndBytesConfig

# QLoRA: the frozen base is stored as 4-bit NormalFloat with double quantization; the
# adapter and the computation stay in higher precision (Dettmers et al. 2023).
quantization_config = BitsAndBytesConfig(
    load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
    bnb_4bit_compute_dtype=torch.bfloat16 if BF16 else torch.float32,
)
'''

# inside main() for a 4-bit base, after gradient checkpointing (a block, like NF4_HUB_CONFIG)
PREPARE_KBIT = '''\
# QLoRA: norms (and the head) in fp32 for stable training, input gradients on
model = prepare_model_for_kbit_training(
    model, use_gradient_checkpointing=GRADIENT_CHECKPOINTING)
'''

# --------------------------------------------------------------------------------------------
# load_data(): bundled corpora and local files through peftlab, hub datasets through datasets
# --------------------------------------------------------------------------------------------
LOAD_PEFTLAB_DATA = '''\
def load_data():
    """The training split of __DATA_NAME__, from peftlab (bundled corpora and local files, with the
    same seeded train/test split as the run). A plain datasets.Dataset."""
    import peftlab

    return peftlab.load_dataset(DATA)["train"]
'''

LOAD_HUB_DATA = '''\
def load_data():
    """The training split of __DATA_NAME__ from the Hugging Face hub (datasets)."""
    from datasets import load_dataset

    # peftlab held out 10% as "test" (seed 0); the same split is made here.
    return load_dataset(DATA, split="train").train_test_split(test_size=0.1, seed=0)["train"]
'''

# --------------------------------------------------------------------------------------------
# tokenize(), summed_loss() and count_targets(): a causal LM or a sequence classifier
# --------------------------------------------------------------------------------------------
TOKENIZE_CAUSAL = '''\
def tokenize(dataset, tokenizer):
    """input_ids, attention_mask and labels for a causal LM.

    Question/answer rows: the question is the user turn and the answer the assistant turn of the
    tokenizer's chat template. Prompt tokens get label -100, so the loss is only on the answer
    (the usual supervised fine-tuning recipe). Plain text rows: every token is a target.
    """
    def prompt_and_answer(question: str, answer: str) -> tuple[str, str]:
        if tokenizer.chat_template:
            user = [{"role": "user", "content": question}]
            prompt = tokenizer.apply_chat_template(user, add_generation_prompt=True, tokenize=False)
            full = tokenizer.apply_chat_template(
                user + [{"role": "assistant", "content": answer}], tokenize=False)
            if full.startswith(prompt):
                return prompt, full[len(prompt):]
            return prompt, answer + (tokenizer.eos_token or "")
        return f"Question: {question}\\nAnswer:", f" {answer}{tokenizer.eos_token or ''}"

    def encode(row: dict) -> dict:
        if "question" in row:
            prompt, answer = prompt_and_answer(row["question"], row["answer"])
            # tokenized apart, so the mask boundary falls exactly between prompt and answer
            prompt_ids = tokenizer(prompt, add_special_tokens=not tokenizer.chat_template)["input_ids"]
            answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
            ids = (prompt_ids + answer_ids)[:MAX_LENGTH]
            labels = ([IGNORE_INDEX] * len(prompt_ids) + answer_ids)[:MAX_LENGTH]
        else:
            ids = tokenizer(row["text"])["input_ids"][:MAX_LENGTH]
            labels = list(ids)
        return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}

    tokens = dataset.map(encode, remove_columns=dataset.column_names)
    # a row whose prompt fills MAX_LENGTH has no answer token left to learn from
    return tokens.filter(lambda row: any(t != IGNORE_INDEX for t in row["labels"][1:]))
'''

TOKENIZE_CLASSIFICATION = '''\
def tokenize(dataset, tokenizer):
    """input_ids, attention_mask and labels (the class id) for sequence classification."""
    def encode(row: dict) -> dict:
        encoded = tokenizer(row["text"], truncation=True, max_length=MAX_LENGTH)
        return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"],
                "labels": row["label"]}

    return dataset.map(encode, remove_columns=dataset.column_names)
'''

LOSS_CAUSAL = '''\
def summed_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy SUMMED over the batch's target tokens: position t predicts token t + 1."""
    logits = logits[:, -labels.shape[1]:]  # soft-prompt methods prepend virtual-token positions
    return F.cross_entropy(
        logits[:, :-1].float().reshape(-1, logits.shape[-1]),  # (B * (T-1), V)
        labels[:, 1:].reshape(-1),  # (B * (T-1),)
        ignore_index=IGNORE_INDEX, reduction="sum",
    )


def count_targets(batch: dict) -> int:
    """How many tokens summed_loss adds up (labels that are not -100)."""
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
'''

LOSS_CLASSIFICATION = '''\
def summed_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy SUMMED over the rows: logits (B, C), labels (B,)."""
    return F.cross_entropy(logits.float(), labels, reduction="sum")


def count_targets(batch: dict) -> int:
    """One target per row."""
    return int(batch["labels"].shape[0])
'''


__all__ = ["LOAD_BUNDLED_MODEL", "LOAD_HUB_MODEL", "NF4_HUB_CONFIG", "PREPARE_KBIT", "LOAD_PEFTLAB_DATA",
           "LOAD_HUB_DATA", "TOKENIZE_CAUSAL", "TOKENIZE_CLASSIFICATION", "LOSS_CAUSAL", "LOSS_CLASSIFICATION"]
