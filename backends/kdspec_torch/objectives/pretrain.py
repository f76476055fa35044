"""`pretrain`: next-token CE on packed documents (a teacher, or a from-scratch baseline)."""

from .ce import build

LAYOUT = "packed"
__all__ = ["LAYOUT", "build"]
