//! AVX-512 (F + BW + VL) variants of the hot loops, chosen at run time when the CPU has them and the
//! shapes allow 16-lane steps; a tail of fewer than sixteen groups takes the AVX2 parameter code
//! (`avx2::params`). Same bytes as the portable path (tests compare them); only speed differs.

use crate::avx2::params;
use crate::elem::Elem;
use crate::format::{Config, DType};
use crate::math::{CodeRange, RCP_MAX, RCP_MIN};
use crate::scratch::Scratch;
use std::arch::x86_64::*;

/// Software prefetch distance of the statistics pass (the only pass that reads memory: the code
/// pass re-reads its block from L1), in bytes ahead of the element being read. The hardware
/// prefetcher alone leaves the core waiting on memory. Measured (2-core Zen 4 VM, 4-bit g64 fp16
/// pages, 256 MiB, quantize / memcpy time, three interleaved runs each): 8 KiB ahead into L2
/// 0.79-0.84x; 4 KiB into L2 0.72-0.84x; 4 KiB into L1 (the earlier setting) 0.60-0.79x; 16 KiB
/// 0.67-0.74x; none 0.63-0.79x.
const PF_DIST: usize = 8192;

#[inline(always)]
unsafe fn pf(p: *const i8) {
    _mm_prefetch::<_MM_HINT_T1>(p.wrapping_add(PF_DIST));
}

#[inline(always)]
unsafe fn load16<E: Elem>(p: *const E) -> __m512 {
    match E::DTYPE {
        DType::F16 => _mm512_cvtph_ps(_mm256_loadu_si256(p as *const __m256i)),
        DType::BF16 => {
            _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(_mm256_loadu_si256(p as *const __m256i))))
        }
        DType::F32 => _mm512_loadu_ps(p as *const f32),
    }
}

/// bfloat16 round-to-nearest-even of 16 floats as u32 lanes (NaN -> canonical 0x7FC0).
#[inline(always)]
unsafe fn bf16_rne16(v: __m512) -> __m512i {
    let b = _mm512_castps_si512(v);
    let lsb = _mm512_and_si512(_mm512_srli_epi32::<16>(b), _mm512_set1_epi32(1));
    let r = _mm512_srli_epi32::<16>(_mm512_add_epi32(b, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF))));
    let nan = _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(v, v);
    _mm512_mask_blend_epi32(nan, r, _mm512_set1_epi32(0x7FC0))
}

/// 16 floats rounded to nearest-even into the 2-byte dtype `E` (bfloat16 NaN made canonical).
#[inline(always)]
unsafe fn narrow16<E: Elem>(v: __m512) -> __m256i {
    match E::DTYPE {
        DType::BF16 => _mm512_cvtepi32_epi16(bf16_rne16(v)),
        _ => _mm512_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(v),
    }
}

/// M_up on 16 lanes (values >= 0 or NaN): (stored bit patterns as u32 lanes, their float values).
#[inline(always)]
unsafe fn up16<E: Elem>(v: __m512) -> (__m512i, __m512) {
    match E::DTYPE {
        DType::F16 => {
            let h = _mm512_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(v);
            // lanes that rounded down move to the next value up (+1 on a positive pattern)
            let low = _mm512_cmp_ps_mask::<_CMP_LT_OQ>(_mm512_cvtph_ps(h), v);
            let h = _mm256_mask_add_epi16(h, low, h, _mm256_set1_epi16(1));
            (_mm512_cvtepu16_epi32(h), _mm512_cvtph_ps(h))
        }
        DType::BF16 => {
            let r = bf16_rne16(v);
            let low = _mm512_cmp_ps_mask::<_CMP_LT_OQ>(_mm512_castsi512_ps(_mm512_slli_epi32::<16>(r)), v);
            let r = _mm512_mask_add_epi32(r, low, r, _mm512_set1_epi32(1));
            (r, _mm512_castsi512_ps(_mm512_slli_epi32::<16>(r)))
        }
        DType::F32 => (_mm512_castps_si512(v), v),
    }
}

/// Stores 16 metadata values (u32 lanes of bit patterns) in the dtype's width.
#[inline(always)]
unsafe fn store_meta16<E: Elem>(p: *mut u8, bits: __m512i) {
    match E::DTYPE {
        DType::F32 => _mm512_storeu_si512(p as *mut _, bits),
        _ => _mm256_storeu_si256(p as *mut __m256i, _mm512_cvtepi32_epi16(bits)),
    }
}

