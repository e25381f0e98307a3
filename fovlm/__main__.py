"""``python -m fovlm``: the same command line as the ``fovlm`` console script."""

from fovlm.cli import main

if __name__ == "__main__":
    main()
