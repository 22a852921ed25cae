"""Evaluation: greedy generation, harmfulness judges, harmful score, task accuracy, over-refusal, CIs."""

from safeft.eval.evaluate import (
    evaluate_model,
    harmful_score,
    judge_check,
    judge_check_xstest,
    over_refusal,
    task_accuracy,
)
from safeft.eval.generate import generate, stop_token_ids
from safeft.eval.judges import (
    BEAVERDAM_FORMAT,
    REFUSAL_PHRASES,
    ClassifierJudge,
    GuardJudge,
    Judge,
    KeywordJudge,
    get_judge,
    unsafe_probs,
)
from safeft.eval.metrics import bootstrap_ci, is_gibberish, is_template_echo

__all__ = [
    "BEAVERDAM_FORMAT",
    "REFUSAL_PHRASES",
    "ClassifierJudge",
    "GuardJudge",
    "Judge",
    "KeywordJudge",
    "bootstrap_ci",
    "evaluate_model",
    "generate",
    "get_judge",
    "harmful_score",
    "is_gibberish",
    "is_template_echo",
    "judge_check",
    "judge_check_xstest",
    "over_refusal",
    "stop_token_ids",
    "task_accuracy",
    "unsafe_probs",
]
