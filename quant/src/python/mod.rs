//! PyO3 bindings (`kvtuner_quant._native`). A thin layer: arrays arrive through the buffer protocol
//! (`buffer`; the Python package turns torch tensors into numpy views without copying), every
//! parameter is checked by the core (`Config::new`, `Shape::new`, headers), core errors become
//! Python exceptions through `From<QuantError> for PyErr`, and the kernels run with the GIL released.

mod buffer;

use crate::format::{Config, DType, ErrorKind, Header, Layout, QuantError, Shape, HEADER_NBYTES};
use crate::kernel;
use crate::threads;
use buffer::Buffer;
use half::{bf16, f16};
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::ffi;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict};
use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::os::raw::c_int;

impl From<QuantError> for PyErr {
    fn from(e: QuantError) -> PyErr {
        match e.kind {
            ErrorKind::Value => PyValueError::new_err(e.msg),
            ErrorKind::Type => PyTypeError::new_err(e.msg),
        }
    }
}

/// Evaluates `$body` with the type alias `$E` naming the element type of `$dtype`.
macro_rules! with_elem_type {
    ($dtype:expr, $E:ident => $body:expr) => {
        match $dtype {
            DType::F16 => {
                type $E = f16;
                $body
            }
            DType::BF16 => {
                type $E = bf16;
                $body
            }
            DType::F32 => {
                type $E = f32;
                $body
            }
        }
    };
}

/// Runs a kernel call with the GIL released, on the configured pool (or inline when small).
fn detached<R: Send>(py: Python<'_>, work_bytes: usize, f: impl FnOnce() -> R + Send) -> R {
    py.detach(|| threads::install_sized(work_bytes, f))
}

/// Packed bytes of one quantized tensor (header + body, FORMAT.md); immutable.
#[pyclass(frozen, module = "kvtuner_quant")]
pub struct QuantizedTensor {
    data: Vec<u8>,
    header: Header,
}

