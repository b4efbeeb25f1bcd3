"""``peftlab study``: PEFT methods compared on one task -- methods x learning rates x seeds.

    peftlab study --out runs/study                      # the course's study (about an hour on 2 cores)
    peftlab study --methods lora,full --seeds 0 --steps 20 --out /tmp/smoke   # a smoke run
    peftlab study --out runs/study                      # again after Ctrl-C: finished cells are kept

Each cell of the grid (one method, one learning rate, one seed) trains from the same pretrained
weights in a fresh child process, then measures:

    valid_<metric>   the task metric on a validation set: ``validation_rows`` rows are cut from the
                     end of the training split (never trained on) and the first ``Task.eval_limit``
                     of them (200) are scored; the learning rate of each method is picked on it
    test_<metric>    the task metric on the test split (its first ``Task.eval_limit`` rows unless
                     ``test_rows`` says otherwise): what the tables and charts report
    forgetting       how much the model lost of what it knew before, on text the task never showed.
                     A causal LM: the rise of cross-entropy on BBC News text (nats per token; the
                     measure of Hugging Face peft's method comparison). An encoder classifier:
                     1 - the mean cosine similarity of its sentence embeddings (mean-pooled last
                     hidden states) of BBC News text before and after training
    updates          (with ``--updates q_proj,v_proj``) each of those layers' weight change ΔW: its
                     largest singular values, effective and stable rank, norm, and the intruder
                     dimensions of W + ΔW (``peftlab.spectra.update_report``): the same for an
                     adapter's update and for full fine-tuning's, which is compared with a copy
                     of the weights taken before training
    reduced          (with ``--reduce-intruders 0.75,0``, LoRA cells) for each lambda: the intruder
                     dimensions scaled by it (peft's ``reduce_intruder_dimension``), how many,
                     and the test metric and forgetting measured again
    trainable_params, peak_memory_mb (the child's peak RSS during training, or CUDA allocated:
    the same measurement for every method), step_time_s (median), the loss curve

Full fine-tuning (``full``) is a row like the methods. Everything lands in one file, OUT/study.json
(the configuration, the provenance -- command, package versions, CPU, date -- and every finished
cell), rewritten whole after each cell; OUT/study.csv (one row per cell) and OUT/study.html (the
charts) are made from it. Run the same command again and the cells already in study.json are
skipped; add methods, learning rates or seeds and only the new cells run; a different training
budget (task, steps, batch, ...) is refused rather than mixed in.

``summarize(study)`` gives one row per method: its best learning rate (by mean validation metric
over seeds) and, at that rate, the test metric's mean, standard deviation, minimum and maximum over
seeds.
"""

from __future__ import annotations

from peftlab.study.cells import measure_base, run_cell
from peftlab.study.command import add_arguments, config_from_args, main
from peftlab.study.config import (ADAPTER_LRS, DEFAULT_LRS, DEFAULT_METHODS, FULL, GRID_KEYS, OTHER_LRS, SCALING_LRS,
                                  VERSION, StudyConfig, config_command)
from peftlab.study.results import (CSV_COLUMNS, cells_csv, config_metric, format_summary, load_study, save_study,
                                   study_html, summarize)
from peftlab.study.running import run_study

__all__ = ["DEFAULT_LRS", "DEFAULT_METHODS", "FULL", "StudyConfig", "cells_csv", "format_summary",
           "load_study", "run_cell", "run_study", "save_study", "summarize"]