/// `avx2::params` sixteen groups at a time (same results; a tail of fewer than sixteen goes to
/// it). At group 32 the 8-lane version took a tenth of the quantizer's time.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn params16<E: Elem>(
    cfg: &Config,
    n: usize,
    lo: &[f32],
    hi: &[f32],
    fin: &[f32],
    scales: *mut u8,
    mins: *mut u8,
    pdiv: &mut [f32],
    prcp: &mut [f32],
    pm: &mut [f32],
) {
    let es = E::DTYPE.nbytes();
    let zero = _mm512_setzero_ps();
    let levels = _mm512_set1_ps(cfg.levels() as f32);
    let qmax = _mm512_set1_ps(cfg.qmax() as f32);
    let inf = _mm512_set1_ps(f32::INFINITY);
    let nan = _mm512_set1_ps(f32::NAN);
    let nan_bits = _mm512_set1_epi32(E::DTYPE.nan_bits() as i32);
    let (rlo, rhi) = (_mm512_set1_ps(RCP_MIN), _mm512_set1_ps(RCP_MAX));
    let one = _mm512_set1_ps(1.0);
    let mut i = 0;
    while i + 16 <= n {
        let l = _mm512_loadu_ps(lo.as_ptr().add(i));
        let h = _mm512_loadu_ps(hi.as_ptr().add(i));
        let ok = _mm512_cmp_ps_mask::<_CMP_NEQ_OQ>(_mm512_loadu_ps(fin.as_ptr().add(i)), zero);
        let s32 = if cfg.asym {
            _mm512_add_ps(_mm512_div_ps(_mm512_sub_ps(h, l), levels), zero)
        } else {
            _mm512_add_ps(_mm512_div_ps(_mm512_max_ps(h, _mm512_sub_ps(zero, l)), qmax), zero)
        };
        let (sb, sf) = up16::<E>(s32);
        let sf = _mm512_mask_blend_ps(ok, nan, sf);
        store_meta16::<E>(scales.add(i * es), _mm512_mask_blend_epi32(ok, nan_bits, sb));
        let div = _mm512_mask_blend_ps(_mm512_cmp_ps_mask::<_CMP_EQ_OQ>(sf, zero), sf, inf);
        let safe = _mm512_cmp_ps_mask::<_CMP_GE_OQ>(sf, rlo) & _mm512_cmp_ps_mask::<_CMP_LE_OQ>(sf, rhi);
        _mm512_storeu_ps(pdiv.as_mut_ptr().add(i), div);
        _mm512_storeu_ps(prcp.as_mut_ptr().add(i), _mm512_mask_blend_ps(safe, nan, _mm512_div_ps(one, sf)));
        if cfg.asym {
            // the min is an input value, so its conversion to the dtype is exact
            let m = _mm512_add_ps(l, zero);
            let mb = match E::DTYPE {
                DType::F16 => _mm512_cvtepu16_epi32(_mm512_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(m)),
                DType::BF16 => _mm512_srli_epi32::<16>(_mm512_castps_si512(m)),
                DType::F32 => _mm512_castps_si512(m),
            };
            store_meta16::<E>(mins.add(i * es), _mm512_mask_blend_epi32(ok, nan_bits, mb));
            _mm512_storeu_ps(pm.as_mut_ptr().add(i), _mm512_mask_blend_ps(ok, nan, m));
        } else {
            _mm512_storeu_ps(pm.as_mut_ptr().add(i), zero);
        }
        i += 16;
    }
    if i < n {
        params::<E>(
            cfg,
            n - i,
            &lo[i..],
            &hi[i..],
            &fin[i..],
            scales.add(i * es),
            mins.add(i * es),
            &mut pdiv[i..],
            &mut prcp[i..],
            &mut pm[i..],
        );
    }
}

/// A chunk's output, written front to back 16 elements per `push`. With `NT` the stores are
/// non-temporal (`p` 16-byte aligned): a 2-byte dtype goes out in aligned 32-byte stores even when
/// `p` is 16 mod 32 (numpy's allocations are), each then holding the upper half of one vector and
/// the lower half of the next. Half as many stores as two 16-byte ones per vector, and the
/// difference counted: dequantize 1.0x -> 1.3x memcpy (Zen 4, fp16, 256 MiB).
struct Writer<E, const NT: bool> {
    p: *mut E,
    /// the last vector pushed (NT, 2-byte dtypes)
    carry: __m256i,
    /// `p` started at 16 mod 32: stores lag 8 elements behind `p`
    shifted: bool,
    started: bool,
}

impl<E: Elem, const NT: bool> Writer<E, NT> {
    #[inline(always)]
    unsafe fn new(p: *mut E) -> Self {
        Writer { p, carry: _mm256_setzero_si256(), shifted: p as usize % 32 != 0, started: false }
    }

    #[inline(always)]
    unsafe fn push(&mut self, v: __m512) {
        if E::DTYPE == DType::F32 {
            if NT {
                crate::avx2::store8_nt(self.p, _mm512_castps512_ps256(v));
                crate::avx2::store8_nt(
                    self.p.add(8),
                    _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(v))),
                );
            } else {
                _mm512_storeu_ps(self.p as *mut f32, v);
            }
        } else {
            let h = narrow16::<E>(v);
            if !NT {
                _mm256_storeu_si256(self.p as *mut __m256i, h);
            } else if !self.shifted {
                _mm256_stream_si256(self.p as *mut __m256i, h);
            } else if self.started {
                _mm256_stream_si256(self.p.sub(8) as *mut __m256i, _mm256_permute2x128_si256::<0x21>(self.carry, h));
            } else {
                _mm_stream_si128(self.p as *mut __m128i, _mm256_castsi256_si128(h));
                self.started = true;
            }
            self.carry = h;
        }
        self.p = self.p.add(16);
    }

    /// Writes what a shifted stream still holds (the upper half of the last vector).
    #[inline(always)]
    unsafe fn finish(self) {
        if NT && E::DTYPE != DType::F32 && self.shifted && self.started {
            _mm_stream_si128(self.p.sub(8) as *mut __m128i, _mm256_extracti128_si256::<1>(self.carry));
        }
    }
}

