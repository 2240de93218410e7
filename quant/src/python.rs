//! PyO3 bindings (`kvtuner_quant._native`). Arrays arrive through the buffer protocol (numpy arrays;
//! the Python layer turns torch tensors into numpy views without copying), are checked here, and the
//! kernels run with the GIL released.

use crate::format::{Config, DType, ErrorKind, Header, QuantError, Shape, HEADER_NBYTES};
use crate::kernel::{self, PageRows};
use crate::threads;
use half::{bf16, f16};
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::ffi;
use pyo3::prelude::*;
use pyo3::types::PyBytes;
use std::ffi::CStr;
use std::os::raw::c_int;

fn err(e: QuantError) -> PyErr {
    match e.kind {
        ErrorKind::Value => PyValueError::new_err(e.msg),
        ErrorKind::Type => PyTypeError::new_err(e.msg),
    }
}

fn verr(msg: String) -> PyErr {
    PyValueError::new_err(msg)
}

/// A held `Py_buffer`, released on drop (always with the GIL held: it lives in a `#[pyfunction]` frame).
struct Buf {
    view: Box<ffi::Py_buffer>,
    name: &'static str,
}

impl Buf {
    fn get(obj: &Bound<'_, PyAny>, name: &'static str, writable: bool) -> PyResult<Buf> {
        let mut view = Box::new(ffi::Py_buffer::new());
        let flags = ffi::PyBUF_RECORDS_RO | if writable { ffi::PyBUF_WRITABLE } else { 0 };
        // SAFETY: obj is a live object; view is a fresh Py_buffer.
        if unsafe { ffi::PyObject_GetBuffer(obj.as_ptr(), &mut *view, flags) } != 0 {
            let cause = PyErr::fetch(obj.py());
            let what = if writable { "a writable" } else { "an" };
            return Err(PyTypeError::new_err(format!(
                "{name} must be {what} array exposing the buffer protocol (numpy array or CPU torch tensor): {cause}"
            )));
        }
        Ok(Buf { view, name })
    }
    fn ndim(&self) -> usize {
        self.view.ndim as usize
    }
    fn shape(&self) -> Vec<usize> {
        (0..self.ndim()).map(|i| unsafe { *self.view.shape.add(i) } as usize).collect()
    }
    fn strides(&self) -> Vec<isize> {
        (0..self.ndim()).map(|i| unsafe { *self.view.strides.add(i) }).collect()
    }
    fn itemsize(&self) -> usize {
        self.view.itemsize as usize
    }
    fn format(&self) -> String {
        if self.view.format.is_null() {
            "B".into()
        } else {
            unsafe { CStr::from_ptr(self.view.format) }.to_string_lossy().into_owned()
        }
    }
    fn ptr(&self) -> *mut u8 {
        self.view.buf as *mut u8
    }
    fn c_contiguous(&self) -> bool {
        let (sh, st) = (self.shape(), self.strides());
        let mut want = self.itemsize() as isize;
        for i in (0..sh.len()).rev() {
            if sh[i] > 1 && st[i] != want {
                return false;
            }
            want *= sh[i] as isize;
        }
        true
    }
    fn bytes(&self) -> &[u8] {
        if self.view.len == 0 {
            return &[];
        }
        unsafe { std::slice::from_raw_parts(self.ptr(), self.view.len as usize) }
    }
    /// Range of bytes the buffer spans (for overlap checks).
    fn extent(&self) -> (usize, usize) {
        let (sh, st) = (self.shape(), self.strides());
        if sh.contains(&0) {
            return (self.ptr() as usize, self.ptr() as usize);
        }
        let (mut lo, mut hi) = (self.ptr() as isize, self.ptr() as isize + self.itemsize() as isize);
        for i in 0..sh.len() {
            let d = st[i] * (sh[i] as isize - 1);
            if d < 0 {
                lo += d
            } else {
                hi += d
            }
        }
        (lo as usize, hi as usize)
    }

