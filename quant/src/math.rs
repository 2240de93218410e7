//! The normative per-group math of FORMAT.md, shared by every kernel family: group parameters from
//! a group's statistics, one code, and the code bit stream. The SIMD kernels compute the same
//! numbers many lanes at a time and fall back to these functions for odd tails.

use crate::elem::Elem;
use crate::format::Config;

/// Calls the caller's `go!(BITS, ASYM)` macro with the config's bit width and symmetry as
/// literals, so a SIMD kernel is monomorphised once per supported combination; the list of
/// combinations lives here only (`Config` has already rejected any other bit width).
macro_rules! for_bits_asym {
    ($cfg:expr, $go:ident) => {
        match ($cfg.bits, $cfg.asym) {
            (2, true) => $go!(2, true),
            (2, false) => $go!(2, false),
            (4, true) => $go!(4, true),
            (4, false) => $go!(4, false),
            (8, true) => $go!(8, true),
            _ => $go!(8, false),
        }
    };
}
#[cfg_attr(not(target_arch = "x86_64"), allow(unused_imports))]
pub(crate) use for_bits_asym;

/// Per-group parameters derived from the group's statistics.
#[derive(Clone, Copy, Debug)]
pub(crate) struct GroupParams<E> {
    pub s_store: E,
    pub m_store: E,
    /// Divisor for the codes: the scale, or +inf for a zero scale (so every code becomes 0).
    pub div: f32,
    /// 1/scale when it is exact enough for the fast quotient, else NaN (which forces the division).
    pub rcp: f32,
    pub m: f32,
}

/// Code range and offset: asymmetric codes are q in [0, 2^b-1]; symmetric q in [-qmax, qmax] stored as q + 2^(b-1).
#[derive(Clone, Copy, Debug)]
pub(crate) struct CodeRange {
    pub lo: f32,
    pub hi: f32,
    pub off: f32,
}

impl CodeRange {
    pub fn of(cfg: &Config) -> CodeRange {
        if cfg.asym {
            CodeRange { lo: 0.0, hi: cfg.levels() as f32, off: 0.0 }
        } else {
            let q = cfg.qmax() as f32;
            CodeRange { lo: -q, hi: q, off: cfg.sym_offset() as f32 }
        }
    }
}

/// Scales whose reciprocal the fast quotient may use: outside this range 1/s loses precision
/// (subnormal) or overflows, and NaN (never in range) sends those groups to the exact division.
pub(crate) const RCP_MIN: f32 = 1.0e-37;
pub(crate) const RCP_MAX: f32 = 1.0e37;

/// The normative group math (FORMAT.md): `lo`/`hi` are the group's min and max, `finite` false when it
/// holds NaN or +-Inf. `+ 0.0` turns a -0.0 into +0.0 so the stored bytes do not depend on which of
/// two equal zeros a min/max reduction happened to return.
#[inline]
pub(crate) fn group_params<E: Elem>(cfg: &Config, finite: bool, lo: f32, hi: f32) -> GroupParams<E> {
    if !finite {
        let n = E::nan();
        return GroupParams { s_store: n, m_store: n, div: f32::NAN, rcp: f32::NAN, m: f32::NAN };
    }
    let (s32, m_store) = if cfg.asym {
        ((hi - lo) / cfg.levels() as f32 + 0.0, E::from_f32(lo + 0.0))
    } else {
        (hi.max(-lo) / cfg.qmax() as f32 + 0.0, E::zero())
    };
    let s_store = E::up(s32);
    let s = s_store.to_f32();
    let div = if s == 0.0 { f32::INFINITY } else { s };
    let rcp = if (RCP_MIN..=RCP_MAX).contains(&s) { 1.0 / s } else { f32::NAN };
    let m = if cfg.asym { m_store.to_f32() } else { 0.0 };
    GroupParams { s_store, m_store, div, rcp, m }
}

/// One code: `clamp(round_half_even((x - m) / div))`, a NaN quotient giving 0.
#[inline]
pub(crate) fn code_of(x: f32, div: f32, m: f32, r: CodeRange) -> u32 {
    let t = (x - m) / div;
    let t = if t.is_nan() { 0.0 } else { t };
    (t.round_ties_even().max(r.lo).min(r.hi) + r.off) as u32
}

/// Ors `code` into element `idx` of the code stream (the byte starts zeroed).
#[inline]
pub(crate) fn put_code(codes: &mut [u8], idx: usize, bits: u8, code: u32) {
    let bit = idx * bits as usize;
    codes[bit / 8] |= (code << (bit % 8)) as u8;
}

/// Element `idx` of the code stream.
#[inline]
pub(crate) fn get_code(codes: &[u8], idx: usize, bits: u8) -> u32 {
    let bit = idx * bits as usize;
    ((codes[bit / 8] >> (bit % 8)) as u32) & ((1u32 << bits) - 1)
}
