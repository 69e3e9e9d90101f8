"""The SLO planner: a per-step token budget, soft admission, promotion and the forecast they share.

* ``views``: the requests as the planner sees them, and the fast passes over them;
* ``bounds``: how long a step may take; ``forecast``: when pending prefills bring first tokens;
* ``budget``: the step's token budget and who sits it out; ``admission``: who is promised an SLO;
* ``planner``: the ``Planner`` of one engine, which combines them with its settings.
"""

from sloserve_runtime.core.planner.budget import Hold
from sloserve_runtime.core.planner.planner import Planner
from sloserve_runtime.core.planner.views import ADMITTED, Decision, LiveRequest

__all__ = ["ADMITTED", "Decision", "Hold", "LiveRequest", "Planner"]
