from registry_helpers import (  # noqa: F401
    basic_registry,
    plain_registry,
    tls_registry,
    token_registry,
)
