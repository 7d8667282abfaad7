"""Test configuration: hypothesis profiles and paths to the shared ggml traces.

Profiles (select with HYPOTHESIS_PROFILE): ``ci`` (default, modest example counts so the whole suite
stays well under 10 minutes on 2 cores) and ``fuzz`` (long runs).
"""

import os
import pathlib

import pytest
from hypothesis import HealthCheck, settings

import jaxkv  # noqa: F401  (enables x64 before any test builds arrays)

settings.register_profile(
    "ci",
    max_examples=25,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "fuzz",
    max_examples=2000,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

REPO = pathlib.Path(__file__).resolve().parent.parent
SHARED = pathlib.Path(os.environ.get("JAXKV_SHARED", REPO.parent / "shared"))
GGML_TRACES = sorted((SHARED / "traces" / "ggml").glob("*.gguf"))


@pytest.fixture(scope="session")
def shared_dir() -> pathlib.Path:
    if not SHARED.is_dir():
        pytest.fail(f"shared traces not found at {SHARED} (set JAXKV_SHARED)")
    return SHARED
