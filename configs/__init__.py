"""The shipped configs as package data: `CONFIG_DIR` finds them in a checkout and in an installed copy."""

from pathlib import Path

CONFIG_DIR = Path(__file__).resolve().parent
