"""Every workaround for another library's internals, one module per library, each naming the versions it was
checked against. tests/test_integrations.py checks each against the installed library. Imports none of ours."""