#[pymethods]
impl QuantizedTensor {
    /// Validates the header and size of `buf` (any bytes-like object) and copies it.
    #[staticmethod]
    fn from_bytes(buf: &Bound<'_, PyAny>) -> PyResult<QuantizedTensor> {
        let b = Buffer::get(buf, "buf", false)?;
        if !b.c_contiguous() {
            return Err(PyValueError::new_err("buf must be a contiguous bytes-like object"));
        }
        let data = b.bytes().to_vec();
        let header = Header::parse(&data)?;
        Ok(QuantizedTensor { data, header })
    }
    #[getter]
    fn nbytes(&self) -> usize {
        self.data.len()
    }
    #[getter]
    fn shape(&self) -> (usize, usize, usize) {
        let s = self.header.shape;
        (s.tokens, s.heads, s.head_dim)
    }
    #[getter]
    fn dtype(&self) -> &'static str {
        self.header.dtype.name()
    }
    #[getter]
    fn bits(&self) -> u8 {
        self.header.cfg.bits
    }
    #[getter]
    fn asym(&self) -> bool {
        self.header.cfg.asym
    }
    #[getter]
    fn axis(&self) -> u8 {
        self.header.cfg.axis
    }
    #[getter]
    fn group_size(&self) -> usize {
        self.header.cfg.group_size
    }
    #[getter]
    fn residual_length(&self) -> usize {
        self.header.cfg.residual_length
    }
    /// Tokens stored as codes (the rest are stored exactly).
    #[getter]
    fn quantized_tokens(&self) -> usize {
        self.header.layout().nq
    }
    fn __len__(&self) -> usize {
        self.data.len()
    }
    fn __bytes__<'py>(&self, py: Python<'py>) -> Bound<'py, PyBytes> {
        PyBytes::new(py, &self.data)
    }
    fn __eq__(&self, other: &Bound<'_, PyAny>) -> bool {
        other.cast::<QuantizedTensor>().map(|o| o.get().data == self.data).unwrap_or(false)
    }
    fn __repr__(&self) -> String {
        let (h, c) = (&self.header, &self.header.cfg);
        format!(
            "QuantizedTensor(shape=({}, {}, {}), dtype='{}', bits={}, asym={}, axis={}, group_size={}, residual_length={}, nbytes={})",
            h.shape.tokens,
            h.shape.heads,
            h.shape.head_dim,
            h.dtype.name(),
            c.bits,
            if c.asym { "True" } else { "False" },
            c.axis,
            c.group_size,
            c.residual_length,
            self.data.len()
        )
    }
    /// Read-only buffer over the packed bytes (zero-copy: `np.frombuffer(q, np.uint8)`).
    unsafe fn __getbuffer__(slf: Bound<'_, Self>, view: *mut ffi::Py_buffer, flags: c_int) -> PyResult<()> {
        if flags & ffi::PyBUF_WRITABLE != 0 {
            return Err(pyo3::exceptions::PyBufferError::new_err("QuantizedTensor is read-only"));
        }
        let me = slf.get();
        // The pyclass is frozen, so `data` never moves or changes while the object (kept alive by
        // view.obj) exists.
        let rc = unsafe {
            ffi::PyBuffer_FillInfo(
                view,
                slf.as_ptr(),
                me.data.as_ptr() as *mut std::ffi::c_void,
                me.data.len() as ffi::Py_ssize_t,
                1,
                flags,
            )
        };
        if rc != 0 {
            return Err(PyErr::fetch(slf.py()));
        }
        Ok(())
    }
    unsafe fn __releasebuffer__(&self, _view: *mut ffi::Py_buffer) {}

    /// Testing aid: (codes as int32 bytes, scale bit patterns as uint32 bytes, min bit patterns as uint32 bytes).
    fn _unpack<'py>(
        &self,
        py: Python<'py>,
    ) -> PyResult<(Bound<'py, PyBytes>, Bound<'py, PyBytes>, Bound<'py, PyBytes>)> {
        let u = kernel::unpack(&self.data)?;
        let le32 = |v: Vec<u32>| v.into_iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
        let codes: Vec<u8> = u.codes.into_iter().flat_map(|x| x.to_le_bytes()).collect();
        Ok((PyBytes::new(py, &codes), PyBytes::new(py, &le32(u.scale_bits)), PyBytes::new(py, &le32(u.min_bits))))
    }
}

#[pyfunction]
#[pyo3(signature = (x, dtype, *, bits, asym, axis, group_size, residual_length=0))]
#[allow(clippy::too_many_arguments)]
fn quantize(
    py: Python<'_>,
    x: &Bound<'_, PyAny>,
    dtype: &str,
    bits: i64,
    asym: bool,
    axis: i64,
    group_size: i64,
    residual_length: i64,
) -> PyResult<QuantizedTensor> {
    let dtype = DType::from_name(dtype)?;
    let cfg = Config::new(bits, asym, axis, group_size, residual_length)?;
    let x = Buffer::get(x, "x", false)?.float3(dtype)?;
    let header = Header::new(cfg, dtype, x.shape)?;
    let mut data = vec![0u8; header.total];
    with_elem_type!(dtype, E => {
        let xs = x.elems::<E>();
        detached(py, x.nbytes(), || kernel::quantize_into(xs, &header.shape, &cfg, &mut data))
    })?;
    Ok(QuantizedTensor { data, header })
}

#[pyfunction]
fn dequantize_into(py: Python<'_>, q: &Bound<'_, QuantizedTensor>, out: &Bound<'_, PyAny>) -> PyResult<()> {
    let qt = q.get();
    let h = qt.header;
    let mut out = Buffer::get(out, "out", true)?.float3(h.dtype)?;
    let shape = out.shape;
    if shape != h.shape {
        return Err(PyValueError::new_err(format!(
            "out must have shape ({}, {}, {}), got ({}, {}, {})",
            h.shape.tokens, h.shape.heads, h.shape.head_dim, shape.tokens, shape.heads, shape.head_dim
        )));
    }
    let work = out.nbytes();
    with_elem_type!(h.dtype, E => {
        let ys = out.elems_mut::<E>();
        detached(py, work, || kernel::dequantize_into(&qt.data, ys))
    })?;
    Ok(())
}