/// The fast quotient is computed in units of 2^-FRAC_BITS: quotients closer than one unit (2^-12) to a tie
/// are redone with the exact division (see `codes4`).
const FRAC_BITS: u32 = 12;
const UNIT: f32 = (1u32 << FRAC_BITS) as f32;

#[derive(Clone, Copy)]
struct K {
    lo: __m512,
    hi: __m512,
    off: __m512i,
    /// (0.5 + the symmetric offset) * UNIT + 1
    bias: __m512,
    /// the fraction bits that must not all be zero
    frac: __m512i,
}

impl K {
    #[inline(always)]
    unsafe fn new(r: CodeRange) -> K {
        K {
            lo: _mm512_set1_ps(r.lo),
            hi: _mm512_set1_ps(r.hi),
            off: _mm512_set1_epi32(r.off as i32),
            bias: _mm512_set1_ps((0.5 + r.off) * UNIT + 1.0),
            frac: _mm512_set1_epi32((1 << FRAC_BITS) - 2),
        }
    }
}

/// Scales the fast reciprocals to `UNIT / s` (exact: a power of two; NaN stays NaN, and a product
/// that overflows to infinity makes the fast path fail, see `codes4`).
#[inline(always)]
unsafe fn scale_rcp(prcp: &mut [f32]) {
    let u = _mm512_set1_ps(UNIT);
    let mut i = 0;
    while i + 16 <= prcp.len() {
        let p = prcp.as_mut_ptr().add(i);
        _mm512_storeu_ps(p, _mm512_mul_ps(_mm512_loadu_ps(p), u));
        i += 16;
    }
    for r in &mut prcp[i..] {
        *r *= UNIT;
    }
}

/// Parameters of the group(s) of one 16-lane vector: divisor, fast reciprocal (NaN: never fast), min.
#[derive(Clone, Copy)]
struct P {
    d: __m512,
    rc: __m512,
    m: __m512,
}

impl P {
    /// All lanes in group `i`.
    #[inline(always)]
    unsafe fn splat(pdiv: &[f32], prcp: &[f32], pm: &[f32], i: usize) -> P {
        P { d: _mm512_set1_ps(pdiv[i]), rc: _mm512_set1_ps(prcp[i]), m: _mm512_set1_ps(pm[i]) }
    }
    /// Lane `j` in group `i + j`.
    #[inline(always)]
    unsafe fn lanes(pdiv: &[f32], prcp: &[f32], pm: &[f32], i: usize) -> P {
        P {
            d: _mm512_loadu_ps(pdiv[i..i + 16].as_ptr()),
            rc: _mm512_loadu_ps(prcp[i..i + 16].as_ptr()),
            m: _mm512_loadu_ps(pm[i..i + 16].as_ptr()),
        }
    }
}

/// Codes of 64 elements (four vectors), symmetric codes offset, as i32 lanes holding
/// `code << FRAC_BITS` plus fraction bits that `pack64` drops.
///
/// Fast path, one FMA and one conversion per vector: `w = floor((x - m) * (UNIT/s) + bias)`, i.e.
/// `UNIT * (t + 0.5 + off) + 1` rounded down, so `w >> FRAC_BITS` is `round_half_even(t) + off`
/// unless `t + 0.5` lies within 2^-12 of an integer - exactly when the fraction bits of `w` above
/// bit 0 are all zero. The fast quotient is within 2^-14 of the exact one (|t| <= 2^8; 1/s and
/// the product each off by half an ulp, the FMA rounding adds 2^-15 at |w| < 2^21), well inside
/// that window, and the group's own min/max bound every quotient to the code range up to a few
/// ulps, so no clamp is needed. NaN and out-of-range products convert to 0x80000000, whose
/// fraction bits are zero, so groups with a zero scale, NaN or Inf (1/s is NaN) never pass. Where
/// any of the 64 lanes fails (one block in 30 on random data) all four vectors take the exact
/// division and the clamp. (`vreduceps` + compare for the same check takes 4 cycles per vector
/// on Zen 4, against one for `vptestmd`.)
#[inline(always)]
unsafe fn codes4<const ASYM: bool>(v: [__m512; 4], p: [P; 4], k: &K) -> [__m512i; 4] {
    const FLOOR: i32 = _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC;
    const RNE: i32 = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
    let mut dx = v;
    let mut w = [_mm512_setzero_si512(); 4];
    let mut ok: __mmask16 = 0xFFFF;
    for j in 0..4 {
        if ASYM {
            dx[j] = _mm512_sub_ps(v[j], p[j].m);
        }
        w[j] = _mm512_cvt_roundps_epi32::<FLOOR>(_mm512_fmadd_ps(dx[j], p[j].rc, k.bias));
        ok = _mm512_mask_test_epi32_mask(ok, w[j], k.frac);
    }
    if ok != 0xFFFF {
        for j in 0..4 {
            let t = _mm512_div_ps(dx[j], p[j].d);
            let t = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask::<_CMP_ORD_Q>(t, t), t); // NaN -> 0
            let r = _mm512_min_ps(_mm512_max_ps(_mm512_roundscale_ps::<RNE>(t), k.lo), k.hi);
            w[j] = _mm512_slli_epi32::<FRAC_BITS>(_mm512_add_epi32(_mm512_cvtps_epi32(r), k.off));
        }
    }
    w
}

