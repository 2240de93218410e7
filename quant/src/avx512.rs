//! AVX-512 (F + BW + VL) variants of the hot loops, chosen at run time when the CPU has them and the
//! shapes allow 16-lane steps; group parameters reuse the AVX2 code (`avx2::params`). Same bytes as the
//! portable path (tests compare them); only speed differs.

use crate::avx2::{params, with_scratch};
use crate::elem::Elem;
use crate::format::{Config, DType};
use crate::kernel::CodeRange;
use std::arch::x86_64::*;

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

#[inline(always)]
unsafe fn store16<E: Elem>(p: *mut E, v: __m512) {
    match E::DTYPE {
        DType::F16 => _mm256_storeu_si256(p as *mut __m256i, _mm512_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(v)),
        DType::BF16 => {
            let b = _mm512_castps_si512(v);
            let lsb = _mm512_and_si512(_mm512_srli_epi32::<16>(b), _mm512_set1_epi32(1));
            let r = _mm512_srli_epi32::<16>(_mm512_add_epi32(b, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF))));
            let nan = _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(v, v);
            let r = _mm512_mask_blend_epi32(nan, r, _mm512_set1_epi32(0x7FC0));
            _mm256_storeu_si256(p as *mut __m256i, _mm512_cvtepi32_epi16(r));
        }
        DType::F32 => _mm512_storeu_ps(p as *mut f32, v),
    }
}

/// Non-temporal `store16` as two 8-lane halves; `p` 16-byte aligned.
#[inline(always)]
unsafe fn store16_nt<E: Elem>(p: *mut E, v: __m512) {
    crate::avx2::store8_nt(p, _mm512_castps512_ps256(v));
    crate::avx2::store8_nt(p.add(8), _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(v))));
}

#[derive(Clone, Copy)]
struct K {
    lo: __m512,
    hi: __m512,
    off: __m512i,
    tol: __m512,
    magic: __m512,
}

impl K {
    #[inline(always)]
    unsafe fn new(r: CodeRange) -> K {
        K {
            lo: _mm512_set1_ps(r.lo),
            hi: _mm512_set1_ps(r.hi),
            off: _mm512_set1_epi32(r.off as i32),
            // see avx2::K: ties closer than 2^-12 are redone with the exact division
            tol: _mm512_set1_ps(0.5 - 1.0 / 4096.0),
            magic: _mm512_set1_ps(12_582_912.0),
        }
    }
}

/// 16 codes, same rules as `avx2::code8`.
#[inline(always)]
unsafe fn code16<const ASYM: bool>(v: __m512, d: __m512, rc: __m512, m: __m512, k: &K) -> __m512i {
    let dx = if ASYM { _mm512_sub_ps(v, m) } else { v };
    let t = _mm512_mul_ps(dx, rc);
    let y = _mm512_add_ps(t, k.magic);
    let qf = _mm512_sub_ps(y, k.magic);
    let ok = _mm512_cmp_ps_mask::<_CMP_LT_OQ>(_mm512_abs_ps(_mm512_sub_ps(t, qf)), k.tol);
    let q = if ok == 0xFFFF {
        _mm512_sub_epi32(_mm512_castps_si512(y), _mm512_castps_si512(k.magic))
    } else {
        let t = _mm512_div_ps(dx, d);
        let t = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask::<_CMP_ORD_Q>(t, t), t);
        let q = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(t);
        _mm512_cvtps_epi32(_mm512_min_ps(_mm512_max_ps(q, k.lo), k.hi))
    };
    if ASYM {
        q
    } else {
        _mm512_add_epi32(q, k.off)
    }
}

