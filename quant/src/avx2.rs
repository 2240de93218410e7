//! AVX2 + FMA + F16C kernels, selected at run time (`kernel::simd_enabled`). They produce exactly the
//! bytes of the portable path in `portable.rs` (tests compare the two); only speed differs.
//!
//! Per chunk: (1) group statistics, (2) group parameters eight groups at a time, (3) codes, 32
//! elements per step, packed with byte shuffles.

use crate::elem::Elem;
use crate::format::{Config, DType};
use crate::math::{group_params, CodeRange, RCP_MAX, RCP_MIN};
use crate::scratch::{split_equal, Scratch};
use std::arch::x86_64::*;

/// Whether this module can take a chunk: rows of 32-element packing steps and, per-token, groups
/// of whole 8-lane vectors.
pub fn fits(cfg: &Config, c: usize) -> bool {
    c % 32 == 0 && (cfg.axis == 1 || cfg.group_size % 8 == 0)
}

#[inline(always)]
unsafe fn load8<E: Elem>(p: *const E) -> __m256 {
    match E::DTYPE {
        DType::F16 => _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i)),
        DType::BF16 => {
            _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(_mm_loadu_si128(p as *const __m128i))))
        }
        DType::F32 => _mm256_loadu_ps(p as *const f32),
    }
}

/// bfloat16 round-to-nearest-even of 8 floats as u32 lanes (NaN -> canonical 0x7FC0).
#[inline(always)]
unsafe fn bf16_rne(v: __m256) -> __m256i {
    let b = _mm256_castps_si256(v);
    let lsb = _mm256_and_si256(_mm256_srli_epi32::<16>(b), _mm256_set1_epi32(1));
    let r = _mm256_srli_epi32::<16>(_mm256_add_epi32(b, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF))));
    let nan = _mm256_castps_si256(_mm256_cmp_ps::<_CMP_UNORD_Q>(v, v));
    _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7FC0), nan)
}

/// 8 u32 lanes (each < 65536) -> 8 u16 in order.
#[inline(always)]
unsafe fn narrow16(r: __m256i) -> __m128i {
    _mm256_castsi256_si128(_mm256_permute4x64_epi64::<0b1000>(_mm256_packus_epi32(r, r)))
}

#[inline(always)]
unsafe fn store8<E: Elem>(p: *mut E, v: __m256) {
    match E::DTYPE {
        DType::F16 => _mm_storeu_si128(p as *mut __m128i, _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(v)),
        DType::BF16 => _mm_storeu_si128(p as *mut __m128i, narrow16(bf16_rne(v))),
        DType::F32 => _mm256_storeu_ps(p as *mut f32, v),
    }
}

/// Like `store8` but non-temporal (bypasses the cache: no read-for-ownership of a large output).
/// `p` must be 16-byte aligned (numpy only guarantees 16).
#[inline(always)]
pub(crate) unsafe fn store8_nt<E: Elem>(p: *mut E, v: __m256) {
    match E::DTYPE {
        DType::F16 => _mm_stream_si128(p as *mut __m128i, _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(v)),
        DType::BF16 => _mm_stream_si128(p as *mut __m128i, narrow16(bf16_rne(v))),
        DType::F32 => {
            _mm_stream_ps(p as *mut f32, _mm256_castps256_ps128(v));
            _mm_stream_ps((p as *mut f32).add(4), _mm256_extractf128_ps::<1>(v));
        }
    }
}

