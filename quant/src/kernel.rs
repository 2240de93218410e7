//! The public quantize / dequantize entry points (single blobs and pages) and the choice of kernel
//! family at run time: AVX-512 (`avx512`), AVX2+FMA+F16C (`avx2`) or the portable code
//! (`portable`), so one wheel runs on any x86-64 and every family writes the same bytes.
//!
//! Work is split into chunks of whole rows (per-token) or whole token groups (per-channel) whose
//! codes start on a byte boundary; chunks run in parallel on the crate's rayon pool.

use crate::elem::Elem;
use crate::format::{Config, DType, Header, Layout, QuantError, Result, Shape, HEADER_NBYTES};
use crate::math::{get_code, CodeRange};
use rayon::prelude::*;
use std::sync::atomic::{AtomicU8, Ordering};

/// Kernel families, best last.
pub const SCALAR: u8 = 0;
pub const AVX2: u8 = 1;
pub const AVX512: u8 = 2;

static MAX_LEVEL: AtomicU8 = AtomicU8::new(AVX512);

/// Caps the kernel family (tests compare every family with the portable one).
pub fn set_max_simd_level(level: u8) {
    MAX_LEVEL.store(level.min(AVX512), Ordering::Relaxed);
}

/// Forces the portable path (`true`) or lifts the cap (`false`).
pub fn set_force_scalar(on: bool) {
    set_max_simd_level(if on { SCALAR } else { AVX512 });
}

/// The best kernel family this CPU supports, within the cap.
pub fn simd_level() -> u8 {
    let cap = MAX_LEVEL.load(Ordering::Relaxed);
    #[cfg(target_arch = "x86_64")]
    {
        let avx2 =
            is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") && is_x86_feature_detected!("f16c");
        let avx512 = avx2
            && is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512vl");
        let have = if avx512 {
            AVX512
        } else if avx2 {
            AVX2
        } else {
            SCALAR
        };
        have.min(cap)
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = cap;
        SCALAR
    }
}

/// Whether a SIMD path is in use.
pub fn simd_enabled() -> bool {
    simd_level() > SCALAR
}

/// The kernel family for chunks with row length `c` under `cfg`.
fn fast_ok(cfg: &Config, c: usize) -> u8 {
    let level = simd_level();
    #[cfg(target_arch = "x86_64")]
    if level >= AVX512 && crate::avx512::fits(cfg, c) {
        return AVX512;
    }
    #[cfg(target_arch = "x86_64")]
    if level >= AVX2 && crate::avx2::fits(cfg, c) {
        return AVX2;
    }
    SCALAR
}

/// Quantizes `x` (whole rows, or whole token groups for axis 1) into the chunk's codes and metadata
/// (`codes` starts on a byte boundary; `scales`/`mins` hold exactly the chunk's groups).
#[allow(clippy::too_many_arguments)]
fn quant_chunk<E: Elem>(
    cfg: &Config,
    c: usize,
    x: &[E],
    codes: &mut [u8],
    scales: &mut [u8],
    mins: &mut [u8],
    fast: u8,
) {
    // SAFETY: `fast` comes from fast_ok: the CPU features are present and the shape fits.
    #[cfg(target_arch = "x86_64")]
    match fast {
        AVX512 => return unsafe { crate::avx512::quant_chunk(cfg, c, x, codes, scales, mins) },
        AVX2 => return unsafe { crate::avx2::quant_chunk(cfg, c, x, codes, scales, mins) },
        _ => {}
    }
    let _ = fast;
    crate::portable::quant_chunk(cfg, c, x, codes, scales, mins)
}

#[allow(clippy::too_many_arguments)]
fn dequant_chunk<E: Elem>(
    cfg: &Config,
    c: usize,
    codes: &[u8],
    scales: &[u8],
    mins: &[u8],
    out: &mut [E],
    fast: u8,
    nt: bool,
) {
    // SAFETY: as in quant_chunk.
    #[cfg(target_arch = "x86_64")]
    match fast {
        AVX512 => return unsafe { crate::avx512::dequant_chunk(cfg, c, codes, scales, mins, out, nt) },
        AVX2 => return unsafe { crate::avx2::dequant_chunk(cfg, c, codes, scales, mins, out, nt) },
        _ => {}
    }
    let _ = (fast, nt);
    crate::portable::dequant_chunk(cfg, c, codes, scales, mins, out)
}

