"""The threat model and the inner maximisation.

:class:`ThreatModel` (a norm, a radius ε in pixel units and the data domain) owns the
norm-specific steepest-ascent step, the projection and the random start;
:func:`perturb` is the one iterative ascent loop over it, used by training's inner
maximisation and by the attacks alike.
"""

from robustopt.threat.model import NORMS, ThreatModel
from robustopt.threat.perturb import ascend, perturb, preserve_state

__all__ = ["NORMS", "ThreatModel", "ascend", "perturb", "preserve_state"]
