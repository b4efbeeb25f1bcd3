"""From notebook to cluster: export a peftlab run as a plain transformers + peft training script.

    peftlab export runs/lora-r8 --to train_lora.py          # the command line
    peftlab.export.export_script("runs/lora-r8", "train_lora.py")   # the Lab's export button

``peftlab train --out DIR`` writes ``DIR/run.json`` (every argument and the resolved method
config). :func:`export_script` turns it into one readable Python file that repeats the run with
Hugging Face ``transformers`` + ``peft`` (+ ``bitsandbytes`` for QLoRA) and ``accelerate``: the same
data, hyperparameters and seed, runnable both as ``python script.py`` (one process) and as
``accelerate launch script.py`` (DDP; FSDP and DeepSpeed recipes are in the script's docstring).

The script leans on peftlab only to *find* the bundled model and data (``peftlab.load_model`` /
``peftlab.load_dataset`` for bundled names and local files); a run on a hub model and a hub
dataset gives a script that does not import peftlab at all. Everything else (tokenization with
the chat template and the loss on answer tokens only, the peft config, AdamW with warmup + cosine,
gradient accumulation, clipping, the seeded data order) is written out in the script itself.

How the script is made: ``peftlab/export/template.py`` is the whole script, a real Python file
with ``__NAME__`` placeholders (tests compile it); a few small fragments (how to load the model,
the data, how to tokenize: ``fragments.py``) are chosen by the run's settings and filled in by
``script.py``. Read the template to see what every export looks like; :data:`SCRIPT_TEMPLATE` is
its text.

References:
    accelerate, "Add Accelerate to your code": https://huggingface.co/docs/accelerate/basic_tutorials/migration
    accelerate, gradient accumulation: https://huggingface.co/docs/accelerate/usage_guides/gradient_accumulation
    FSDP with accelerate: https://huggingface.co/docs/accelerate/usage_guides/fsdp
    DeepSpeed with accelerate: https://huggingface.co/docs/accelerate/usage_guides/deepspeed
    peft + accelerate: https://huggingface.co/docs/peft/accelerate/fsdp
"""

from __future__ import annotations

from peftlab.export.peft_config import peft_config_source
from peftlab.export.script import SCRIPT_TEMPLATE, export_script, read_run, render_script

__all__ = ["SCRIPT_TEMPLATE", "export_script", "read_run", "render_script", "peft_config_source"]
