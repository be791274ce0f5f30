import pytest
from registry_helpers import (  # noqa: F401
    basic_registry,
    plain_registry,
    tls_registry,
    token_registry,
)

# Helpers that assert get pytest's detailed assertion messages too. This must
# run before any test module imports them.
pytest.register_assert_rewrite("layerbuild")
