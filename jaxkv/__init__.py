"""jaxkv: a JAX reference and fuzzing framework for decode attention over mixed-precision KV caches.

float64 is part of the contract (the ``"f64"`` precision policy is the golden reference), so importing
jaxkv enables ``jax_enable_x64``. Every function states its dtypes explicitly; nothing relies on
JAX's default dtype.
"""

import jax as _jax

_jax.config.update("jax_enable_x64", True)

__version__ = "0.1.0"
