"""Evaluation: greedy generation, judges (three outcomes: refusal / harmful / other), harmful score, task accuracy,
over-refusal, CIs."""

from safeft.eval.evaluate import (
    evaluate_model,
    harmful_score,
    judge_check,
    judge_check_xstest,
    outcome_summary,
    over_refusal,
    over_refusal_summary,
    task_accuracy,
)
from safeft.eval.generate import generate, stop_token_ids
from safeft.eval.judges import (
    BEAVERDAM_FORMAT,
    OUTCOMES,
    REFUSAL_PHRASES,
    ClassifierJudge,
    GuardJudge,
    HarmBenchJudge,
    Judge,
    KeywordJudge,
    LlamaGuardJudge,
    WildGuardJudge,
    get_judge,
    unsafe_probs,
)
from safeft.eval.metrics import bootstrap_ci, is_gibberish, is_template_echo

__all__ = [
    "BEAVERDAM_FORMAT",
    "OUTCOMES",
    "REFUSAL_PHRASES",
    "ClassifierJudge",
    "GuardJudge",
    "HarmBenchJudge",
    "Judge",
    "KeywordJudge",
    "LlamaGuardJudge",
    "WildGuardJudge",
    "bootstrap_ci",
    "evaluate_model",
    "generate",
    "get_judge",
    "harmful_score",
    "is_gibberish",
    "is_template_echo",
    "judge_check",
    "judge_check_xstest",
    "outcome_summary",
    "over_refusal",
    "over_refusal_summary",
    "stop_token_ids",
    "task_accuracy",
    "unsafe_probs",
]