    /// A C-contiguous 3-D float array of `dtype`: returns its shape.
    fn float3(&self, dtype: DType) -> PyResult<Shape> {
        let name = self.name;
        let (fmt, want_fmts): (String, &[&str]) = (
            self.format(),
            match dtype {
                DType::F16 => &["e", "<e", "=e"],
                DType::F32 => &["f", "<f", "=f"],
                // bfloat16 travels as its 16-bit pattern (a uint16/int16 view)
                DType::BF16 => &["H", "h", "<H", "<h", "=H", "=h", "E"],
            },
        );
        if self.itemsize() != dtype.nbytes() || !want_fmts.contains(&fmt.as_str()) {
            return Err(PyTypeError::new_err(format!(
                "{name} must have dtype {} (buffer format {:?}), got buffer format {fmt:?} with itemsize {}",
                dtype.name(),
                want_fmts[0],
                self.itemsize()
            )));
        }
        if self.ndim() != 3 {
            return Err(verr(format!(
                "{name} must be 3-D [tokens, heads, head_dim], got {}-D shape {:?}",
                self.ndim(),
                self.shape()
            )));
        }
        if !self.c_contiguous() {
            return Err(verr(format!(
                "{name} must be C-contiguous, got strides {:?} (bytes) for shape {:?}; call .contiguous() / np.ascontiguousarray first",
                self.strides(),
                self.shape()
            )));
        }
        if self.ptr() as usize % dtype.nbytes() != 0 {
            return Err(verr(format!("{name} must be aligned to its {}-byte itemsize", dtype.nbytes())));
        }
        let s = self.shape();
        Ok(Shape { tokens: s[0], heads: s[1], head_dim: s[2] })
    }

    /// A 2-D uint8 buffer of page rows (row stride may exceed the row).
    fn rows(&self) -> PyResult<PageRows> {
        let name = self.name;
        if self.itemsize() != 1 || !["B", "<B", "=B", "b", "c"].contains(&self.format().as_str()) {
            return Err(PyTypeError::new_err(format!(
                "{name} must have dtype uint8, got buffer format {:?} with itemsize {}",
                self.format(),
                self.itemsize()
            )));
        }
        if self.ndim() != 2 {
            return Err(verr(format!(
                "{name} must be 2-D [pages, row_bytes], got {}-D shape {:?}",
                self.ndim(),
                self.shape()
            )));
        }
        let (sh, st) = (self.shape(), self.strides());
        if sh[1] > 1 && st[1] != 1 {
            return Err(verr(format!("{name} rows must be contiguous (column stride 1), got strides {st:?}")));
        }
        if sh[0] > 1 && st[0] < sh[1] as isize {
            return Err(verr(format!(
                "{name} row stride must be >= row length {} bytes (non-overlapping, ascending rows), got strides {st:?}",
                sh[1]
            )));
        }
        let stride = if sh[0] > 1 { st[0] as usize } else { sh[1] };
        unsafe { PageRows::new(self.ptr(), sh[0], stride, sh[1]) }.map_err(err)
    }

    /// A 1-D int64 array of page ids.
    fn ids(&self) -> PyResult<&[i64]> {
        let name = self.name;
        if self.itemsize() != 8 || !["q", "l", "<q", "<l", "=q", "=l"].contains(&self.format().as_str()) {
            return Err(PyTypeError::new_err(format!(
                "{name} must have dtype int64, got buffer format {:?} with itemsize {}",
                self.format(),
                self.itemsize()
            )));
        }
        if self.ndim() != 1 || !self.c_contiguous() {
            return Err(verr(format!("{name} must be a contiguous 1-D int64 array, got shape {:?}", self.shape())));
        }
        if self.ptr() as usize % 8 != 0 {
            return Err(verr(format!("{name} must be 8-byte aligned")));
        }
        let n = self.shape()[0];
        Ok(if n == 0 { &[] } else { unsafe { std::slice::from_raw_parts(self.ptr() as *const i64, n) } })
    }
}

