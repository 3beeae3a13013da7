"""Fixtures shared by the detector tests."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture
def one_intra_op_thread():
    """One intra-op thread: on CI's few shared cores several threads fight each other (OpenMP
    spin-waits make oversubscription far worse than serial; the R50 step measured 18 s on two
    contended threads against 6 s on one).  Modules opt in with
    ``pytestmark = pytest.mark.usefixtures("one_intra_op_thread")``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
