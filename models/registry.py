"""The families plait ships, registered in the catalogue (``plait.models.common.family``).

Adding a family: a folder under models/ whose ``__init__`` exports ``FAMILY`` (see
docs/models.md, "Adding a family"), and one line below. Families kept outside plait call
``register`` themselves and are named in a run config's ``model.families``.
"""

from plait.models.common.family import register
from plait.models.common.mixers import SOFTMAX

from . import based, gdn, h3, hybrid, mamba2, moh, seqboat, transnormer

SHIPPED = (
    SOFTMAX,
    transnormer.FAMILY,
    based.FAMILY,
    h3.FAMILY,
    seqboat.FAMILY,
    moh.FAMILY,
    gdn.FAMILY,
    mamba2.FAMILY,
    hybrid.FAMILY,
)
"""plait's own families, in the order docs/models.md lists them."""

for _family in SHIPPED:
    register(_family)
