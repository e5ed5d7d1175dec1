"""``python -m robustopt``: the same as the ``robustopt`` console script."""

from robustopt.cli.app import main

if __name__ == "__main__":
    main()