/// Packs 64 codes (four vectors of `codes4` output, element order) into 64 * BITS / 8 bytes
/// at `out`, or only the first 32 codes when `HALF`. The lanes are first narrowed to bytes with
/// in-lane packs (3 instructions for 64 codes), which leaves code `16k + 4l + j` of vector `k` at
/// byte `16l + 4k + j`; bits are merged with multiply-adds, and one cross-lane permute puts the
/// results in order: 8 instructions per 64 codes at 4 bits, where shifting, or-ing, narrowing
/// (`vpmovqb`) and storing each vector took 16.
#[inline(always)]
unsafe fn pack64<const BITS: u8, const HALF: bool>(w: [__m512i; 4], out: *mut u8) {
    // codes below 16 keep `w` below 2^16: shift after the first pack, on half as many vectors
    let b = if BITS <= 4 {
        let lo = _mm512_srli_epi16::<FRAC_BITS>(_mm512_packus_epi32(w[0], w[1]));
        let hi = _mm512_srli_epi16::<FRAC_BITS>(_mm512_packus_epi32(w[2], w[3]));
        _mm512_packus_epi16(lo, hi)
    } else {
        let q = [
            _mm512_srli_epi32::<FRAC_BITS>(w[0]),
            _mm512_srli_epi32::<FRAC_BITS>(w[1]),
            _mm512_srli_epi32::<FRAC_BITS>(w[2]),
            _mm512_srli_epi32::<FRAC_BITS>(w[3]),
        ];
        _mm512_packus_epi16(_mm512_packus_epi32(q[0], q[1]), _mm512_packus_epi32(q[2], q[3]))
    };
    match BITS {
        8 => {
            // dword 4l + k holds codes 16k + 4l .. +3: output dword 4k + l
            let r =
                _mm512_permutexvar_epi32(_mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15), b);
            if HALF {
                _mm256_storeu_si256(out as *mut __m256i, _mm512_castsi512_si256(r));
            } else {
                _mm512_storeu_si512(out as *mut _, r);
            }
        }
        4 => {
            // word 8l + 2k + i = c + 16 c' for the pair (c, c') = codes 16k + 4l + 2i, +1, output byte
            // 8k + 2l + i; after packing words to bytes, word 8l + k holds output word 4k + l
            let m = _mm512_maddubs_epi16(b, _mm512_set1_epi16(0x1001));
            let w = _mm512_packus_epi16(m, m);
            let r = _mm512_permutexvar_epi16(
                _mm512_set_epi16(
                    0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 27, 19, 11, 3, 26, 18, 10, 2, 25, 17, 9, 1, 24, 16,
                    8, 0,
                ),
                w,
            );
            if HALF {
                _mm_storeu_si128(out as *mut __m128i, _mm512_castsi512_si128(r));
            } else {
                _mm256_storeu_si256(out as *mut __m256i, _mm512_castsi512_si256(r));
            }
        }
        _ => {
            // dword 4l + k = (c0 + 4 c1) + 16 (c2 + 4 c3) for codes 16k + 4l .. +3: output byte 4k + l
            let m = _mm512_maddubs_epi16(b, _mm512_set1_epi16(0x0401));
            let d = _mm512_madd_epi16(m, _mm512_set1_epi32(0x0010_0001));
            let r = _mm_shuffle_epi8(
                _mm512_cvtepi32_epi8(d),
                _mm_setr_epi8(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15),
            );
            if HALF {
                _mm_storel_epi64(out as *mut __m128i, r);
            } else {
                _mm_storeu_si128(out as *mut __m128i, r);
            }
        }
    }
}

#[inline(always)]
unsafe fn codes16<const BITS: u8>(codes: *const u8, e: usize) -> __m512i {
    match BITS {
        8 => _mm512_cvtepu8_epi32(_mm_loadu_si128(codes.add(e) as *const __m128i)),
        4 => {
            let w = std::ptr::read_unaligned(codes.add(e / 2) as *const u64);
            let v = _mm512_permutexvar_epi32(
                _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1),
                _mm512_castsi128_si512(_mm_cvtsi64_si128(w as i64)),
            );
            _mm512_and_si512(
                _mm512_srlv_epi32(v, _mm512_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28, 0, 4, 8, 12, 16, 20, 24, 28)),
                _mm512_set1_epi32(15),
            )
        }
        _ => {
            let w = std::ptr::read_unaligned(codes.add(e / 4) as *const u32);
            _mm512_and_si512(
                _mm512_srlv_epi32(
                    _mm512_set1_epi32(w as i32),
                    _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30),
                ),
                _mm512_set1_epi32(3),
            )
        }
    }
}

