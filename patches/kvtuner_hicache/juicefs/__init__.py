"""JuiceFS storage backend for SGLang's hierarchical cache (HiCache L3).

``--hicache-storage-backend juicefs`` in a patched SGLang, or ``dynamic`` with
``"module_path": "kvtuner_hicache.juicefs"`` without the patch. Options, on-disk layout and
failure handling: ``docs/juicefs-backend.md``.
"""

from .options import JuiceFSOptions
from .page_file import HEADER_SIZE
from .storage import BACKEND_NAME, JuiceFSStorage
from .volume import mount_fstype

__all__ = ["JuiceFSStorage", "JuiceFSOptions", "BACKEND_NAME", "HEADER_SIZE", "mount_fstype"]