/// Packs 16 codes (i32 lanes < 2^BITS) into 16 * BITS / 8 bytes, least significant bits first.
/// (Non-temporal stores were tried here and measured slower: the writes are partial cache lines.)
#[inline(always)]
unsafe fn pack16<const BITS: u8>(q: __m512i, out: *mut u8) {
    match BITS {
        8 => _mm_storeu_si128(out as *mut __m128i, _mm512_cvtepi32_epi8(q)),
        4 => {
            // each 64-bit lane holds (c[2j], c[2j+1]): c[2j] | c[2j+1] << 4 in its low byte
            let y = _mm512_or_si512(q, _mm512_srli_epi64::<28>(q));
            _mm_storel_epi64(out as *mut __m128i, _mm512_cvtepi64_epi8(y));
        }
        _ => {
            let y = _mm512_or_si512(q, _mm512_srli_epi64::<30>(q)); // 4-bit pairs in each 64-bit lane
            let z = _mm512_cvtepi64_epi32(y); // 8 x (c[2j] | c[2j+1] << 2)
            let w = _mm256_or_si256(z, _mm256_srli_epi64::<28>(z));
            let b = _mm256_cvtepi64_epi8(w);
            std::ptr::write_unaligned(out as *mut u32, _mm_cvtsi128_si32(b) as u32);
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

/// Per-group (finite, min, max) of `ng` groups of `g` (multiple of 16) elements; f32 copy to `xf`.
#[inline(always)]
unsafe fn stats_rows<E: Elem>(
    x: *const E,
    g: usize,
    ng: usize,
    xf: &mut [f32],
    lo: &mut [f32],
    hi: &mut [f32],
    fin: &mut [f32],
) {
    for gi in 0..ng {
        let p = x.add(gi * g);
        let (mut mn, mut mx, mut acc) =
            (_mm512_set1_ps(f32::INFINITY), _mm512_set1_ps(f32::NEG_INFINITY), _mm512_setzero_ps());
        let mut i = 0;
        while i < g {
            // the hardware prefetcher alone leaves the core waiting on memory: ask for 4 KiB ahead
            _mm_prefetch::<_MM_HINT_T0>((p.add(i) as *const i8).wrapping_add(4096));
            let v = load16(p.add(i));
            _mm512_storeu_ps(xf.as_mut_ptr().add(gi * g + i), v);
            acc = _mm512_add_ps(acc, v); // non-finite iff some element is (or a float32 sum overflowed)
            mn = _mm512_min_ps(mn, v);
            mx = _mm512_max_ps(mx, v);
            i += 16;
        }
        lo[gi] = _mm512_reduce_min_ps(mn);
        hi[gi] = _mm512_reduce_max_ps(mx);
        let z = _mm512_mul_ps(acc, _mm512_setzero_ps());
        let suspect = _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(z, z) != 0;
        fin[gi] = if suspect { xf[gi * g..(gi + 1) * g].iter().all(|f| f.is_finite()) as u8 as f32 } else { 1.0 };
    }
}

/// Per-channel (finite, min, max) over `g` rows of `c` (multiple of 32) elements: 32 channels (one
/// 64-byte line of fp16) at a time down the rows, running values in registers.
#[inline(always)]
unsafe fn stats_cols32<E: Elem>(x: *const E, c: usize, g: usize, lo: &mut [f32], hi: &mut [f32], fin: &mut [f32]) {
    let one = _mm512_set1_ps(1.0);
    let zero = _mm512_setzero_ps();
    let mut cb = 0;
    while cb < c {
        let (mut mn0, mut mx0, mut ac0) = (_mm512_set1_ps(f32::INFINITY), _mm512_set1_ps(f32::NEG_INFINITY), zero);
        let (mut mn1, mut mx1, mut ac1) = (mn0, mx0, zero);
        for r in 0..g {
            let p = x.add(r * c + cb);
            let (v0, v1) = (load16(p), load16(p.add(16)));
            // sums: non-finite iff some element is (or a float32 sum overflowed: rechecked below)
            ac0 = _mm512_add_ps(ac0, v0);
            ac1 = _mm512_add_ps(ac1, v1);
            mn0 = _mm512_min_ps(mn0, v0);
            mn1 = _mm512_min_ps(mn1, v1);
            mx0 = _mm512_max_ps(mx0, v0);
            mx1 = _mm512_max_ps(mx1, v1);
        }
        _mm512_storeu_ps(lo.as_mut_ptr().add(cb), mn0);
        _mm512_storeu_ps(lo.as_mut_ptr().add(cb + 16), mn1);
        _mm512_storeu_ps(hi.as_mut_ptr().add(cb), mx0);
        _mm512_storeu_ps(hi.as_mut_ptr().add(cb + 16), mx1);
        for (h, ac) in [(0usize, ac0), (16, ac1)] {
            let z = _mm512_mul_ps(ac, zero);
            let bad = _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(z, z);
            _mm512_storeu_ps(fin.as_mut_ptr().add(cb + h), one);
            if bad != 0 {
                for j in 0..16 {
                    if bad >> j & 1 != 0 {
                        let ok = (0..g).all(|r| (*x.add(r * c + cb + h + j)).to_f32().is_finite());
                        fin[cb + h + j] = ok as u8 as f32;
                    }
                }
            }
        }
        cb += 32;
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
    match (cfg.bits, cfg.asym) {
        (2, true) => go!(2, true),
        (2, false) => go!(2, false),
        (4, true) => go!(4, true),
        (4, false) => go!(4, false),
        (8, true) => go!(8, true),
        _ => go!(8, false),
    }
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
        let brows = (4096 / c).max(1);
        let bmax = brows * c;
        let gmax = bmax / g;
        with_scratch(bmax + 6 * gmax, |s| {
            let (xf, s) = s.split_at_mut(bmax);
            let (lo, s) = s.split_at_mut(gmax);
            let (hi, s) = s.split_at_mut(gmax);
            let (fin, s) = s.split_at_mut(gmax);
            let (pdiv, s) = s.split_at_mut(gmax);
            let (prcp, pm) = s.split_at_mut(gmax);
            let mut r0 = 0;
            while r0 < rows {
                let nr = brows.min(rows - r0);
                let (e0, n) = (r0 * c, nr * c);
                let ng = n / g;
                stats_rows(x.as_ptr().add(e0), g, ng, xf, lo, hi, fin);
                params::<E>(cfg, ng, lo, hi, fin, sp.add(e0 / g * es), mp.add(e0 / g * es), pdiv, prcp, pm);
                let ob = op.add(e0 * bpe / 8);
                for gi in 0..ng {
                    let (d, r, m) = (_mm512_set1_ps(pdiv[gi]), _mm512_set1_ps(prcp[gi]), _mm512_set1_ps(pm[gi]));
                    let mut e = gi * g;
                    while e < (gi + 1) * g {
                        let q = code16::<ASYM>(_mm512_loadu_ps(xf.as_ptr().add(e)), d, r, m, &k);
                        pack16::<BITS>(q, ob.add(e * bpe / 8));
                        e += 16;
                    }
                }
                r0 += nr;
            }
        });
    } else {
        let units = x.len() / (g * c);
        with_scratch(6 * c, |s| {
            let (lo, s) = s.split_at_mut(c);
            let (hi, s) = s.split_at_mut(c);
            let (fin, s) = s.split_at_mut(c);
            let (pdiv, s) = s.split_at_mut(c);
            let (prcp, pm) = s.split_at_mut(c);
            for u in 0..units {
                let xu = x.as_ptr().add(u * g * c);
                stats_cols32(xu, c, g, lo, hi, fin);
                params::<E>(cfg, c, lo, hi, fin, sp.add(u * c * es), mp.add(u * c * es), pdiv, prcp, pm);
                for r in 0..g {
                    let xr = xu.add(r * c);
                    let orow = op.add((u * g + r) * c * bpe / 8);
                    let mut e = 0;
                    while e < c {
                        let (d, rc, m) = (
                            _mm512_loadu_ps(pdiv.as_ptr().add(e)),
                            _mm512_loadu_ps(prcp.as_ptr().add(e)),
                            _mm512_loadu_ps(pm.as_ptr().add(e)),
                        );
                        pack16::<BITS>(code16::<ASYM>(load16(xr.add(e)), d, rc, m, &k), orow.add(e * bpe / 8));
                        e += 16;
                    }
                }
            }
        });
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
    match (cfg.bits, cfg.asym) {
        (2, true) => go!(2, true),
        (2, false) => go!(2, false),
        (4, true) => go!(4, true),
        (4, false) => go!(4, false),
        (8, true) => go!(8, true),
        _ => go!(8, false),
    }
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
    let (cp, outp) = (codes.as_ptr(), out.as_mut_ptr());
    if cfg.axis == 0 {
        let ng = out.len() / g;
        with_scratch(2 * ng, |s| {
            let (ps, pm) = s.split_at_mut(ng);
            crate::avx2::load_meta::<E>(scales, mins, cfg.asym, 0, ng, ps, pm);
            for gi in 0..ng {
                let (sv, mv) = (_mm512_set1_ps(ps[gi]), _mm512_set1_ps(pm[gi]));
                let mut e = gi * g;
                while e < (gi + 1) * g {
                    let y = dec16::<ASYM>(codes16::<BITS>(cp, e), sv, mv, off);
                    if NT {
                        store16_nt(outp.add(e), y)
                    } else {
                        store16(outp.add(e), y)
                    }
                    e += 16;
                }
            }
        });
    } else {
        let units = out.len() / (g * c);
        with_scratch(2 * c, |s| {
            let (ps, pm) = s.split_at_mut(c);
            for u in 0..units {
                crate::avx2::load_meta::<E>(scales, mins, cfg.asym, u * c, c, ps, pm);
                for r in 0..g {
                    let row = (u * g + r) * c;
                    let mut e = 0;
                    while e < c {
                        let (sv, mv) = (_mm512_loadu_ps(ps.as_ptr().add(e)), _mm512_loadu_ps(pm.as_ptr().add(e)));
                        let y = dec16::<ASYM>(codes16::<BITS>(cp, row + e), sv, mv, off);
                        if NT {
                            store16_nt(outp.add(row + e), y)
                        } else {
                            store16(outp.add(row + e), y)
                        }
                        e += 16;
                    }
                }
            }
        });
    }
}