/// M_up on 8 lanes (values >= 0 or NaN): (stored bit patterns as u32 lanes, their float values).
#[inline(always)]
unsafe fn up8<E: Elem>(v: __m256) -> (__m256i, __m256) {
    match E::DTYPE {
        DType::F16 => {
            let h = _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(v);
            let lt = _mm256_castps_si256(_mm256_cmp_ps::<_CMP_LT_OQ>(_mm256_cvtph_ps(h), v));
            // lanes that rounded down move to the next value up (+1 on a positive pattern)
            let lt16 = _mm_packs_epi32(_mm256_castsi256_si128(lt), _mm256_extracti128_si256::<1>(lt));
            let h = _mm_sub_epi16(h, lt16);
            (_mm256_cvtepu16_epi32(h), _mm256_cvtph_ps(h))
        }
        DType::BF16 => {
            let r = bf16_rne(v);
            let lt =
                _mm256_castps_si256(_mm256_cmp_ps::<_CMP_LT_OQ>(_mm256_castsi256_ps(_mm256_slli_epi32::<16>(r)), v));
            let r = _mm256_sub_epi32(r, lt);
            (r, _mm256_castsi256_ps(_mm256_slli_epi32::<16>(r)))
        }
        DType::F32 => (_mm256_castps_si256(v), v),
    }
}

/// Stores 8 metadata values (u32 lanes of bit patterns) in the dtype's width.
#[inline(always)]
unsafe fn store_meta<E: Elem>(p: *mut u8, bits: __m256i) {
    match E::DTYPE {
        DType::F32 => _mm256_storeu_si256(p as *mut __m256i, bits),
        _ => _mm_storeu_si128(p as *mut __m128i, narrow16(bits)),
    }
}

#[inline(always)]
unsafe fn hmin(v: __m256) -> f32 {
    let m = _mm_min_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let m = _mm_min_ps(m, _mm_movehl_ps(m, m));
    _mm_cvtss_f32(_mm_min_ss(m, _mm_shuffle_ps::<1>(m, m)))
}

#[inline(always)]
unsafe fn hmax(v: __m256) -> f32 {
    let m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    _mm_cvtss_f32(_mm_max_ss(m, _mm_shuffle_ps::<1>(m, m)))
}

/// Group parameters for `n` groups from their statistics; `fin` is 1.0 for a finite group. Writes
/// the stored scale/min patterns to `scales`/`mins` and the float parameters to `pdiv`/`prcp`/`pm`.
/// Same results as `math::group_params`, eight groups at a time.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
pub(crate) unsafe fn params<E: Elem>(
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
    let zero = _mm256_setzero_ps();
    let levels = _mm256_set1_ps(cfg.levels() as f32);
    let qmax = _mm256_set1_ps(cfg.qmax() as f32);
    let inf = _mm256_set1_ps(f32::INFINITY);
    let nan = _mm256_set1_ps(f32::NAN);
    let nan_bits = _mm256_set1_epi32(E::DTYPE.nan_bits() as i32);
    let (rlo, rhi) = (_mm256_set1_ps(RCP_MIN), _mm256_set1_ps(RCP_MAX));
    let one = _mm256_set1_ps(1.0);
    let mut i = 0;
    while i + 8 <= n {
        let l = _mm256_loadu_ps(lo.as_ptr().add(i));
        let h = _mm256_loadu_ps(hi.as_ptr().add(i));
        let ok = _mm256_cmp_ps::<_CMP_NEQ_OQ>(_mm256_loadu_ps(fin.as_ptr().add(i)), zero);
        let s32 = if cfg.asym {
            _mm256_add_ps(_mm256_div_ps(_mm256_sub_ps(h, l), levels), zero)
        } else {
            _mm256_add_ps(_mm256_div_ps(_mm256_max_ps(h, _mm256_sub_ps(zero, l)), qmax), zero)
        };
        let (sb, sf) = up8::<E>(s32);
        let sb = _mm256_blendv_epi8(nan_bits, sb, _mm256_castps_si256(ok));
        let sf = _mm256_blendv_ps(nan, sf, ok);
        store_meta::<E>(scales.add(i * es), sb);
        let div = _mm256_blendv_ps(sf, inf, _mm256_cmp_ps::<_CMP_EQ_OQ>(sf, zero));
        let safe = _mm256_and_ps(_mm256_cmp_ps::<_CMP_GE_OQ>(sf, rlo), _mm256_cmp_ps::<_CMP_LE_OQ>(sf, rhi));
        let rcp = _mm256_blendv_ps(nan, _mm256_div_ps(one, sf), safe);
        _mm256_storeu_ps(pdiv.as_mut_ptr().add(i), div);
        _mm256_storeu_ps(prcp.as_mut_ptr().add(i), rcp);
        if cfg.asym {
            // the min is an input value, so its conversion to the dtype is exact
            let m = _mm256_add_ps(l, zero);
            let mb = match E::DTYPE {
                DType::F16 => _mm256_cvtepu16_epi32(_mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(m)),
                DType::BF16 => _mm256_srli_epi32::<16>(_mm256_castps_si256(m)),
                DType::F32 => _mm256_castps_si256(m),
            };
            store_meta::<E>(mins.add(i * es), _mm256_blendv_epi8(nan_bits, mb, _mm256_castps_si256(ok)));
            _mm256_storeu_ps(pm.as_mut_ptr().add(i), _mm256_blendv_ps(nan, m, ok));
        } else {
            _mm256_storeu_ps(pm.as_mut_ptr().add(i), zero);
        }
        i += 8;
    }
    while i < n {
        let p = group_params::<E>(cfg, fin[i] != 0.0, lo[i], hi[i]);
        p.s_store.put(std::slice::from_raw_parts_mut(scales.add(i * es), es));
        if cfg.asym {
            p.m_store.put(std::slice::from_raw_parts_mut(mins.add(i * es), es));
        }
        pdiv[i] = p.div;
        prcp[i] = p.rcp;
        pm[i] = p.m;
        i += 1;
    }
}

