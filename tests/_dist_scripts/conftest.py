"""The worker scripts here are launched by the tests, not collected (``--doctest-modules``
would import them outside their launcher)."""

collect_ignore_glob = ["*.py"]
