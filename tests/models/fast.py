"""Compile helper for the model tests: tiny models, so XLA's compile time dominates the suite."""

import jax

# Cheaper CPU code generation; results stay within the tests' fp32 tolerances.
FAST_COMPILE = {
    "xla_backend_optimization_level": 0,
    "xla_llvm_disable_expensive_passes": True,
    "xla_cpu_use_fusion_emitters": False,  # the largest saving: ~3x less compile time
}


def fast_jit(fn, *example_args):
    """`jax.jit(fn)` compiled for arguments shaped like `example_args`, with cheap codegen."""
    return jax.jit(fn).lower(*example_args).compile(compiler_options=FAST_COMPILE)