/// Constants of the code computation.
#[derive(Clone, Copy)]
struct K {
    lo: __m256,
    hi: __m256,
    off: __m256i,
    tol: __m256,
    absmask: __m256,
    magic: __m256,
}

impl K {
    #[inline(always)]
    unsafe fn new(r: CodeRange) -> K {
        K {
            lo: _mm256_set1_ps(r.lo),
            hi: _mm256_set1_ps(r.hi),
            off: _mm256_set1_epi32(r.off as i32),
            // Every unclamped quotient has |t| <= 2^8, where the fast quotient is within 2.5 ulp
            // (< 2^-14) of the exact one; anything closer than 2^-12 to a tie is redone exactly.
            tol: _mm256_set1_ps(0.5 - 1.0 / 4096.0),
            absmask: _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFF_FFFF)),
            // t + 1.5 * 2^23 rounds t half-to-even into the low mantissa bits (|t| < 2^22)
            magic: _mm256_set1_ps(12_582_912.0),
        }
    }
}

/// Codes of 8 elements (already float32) as i32 lanes (symmetric codes offset).
///
/// Fast path: `t = (x - m) * (1/s)`, rounded with the magic constant. The group's own min/max bound
/// every quotient to [0, 2^b - 1] (asym) or [-qmax, qmax] (sym) up to a few ulps, so no clamp is
/// needed there. Lanes near a tie, or not finite, take the exact division (NaN -> 0) and the clamp.
#[inline(always)]
unsafe fn code8<const ASYM: bool>(v: __m256, d: __m256, rc: __m256, m: __m256, k: &K) -> __m256i {
    let dx = if ASYM { _mm256_sub_ps(v, m) } else { v };
    let t = _mm256_mul_ps(dx, rc);
    let y = _mm256_add_ps(t, k.magic);
    let qf = _mm256_sub_ps(y, k.magic);
    let ok = _mm256_cmp_ps::<_CMP_LT_OQ>(_mm256_and_ps(_mm256_sub_ps(t, qf), k.absmask), k.tol);
    let q = if _mm256_movemask_ps(ok) == 0xFF {
        _mm256_sub_epi32(_mm256_castps_si256(y), _mm256_castps_si256(k.magic))
    } else {
        let t = _mm256_div_ps(dx, d);
        let t = _mm256_and_ps(t, _mm256_cmp_ps::<_CMP_ORD_Q>(t, t));
        let q = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(t);
        _mm256_cvtps_epi32(_mm256_min_ps(_mm256_max_ps(q, k.lo), k.hi))
    };
    if ASYM {
        q
    } else {
        _mm256_add_epi32(q, k.off)
    }
}