#[pyfunction]
#[pyo3(signature = (tokens, heads, head_dim, *, dtype, bits, asym, axis, group_size, residual_length=0))]
#[allow(clippy::too_many_arguments)]
fn packed_nbytes(
    tokens: i64,
    heads: i64,
    head_dim: i64,
    dtype: &str,
    bits: i64,
    asym: bool,
    axis: i64,
    group_size: i64,
    residual_length: i64,
) -> PyResult<usize> {
    let dtype = DType::from_name(dtype)?;
    let cfg = Config::new(bits, asym, axis, group_size, residual_length)?;
    let shape = Shape::new(tokens, heads, head_dim)?;
    Ok(crate::format::packed_nbytes(&cfg, dtype, &shape)?)
}

/// Where everything of one blob lies (FORMAT.md), for a configuration, dtype and shape: the
/// section offsets and sizes, the 64-byte header and the zero padding. Readers and writers of
/// blobs outside this crate (the device codec, the page format) take the geometry from here.
#[pyclass(frozen, module = "kvtuner_quant")]
pub struct BlobLayout {
    header: Header,
    layout: Layout,
}

#[pymethods]
impl BlobLayout {
    #[new]
    #[pyo3(signature = (tokens, heads, head_dim, *, dtype, bits, asym, axis, group_size, residual_length=0))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        tokens: i64,
        heads: i64,
        head_dim: i64,
        dtype: &str,
        bits: i64,
        asym: bool,
        axis: i64,
        group_size: i64,
        residual_length: i64,
    ) -> PyResult<BlobLayout> {
        let dtype = DType::from_name(dtype)?;
        let cfg = Config::new(bits, asym, axis, group_size, residual_length)?;
        let header = Header::new(cfg, dtype, Shape::new(tokens, heads, head_dim)?)?;
        Ok(BlobLayout { header, layout: header.layout() })
    }
    #[getter]
    fn shape(&self) -> (usize, usize, usize) {
        let s = self.header.shape;
        (s.tokens, s.heads, s.head_dim)
    }
    #[getter]
    fn dtype(&self) -> &'static str {
        self.header.dtype.name()
    }
    #[getter]
    fn itemsize(&self) -> usize {
        self.header.dtype.nbytes()
    }
    #[getter]
    fn bits(&self) -> u8 {
        self.header.cfg.bits
    }
    #[getter]
    fn asym(&self) -> bool {
        self.header.cfg.asym
    }
    #[getter]
    fn axis(&self) -> u8 {
        self.header.cfg.axis
    }
    #[getter]
    fn group_size(&self) -> usize {
        self.header.cfg.group_size
    }
    #[getter]
    fn residual_length(&self) -> usize {
        self.header.cfg.residual_length
    }
    /// Tokens stored as codes; tokens from here on are stored exactly.
    #[getter]
    fn nq(&self) -> usize {
        self.layout.nq
    }
    #[getter]
    fn ngroups(&self) -> usize {
        self.layout.ngroups
    }
    #[getter]
    fn codes_off(&self) -> usize {
        self.layout.codes_off
    }
    #[getter]
    fn codes_nbytes(&self) -> usize {
        self.layout.codes_len
    }
    #[getter]
    fn scales_off(&self) -> usize {
        self.layout.scales_off
    }
    /// Equals `residual_off` when symmetric (there is no mins section).
    #[getter]
    fn mins_off(&self) -> usize {
        self.layout.mins_off
    }
    /// Bytes of the scales (and of the mins), unpadded.
    #[getter]
    fn meta_nbytes(&self) -> usize {
        self.layout.meta_len
    }
    #[getter]
    fn residual_off(&self) -> usize {
        self.layout.residual_off
    }
    #[getter]
    fn residual_nbytes(&self) -> usize {
        self.layout.residual_len
    }
    #[getter]
    fn total_nbytes(&self) -> usize {
        self.layout.total
    }
    /// The 64-byte header every blob of this layout starts with.
    #[getter]
    fn header<'py>(&self, py: Python<'py>) -> Bound<'py, PyBytes> {
        PyBytes::new(py, &self.header.to_bytes())
    }
    /// `(start, end)` byte ranges of the zero padding between sections.
    #[getter]
    fn padding(&self) -> Vec<(usize, usize)> {
        self.header.padding().into_iter().map(|r| (r.start, r.end)).collect()
    }
    /// The keyword arguments `quantize_pages` / `dequantize_pages` take for blobs of this layout.
    fn codec_kwargs<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let c = &self.header.cfg;
        let d = PyDict::new(py);
        d.set_item("bits", c.bits)?;
        d.set_item("asym", c.asym)?;
        d.set_item("axis", c.axis)?;
        d.set_item("group_size", c.group_size)?;
        d.set_item("residual_length", c.residual_length)?;
        Ok(d)
    }
    fn __eq__(&self, other: &Bound<'_, PyAny>) -> bool {
        other.cast::<BlobLayout>().map(|o| o.get().header == self.header).unwrap_or(false)
    }
    fn __hash__(&self) -> u64 {
        let mut h = DefaultHasher::new();
        self.header.to_bytes().hash(&mut h);
        h.finish()
    }
    fn __repr__(&self) -> String {
        let (h, c) = (&self.header, &self.header.cfg);
        format!(
            "BlobLayout(shape=({}, {}, {}), dtype='{}', bits={}, asym={}, axis={}, group_size={}, residual_length={}, total_nbytes={})",
            h.shape.tokens,
            h.shape.heads,
            h.shape.head_dim,
            h.dtype.name(),
            c.bits,
            if c.asym { "True" } else { "False" },
            c.axis,
            c.group_size,
            c.residual_length,
            self.layout.total
        )
    }
}

