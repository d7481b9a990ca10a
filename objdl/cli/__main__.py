"""``python -m objdl.cli``: the objdl command."""

from objdl.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