/// A raw pointer that may cross threads; each chunk touches a disjoint range of it.
#[derive(Clone, Copy)]
struct SendPtr(*mut u8);
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

/// How the quantized rows are cut into parallel chunks.
struct Plan {
    unit_rows: usize,
    units: usize,
    per_chunk: usize,
}

impl Plan {
    fn new(cfg: &Config, c: usize, nq: usize) -> Plan {
        let unit_rows = if cfg.axis == 0 { 1 } else { cfg.group_size };
        let units = nq / unit_rows;
        let unit_el = unit_rows * c;
        // Chunks must start on a byte boundary of the code stream; otherwise one chunk does it all.
        let per_chunk =
            if (unit_el * cfg.bits as usize) % 8 == 0 { (64 * 1024 / unit_el.max(1)).max(1) } else { units.max(1) };
        Plan { unit_rows, units, per_chunk }
    }
    fn chunks(&self) -> usize {
        self.units.div_ceil(self.per_chunk)
    }
    /// Row range of chunk `i`.
    fn rows(&self, i: usize) -> (usize, usize) {
        let u0 = i * self.per_chunk;
        let u1 = (u0 + self.per_chunk).min(self.units);
        (u0 * self.unit_rows, u1 * self.unit_rows)
    }
}

fn as_bytes<E: Elem>(x: &[E]) -> &[u8] {
    // Elements are plain little-endian numbers (checked below for the host) without padding.
    unsafe { std::slice::from_raw_parts(x.as_ptr() as *const u8, std::mem::size_of_val(x)) }
}

#[cfg(target_endian = "big")]
compile_error!("kvtuner_quant assumes a little-endian host (residual tokens are copied as raw bytes)");

fn check_len(what: &str, got: usize, want: usize) -> Result<()> {
    if got != want {
        return Err(QuantError::value(format!("{what} holds {got} elements, expected {want}")));
    }
    Ok(())
}

/// Quantizes `x` (`[tokens, heads, head_dim]` row-major) into `out`, which must be exactly
/// `packed_nbytes` long. Runs on the calling thread's rayon pool (see `threads::install`).
pub fn quantize_into<E: Elem>(x: &[E], shape: &Shape, cfg: &Config, out: &mut [u8]) -> Result<()> {
    let h = Header::new(*cfg, E::DTYPE, *shape)?;
    check_len("x", x.len(), shape.numel().unwrap_or(usize::MAX))?;
    if out.len() != h.total {
        return Err(QuantError::value(format!("out holds {} bytes, expected {}", out.len(), h.total)));
    }
    h.write(out);
    let lay = h.layout();
    // Padding between sections is zeroed so equal inputs always give equal bytes.
    for range in h.padding() {
        out[range].fill(0);
    }
    let c = shape.row();
    let (qx, rx) = x.split_at(lay.nq * c);
    out[lay.residual_off..].copy_from_slice(as_bytes(rx));
    quant_body(cfg, c, qx, &lay, out);
    Ok(())
}

fn quant_body<E: Elem>(cfg: &Config, c: usize, qx: &[E], lay: &Layout, out: &mut [u8]) {
    let plan = Plan::new(cfg, c, lay.nq);
    let fast = fast_ok(cfg, c);
    let base = SendPtr(out.as_mut_ptr());
    let (bits, g, es) = (cfg.bits as usize, cfg.group_size, E::DTYPE.nbytes());
    let lay = *lay;
    let run = |i: usize| {
        #[allow(clippy::redundant_locals)] // capture the whole Send wrapper, not its raw-pointer field
        let base = base;
        let (r0, r1) = plan.rows(i);
        let (cb0, cb1) = (r0 * c * bits / 8, (r1 * c * bits).div_ceil(8));
        let (g0, g1) = (r0 * c / g, r1 * c / g);
        // SAFETY: chunks cover disjoint row ranges, hence disjoint byte ranges of each section
        // (chunk starts are byte aligned by Plan); all ranges lie inside `out` by Layout.
        unsafe {
            let codes = std::slice::from_raw_parts_mut(base.0.add(lay.codes_off + cb0), cb1 - cb0);
            let scales = std::slice::from_raw_parts_mut(base.0.add(lay.scales_off + g0 * es), (g1 - g0) * es);
            let mins = if cfg.asym {
                std::slice::from_raw_parts_mut(base.0.add(lay.mins_off + g0 * es), (g1 - g0) * es)
            } else {
                &mut []
            };
            quant_chunk(cfg, c, &qx[r0 * c..r1 * c], codes, scales, mins, fast);
        }
    };
    if plan.chunks() == 1 || crate::threads::serial() {
        (0..plan.chunks()).for_each(run);
    } else {
        (0..plan.chunks()).into_par_iter().for_each(run);
    }
}