#[pyfunction]
#[pyo3(signature = (x, dtype, dst, page_ids, *, page_tokens, bits, asym, axis, group_size, residual_length=0))]
#[allow(clippy::too_many_arguments)]
fn quantize_pages(
    py: Python<'_>,
    x: &Bound<'_, PyAny>,
    dtype: &str,
    dst: &Bound<'_, PyAny>,
    page_ids: &Bound<'_, PyAny>,
    page_tokens: i64,
    bits: i64,
    asym: bool,
    axis: i64,
    group_size: i64,
    residual_length: i64,
) -> PyResult<()> {
    let dtype = DType::from_name(dtype)?;
    let cfg = Config::new(bits, asym, axis, group_size, residual_length)?;
    let x = Buffer::get(x, "x", false)?.float3(dtype)?;
    let dst = Buffer::get(dst, "dst", true)?;
    let rows = dst.page_rows()?;
    let ids_buf = Buffer::get(page_ids, "page_ids", false)?;
    let ids = ids_buf.page_ids()?;
    x.buf.check_disjoint(&dst)?;
    ids_buf.check_disjoint(&dst)?;
    // The core derives the page size from len(page_ids); the explicit page_tokens catches a caller
    // whose x does not hold the pages it means.
    if page_tokens < 1 {
        return Err(PyValueError::new_err(format!("page_tokens must be >= 1, got {page_tokens}")));
    }
    if (page_tokens as u64).checked_mul(ids.len() as u64) != Some(x.shape.tokens as u64) {
        return Err(PyValueError::new_err(format!(
            "x must have len(page_ids) * page_tokens = {} * {page_tokens} tokens, got {}",
            ids.len(),
            x.shape.tokens
        )));
    }
    with_elem_type!(dtype, E => {
        let xs = x.elems::<E>();
        detached(py, x.nbytes(), || kernel::quantize_pages(xs, &x.shape, &cfg, &rows, ids))
    })?;
    Ok(())
}

