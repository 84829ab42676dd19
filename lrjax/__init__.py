"""lrjax: low-rank CNN compression in JAX/Flax (Tai et al., ICLR 2016).

Submodules: ``decompose`` (closed-form factors), ``costs`` (cost model), ``ranks`` (rank selection),
``iterative`` (iterative baseline), ``layers``, ``models``, ``cost_report``, ``surgery``, ``convert``,
``checkpoint``, ``data``, ``train``, ``pretrained``, ``compress``, ``timing``. The four below are
imported with the package; the others on demand (``data`` imports TensorFlow).
"""

from lrjax import costs, decompose, iterative, ranks

__version__ = "0.1.0"

__all__ = ["costs", "decompose", "iterative", "ranks"]
