import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402

# One intra-op thread: the suite shares 2 cores with the Celery worker processes it starts, and oversubscribed
# BLAS/OpenMP threads were measured ~10x slower than one thread on this machine.
torch.set_num_threads(1)
