"""A task's data: loading its sources, and turning its rows into what TRL trains on."""