/// Packs 32 codes (4 x 8 i32 lanes, each < 2^BITS) into 32 * BITS / 8 bytes at `out`.
#[inline(always)]
unsafe fn pack32<const BITS: u8>(ci: [__m256i; 4], out: *mut u8) {
    let bytes = _mm256_permutevar8x32_epi32(
        _mm256_packus_epi16(_mm256_packus_epi32(ci[0], ci[1]), _mm256_packus_epi32(ci[2], ci[3])),
        _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7),
    );
    match BITS {
        8 => _mm256_storeu_si256(out as *mut __m256i, bytes),
        4 => {
            // byte pairs (c0, c1) -> c0 + 16*c1
            let y = _mm256_maddubs_epi16(bytes, _mm256_set1_epi16(0x1001));
            _mm_storeu_si128(out as *mut __m128i, narrow8(y));
        }
        _ => {
            // (c0 + 4c1) + 16(c2 + 4c3)
            let y = _mm256_maddubs_epi16(bytes, _mm256_set1_epi16(0x0401));
            let z = _mm256_madd_epi16(y, _mm256_set1_epi32(0x0010_0001));
            let w = _mm256_shuffle_epi8(
                z,
                _mm256_setr_epi8(
                    0, 4, 8, 12, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, 0, 4, 8, 12, -1, -1, -1, -1, -1, -1,
                    -1, -1, -1, -1, -1, -1,
                ),
            );
            let lo = _mm256_cvtsi256_si32(w) as u32 as u64;
            let hi = _mm256_extract_epi32::<4>(w) as u32 as u64;
            std::ptr::write_unaligned(out as *mut u64, lo | (hi << 32));
        }
    }
}

/// 16 u16 lanes (each < 256) -> 16 bytes in order.
#[inline(always)]
unsafe fn narrow8(y: __m256i) -> __m128i {
    _mm256_castsi256_si128(_mm256_permute4x64_epi64::<0b1000>(_mm256_packus_epi16(y, y)))
}

/// 8 codes starting at element `e` as i32 lanes.
#[inline(always)]
unsafe fn codes8<const BITS: u8>(codes: *const u8, e: usize) -> __m256i {
    match BITS {
        8 => _mm256_cvtepu8_epi32(_mm_loadl_epi64(codes.add(e) as *const __m128i)),
        4 => {
            let w = std::ptr::read_unaligned(codes.add(e / 2) as *const u32);
            _mm256_and_si256(
                _mm256_srlv_epi32(_mm256_set1_epi32(w as i32), _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28)),
                _mm256_set1_epi32(15),
            )
        }
        _ => {
            let w = std::ptr::read_unaligned(codes.add(e / 4) as *const u16);
            _mm256_and_si256(
                _mm256_srlv_epi32(_mm256_set1_epi32(w as i32), _mm256_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14)),
                _mm256_set1_epi32(3),
            )
        }
    }
}

/// `x_hat = q * s + m` (not fused: with cancellation an FMA would differ from the reference by many ulps).
#[inline(always)]
unsafe fn dec8<const ASYM: bool>(ci: __m256i, s: __m256, m: __m256, off: __m256) -> __m256 {
    let q = _mm256_cvtepi32_ps(ci);
    if ASYM {
        _mm256_add_ps(_mm256_mul_ps(q, s), m)
    } else {
        _mm256_mul_ps(_mm256_sub_ps(q, off), s)
    }
}

