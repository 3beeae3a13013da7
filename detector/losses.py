"""Old import path of :mod:`detector.models.losses`, kept while ``benchmarks/`` imports it.

``detector.losses`` *is* ``detector.models.losses`` (the same module object, not a copy), so
setting an attribute through either name reaches the loss: ``benchmarks/e2e_loss_step.py``
replaces ``detector.losses.atss_assign_batched`` to time the loss without the assignment. New
code imports :mod:`detector.models.losses`; delete this file once nothing uses the old path.
"""

import sys

from detector.models import losses as _losses

sys.modules[__name__] = _losses
