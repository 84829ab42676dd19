"""bonsai's NNX language models, as published: a KV cache passed as a keyword and updated by the
call, dense layers written by hand, a vision tower; whole-net `speedup:1.5` data-free and
calibrated (seconds, the report against XLA's compiled flop count), and the exports to ONNX
Runtime, LiteRT and StableHLO (max |runtime - JAX|).

The models are jax-ml/bonsai's Qwen 3, Gemma 3 (SigLIP tower, sliding and full attention), Qwen
3-VL's text model and LLaDA (their linear layers are bonsai's own ``ShardedLinear``), imported
unmodified from a checkout given by path (this machine has no network: ``git clone
https://github.com/jax-ml/bonsai`` elsewhere; bonsai imports ``jaxtyping``, LLaDA ``tqdm``), in
small configurations (2 layers of width 64, 16 tokens, batch 2), random weights. LLaDA's
``ShardingConfig.no_sharding()`` holds ``PartitionSpec(None, ...)`` specs, which JAX takes only
under a mesh: it runs under a one-device explicit mesh; its norms' weights, zeros until loaded,
are set to ones.

    python -m benchmarks.bonsai_llms --bonsai ~/src/bonsai --json bench_results/bonsai_llms.json
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time

from benchmarks.common import checkout_run, chosen_models, setup

MODELS = ("qwen3", "gemma3", "qwen3_vl", "llada")
EXPORTERS = ("onnx", "tflite", "stablehlo")
BATCH, TOKENS = 2, 16


def xla_flops(model, args, keywords, compiled: bool) -> float:
    """XLA's flop count (lowered or compiled) of ``model(*args, **keywords())`` on its eval view
    (dropout off, as lrjax costs it), the weights arguments."""
    import jax
    from flax import nnx

    from lrjax.nnx_surgery import eval_view

    graphdef, state = nnx.split(eval_view(model))
    lowered = jax.jit(lambda s, *a: nnx.merge(graphdef, s)(*a, **keywords())).lower(state, *args)
    return (lowered.compile() if compiled else lowered).cost_analysis()["flops"]


def measure(model, args, keywords, calibration, *, tmp_dir: str, rule: str = "speedup:1.5",
            exporters=EXPORTERS, export_kwargs=None) -> dict:
    """One model's row. ``args``: the example call's positional arguments; ``keywords()``: its
    keyword arguments, made afresh for each call (a new KV cache); ``calibration``: batches as
    ``decompose_nnx`` takes them; ``export_kwargs``: per format (``fixed_batch``)."""
    import lrjax
    from lrjax import export

    row = {}
    for method, calib in (("data-free", None), ("calibrated", calibration)):
        start = time.perf_counter()
        result = lrjax.decompose_nnx(model, *args, **keywords(), rule=rule, calibration=calib)
        row[method] = {"seconds": time.perf_counter() - start,
                       "report_speedup": result.report.speedup,
                       "layers_split": len(result.report.ranks),
                       "kept_full": len(result.report.kept_full),
                       "left_as_is": len(result.report.skipped)}
    for compiled in (False, True):
        row["calibrated"][f"xla_{'compiled' if compiled else 'lowered'}_speedup"] = xla_flops(
            model, args, keywords, compiled) / xla_flops(result.module, args, keywords, compiled)
    for fmt in exporters:
        extra = dict((export_kwargs or {}).get(fmt, {}))
        start = time.perf_counter()
        try:
            done = export.EXPORTERS[fmt](result.module, None, tuple(args),
                                         os.path.join(tmp_dir, f"model.{fmt}"), **keywords(),
                                         **extra)
            row[fmt] = {"max_abs_error": done.max_abs_error, "scale": done.scale,
                        "batches": list(done.checked_batches),
                        "seconds": time.perf_counter() - start, **extra}
        except export.ExportError as e:
            row[fmt] = {"error": str(e)}
    return row


def _build(name: str):
    """``(model, args, keywords, calibration, export_kwargs, context)`` of one bonsai model."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    rng = np.random.default_rng(0)
    ids = jnp.asarray(rng.integers(1, 256, (BATCH, TOKENS)), jnp.int32)
    fixed = {"onnx": {"fixed_batch": True}, "stablehlo": {"fixed_batch": True}}  # the cache's
    if name == "qwen3":
        from bonsai.models.qwen3 import modeling as q

        cfg = q.ModelConfig(num_layers=2, vocab_size=256, emb_dim=64, mlp_dim=128, num_heads=4,
                            head_dim=16, num_kv_heads=2, rope_theta=10000, rope_scaling_factor=1,
                            local_rope_theta=1e4, norm_eps=1e-6, tie_word_embeddings=False)
        seg = jnp.ones_like(ids)
        return (q.Qwen3(cfg, rngs=nnx.Rngs(0)), (ids,),
                lambda: {"cache": q.init_cache(cfg, BATCH, TOKENS, 0, jnp.float32),
                         "segment_ids": seg},
                [(ids, {"segment_ids": seg})], fixed, contextlib.nullcontext())
    if name == "gemma3":
        from bonsai.models.gemma3 import modeling as g

        mode = g.AttentionMode
        vision = g.VisionConfig(attention_dropout=0.0, hidden_size=32, image_size=28,
                                intermediate_size=64, layer_norm_eps=1e-6, num_attention_heads=4,
                                num_channels=3, num_hidden_layers=2, patch_size=7,
                                vision_use_head=False)
        text = g.TextConfig(attention_bias=False, attention_dropout=0.0, head_dim=16,
                            hidden_size=64, intermediate_size=128,
                            layer_types=[mode.SLIDE, mode.FULL], max_position_embeddings=64,
                            num_attention_heads=4, num_hidden_layers=2, num_key_value_heads=2,
                            rms_norm_eps=1e-6, rope_full_factor=8.0, rope_full_theta=1e6,
                            rope_slide_factor=1.0, rope_slide_theta=1e4, sliding_window=8,
                            vocab_size=256, norm_dtype=jnp.float32)
        cfg = g.ModelConfig(vision_config=vision, text_config=text, mm_tokens_per_image=4,
                            dtype="float32", final_logit_softcapping=None)
        image_tokens = jnp.zeros((BATCH, TOKENS), jnp.int32).at[:, 1:5].set(1)
        seg = jnp.ones((BATCH, TOKENS), jnp.int32)
        pixels = jnp.asarray(rng.standard_normal((BATCH, 28, 28, 3)), jnp.float32)
        return (g.Gemma3Model(cfg, rngs=nnx.Rngs(0)), (ids, pixels),
                lambda: {"cache": g.init_cache(cfg, BATCH, TOKENS, 0, jnp.float32),
                         "segment_ids": seg, "token_type_ids": image_tokens},
                [(ids, pixels, {"segment_ids": seg, "token_type_ids": image_tokens})], fixed,
                contextlib.nullcontext())
    if name == "qwen3_vl":
        from bonsai.models.qwen3_vl import modeling as q

        cfg = q.ModelConfig(
            vision_config=q.Qwen3VLVisionConfig(depth=1, hidden_size=32, intermediate_size=64,
                                                num_heads=2, out_hidden_size=64,
                                                deepstack_visual_indexes=(0,),
                                                num_position_embeddings=16),
            text_config=q.Qwen3VLTextConfig(vocab_size=256, hidden_size=64, intermediate_size=128,
                                            num_hidden_layers=2, num_attention_heads=4,
                                            num_key_value_heads=2, head_dim=16,
                                            mrope_section=(4, 2, 2), tie_word_embeddings=False))
        return (q.Qwen3VLForConditionalGeneration(cfg, rngs=nnx.Rngs(0)), (ids,),
                lambda: {"cache": q.init_cache(cfg, BATCH, TOKENS, 0, jnp.float32)}, [ids], fixed,
                contextlib.nullcontext())
    from bonsai.models.llada import modeling as L

    mesh = jax.make_mesh((1,), ("fsdp",), axis_types=(jax.sharding.AxisType.Explicit,))
    cfg = L.ModelConfig(dtype=jnp.float32, d_model=64, n_heads=4, n_kv_heads=4, n_layers=2,
                        embedding_dropout=0.0, max_sequence_length=64, rope_theta=1e4,
                        include_qkv_bias=False, include_bias=False, vocab_size=256,
                        embedding_size=256, mlp_hidden_size=128,
                        shd_cfg=L.ShardingConfig.no_sharding(), return_hidden_states=False)
    with jax.set_mesh(mesh):
        model = L.LLaDAModel(cfg, rngs=nnx.Rngs(0))
    for _, node in nnx.iter_graph(model):  # zeros until loaded
        if isinstance(node, L.RMSNorm):
            node.weight.set_value(jnp.ones_like(node.weight[...]))
    mask, key = jnp.ones((BATCH, TOKENS), jnp.int32), jax.random.key(0)
    return (model, (ids, mask, key), dict, [(ids, mask, key)], fixed, jax.set_mesh(mesh))