/// Per-group (finite, min, max) of `ng` contiguous groups of `g` (multiple of 8) elements, also
/// writing the elements as f32 to `xf` for the code pass.
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
    let zero = _mm256_setzero_ps();
    for gi in 0..ng {
        let p = x.add(gi * g);
        let (mut mn, mut mx, mut acc) = (_mm256_set1_ps(f32::INFINITY), _mm256_set1_ps(f32::NEG_INFINITY), zero);
        let mut i = 0;
        while i < g {
            // the hardware prefetcher alone leaves the core waiting on memory: ask for 4 KiB ahead
            _mm_prefetch::<_MM_HINT_T0>((p.add(i) as *const i8).wrapping_add(4096));
            let v = load8(p.add(i));
            _mm256_storeu_ps(xf.as_mut_ptr().add(gi * g + i), v);
            // NaN and +-Inf make the sum non-finite (so may a float32 overflow: rechecked below)
            acc = _mm256_add_ps(acc, v);
            mn = _mm256_min_ps(mn, v);
            mx = _mm256_max_ps(mx, v);
            i += 8;
        }
        lo[gi] = hmin(mn);
        hi[gi] = hmax(mx);
        let suspect = _mm256_movemask_ps(_mm256_cmp_ps::<_CMP_UNORD_Q>(_mm256_mul_ps(acc, zero), zero)) != 0;
        fin[gi] = if suspect { xf[gi * g..(gi + 1) * g].iter().all(|f| f.is_finite()) as u8 as f32 } else { 1.0 };
    }
}

/// Per-channel (finite, min, max) over `g` rows of `c` (multiple of 8) elements.
#[inline(always)]
pub(crate) unsafe fn stats_cols<E: Elem>(
    x: *const E,
    c: usize,
    g: usize,
    lo: &mut [f32],
    hi: &mut [f32],
    fin: &mut [f32],
) {
    let zero = _mm256_setzero_ps();
    let one = _mm256_set1_ps(1.0);
    let mut cb = 0;
    while cb < c {
        let (mut mn, mut mx, mut acc) = (_mm256_set1_ps(f32::INFINITY), _mm256_set1_ps(f32::NEG_INFINITY), zero);
        for r in 0..g {
            // prefetch the same place one token group ahead (prefetches never fault)
            _mm_prefetch::<_MM_HINT_T0>((x.wrapping_add(g * c + r * c + cb)) as *const i8);
            let v = load8(x.add(r * c + cb));
            acc = _mm256_add_ps(acc, _mm256_mul_ps(v, zero));
            mn = _mm256_min_ps(mn, v);
            mx = _mm256_max_ps(mx, v);
        }
        _mm256_storeu_ps(lo.as_mut_ptr().add(cb), mn);
        _mm256_storeu_ps(hi.as_mut_ptr().add(cb), mx);
        _mm256_storeu_ps(fin.as_mut_ptr().add(cb), _mm256_and_ps(one, _mm256_cmp_ps::<_CMP_ORD_Q>(acc, acc)));
        cb += 8;
    }
}