/// Steps of a transposed horizontal reduction of sixteen vectors `v0..v15` into one vector whose
/// lane `4 * (i % 4) + i / 4` is the min (`MAX` false) or max of `v_i`: 15 merges of two shuffles
/// and one min/max each, where `_mm512_reduce_min_ps` costs 8 dependent steps and a scalar store
/// per vector. Merging as soon as both inputs exist keeps the partial results in registers (an
/// array of sixteen vectors per reduction spills: 512-bit stores cost three cycles on Zen 4).
struct Tree<const MAX: bool>;

impl<const MAX: bool> Tree<MAX> {
    #[inline(always)]
    unsafe fn f(a: __m512, b: __m512) -> __m512 {
        if MAX {
            _mm512_max_ps(a, b)
        } else {
            _mm512_min_ps(a, b)
        }
    }
    /// 256-bit halves: [a: c0^c2, c1^c3 | b: c0^c2, c1^c3] (c = 128-bit chunk)
    #[inline(always)]
    unsafe fn l1(a: __m512, b: __m512) -> __m512 {
        Self::f(_mm512_shuffle_f32x4::<0x44>(a, b), _mm512_shuffle_f32x4::<0xEE>(a, b))
    }
    /// 128-bit chunks: chunk k holds the 4 partials of input k of the four below
    #[inline(always)]
    unsafe fn l2(a: __m512, b: __m512) -> __m512 {
        Self::f(_mm512_shuffle_f32x4::<0x88>(a, b), _mm512_shuffle_f32x4::<0xDD>(a, b))
    }
    /// within chunks: pairs
    #[inline(always)]
    unsafe fn l3(a: __m512, b: __m512) -> __m512 {
        Self::f(_mm512_shuffle_ps::<0x44>(a, b), _mm512_shuffle_ps::<0xEE>(a, b))
    }
    /// within chunks: singles
    #[inline(always)]
    unsafe fn l4(a: __m512, b: __m512) -> __m512 {
        Self::f(_mm512_shuffle_ps::<0x88>(a, b), _mm512_shuffle_ps::<0xDD>(a, b))
    }
}

/// Per-group (finite, min, max) of `ng` groups of `g` (multiple of 32) elements, sixteen groups at
/// a time through `Tree`; one running `x * 0` sum decides whether any of them needs the exact
/// finiteness check (it is NaN iff some element is NaN or infinite). It runs on the FMA pipes,
/// which min and max leave idle.
#[inline(always)]
unsafe fn stats_rows<E: Elem>(x: *const E, g: usize, ng: usize, lo: &mut [f32], hi: &mut [f32], fin: &mut [f32]) {
    /// min and max vectors of group `gi`, `acc` updated (a nested fn, not a closure: closures do
    /// not inherit the caller's target features)
    #[inline(always)]
    unsafe fn group<E: Elem>(x: *const E, g: usize, gi: usize, acc: &mut __m512) -> (__m512, __m512) {
        let p = x.add(gi * g);
        let zero = _mm512_setzero_ps();
        let (mut mn, mut mx) = (_mm512_set1_ps(f32::INFINITY), _mm512_set1_ps(f32::NEG_INFINITY));
        let mut i = 0;
        while i < g {
            pf(p.add(i) as *const i8);
            let (v0, v1) = (load16(p.add(i)), load16(p.add(i + 16)));
            *acc = _mm512_fmadd_ps(v1, zero, _mm512_fmadd_ps(v0, zero, *acc));
            mn = _mm512_min_ps(mn, _mm512_min_ps(v0, v1));
            mx = _mm512_max_ps(mx, _mm512_max_ps(v0, v1));
            i += 32;
        }
        (mn, mx)
    }
    let exact_fin = |gi: usize| (0..g).all(|i| (*x.add(gi * g + i)).to_f32().is_finite()) as u8 as f32;
    type Lo = Tree<false>;
    type Hi = Tree<true>;
    // the tree leaves group j in lane 4 * (j % 4) + j / 4; this puts it back in lane j
    let order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
    let mut g0 = 0;
    while g0 + 16 <= ng {
        let mut acc = _mm512_setzero_ps();
        // a quarter of the tree: groups g0 + 4q .. + 3 -> one l2 vector each for min and max
        macro_rules! quarter {
            ($q:expr) => {{
                let (a0, b0) = group(x, g, g0 + 4 * $q, &mut acc);
                let (a1, b1) = group(x, g, g0 + 4 * $q + 1, &mut acc);
                let (w0l, w0h) = (Lo::l1(a0, a1), Hi::l1(b0, b1));
                let (a2, b2) = group(x, g, g0 + 4 * $q + 2, &mut acc);
                let (a3, b3) = group(x, g, g0 + 4 * $q + 3, &mut acc);
                (Lo::l2(w0l, Lo::l1(a2, a3)), Hi::l2(w0h, Hi::l1(b2, b3)))
            }};
        }
        let (u0l, u0h) = quarter!(0);
        let (u1l, u1h) = quarter!(1);
        let (r0l, r0h) = (Lo::l3(u0l, u1l), Hi::l3(u0h, u1h));
        let (u2l, u2h) = quarter!(2);
        let (u3l, u3h) = quarter!(3);
        let (r1l, r1h) = (Lo::l3(u2l, u3l), Hi::l3(u2h, u3h));
        _mm512_storeu_ps(lo.as_mut_ptr().add(g0), _mm512_permutexvar_ps(order, Lo::l4(r0l, r1l)));
        _mm512_storeu_ps(hi.as_mut_ptr().add(g0), _mm512_permutexvar_ps(order, Hi::l4(r0h, r1h)));
        if _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(acc, acc) != 0 {
            for (gi, f) in fin[g0..g0 + 16].iter_mut().enumerate() {
                *f = exact_fin(g0 + gi);
            }
        } else {
            _mm512_storeu_ps(fin.as_mut_ptr().add(g0), _mm512_set1_ps(1.0));
        }
        g0 += 16;
    }
    for gi in g0..ng {
        let mut acc = _mm512_setzero_ps();
        let (mn, mx) = group(x, g, gi, &mut acc);
        lo[gi] = _mm512_reduce_min_ps(mn);
        hi[gi] = _mm512_reduce_max_ps(mx);
        fin[gi] = if _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(acc, acc) != 0 { exact_fin(gi) } else { 1.0 };
    }
}

