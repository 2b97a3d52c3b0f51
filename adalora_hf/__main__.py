"""``python -m adalora_hf``: the ``adalora`` command line (see ``adalora_hf.cli``)."""

from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
