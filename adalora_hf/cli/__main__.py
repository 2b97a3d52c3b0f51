"""``python -m adalora_hf.cli``: the same as ``adalora`` and ``python -m adalora_hf``."""

from ._commands import main

if __name__ == "__main__":
    raise SystemExit(main())
