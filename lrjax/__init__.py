"""lrjax: low-rank CNN compression in JAX/Flax (Tai et al., ICLR 2016).

Top level: :func:`decompose_linen` and :func:`decompose_nnx` compress any Flax model, and
:func:`save_decomposed` and :func:`load_decomposed` keep the result for another process (loaded on
first use, so that ``import lrjax`` stays light). Submodules: ``decompose`` (closed-form factors),
``costs`` (cost model), ``ranks`` (rank selection), ``iterative`` (iterative baseline) are imported
with the package; ``rules``, ``problem``, ``layers``, ``nnx_layers``, ``formulations``, ``models``,
``surgery``, ``nnx_surgery``, ``saved``, ``cost_report``, ``convert``, ``export``, ``runtimes``,
``onnx_convert``, ``checkpoint``, ``data``, ``train``, ``reporting``, ``pretrained``, ``timing``,
``xla_flags`` and the command lines in ``cli`` on demand (``data`` imports TensorFlow). The
README's module map gives each module's layer and responsibility.

TensorFlow (``tf.data`` input pipelines, the LiteRT converter) runs without oneDNN's custom ops
unless ``TF_ENABLE_ONEDNN_OPTS`` is set before lrjax is imported: lrjax runs no TensorFlow compute
where they would matter, and their allocator keeps the memory of freed variables (the LiteRT
export of the low-rank VGG-16 peaks at 3.0 GiB without them, 3.8 GiB with them).
"""

import os

os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")  # before anything imports TensorFlow

from lrjax import costs, decompose, iterative, ranks  # noqa: E402

__version__ = "0.2.0"

__all__ = ["costs", "decompose", "iterative", "ranks", "decompose_linen", "decompose_nnx",
           "save_decomposed", "load_decomposed"]


def __getattr__(name):
    if name == "decompose_linen":
        from lrjax.surgery import decompose_linen

        return decompose_linen
    if name == "decompose_nnx":
        from lrjax.nnx_surgery import decompose_nnx

        return decompose_nnx
    if name in ("save_decomposed", "load_decomposed"):
        from lrjax import saved

        return getattr(saved, name)
    raise AttributeError(f"module 'lrjax' has no attribute {name!r}")