/// Quantizes a chunk (see `kernel::quant_chunk`); requires `fits(cfg, c)`.
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C; slices are sized as `quant_chunk` documents.
#[target_feature(enable = "avx2,fma,f16c")]
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
    let (sp, mp, op) = (scales.as_mut_ptr(), mins.as_mut_ptr(), codes.as_mut_ptr());
    let bpe = BITS as usize; // bits per element
    if cfg.axis == 0 {
        // batches of whole rows, about 4096 elements, so the f32 copy stays in L1
        let rows = x.len() / c;
        let brows = (4096 / c).max(1);
        let per_vec = g % 32 != 0; // groups narrower than a 32-element packing step
        let bmax = brows * c;
        let gmax = bmax / g;
        let nvmax = if per_vec { bmax / 8 } else { 0 };
        let mut scratch = Scratch::take(bmax + 6 * gmax + 3 * nvmax);
        let (xf, s) = scratch.split_at_mut(bmax);
        let (stats, per_vec_params) = s.split_at_mut(6 * gmax);
        let [lo, hi, fin, pdiv, prcp, pm] = split_equal(stats, gmax);
        let [vd, vr, vm] = split_equal(per_vec_params, nvmax);
        let mut r0 = 0;
        while r0 < rows {
            let nr = brows.min(rows - r0);
            let (e0, n) = (r0 * c, nr * c);
            let ng = n / g;
            let g0 = e0 / g;
            stats_rows(x.as_ptr().add(e0), g, ng, xf, lo, hi, fin);
            params::<E>(
                cfg,
                ng,
                lo,
                hi,
                fin,
                sp.add(g0 * E::DTYPE.nbytes()),
                mp.add(g0 * E::DTYPE.nbytes()),
                pdiv,
                prcp,
                pm,
            );
            let ob = op.add(e0 * bpe / 8);
            if !per_vec {
                for gi in 0..ng {
                    let (d, r, m) = (_mm256_set1_ps(pdiv[gi]), _mm256_set1_ps(prcp[gi]), _mm256_set1_ps(pm[gi]));
                    let mut e = gi * g;
                    while e < (gi + 1) * g {
                        let mut ci = [_mm256_setzero_si256(); 4];
                        for (j, cij) in ci.iter_mut().enumerate() {
                            *cij = code8::<ASYM>(_mm256_loadu_ps(xf.as_ptr().add(e + 8 * j)), d, r, m, &k);
                        }
                        pack32::<BITS>(ci, ob.add(e * bpe / 8));
                        e += 32;
                    }
                }
            } else {
                for gi in 0..ng {
                    let (a, b) = (gi * g / 8, (gi + 1) * g / 8);
                    vd[a..b].fill(pdiv[gi]);
                    vr[a..b].fill(prcp[gi]);
                    vm[a..b].fill(pm[gi]);
                }
                let mut e = 0;
                while e < n {
                    let mut ci = [_mm256_setzero_si256(); 4];
                    for (j, cij) in ci.iter_mut().enumerate() {
                        let v = e / 8 + j;
                        let (d, r, m) = (_mm256_set1_ps(vd[v]), _mm256_set1_ps(vr[v]), _mm256_set1_ps(vm[v]));
                        *cij = code8::<ASYM>(_mm256_loadu_ps(xf.as_ptr().add(e + 8 * j)), d, r, m, &k);
                    }
                    pack32::<BITS>(ci, ob.add(e * bpe / 8));
                    e += 32;
                }
            }
            r0 += nr;
        }
    } else {
        let units = x.len() / (g * c);
        let mut scratch = Scratch::take(6 * c);
        let [lo, hi, fin, pdiv, prcp, pm] = scratch.split(c);
        for u in 0..units {
            let xu = x.as_ptr().add(u * g * c);
            stats_cols(xu, c, g, lo, hi, fin);
            params::<E>(
                cfg,
                c,
                lo,
                hi,
                fin,
                sp.add(u * c * E::DTYPE.nbytes()),
                mp.add(u * c * E::DTYPE.nbytes()),
                pdiv,
                prcp,
                pm,
            );
            for r in 0..g {
                let xr = xu.add(r * c);
                let orow = op.add((u * g + r) * c * bpe / 8);
                let mut e = 0;
                while e < c {
                    let mut ci = [_mm256_setzero_si256(); 4];
                    for (j, cij) in ci.iter_mut().enumerate() {
                        let o = e + 8 * j;
                        let (d, rc, m) = (
                            _mm256_loadu_ps(pdiv.as_ptr().add(o)),
                            _mm256_loadu_ps(prcp.as_ptr().add(o)),
                            _mm256_loadu_ps(pm.as_ptr().add(o)),
                        );
                        *cij = code8::<ASYM>(load8(xr.add(o)), d, rc, m, &k);
                    }
                    pack32::<BITS>(ci, orow.add(e * bpe / 8));
                    e += 32;
                }
            }
        }
    }
}