/// Allocates and fills a blob.
pub fn quantize<E: Elem>(x: &[E], shape: &Shape, cfg: &Config) -> Result<Vec<u8>> {
    let total = crate::format::packed_nbytes(cfg, E::DTYPE, shape)?;
    let mut out = vec![0u8; total];
    quantize_into(x, shape, cfg, &mut out)?;
    Ok(out)
}

/// Dequantizes one blob (exactly one, header validated) into `out`.
pub fn dequantize_into<E: Elem>(blob: &[u8], out: &mut [E]) -> Result<Header> {
    let h = Header::parse(blob)?;
    if h.dtype != E::DTYPE {
        return Err(QuantError::type_(format!("out must have dtype {}, got {}", h.dtype.name(), E::DTYPE.name())));
    }
    check_len("out", out.len(), h.shape.numel().unwrap_or(usize::MAX))?;
    let nt = std::mem::size_of_val(out) >= NT_BYTES;
    dequant_body(&h, blob, out, nt);
    Ok(h)
}

/// Outputs at least this large are written with non-temporal stores: they cannot stay in cache
/// anyway, and skipping the read-for-ownership saves a third of the memory traffic.
const NT_BYTES: usize = 8 << 20;

/// Decodes a blob whose header `h` was already validated against `blob` and `out`.
fn dequant_body<E: Elem>(h: &Header, blob: &[u8], out: &mut [E], nt: bool) {
    let lay = h.layout();
    let cfg = &h.cfg;
    let c = h.shape.row();
    let (qo, ro) = out.split_at_mut(lay.nq * c);
    // Residual tokens come back bit for bit.
    for (i, y) in ro.iter_mut().enumerate() {
        *y = E::get(&blob[lay.residual_off + i * E::DTYPE.nbytes()..]);
    }
    let plan = Plan::new(cfg, c, lay.nq);
    let fast = fast_ok(cfg, c);
    let (bits, g, es) = (cfg.bits as usize, cfg.group_size, E::DTYPE.nbytes());
    let obase = SendPtr(qo.as_mut_ptr() as *mut u8);
    let run = |i: usize| {
        #[allow(clippy::redundant_locals)] // capture the whole Send wrapper, not its raw-pointer field
        let obase = obase;
        let (r0, r1) = plan.rows(i);
        let (cb0, cb1) = (r0 * c * bits / 8, (r1 * c * bits).div_ceil(8));
        let (g0, g1) = (r0 * c / g, r1 * c / g);
        let codes = &blob[lay.codes_off + cb0..lay.codes_off + cb1];
        let scales = &blob[lay.scales_off + g0 * es..lay.scales_off + g1 * es];
        let mins = if cfg.asym { &blob[lay.mins_off + g0 * es..lay.mins_off + g1 * es] } else { &[][..] };
        // SAFETY: disjoint row ranges of `qo` per chunk.
        let o = unsafe { std::slice::from_raw_parts_mut((obase.0 as *mut E).add(r0 * c), (r1 - r0) * c) };
        dequant_chunk(cfg, c, codes, scales, mins, o, fast, nt);
    };
    if plan.chunks() <= 1 || crate::threads::serial() {
        (0..plan.chunks()).for_each(run);
    } else {
        (0..plan.chunks()).into_par_iter().for_each(run);
    }
}

