//! Arrays from Python through the buffer protocol: a held `Py_buffer` and the checks that turn it
//! into a typed view the kernels can use (float tensor, page rows, page ids). All raw-pointer
//! access to caller memory in the bindings happens here.

use crate::elem::Elem;
use crate::format::{DType, Shape};
use crate::kernel::PageRows;
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::ffi;
use pyo3::prelude::*;
use std::ffi::CStr;

/// A held `Py_buffer`, released on drop (always with the GIL held: it lives in a `#[pyfunction]` frame).
pub(super) struct Buffer {
    view: Box<ffi::Py_buffer>,
    /// The argument name, for error messages.
    name: &'static str,
}

impl Buffer {
    pub(super) fn get(obj: &Bound<'_, PyAny>, name: &'static str, writable: bool) -> PyResult<Buffer> {
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
        Ok(Buffer { view, name })
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
    pub(super) fn c_contiguous(&self) -> bool {
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
    /// The bytes of a contiguous buffer.
    pub(super) fn bytes(&self) -> &[u8] {
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

    /// Checks a C-contiguous 3-D float array of `dtype` and returns its typed view.
    pub(super) fn float3(self, dtype: DType) -> PyResult<FloatArray> {
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
            return Err(PyValueError::new_err(format!(
                "{name} must be 3-D [tokens, heads, head_dim], got {}-D shape {:?}",
                self.ndim(),
                self.shape()
            )));
        }
        if !self.c_contiguous() {
            return Err(PyValueError::new_err(format!(
                "{name} must be C-contiguous, got strides {:?} (bytes) for shape {:?}; call .contiguous() / np.ascontiguousarray first",
                self.strides(),
                self.shape()
            )));
        }
        if self.ptr() as usize % dtype.nbytes() != 0 {
            return Err(PyValueError::new_err(format!(
                "{name} must be aligned to its {}-byte itemsize",
                dtype.nbytes()
            )));
        }
        let s = self.shape();
        let shape = Shape { tokens: s[0], heads: s[1], head_dim: s[2] };
        Ok(FloatArray { buf: self, dtype, shape })
    }

    /// Checks a 2-D uint8 buffer of page rows (the row stride may exceed the row).
    pub(super) fn page_rows(&self) -> PyResult<PageRows> {
        let name = self.name;
        if self.itemsize() != 1 || !["B", "<B", "=B", "b", "c"].contains(&self.format().as_str()) {
            return Err(PyTypeError::new_err(format!(
                "{name} must have dtype uint8, got buffer format {:?} with itemsize {}",
                self.format(),
                self.itemsize()
            )));
        }
        if self.ndim() != 2 {
            return Err(PyValueError::new_err(format!(
                "{name} must be 2-D [pages, row_bytes], got {}-D shape {:?}",
                self.ndim(),
                self.shape()
            )));
        }
        let (sh, st) = (self.shape(), self.strides());
        if sh[1] > 1 && st[1] != 1 {
            return Err(PyValueError::new_err(format!(
                "{name} rows must be contiguous (column stride 1), got strides {st:?}"
            )));
        }
        if sh[0] > 1 && st[0] < sh[1] as isize {
            return Err(PyValueError::new_err(format!(
                "{name} row stride must be >= row length {} bytes (non-overlapping, ascending rows), got strides {st:?}",
                sh[1]
            )));
        }
        let stride = if sh[0] > 1 { st[0] as usize } else { sh[1] };
        // SAFETY: the rows lie inside this buffer, which the calling #[pyfunction] holds for the call.
        Ok(unsafe { PageRows::new(self.ptr(), sh[0], stride, sh[1]) }?)
    }

    /// Checks a contiguous 1-D int64 array of page ids.
    pub(super) fn page_ids(&self) -> PyResult<&[i64]> {
        let name = self.name;
        if self.itemsize() != 8 || !["q", "l", "<q", "<l", "=q", "=l"].contains(&self.format().as_str()) {
            return Err(PyTypeError::new_err(format!(
                "{name} must have dtype int64, got buffer format {:?} with itemsize {}",
                self.format(),
                self.itemsize()
            )));
        }
        if self.ndim() != 1 || !self.c_contiguous() {
            return Err(PyValueError::new_err(format!(
                "{name} must be a contiguous 1-D int64 array, got shape {:?}",
                self.shape()
            )));
        }
        if self.ptr() as usize % 8 != 0 {
            return Err(PyValueError::new_err(format!("{name} must be 8-byte aligned")));
        }
        let n = self.shape()[0];
        Ok(if n == 0 { &[] } else { unsafe { std::slice::from_raw_parts(self.ptr() as *const i64, n) } })
    }

    /// Rejects two arguments whose memory overlaps (a kernel reading one while writing the other).
    pub(super) fn check_disjoint(&self, other: &Buffer) -> PyResult<()> {
        let ((a0, a1), (b0, b1)) = (self.extent(), other.extent());
        if a0 < b1 && b0 < a1 {
            return Err(PyValueError::new_err(format!("{} and {} must not share memory", self.name, other.name)));
        }
        Ok(())
    }
}

impl Drop for Buffer {
    fn drop(&mut self) {
        // SAFETY: the view was filled by PyObject_GetBuffer; the GIL is held (see struct doc).
        unsafe { ffi::PyBuffer_Release(&mut *self.view) };
    }
}

/// A checked C-contiguous `[tokens, heads, head_dim]` float buffer (`Buffer::float3`).
pub(super) struct FloatArray {
    pub buf: Buffer,
    pub dtype: DType,
    pub shape: Shape,
}

impl FloatArray {
    fn len(&self) -> usize {
        self.shape.numel().unwrap_or(0)
    }

    /// Input bytes, the work size that decides between the calling thread and the pool.
    pub(super) fn nbytes(&self) -> usize {
        self.len() * self.dtype.nbytes()
    }

    /// The elements, as the element type the caller dispatched on (`with_elem_type!`).
    pub(super) fn elems<E: Elem>(&self) -> &[E] {
        assert_eq!(E::DTYPE, self.dtype, "element type must match the checked dtype");
        if self.len() == 0 {
            return &[];
        }
        // SAFETY: float3 checked dtype, itemsize, alignment, C-contiguity and shape; the buffer is
        // held (and cannot move) while `self` lives.
        unsafe { std::slice::from_raw_parts(self.buf.ptr() as *const E, self.len()) }
    }

    /// The elements, writable. Python code may still hold the array: writing while the GIL is
    /// released is the documented contract of `out=` arguments (as with numpy's own `out=`).
    pub(super) fn elems_mut<E: Elem>(&mut self) -> &mut [E] {
        assert_eq!(E::DTYPE, self.dtype, "element type must match the checked dtype");
        assert!(self.buf.view.readonly == 0, "elems_mut needs a buffer requested writable");
        if self.len() == 0 {
            return &mut [];
        }
        // SAFETY: as in `elems`, and the buffer was requested with PyBUF_WRITABLE.
        unsafe { std::slice::from_raw_parts_mut(self.buf.ptr() as *mut E, self.len()) }
    }
}
