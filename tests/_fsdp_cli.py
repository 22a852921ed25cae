"""``safeft`` command line under FSDP2 on CPU, for tests/test_fsdp.py: launched by ``torch.distributed.run`` with
accelerate's FSDP settings in the environment (``ACCELERATE_USE_FSDP=true FSDP_VERSION=2 ...``, what
``accelerate launch --config_file examples/accelerate/fsdp.yaml`` sets). accelerate turns FSDP on only for
multi-GPU-like process groups, so the CPU/gloo group is reported as one (the only difference from a GPU run).

    ACCELERATE_USE_FSDP=true FSDP_VERSION=2 ... python -m torch.distributed.run --nproc_per_node 2 \\
        tests/_fsdp_cli.py train --model M ...
"""

from __future__ import annotations

import os
import sys

from accelerate.state import PartialState
from accelerate.utils import DistributedType

_init = PartialState.__init__


def _report_multi_gpu(self, *args, **kwargs):
    _init(self, *args, **kwargs)
    if self.distributed_type == DistributedType.MULTI_CPU and os.environ.get("ACCELERATE_USE_FSDP") == "true":
        self.distributed_type = DistributedType.MULTI_GPU


PartialState.__init__ = _report_multi_gpu

if __name__ == "__main__":
    from safeft.cli import main

    sys.exit(main(sys.argv[1:]))
