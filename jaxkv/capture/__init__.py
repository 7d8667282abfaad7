"""Capture the attention calls of a real llama.cpp inference as trace v1 files.

Modules, one job each: :mod:`.ggml_struct` (the ``ggml_tensor`` struct and node descriptors),
:mod:`.collect` (the eval callback: which nodes, which operands), :mod:`.writer` (a call -> trace v1
file with views of the real buffers), :mod:`.engine` (llama-cpp-python's libraries and build facts),
:mod:`.runner` (load, decode greedily, capture). CLI: ``python -m fuzz capture`` (fuzz.capture_cmd).
Nothing here is imported by ``jaxkv`` itself: llama-cpp-python is an optional extra.
"""
