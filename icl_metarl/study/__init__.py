"""A study end to end: the quickstart and the ``icl-metarl`` command line, both read from the registry."""
