from typing import Any, Literal

__version__: str
HEADER_NBYTES: int
FORMAT_VERSION: int

DTypeName = Literal["float16", "bfloat16", "float32"]

class QuantizedTensor:
    @staticmethod
    def from_bytes(buf: Any) -> QuantizedTensor: ...
    @property
    def nbytes(self) -> int: ...
    @property
    def shape(self) -> tuple[int, int, int]: ...
    @property
    def dtype(self) -> DTypeName: ...
    @property
    def bits(self) -> int: ...
    @property
    def asym(self) -> bool: ...
    @property
    def axis(self) -> int: ...
    @property
    def group_size(self) -> int: ...
    @property
    def residual_length(self) -> int: ...
    @property
    def quantized_tokens(self) -> int: ...
    def __len__(self) -> int: ...
    def __bytes__(self) -> bytes: ...
    def __buffer__(self, flags: int, /) -> memoryview: ...
    def _unpack(self) -> tuple[bytes, bytes, bytes]: ...

def dtype_name(dtype: Any) -> DTypeName: ...
def quantize(
    x: Any, *, bits: int, asym: bool, axis: int, group_size: int, residual_length: int = 0
) -> QuantizedTensor: ...
def dequantize(q: QuantizedTensor, out: Any = None) -> Any: ...
def packed_nbytes(
    tokens: int,
    heads: int,
    head_dim: int,
    *,
    dtype: Any,
    bits: int,
    asym: bool,
    axis: int,
    group_size: int,
    residual_length: int = 0,
) -> int: ...
def quantize_pages(
    x: Any,
    dst: Any,
    page_ids: Any,
    *,
    page_tokens: int,
    bits: int,
    asym: bool,
    axis: int,
    group_size: int,
    residual_length: int = 0,
) -> None: ...
def dequantize_pages(
    src: Any,
    page_ids: Any,
    out: Any,
    *,
    bits: int,
    asym: bool,
    axis: int,
    group_size: int,
    residual_length: int = 0,
) -> None: ...
def set_num_threads(n: int) -> None: ...
def get_num_threads() -> int: ...