/// Per-channel (finite, min, max) of one tile: `16 * NV` channels down `g` rows of stride `c`,
/// running values in registers; `pf` is the same tile `TILE_PF_AHEAD` tiles on, prefetched row by row.
/// Finiteness as in `stats_rows`: an `x * 0` sum per vector, the exact check only when it is NaN.
#[inline(always)]
unsafe fn stats_tile<E: Elem, const NV: usize>(
    x: *const E,
    pf: *const E,
    c: usize,
    g: usize,
    lo: &mut [f32],
    hi: &mut [f32],
    fin: &mut [f32],
) {
    let zero = _mm512_setzero_ps();
    let mut mn = [_mm512_set1_ps(f32::INFINITY); NV];
    let mut mx = [_mm512_set1_ps(f32::NEG_INFINITY); NV];
    let mut acc = [zero; NV];
    let row_bytes = 16 * NV * E::DTYPE.nbytes();
    for r in 0..g {
        let p = x.add(r * c);
        let mut b = 0;
        while b < row_bytes {
            _mm_prefetch::<_MM_HINT_T1>((pf.wrapping_add(r * c) as *const i8).wrapping_add(b));
            b += 64;
        }
        for j in 0..NV {
            let v = load16(p.add(16 * j));
            acc[j] = _mm512_fmadd_ps(v, zero, acc[j]);
            mn[j] = _mm512_min_ps(mn[j], v);
            mx[j] = _mm512_max_ps(mx[j], v);
        }
    }
    for j in 0..NV {
        _mm512_storeu_ps(lo.as_mut_ptr().add(16 * j), mn[j]);
        _mm512_storeu_ps(hi.as_mut_ptr().add(16 * j), mx[j]);
        _mm512_storeu_ps(fin.as_mut_ptr().add(16 * j), _mm512_set1_ps(1.0));
        let bad = _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(acc[j], acc[j]);
        if bad != 0 {
            for l in 0..16 {
                if bad >> l & 1 != 0 {
                    let ch = 16 * j + l;
                    fin[ch] = (0..g).all(|r| (*x.add(r * c + ch)).to_f32().is_finite()) as u8 as f32;
                }
            }
        }
    }
}

/// Per-channel tiles are this many channels wide (the last one of a row may be 32): at group 32
/// and fp16 a tile is 4 KiB, so the code pass re-reads it from L1.
const TILE_CH: usize = 64;
/// Tiles ahead that the statistics pass prefetches (into L2), in tile order: along the rows, then
/// on into the next token group. Two tiles = 8 KiB at fp16 and group 32, as `PF_DIST`.
const TILE_PF_AHEAD: usize = 2;

/// Codes of one row of a per-channel tile (`NV` = 4: 64 channels, 2: 32) into `out`.
#[inline(always)]
unsafe fn tile_row_codes<E: Elem, const BITS: u8, const ASYM: bool, const NV: usize>(
    xr: *const E,
    p: &[P; 4],
    k: &K,
    out: *mut u8,
) {
    if NV == 4 {
        let v = [load16(xr), load16(xr.add(16)), load16(xr.add(32)), load16(xr.add(48))];
        pack64::<BITS, false>(codes4::<ASYM>(v, *p, k), out);
    } else {
        let v = [load16(xr), load16(xr.add(16))];
        let q = codes4::<ASYM>([v[0], v[1], v[0], v[1]], [p[0], p[1], p[0], p[1]], k);
        pack64::<BITS, true>(q, out);
    }
}

