"""Oracles: real kernels run in the loop, to compare jaxkv's models against.

``jaxkv.oracles.ggml`` runs ggml's own CPU ops (through the ``libggml-python`` wheel's shared libraries,
bound with ctypes in ``jaxkv.oracles.ggml_lib``) on canonical-layout numpy inputs. Importing this package
loads nothing; the libraries load on first use and raise ``OracleUnavailable`` when absent.
"""

from jaxkv.oracles.ggml_lib import OracleUnavailable

__all__ = ["OracleUnavailable"]
