"""Worker for tests/test_monitor.py::test_ddp_two_ranks_stop_together.

``python -m torch.distributed.run --nproc_per_node 2 tests/_monitor_ddp_worker.py WORK``: LoRA-trains a tiny random
Llama with a plain Trainer (DDP, gloo on CPU) and a SafetyMonitor whose judge passes the first two checks and finds
every harmful prompt answered at the third (step 4, on_breach=stop); the judge raises on any rank but 0. Each rank
writes ``WORK/rank<r>.json`` with its final step, its safety log rows and how often its judge ran.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from helpers_dist import teardown  # noqa: E402
from test_monitor import BENIGN, HARM, ScriptJudge, _trainer  # noqa: E402

from safeft.monitor import SafetyMonitor  # noqa: E402


class RankZeroJudge(ScriptJudge):
    def outcomes(self, prompts, answers):
        if torch.distributed.get_rank() != 0:
            raise RuntimeError("the judge ran on a rank other than 0")
        return super().outcomes(prompts, answers)


def main() -> None:
    work = Path(sys.argv[1])
    torch.set_num_threads(1)
    tr = _trainer(work / "out", max_steps=10)
    judge = RankZeroJudge(safe_calls=2)
    SafetyMonitor(
        harmful_prompts=HARM,
        benign_prompts=BENIGN,
        judge=judge,
        every=2,
        max_new_tokens=4,
        max_harmful_rate=0.5,
        on_breach="stop",
        log=lambda *_: None,
    ).attach(tr)
    tr.train()
    rank = torch.distributed.get_rank()
    rows = [
        {k: v for k, v in h.items() if k.startswith("safety/") and k != "safety/check_seconds" or k == "step"}
        for h in tr.state.log_history
        if "safety/harmful_rate" in h
    ]
    (work / f"rank{rank}.json").write_text(
        json.dumps({"global_step": tr.state.global_step, "safety": rows, "judge_calls": judge.calls})
    )
    teardown()


if __name__ == "__main__":
    main()
