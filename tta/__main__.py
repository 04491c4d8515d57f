"""``python -m tta``: the ``tta`` command line (the same as the ``tta`` script)."""

from tta.cli import main

if __name__ == "__main__":
    main()