/// Whether this module can take a chunk: 16-lane rows and, per-token, 32-element groups.
pub fn fits(cfg: &Config, c: usize) -> bool {
    c % 32 == 0 && (cfg.axis == 1 || cfg.group_size % 32 == 0)
}

/// # Safety
/// CPU with AVX-512 F/BW/VL, AVX2, FMA, F16C; `fits(cfg, c)`; slices as for `kernel::quant_chunk`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
pub unsafe fn quant_chunk<E: Elem>(
    cfg: &Config,
    c: usize,
    x: &[E],
    codes: &mut [u8],
    scales: &mut [u8],
    mins: &mut [u8],
) {
    macro_rules! go {
        ($b:literal, $a:literal) => {
            quant_chunk_t::<E, $b, $a>(cfg, c, x, codes, scales, mins)
        };
    }
    crate::math::for_bits_asym!(cfg, go);
}

#[inline(always)]
unsafe fn quant_chunk_t<E: Elem, const BITS: u8, const ASYM: bool>(
    cfg: &Config,
    c: usize,
    x: &[E],
    codes: &mut [u8],
    scales: &mut [u8],
    mins: &mut [u8],
) {
    let g = cfg.group_size;
    let k = K::new(CodeRange::of(cfg));
    let es = E::DTYPE.nbytes();
    let (sp, mp, op) = (scales.as_mut_ptr(), mins.as_mut_ptr(), codes.as_mut_ptr());
    let bpe = BITS as usize;
    if cfg.axis == 0 {
        let rows = x.len() / c;
        // blocks of whole rows, about 2048 elements: statistics, then codes from L1. Measured as
        // for PF_DIST: 0.79-0.84x memcpy, against 0.73-0.76x at 4096 and 0.71-0.78x at 1024
        let brows = (2048 / c).max(1);
        let gmax = brows * c / g;
        let mut scratch = Scratch::take(6 * gmax);
        let [lo, hi, fin, pdiv, prcp, pm] = scratch.split(gmax);
        let mut r0 = 0;
        while r0 < rows {
            let nr = brows.min(rows - r0);
            let (e0, n) = (r0 * c, nr * c);
            let ng = n / g;
            let xb = x.as_ptr().add(e0);
            stats_rows(xb, g, ng, lo, hi, fin);
            params16::<E>(cfg, ng, lo, hi, fin, sp.add(e0 / g * es), mp.add(e0 / g * es), pdiv, prcp, pm);
            scale_rcp(&mut prcp[..ng]);
            let ob = op.add(e0 * bpe / 8);
            // the four vectors from element e (a macro: closures lose the target features). The
            // code pass converts the block again, from L1: cheaper than writing an f32 copy in the
            // statistics pass and reading it back (a 512-bit store costs three cycles on Zen 4).
            macro_rules! ld4 {
                ($e:expr) => {{
                    let f = xb.add($e);
                    [load16(f), load16(f.add(16)), load16(f.add(32)), load16(f.add(48))]
                }};
            }
            if g % 64 == 0 {
                for gi in 0..ng {
                    let p = P::splat(pdiv, prcp, pm, gi);
                    let mut e = gi * g;
                    while e < (gi + 1) * g {
                        pack64::<BITS, false>(codes4::<ASYM>(ld4!(e), [p; 4], &k), ob.add(e * bpe / 8));
                        e += 64;
                    }
                }
            } else {
                // 32-element groups: two per step, the last step possibly half
                let mut e = 0;
                while e + 64 <= n {
                    let (pa, pb) = (P::splat(pdiv, prcp, pm, e / g), P::splat(pdiv, prcp, pm, (e + 32) / g));
                    pack64::<BITS, false>(codes4::<ASYM>(ld4!(e), [pa, pa, pb, pb], &k), ob.add(e * bpe / 8));
                    e += 64;
                }
                if e < n {
                    let pa = P::splat(pdiv, prcp, pm, e / g);
                    let v = [load16(xb.add(e)), load16(xb.add(e + 16))];
                    let q = codes4::<ASYM>([v[0], v[1], v[0], v[1]], [pa; 4], &k);
                    pack64::<BITS, true>(q, ob.add(e * bpe / 8));
                }
            }
            r0 += nr;
        }
    } else {
        // Per-channel groups run down the tokens: tiles of TILE_CH channels x g tokens, each
        // statistics (in registers), parameters, then codes while the tile is in L1. (Whole token
        // groups at a time, 64 KiB at group 32 and 1024 channels, left the code pass reading L2.)
        let units = x.len() / (g * c);
        let mut scratch = Scratch::take(6 * TILE_CH);
        let [lo, hi, fin, pdiv, prcp, pm] = scratch.split(TILE_CH);
        let x0 = x.as_ptr();
        for u in 0..units {
            let mut cb = 0;
            while cb < c {
                let w = TILE_CH.min(c - cb);
                let xt = x0.add(u * g * c + cb);
                // the tile TILE_PF_AHEAD on: further along these rows, or in the next token group
                let pcb = cb + TILE_PF_AHEAD * TILE_CH;
                let pf = if pcb < c { xt.wrapping_add(pcb - cb) } else { x0.wrapping_add((u + 1) * g * c + pcb - c) };
                if w == 64 {
                    stats_tile::<E, 4>(xt, pf, c, g, lo, hi, fin);
                } else {
                    stats_tile::<E, 2>(xt, pf, c, g, lo, hi, fin);
                }
                let g0 = u * c + cb;
                params16::<E>(cfg, w, lo, hi, fin, sp.add(g0 * es), mp.add(g0 * es), pdiv, prcp, pm);
                scale_rcp(&mut prcp[..w]);
                let p = [
                    P::lanes(pdiv, prcp, pm, 0),
                    P::lanes(pdiv, prcp, pm, 16),
                    P::lanes(pdiv, prcp, pm, 32),
                    P::lanes(pdiv, prcp, pm, 48),
                ];
                for r in 0..g {
                    let xr = xt.add(r * c);
                    let out = op.add(((u * g + r) * c + cb) * bpe / 8);
                    _mm_prefetch::<_MM_HINT_ET0>(out.wrapping_add(TILE_PF_AHEAD * TILE_CH * bpe / 8) as *const i8);
                    if w == 64 {
                        tile_row_codes::<E, BITS, ASYM, 4>(xr, &p, &k, out);
                    } else {
                        tile_row_codes::<E, BITS, ASYM, 2>(xr, &p, &k, out);
                    }
                }
                cb += w;
            }
        }
    }
}

