"""Workarounds for other libraries' internals, one module per library, each naming the versions it was checked
against and tested by tests/test_integrations.py so that a change in the library is noticed."""
