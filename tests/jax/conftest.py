"""Every test here needs jax and optax; the parity tests also need torch + transformers (they
skip themselves without)."""

import pytest

pytest.importorskip("jax")
pytest.importorskip("optax")
