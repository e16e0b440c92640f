"""Every file and directory name of a run, in one place.

A pipeline run (``llamarec run``) holds a retriever run in ``retriever/`` and a ranker run in
``ranker/``; both can also stand alone (``llamarec retrieve train`` / ``llamarec rank train``).
Paths inside a run are always relative to the run directory, so a run can be moved or copied.
"""

from __future__ import annotations

# in every directory that holds artifacts: their relative paths, sha256 and sizes
MANIFEST_FILE = "manifest.json"

# pipeline run (``llamarec run``)
RETRIEVER_DIR = "retriever"
RANKER_DIR = "ranker"
PIPELINE_METRICS = "metrics.json"  # data, retriever, ranker training and evaluation results
PIPELINE_CONFIG = "config.yaml"
STAGES_FILE = "stages.json"
STARTED_FILE = "stage-started.json"  # the stage in progress and its key (gone when it finishes)
DATA_STATS = "data.json"
EVAL_DIR = "eval"  # inside RANKER_DIR
REPORT_FILE = "report.md"

# retriever run
RETRIEVER_CONFIG = "config.json"
RETRIEVER_MODEL = "model.safetensors"
RETRIEVER_METRICS = "metrics.json"
CATALOGUE_FILE = "items.parquet"  # raw ids and titles of the items, by dense id
CANDIDATES_FILE = "candidates.safetensors"
CANDIDATES_SUMMARY = "candidates.json"
LAST_CHECKPOINT = "last"

# ranker run
RANK_CONFIG = "rank_config.json"
ADAPTER_DIR = "adapter"
RANKER_SCALE_FILE = "ranker_scale.json"  # inside ADAPTER_DIR: a residual ranker's gate
FULL_LAYERS_FILE = "full_layers.safetensors"  # inside ADAPTER_DIR instead of LoRA: full_layers' weights
TITLE_VECTORS_FILE = "title_vectors.safetensors"  # a title_similarity ranker's item vectors
PROMPT_FILE = "prompt.json"  # the resolved prompt config the ranker was trained with
RANK_TRAIN_METRICS = "train_metrics.json"

# evaluation of a ranker
EVAL_METRICS = "metrics.json"
EVAL_RANKS = "ranks.csv"