/// # Safety
/// As for `quant_chunk`; slices as for `kernel::dequant_chunk`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
pub unsafe fn dequant_chunk<E: Elem>(
    cfg: &Config,
    c: usize,
    codes: &[u8],
    scales: &[u8],
    mins: &[u8],
    out: &mut [E],
    nt: bool,
) {
    let nt = nt && out.as_ptr() as usize % 16 == 0;
    macro_rules! go {
        ($b:literal, $a:literal) => {
            if nt {
                dequant_chunk_t::<E, $b, $a, true>(cfg, c, codes, scales, mins, out);
                _mm_sfence(); // streaming stores are ordered before the chunk is reported done
            } else {
                dequant_chunk_t::<E, $b, $a, false>(cfg, c, codes, scales, mins, out)
            }
        };
    }
    crate::math::for_bits_asym!(cfg, go);
}

#[inline(always)]
unsafe fn dec16<const ASYM: bool>(ci: __m512i, s: __m512, m: __m512, off: __m512) -> __m512 {
    let q = _mm512_cvtepi32_ps(ci);
    if ASYM {
        _mm512_add_ps(_mm512_mul_ps(q, s), m)
    } else {
        _mm512_mul_ps(_mm512_sub_ps(q, off), s)
    }
}

#[inline(always)]
unsafe fn dequant_chunk_t<E: Elem, const BITS: u8, const ASYM: bool, const NT: bool>(
    cfg: &Config,
    c: usize,
    codes: &[u8],
    scales: &[u8],
    mins: &[u8],
    out: &mut [E],
) {
    let g = cfg.group_size;
    let off = _mm512_set1_ps(CodeRange::of(cfg).off);
    let cp = codes.as_ptr();
    // both layouts visit the output front to back, 16 elements at a time
    let mut w = Writer::<E, NT>::new(out.as_mut_ptr());
    if cfg.axis == 0 {
        let ng = out.len() / g;
        let mut scratch = Scratch::take(2 * ng);
        let [ps, pm] = scratch.split(ng);
        crate::avx2::load_meta::<E>(scales, mins, cfg.asym, 0, ng, ps, pm);
        for gi in 0..ng {
            let (sv, mv) = (_mm512_set1_ps(ps[gi]), _mm512_set1_ps(pm[gi]));
            let mut e = gi * g;
            while e < (gi + 1) * g {
                w.push(dec16::<ASYM>(codes16::<BITS>(cp, e), sv, mv, off));
                e += 16;
            }
        }
    } else {
        let units = out.len() / (g * c);
        let mut scratch = Scratch::take(2 * c);
        let [ps, pm] = scratch.split(c);
        for u in 0..units {
            crate::avx2::load_meta::<E>(scales, mins, cfg.asym, u * c, c, ps, pm);
            for r in 0..g {
                let row = (u * g + r) * c;
                let mut e = 0;
                while e < c {
                    let (sv, mv) = (_mm512_loadu_ps(ps.as_ptr().add(e)), _mm512_loadu_ps(pm.as_ptr().add(e)));
                    w.push(dec16::<ASYM>(codes16::<BITS>(cp, row + e), sv, mv, off));
                    e += 16;
                }
            }
        }
    }
    w.finish();
}