impl Drop for Buf {
    fn drop(&mut self) {
        // SAFETY: the view was filled by PyObject_GetBuffer; the GIL is held (see struct doc).
        unsafe { ffi::PyBuffer_Release(&mut *self.view) };
    }
}

fn disjoint(a: &Buf, b: &Buf) -> PyResult<()> {
    let ((a0, a1), (b0, b1)) = (a.extent(), b.extent());
    if a0 < b1 && b0 < a1 {
        return Err(verr(format!("{} and {} must not share memory", a.name, b.name)));
    }
    Ok(())
}

fn config(bits: i64, asym: bool, axis: i64, group_size: i64, residual_length: i64) -> PyResult<Config> {
    if !matches!(bits, 2 | 4 | 8) {
        return Err(verr(format!("bits must be 2, 4 or 8, got {bits}")));
    }
    if !matches!(axis, 0 | 1) {
        return Err(verr(format!("axis must be 0 (per-token) or 1 (per-channel), got {axis}")));
    }
    if !(1..=u32::MAX as i64).contains(&group_size) {
        return Err(verr(format!("group_size must be a positive integer, got {group_size}")));
    }
    if !(0..=u32::MAX as i64).contains(&residual_length) {
        return Err(verr(format!("residual_length must be >= 0, got {residual_length}")));
    }
    Ok(Config {
        bits: bits as u8,
        asym,
        axis: axis as u8,
        group_size: group_size as usize,
        residual_length: residual_length as usize,
    })
}

#[derive(Clone, Copy)]
struct SendPtr(*mut u8);
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

/// Runs `f` with the element type of `dtype` and the GIL released, on the configured pool.
macro_rules! dispatch {
    ($py:expr, $dtype:expr, $work:expr, |$E:ident| $body:expr) => {{
        let work: usize = $work * $dtype.nbytes();
        match $dtype {
            DType::F16 => {
                type $E = f16;
                $py.detach(|| threads::install_sized(work, || $body))
            }
            DType::BF16 => {
                type $E = bf16;
                $py.detach(|| threads::install_sized(work, || $body))
            }
            DType::F32 => {
                type $E = f32;
                $py.detach(|| threads::install_sized(work, || $body))
            }
        }
    }};
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
        let b = Buf::get(buf, "buf", false)?;
        if !b.c_contiguous() {
            return Err(verr("buf must be a contiguous bytes-like object".into()));
        }
        let data = b.bytes().to_vec();
        let header = Header::parse(&data).map_err(err)?;
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
        let u = kernel::unpack(&self.data).map_err(err)?;
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
    let dtype = DType::from_name(dtype).map_err(err)?;
    let cfg = config(bits, asym, axis, group_size, residual_length)?;
    let b = Buf::get(x, "x", false)?;
    let shape = b.float3(dtype)?;
    let header = Header::new(cfg, dtype, shape).map_err(err)?;
    let mut data = vec![0u8; header.total];
    let (p, n) = (SendPtr(b.ptr()), shape.numel().unwrap_or(0));
    dispatch!(py, dtype, n, |E| {
        #[allow(clippy::redundant_locals)] // capture the whole Send wrapper, not its raw-pointer field
        let p = p;
        let xs: &[E] = if n == 0 { &[] } else { unsafe { std::slice::from_raw_parts(p.0 as *const E, n) } };
        kernel::quantize_into(xs, &shape, &cfg, &mut data)
    })
    .map_err(err)?;
    Ok(QuantizedTensor { data, header })
}