def _table(rows: dict) -> str:
    lines = [f"{'model':<10}{'split':>7}{'data-free':>12}{'calibrated: s, report vs XLA':>44}"
             + "".join(f"{f:>12}" for f in EXPORTERS)]
    for name, r in rows.items():
        free, cal = r["data-free"], r["calibrated"]
        cells = [f"{cal['layers_split']}", f"{free['seconds']:.1f} s",
                 f"{cal['seconds']:.1f} s {cal['report_speedup']:.4f} vs "
                 f"{cal['xla_lowered_speedup']:.4f} / {cal['xla_compiled_speedup']:.4f}"]
        cells += [f"{r[f]['max_abs_error']:.1e}" if "max_abs_error" in r.get(f, {}) else
                  ("error" if f in r else "-") for f in EXPORTERS]
        lines.append(f"{name:<10}{cells[0]:>7}{cells[1]:>12}{cells[2]:>44}"
                     + "".join(f"{c:>12}" for c in cells[3:]))
    return "\n".join(lines)


def main(argv=None) -> dict:
    setup()
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bonsai", required=True, help="a checkout of github.com/jax-ml/bonsai")
    parser.add_argument("--json", default="bench_results/bonsai_llms.json")
    parser.add_argument("--models", default=",".join(MODELS),
                        help=f"comma-separated subset of {','.join(MODELS)}")
    args = parser.parse_args(argv)
    names = chosen_models(parser, args.models, MODELS)
    if not os.path.isdir(os.path.join(args.bonsai, "bonsai", "models")):
        parser.error(f"--bonsai {args.bonsai}: no bonsai/models folder there")

    sys.path.insert(0, os.path.abspath(args.bonsai))

    def row_of(name, tmp):
        model, call_args, keywords, calibration, export_kwargs, context = _build(name)
        with context:
            return measure(model, call_args, keywords, calibration, tmp_dir=tmp,
                           export_kwargs=export_kwargs)

    return checkout_run("bonsai_llms", argv, ("bonsai", args.bonsai), names, row_of, _table,
                        args.json, rule="speedup:1.5")


if __name__ == "__main__":
    main()
