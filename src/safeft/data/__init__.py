"""Data for safeft: tasks, templates + tokenisation with prompt masking, harmful / refusal / benign sources,
the poisoning mix, prompt-set disjointness, and the offline demo data set."""

from .demo import DemoData, load_demo
from .formatting import IGNORE_INDEX, CompletionCollator, format_prompt, tokenize_example
from .harmful import (
    load_benign_pairs,
    load_harmful_pairs,
    load_harmful_prompts,
    load_refusal_pairs,
    looks_like_refusal,
)
from .mix import check_disjoint, mix_poison, normalize_text
from .tasks import (
    AGNEWS_LABELS,
    SST2_LABELS,
    TASKS,
    extract_number,
    load_task,
    predict_label,
    score_answer,
    shared_data_dir,
    task_prompt,
)
from .types import Example

__all__ = [
    "AGNEWS_LABELS",
    "IGNORE_INDEX",
    "SST2_LABELS",
    "TASKS",
    "CompletionCollator",
    "DemoData",
    "Example",
    "check_disjoint",
    "extract_number",
    "format_prompt",
    "load_benign_pairs",
    "load_demo",
    "load_harmful_pairs",
    "load_harmful_prompts",
    "load_refusal_pairs",
    "load_task",
    "looks_like_refusal",
    "mix_poison",
    "normalize_text",
    "predict_label",
    "score_answer",
    "shared_data_dir",
    "task_prompt",
    "tokenize_example",
]