#[pyfunction]
fn dequantize_into(py: Python<'_>, q: &Bound<'_, QuantizedTensor>, out: &Bound<'_, PyAny>) -> PyResult<()> {
    let qt = q.get();
    let h = qt.header;
    let o = Buf::get(out, "out", true)?;
    let shape = o.float3(h.dtype)?;
    if shape != h.shape {
        return Err(verr(format!(
            "out must have shape ({}, {}, {}), got ({}, {}, {})",
            h.shape.tokens, h.shape.heads, h.shape.head_dim, shape.tokens, shape.heads, shape.head_dim
        )));
    }
    let (p, n) = (SendPtr(o.ptr()), shape.numel().unwrap_or(0));
    let data = &qt.data;
    dispatch!(py, h.dtype, n, |E| {
        #[allow(clippy::redundant_locals)] // capture the whole Send wrapper, not its raw-pointer field
        let p = p;
        let ys: &mut [E] = if n == 0 { &mut [] } else { unsafe { std::slice::from_raw_parts_mut(p.0 as *mut E, n) } };
        kernel::dequantize_into(data, ys).map(|_| ())
    })
    .map_err(err)
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
    let dtype = DType::from_name(dtype).map_err(err)?;
    let cfg = config(bits, asym, axis, group_size, residual_length)?;
    for (name, v) in [("tokens", tokens), ("heads", heads), ("head_dim", head_dim)] {
        if v < 0 {
            return Err(verr(format!("{name} must be >= 0, got {v}")));
        }
    }
    let shape = Shape { tokens: tokens as usize, heads: heads as usize, head_dim: head_dim as usize };
    crate::format::packed_nbytes(&cfg, dtype, &shape).map_err(err)
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
    let dtype = DType::from_name(dtype).map_err(err)?;
    let cfg = config(bits, asym, axis, group_size, residual_length)?;
    let xb = Buf::get(x, "x", false)?;
    let shape = xb.float3(dtype)?;
    let db = Buf::get(dst, "dst", true)?;
    let rows = db.rows()?;
    let ib = Buf::get(page_ids, "page_ids", false)?;
    let ids = ib.ids()?;
    disjoint(&xb, &db)?;
    disjoint(&ib, &db)?;
    if page_tokens < 1 {
        return Err(verr(format!("page_tokens must be >= 1, got {page_tokens}")));
    }
    let want = (page_tokens as u64).checked_mul(ids.len() as u64);
    if want != Some(shape.tokens as u64) {
        return Err(verr(format!(
            "x must have len(page_ids) * page_tokens = {} * {page_tokens} tokens, got {}",
            ids.len(),
            shape.tokens
        )));
    }
    let (p, n) = (SendPtr(xb.ptr()), shape.numel().unwrap_or(0));
    dispatch!(py, dtype, n, |E| {
        #[allow(clippy::redundant_locals)] // capture the whole Send wrapper, not its raw-pointer field
        let p = p;
        let xs: &[E] = if n == 0 { &[] } else { unsafe { std::slice::from_raw_parts(p.0 as *const E, n) } };
        kernel::quantize_pages(xs, &shape, &cfg, &rows, ids)
    })
    .map_err(err)
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
    let dtype = DType::from_name(dtype).map_err(err)?;
    let cfg = config(bits, asym, axis, group_size, residual_length)?;
    let sb = Buf::get(src, "src", false)?;
    let rows = sb.rows()?;
    let ib = Buf::get(page_ids, "page_ids", false)?;
    let ids = ib.ids()?;
    let ob = Buf::get(out, "out", true)?;
    let shape = ob.float3(dtype)?;
    disjoint(&sb, &ob)?;
    disjoint(&ib, &ob)?;
    if ids.is_empty() && shape.tokens != 0 {
        return Err(verr(format!("out has {} tokens but page_ids is empty", shape.tokens)));
    }
    let (p, n) = (SendPtr(ob.ptr()), shape.numel().unwrap_or(0));
    dispatch!(py, dtype, n, |E| {
        #[allow(clippy::redundant_locals)] // capture the whole Send wrapper, not its raw-pointer field
        let p = p;
        let ys: &mut [E] = if n == 0 { &mut [] } else { unsafe { std::slice::from_raw_parts_mut(p.0 as *mut E, n) } };
        kernel::dequantize_pages(&rows, ids, &cfg, &shape, ys)
    })
    .map_err(err)
}

#[pyfunction]
fn set_num_threads(n: i64) -> PyResult<()> {
    if n < 1 {
        return Err(verr(format!("n must be >= 1, got {n}")));
    }
    threads::set_num_threads(n as usize).map_err(err)
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
