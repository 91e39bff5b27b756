"""The image format: layouts (schema), framing records (core), and the one codec."""
from ..errors import ImageError
from . import core
from .codec import ImageReader, ImageWriter, decode_all
from .schema import ENUMS, LAYOUTS, Layout, Record, layout
from .types import FORMAT_VERSION, MAGIC_HEAD, MAGIC_TAIL, PAGE_SIZE, ObjType

__all__ = ["ImageError", "ImageReader", "ImageWriter", "decode_all", "ENUMS", "LAYOUTS",
           "Layout", "Record", "layout", "core", "FORMAT_VERSION", "MAGIC_HEAD", "MAGIC_TAIL",
           "PAGE_SIZE", "ObjType"]