/// Dequantizes a chunk (see `kernel::dequant_chunk`); same preconditions as `quant_chunk`.
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C; slices are sized as `dequant_chunk` documents.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn dequant_chunk<E: Elem>(
    cfg: &Config,
    c: usize,
    codes: &[u8],
    scales: &[u8],
    mins: &[u8],
    out: &mut [E],
    nt: bool,
) {
    // non-temporal stores need 16-byte aligned output (every 8-element store is then aligned)
    let nt = nt && out.as_ptr() as usize % 16 == 0;
    macro_rules! go {
        ($b:literal, $a:literal) => {
            if nt {
                dequant_chunk_t::<E, $b, $a, true>(cfg, c, codes, scales, mins, out);
                // order the streaming stores before the chunk is reported done to other threads
                _mm_sfence();
            } else {
                dequant_chunk_t::<E, $b, $a, false>(cfg, c, codes, scales, mins, out)
            }
        };
    }
    crate::math::for_bits_asym!(cfg, go);
}

/// Metadata of `n` groups starting at group `g0` widened to f32 (scale, min).
#[inline(always)]
pub(crate) unsafe fn load_meta<E: Elem>(
    scales: &[u8],
    mins: &[u8],
    asym: bool,
    g0: usize,
    n: usize,
    ps: &mut [f32],
    pm: &mut [f32],
) {
    let es = E::DTYPE.nbytes();
    let wid = |p: *const u8| -> __m256 {
        match E::DTYPE {
            DType::F16 => _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i)),
            DType::BF16 => _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(_mm_loadu_si128(
                p as *const __m128i,
            )))),
            DType::F32 => _mm256_loadu_ps(p as *const f32),
        }
    };
    let mut i = 0;
    while i + 8 <= n {
        _mm256_storeu_ps(ps.as_mut_ptr().add(i), wid(scales.as_ptr().add((g0 + i) * es)));
        let m = if asym { wid(mins.as_ptr().add((g0 + i) * es)) } else { _mm256_setzero_ps() };
        _mm256_storeu_ps(pm.as_mut_ptr().add(i), m);
        i += 8;
    }
    while i < n {
        ps[i] = E::get(&scales[(g0 + i) * es..]).to_f32();
        pm[i] = if asym { E::get(&mins[(g0 + i) * es..]).to_f32() } else { 0.0 };
        i += 1;
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
    let off = _mm256_set1_ps(CodeRange::of(cfg).off);
    let (cp, outp) = (codes.as_ptr(), out.as_mut_ptr());
    if cfg.axis == 0 {
        let ng = out.len() / g;
        let mut scratch = Scratch::take(2 * ng);
        let [ps, pm] = scratch.split(ng);
        load_meta::<E>(scales, mins, cfg.asym, 0, ng, ps, pm);
        for gi in 0..ng {
            let (sv, mv) = (_mm256_set1_ps(ps[gi]), _mm256_set1_ps(pm[gi]));
            let mut e = gi * g;
            while e < (gi + 1) * g {
                let y = dec8::<ASYM>(codes8::<BITS>(cp, e), sv, mv, off);
                if NT {
                    store8_nt(outp.add(e), y)
                } else {
                    store8(outp.add(e), y)
                }
                e += 8;
            }
        }
    } else {
        let units = out.len() / (g * c);
        let mut scratch = Scratch::take(2 * c);
        let [ps, pm] = scratch.split(c);
        for u in 0..units {
            load_meta::<E>(scales, mins, cfg.asym, u * c, c, ps, pm);
            for r in 0..g {
                let row = (u * g + r) * c;
                let mut e = 0;
                while e < c {
                    let (sv, mv) = (_mm256_loadu_ps(ps.as_ptr().add(e)), _mm256_loadu_ps(pm.as_ptr().add(e)));
                    let y = dec8::<ASYM>(codes8::<BITS>(cp, row + e), sv, mv, off);
                    if NT {
                        store8_nt(outp.add(row + e), y)
                    } else {
                        store8(outp.add(row + e), y)
                    }
                    e += 8;
                }
            }
        }
    }
}