/// A caller-owned 2-D byte buffer of page rows: row `i` starts at `ptr + i * stride` and is
/// `row_bytes` long (the row stride may exceed the row, e.g. a column slice of a wider buffer).
#[derive(Clone, Copy, Debug)]
pub struct PageRows {
    ptr: *mut u8,
    rows: usize,
    stride: usize,
    row_bytes: usize,
}

unsafe impl Send for PageRows {}
unsafe impl Sync for PageRows {}

impl PageRows {
    /// # Safety
    /// `ptr` must be valid for reads (and writes, if used as a destination) of every row for the
    /// duration of the calls it is passed to, and nothing else may access those bytes meanwhile.
    pub unsafe fn new(ptr: *mut u8, rows: usize, stride: usize, row_bytes: usize) -> Result<PageRows> {
        if rows > 1 && stride < row_bytes {
            return Err(QuantError::value(format!(
                "dst/src rows overlap: row stride {stride} bytes is smaller than the row ({row_bytes} bytes)"
            )));
        }
        Ok(PageRows { ptr, rows, stride, row_bytes })
    }
    pub fn rows(&self) -> usize {
        self.rows
    }
    pub fn row_bytes(&self) -> usize {
        self.row_bytes
    }
    fn row_ptr(&self, id: usize) -> *mut u8 {
        // `id < rows` was checked by `check_ids`.
        unsafe { self.ptr.add(id * self.stride) }
    }
}

/// Checks page ids (in range, no duplicates: two pages written to one row would race).
fn check_ids(ids: &[i64], rows: usize) -> Result<Vec<usize>> {
    let mut seen = vec![false; rows];
    ids.iter()
        .enumerate()
        .map(|(i, &id)| {
            if id < 0 || id as u64 >= rows as u64 {
                return Err(QuantError::value(format!(
                    "page_ids[{i}] = {id} is out of range: expected 0 <= id < {rows} (rows of the page buffer)"
                )));
            }
            let id = id as usize;
            if std::mem::replace(&mut seen[id], true) {
                return Err(QuantError::value(format!(
                    "page_ids[{i}] = {id} is repeated: each page id may appear once"
                )));
            }
            Ok(id)
        })
        .collect()
}

fn page_shape(total_tokens: usize, n: usize, heads: usize, head_dim: usize) -> Result<Shape> {
    if n == 0 {
        if total_tokens != 0 {
            return Err(QuantError::value(format!("x/out has {total_tokens} tokens but page_ids is empty")));
        }
        return Ok(Shape { tokens: 0, heads, head_dim });
    }
    if total_tokens % n != 0 {
        return Err(QuantError::value(format!(
            "x/out has {total_tokens} tokens, expected a multiple of len(page_ids) = {n}"
        )));
    }
    Ok(Shape { tokens: total_tokens / n, heads, head_dim })
}

/// Quantizes `n = ids.len()` pages of `shape.tokens / n` tokens each; page `i` becomes one blob at
/// the start of row `ids[i]` of `dst`.
pub fn quantize_pages<E: Elem>(x: &[E], shape: &Shape, cfg: &Config, dst: &PageRows, ids: &[i64]) -> Result<()> {
    let ps = page_shape(shape.tokens, ids.len(), shape.heads, shape.head_dim)?;
    let total = crate::format::packed_nbytes(cfg, E::DTYPE, &ps)?;
    check_len("x", x.len(), shape.numel().unwrap_or(usize::MAX))?;
    if dst.row_bytes < total {
        return Err(QuantError::value(format!(
            "dst rows hold {} bytes, expected at least packed_nbytes = {total} per page",
            dst.row_bytes
        )));
    }
    let rows = check_ids(ids, dst.rows)?;
    let pel = ps.numel().unwrap_or(0);
    let one = |(i, &id): (usize, &usize)| {
        // SAFETY: ids are distinct and rows do not overlap (PageRows::new), so each blob is exclusive.
        let out = unsafe { std::slice::from_raw_parts_mut(dst.row_ptr(id), total) };
        quantize_into(&x[i * pel..(i + 1) * pel], &ps, cfg, out)
    };
    if crate::threads::serial() {
        rows.iter().enumerate().try_for_each(one)
    } else {
        rows.par_iter().enumerate().try_for_each(one)
    }
}

