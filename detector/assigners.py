"""Old import path of :mod:`detector.models.assigners`, kept while ``benchmarks/`` imports it.

``detector.assigners`` *is* ``detector.models.assigners`` (the same module object). New code
imports :mod:`detector.models.assigners`; delete this file once nothing uses the old path.
"""

import sys

from detector.models import assigners as _assigners

sys.modules[__name__] = _assigners
