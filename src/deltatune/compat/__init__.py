"""Assumptions about other libraries' private behaviour, one module per library, each with a test in
``tests/test_compat.py`` that fails loudly when an upgrade breaks it."""