/// Dequantizes the pages at rows `ids` of `src` into `out` (`shape` = out's shape). Every header is
/// checked before anything is written.
pub fn dequantize_pages<E: Elem>(
    src: &PageRows,
    ids: &[i64],
    cfg: &Config,
    shape: &Shape,
    out: &mut [E],
) -> Result<()> {
    let ps = page_shape(shape.tokens, ids.len(), shape.heads, shape.head_dim)?;
    check_len("out", out.len(), shape.numel().unwrap_or(usize::MAX))?;
    cfg.validate(&ps)?;
    let rows = check_ids_read(ids, src.rows)?;
    let mut headers = Vec::with_capacity(rows.len());
    for (i, &id) in rows.iter().enumerate() {
        let row = unsafe { std::slice::from_raw_parts(src.row_ptr(id) as *const u8, src.row_bytes) };
        let h = Header::parse_prefix(row)
            .and_then(|h| h.expect(cfg, E::DTYPE, &ps).map(|_| h))
            .map_err(|e| QuantError { kind: e.kind, msg: format!("page {i} (page id {id}): {}", e.msg) })?;
        headers.push(h);
    }
    let pel = ps.numel().unwrap_or(0);
    let nt = std::mem::size_of_val(out) >= NT_BYTES;
    let obase = SendPtr(out.as_mut_ptr() as *mut u8);
    let one = |(i, (&id, h)): (usize, (&usize, &Header))| {
        #[allow(clippy::redundant_locals)] // capture the whole Send wrapper, not its raw-pointer field
        let obase = obase;
        let blob = unsafe { std::slice::from_raw_parts(src.row_ptr(id) as *const u8, h.total) };
        // SAFETY: page i owns out[i*pel..(i+1)*pel].
        let o = unsafe { std::slice::from_raw_parts_mut((obase.0 as *mut E).add(i * pel), pel) };
        dequant_body(h, blob, o, nt);
    };
    if crate::threads::serial() {
        rows.iter().zip(headers.iter()).enumerate().for_each(one);
    } else {
        rows.par_iter().zip(headers.par_iter()).enumerate().for_each(one);
    }
    Ok(())
}

/// Reading the same page twice is harmless, so only the range is checked.
fn check_ids_read(ids: &[i64], rows: usize) -> Result<Vec<usize>> {
    ids.iter()
        .enumerate()
        .map(|(i, &id)| {
            if id < 0 || id as u64 >= rows as u64 {
                Err(QuantError::value(format!(
                    "page_ids[{i}] = {id} is out of range: expected 0 <= id < {rows} (rows of the page buffer)"
                )))
            } else {
                Ok(id as usize)
            }
        })
        .collect()
}

/// Unpacked view of a blob for tests and tools: codes (one per quantized element, symmetric codes
/// with their offset removed), scales and mins as f32, residual elements as f32.
#[derive(Clone, Debug, PartialEq)]
pub struct Unpacked {
    pub header: Header,
    pub codes: Vec<i32>,
    pub scale_bits: Vec<u32>,
    pub min_bits: Vec<u32>,
}

/// Decodes the code stream and metadata (raw bit patterns, widened to u32) of a valid blob.
pub fn unpack(blob: &[u8]) -> Result<Unpacked> {
    let header = Header::parse(blob)?;
    let lay = header.layout();
    let cfg = header.cfg;
    let off = CodeRange::of(&cfg).off as i32;
    let n = lay.nq * header.shape.row();
    let codes = (0..n).map(|i| get_code(&blob[lay.codes_off..], i, cfg.bits) as i32 - off).collect();
    let es = header.dtype.nbytes();
    let rd = |o: usize| -> u32 {
        match header.dtype {
            DType::F32 => u32::from_le_bytes(blob[o..o + 4].try_into().unwrap()),
            _ => u16::from_le_bytes([blob[o], blob[o + 1]]) as u32,
        }
    };
    let scale_bits = (0..lay.ngroups).map(|g| rd(lay.scales_off + g * es)).collect();
    let min_bits = if cfg.asym { (0..lay.ngroups).map(|g| rd(lay.mins_off + g * es)).collect() } else { vec![] };
    Ok(Unpacked { header, codes, scale_bits, min_bits })
}

const _: () = assert!(HEADER_NBYTES % 8 == 0);