#[pyfunction]
#[pyo3(signature = (src, page_ids, out, dtype, *, bits, asym, axis, group_size, residual_length=0))]
#[allow(clippy::too_many_arguments)]
fn dequantize_pages(
    py: Python<'_>,
    src: &Bound<'_, PyAny>,
    page_ids: &Bound<'_, PyAny>,
    out: &Bound<'_, PyAny>,
    dtype: &str,
    bits: i64,
    asym: bool,
    axis: i64,
    group_size: i64,
    residual_length: i64,
) -> PyResult<()> {
    let dtype = DType::from_name(dtype)?;
    let cfg = Config::new(bits, asym, axis, group_size, residual_length)?;
    let src = Buffer::get(src, "src", false)?;
    let rows = src.page_rows()?;
    let ids_buf = Buffer::get(page_ids, "page_ids", false)?;
    let ids = ids_buf.page_ids()?;
    let mut out = Buffer::get(out, "out", true)?.float3(dtype)?;
    src.check_disjoint(&out.buf)?;
    ids_buf.check_disjoint(&out.buf)?;
    let (shape, work) = (out.shape, out.nbytes());
    with_elem_type!(dtype, E => {
        let ys = out.elems_mut::<E>();
        detached(py, work, || kernel::dequantize_pages(&rows, ids, &cfg, &shape, ys))
    })?;
    Ok(())
}

#[pyfunction]
fn set_num_threads(n: i64) -> PyResult<()> {
    Ok(threads::set_num_threads(n)?)
}

#[pyfunction]
fn get_num_threads() -> usize {
    threads::get_num_threads()
}

/// Testing aid: force the portable (non-SIMD) kernels.
#[pyfunction]
fn _set_force_scalar(on: bool) {
    kernel::set_force_scalar(on)
}

/// Whether SIMD kernels are in use.
#[pyfunction]
fn _simd_enabled() -> bool {
    kernel::simd_enabled()
}

/// Testing aid: cap the kernel family (0 portable, 1 AVX2, 2 AVX-512); returns the level now in use.
#[pyfunction]
fn _set_max_simd_level(level: u8) -> u8 {
    kernel::set_max_simd_level(level);
    kernel::simd_level()
}

/// The kernel family in use: 0 portable, 1 AVX2+FMA+F16C, 2 AVX-512 F/BW/VL.
#[pyfunction]
fn _simd_level() -> u8 {
    kernel::simd_level()
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    // The crate version is the wheel's version (maturin takes it from Cargo.toml).
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add("HEADER_NBYTES", HEADER_NBYTES)?;
    m.add("FORMAT_VERSION", crate::format::VERSION)?;
    m.add_class::<QuantizedTensor>()?;
    m.add_class::<BlobLayout>()?;
    m.add_function(wrap_pyfunction!(quantize, m)?)?;
    m.add_function(wrap_pyfunction!(dequantize_into, m)?)?;
    m.add_function(wrap_pyfunction!(packed_nbytes, m)?)?;
    m.add_function(wrap_pyfunction!(quantize_pages, m)?)?;
    m.add_function(wrap_pyfunction!(dequantize_pages, m)?)?;
    m.add_function(wrap_pyfunction!(set_num_threads, m)?)?;
    m.add_function(wrap_pyfunction!(get_num_threads, m)?)?;
    m.add_function(wrap_pyfunction!(_set_force_scalar, m)?)?;
    m.add_function(wrap_pyfunction!(_simd_enabled, m)?)?;
    m.add_function(wrap_pyfunction!(_set_max_simd_level, m)?)?;
    m.add_function(wrap_pyfunction!(_simd_level, m)?)?;
    Ok(())
}
