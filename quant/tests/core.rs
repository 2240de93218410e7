//! Core tests: header parsing, kernels against an independent scalar reference of the math,
//! SIMD path == portable path, round trips, pages, and no panics on arbitrary input (proptest).

use half::{bf16, f16};
use kvtuner_quant::kernel::{set_force_scalar, set_max_simd_level, simd_level, AVX2, AVX512, SCALAR};
use kvtuner_quant::*;
use proptest::prelude::*;
use std::sync::Mutex;

/// Serialises tests that flip the global scalar/SIMD switch.
static PATH_LOCK: Mutex<()> = Mutex::new(());

fn cfg(bits: u8, asym: bool, axis: u8, group_size: usize, residual_length: usize) -> Config {
    Config { bits, asym, axis, group_size, residual_length }
}

/// Reference: the formulas element by element, written without the crate's kernels.
struct Ref {
    codes: Vec<i32>,
    scale_bits: Vec<u32>,
    min_bits: Vec<u32>,
    nq: usize,
}

fn reference<E: Elem>(x: &[E], sh: &Shape, c: &Config) -> Ref {
    let row = sh.heads * sh.head_dim;
    let win = c.residual_length.min(sh.tokens);
    let nq = if c.axis == 0 { sh.tokens - win } else { (sh.tokens - win) / c.group_size * c.group_size };
    let bits_of = |v: E| -> u32 {
        let mut b = [0u8; 4];
        v.put(&mut b);
        if E::DTYPE == DType::F32 {
            u32::from_le_bytes(b)
        } else {
            u16::from_le_bytes([b[0], b[1]]) as u32
        }
    };
    // members of group gi, in natural element order
    let ngroups = nq * row / c.group_size;
    let members = |gi: usize| -> Vec<usize> {
        if c.axis == 0 {
            (gi * c.group_size..(gi + 1) * c.group_size).collect()
        } else {
            let (tg, ch) = (gi / row, gi % row);
            (0..c.group_size).map(|r| (tg * c.group_size + r) * row + ch).collect()
        }
    };
    let mut codes = vec![0i32; nq * row];
    let (mut scale_bits, mut min_bits) = (vec![], vec![]);
    for gi in 0..ngroups {
        let idx = members(gi);
        let v: Vec<f32> = idx.iter().map(|&i| x[i].to_f32()).collect();
        let finite = v.iter().all(|f| f.is_finite());
        if !finite {
            scale_bits.push(bits_of(E::nan()));
            if c.asym {
                min_bits.push(bits_of(E::nan()));
            }
            continue; // codes stay 0
        }
        let mn = v.iter().cloned().fold(f32::INFINITY, f32::min);
        let mx = v.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
        let (s, m, lo, hi) = if c.asym {
            let s = E::up((mx - mn) / ((1u32 << c.bits) - 1) as f32 + 0.0);
            let m = E::from_f32(mn + 0.0);
            min_bits.push(bits_of(m));
            (s, m.to_f32(), 0.0, ((1u32 << c.bits) - 1) as f32)
        } else {
            let q = ((1u32 << (c.bits - 1)) - 1) as f32;
            let a = v.iter().fold(0f32, |a, f| a.max(f.abs()));
            (E::up(a / q + 0.0), 0.0, -q, q)
        };
        scale_bits.push(bits_of(s));
        let sf = s.to_f32();
        for (k, &i) in idx.iter().enumerate() {
            codes[i] = if sf == 0.0 {
                0
            } else {
                let t = (v[k] - m) / sf;
                let t = if t.is_nan() { 0.0 } else { t };
                t.round_ties_even().clamp(lo, hi) as i32
            };
        }
    }
    Ref { codes, scale_bits, min_bits, nq }
}

fn rand_vals(seed: u64, n: usize) -> Vec<f32> {
    // xorshift: deterministic without extra crates
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 8.0
        })
        .collect()
}

fn check_against_reference<E: Elem>(x: &[E], sh: &Shape, c: &Config) {
    let blob = quantize(x, sh, c).unwrap();
    let u = unpack(&blob).unwrap();
    let r = reference(x, sh, c);
    assert_eq!(u.header.layout().nq, r.nq);
    assert_eq!(u.scale_bits, r.scale_bits, "scales {c:?} {sh:?}");
    assert_eq!(u.min_bits, r.min_bits, "mins {c:?} {sh:?}");
    assert_eq!(u.codes, r.codes, "codes {c:?} {sh:?}");
    // round trip: residual exact, quantized part within the bound
    let mut y = vec![E::zero(); x.len()];
    dequantize_into(&blob, &mut y).unwrap();
    let row = sh.heads * sh.head_dim;
    for i in r.nq * row..x.len() {
        assert_eq!(x[i].to_f32().to_bits(), y[i].to_f32().to_bits(), "residual element {i}");
    }
}

fn all_configs() -> Vec<Config> {
    let mut v = vec![];
    for bits in [2, 4, 8] {
        for asym in [false, true] {
            for (axis, g) in [(0, 8), (0, 32), (0, 64), (0, 3), (1, 4), (1, 32), (1, 5)] {
                for res in [0, 5, 40] {
                    v.push(cfg(bits, asym, axis, g, res));
                }
            }
        }
    }
    v
}

/// Runs `f` under every kernel family this CPU has (portable, AVX2, AVX-512).
fn both_paths(f: impl Fn()) {
    let _g = PATH_LOCK.lock().unwrap_or_else(|p| p.into_inner());
    for level in [SCALAR, AVX2, AVX512] {
        set_max_simd_level(level);
        if simd_level() == level {
            f();
        }
    }
    set_force_scalar(false);
}

#[test]
fn codes_and_metadata_match_reference_all_dtypes() {
    both_paths(|| {
        for (k, c) in all_configs().into_iter().enumerate() {
            let hd = if c.group_size == 3 { 48 } else { 64 };
            let sh = Shape { tokens: 70, heads: 2, head_dim: hd };
            let mut v = rand_vals(k as u64 + 1, 70 * 2 * hd);
            // a constant group, a zero group, NaN and Inf groups
            for i in 0..hd {
                v[2 * hd + i] = 1.25;
                v[4 * hd + i] = 0.0;
            }
            v[7 * hd + 3] = f32::NAN;
            v[9 * hd + 1] = f32::INFINITY;
            v[11 * hd + 5] = f32::NEG_INFINITY;
            let xh: Vec<f16> = v.iter().map(|&f| f16::from_f32(f)).collect();
            let xb: Vec<bf16> = v.iter().map(|&f| bf16::from_f32(f)).collect();
            check_against_reference(&xh, &sh, &c);
            check_against_reference(&xb, &sh, &c);
            check_against_reference(&v, &sh, &c);
        }
    });
}

#[test]
fn simd_and_scalar_paths_give_identical_bytes() {
    let _g = PATH_LOCK.lock().unwrap_or_else(|p| p.into_inner());
    for (k, c) in all_configs().into_iter().enumerate() {
        let hd = if c.group_size == 3 { 48 } else { 64 };
        let sh = Shape { tokens: 300, heads: 3, head_dim: hd };
        let v = rand_vals(100 + k as u64, 300 * 3 * hd);
        let xh: Vec<f16> = v.iter().map(|&f| f16::from_f32(f)).collect();
        set_force_scalar(true);
        let a = quantize(&xh, &sh, &c).unwrap();
        let mut ya = vec![f16::ZERO; xh.len()];
        dequantize_into(&a, &mut ya).unwrap();
        for level in [AVX2, AVX512] {
            set_max_simd_level(level);
            if simd_level() != level {
                continue;
            }
            let b = quantize(&xh, &sh, &c).unwrap();
            let mut yb = vec![f16::ZERO; xh.len()];
            dequantize_into(&b, &mut yb).unwrap();
            assert_eq!(a, b, "level {level} {c:?}");
            for (p, q) in ya.iter().zip(&yb) {
                assert!(p.to_bits() == q.to_bits() || (p.is_nan() && q.is_nan()), "level {level} {c:?}");
            }
        }
        set_force_scalar(false);
    }
}

fn as_bytes<E: Elem>(x: &[E]) -> &[u8] {
    unsafe { std::slice::from_raw_parts(x.as_ptr() as *const u8, std::mem::size_of_val(x)) }
}

/// Dequantizes `blob` into a window of a larger buffer that starts `shift` bytes past a 64-byte
/// boundary; returns the window's bytes, after checking that nothing around it was written.
fn dequantize_at<E: Elem>(blob: &[u8], n: usize, shift: usize) -> Vec<u8> {
    let es = std::mem::size_of::<E>();
    let canary = E::from_f32(7.0);
    let mut buf = vec![canary; n + 128 / es];
    let lead = (64 - buf.as_ptr() as usize % 64) % 64 + shift;
    assert_eq!(lead % es, 0);
    let start = lead / es;
    dequantize_into(blob, &mut buf[start..start + n]).unwrap();
    assert!(buf[..start].iter().chain(&buf[start + n..]).all(|&v| v == canary), "wrote outside the output");
    as_bytes(&buf[start..start + n]).to_vec()
}

fn streamed_output_equals_portable<E: Elem>(x: &[E], sh: &Shape) {
    let n = x.len();
    for c in [cfg(4, true, 0, 64, 0), cfg(2, false, 1, 32, 0)] {
        let blob = quantize(x, sh, &c).unwrap();
        set_force_scalar(true);
        let want = dequantize_at::<E>(&blob, n, 0);
        for level in [AVX2, AVX512] {
            set_max_simd_level(level);
            if simd_level() != level {
                continue;
            }
            // 16 bytes past a 32-byte boundary is numpy's usual alignment: the shifted stream
            for shift in [0, 16, 32, 48] {
                assert!(dequantize_at::<E>(&blob, n, shift) == want, "level {level} shift {shift} {c:?}");
            }
        }
        set_force_scalar(false);
    }
}

/// Outputs of 8 MiB and more are written with non-temporal stores (32-byte ones for 2-byte dtypes,
/// shifted by half a vector when the output is 16 mod 32): same bytes as the portable path at
/// every 16-byte alignment, nothing written around the output.
#[test]
fn large_outputs_streamed_at_any_16_byte_alignment() {
    let _g = PATH_LOCK.lock().unwrap_or_else(|p| p.into_inner());
    let sh = Shape { tokens: 2048, heads: 16, head_dim: 128 }; // 4 Mi elements: 8 MiB of fp16
    let v = rand_vals(77, sh.numel().unwrap());
    streamed_output_equals_portable(&v.iter().map(|&f| f16::from_f32(f)).collect::<Vec<_>>(), &sh);
    streamed_output_equals_portable(&v.iter().map(|&f| bf16::from_f32(f)).collect::<Vec<_>>(), &sh);
    streamed_output_equals_portable(&v, &sh);
}

/// Rows of 96 elements: the AVX-512 code pass steps 64 elements and ends each row (per-channel) or
/// block (per-token, group 32) with a half step; half of the groups hold values on a grid of
/// half-steps, so many quotients are exact ties or within 2^-12 of one (the fast path must give
/// way to the exact division there).
#[test]
fn half_steps_and_near_ties_match_reference() {
    both_paths(|| {
        for bits in [2u8, 4, 8] {
            for asym in [false, true] {
                for (axis, g) in [(0u8, 32usize), (1, 4), (1, 32)] {
                    let sh = Shape { tokens: 67, heads: 3, head_dim: 32 };
                    let n = 67 * 96;
                    let mut v = rand_vals(7 + bits as u64, n);
                    let levels = ((1u32 << bits) - 1) as f32;
                    for (i, f) in v.iter_mut().enumerate() {
                        if (i / 32) % 2 == 0 {
                            // k / 2 on [0, levels]: scale 1 (asym), ties at every odd k; the
                            // tiny nudges land within 2^-12 of a tie
                            let k = (i * 7919 % (2 * levels as usize + 1)) as f32;
                            let nudge = [0.0, 1.0 / 8192.0, -1.0 / 8192.0, 1.0 / 2048.0][i % 4];
                            *f = k / 2.0 + nudge;
                        }
                    }
                    let c = cfg(bits, asym, axis, g, 3);
                    let xh: Vec<f16> = v.iter().map(|&f| f16::from_f32(f)).collect();
                    let xb: Vec<bf16> = v.iter().map(|&f| bf16::from_f32(f)).collect();
                    check_against_reference(&xh, &sh, &c);
                    check_against_reference(&xb, &sh, &c);
                    check_against_reference(&v, &sh, &c);
                }
            }
        }
    });
}

#[test]
fn exact_half_quotients_round_to_even() {
    // group {0, 3}: 2-bit asym scale 1, codes of 0.5/1.5/2.5 are exactly representable ties
    let x: Vec<f32> = vec![0.0, 0.5, 1.5, 2.5, 3.0, 0.0, 0.0, 0.0];
    let sh = Shape { tokens: 1, heads: 1, head_dim: 8 };
    let c = cfg(2, true, 0, 8, 0);
    both_paths(|| {
        let u = unpack(&quantize(&x, &sh, &c).unwrap()).unwrap();
        assert_eq!(u.codes, vec![0, 0, 2, 2, 3, 0, 0, 0]);
    });
}

#[test]
fn header_roundtrip_and_mismatch_messages() {
    let sh = Shape { tokens: 10, heads: 2, head_dim: 32 };
    let c = cfg(4, true, 1, 4, 2);
    let x = vec![f16::from_f32(1.0); 640];
    let blob = quantize(&x, &sh, &c).unwrap();
    assert_eq!(&blob[..4], b"KVQT");
    let h = Header::parse(&blob).unwrap();
    assert_eq!(h.cfg, c);
    assert_eq!(h.shape, sh);
    assert_eq!(h.total, blob.len());
    let e = h.expect(&cfg(2, true, 1, 4, 2), DType::F16, &sh).unwrap_err();
    assert!(e.msg.contains("bits"), "{}", e.msg);
    let e = h.expect(&c, DType::BF16, &sh).unwrap_err();
    assert!(e.msg.contains("dtype"), "{}", e.msg);
    let e = h.expect(&cfg(4, true, 1, 8, 2), DType::F16, &sh).unwrap_err();
    assert!(e.msg.contains("group_size"), "{}", e.msg);
    let e = Header::parse(&blob[..blob.len() - 1]).unwrap_err();
    assert!(e.msg.contains("total_nbytes"), "{}", e.msg);
    let mut bad = blob.clone();
    bad[0] = b'X';
    assert!(Header::parse(&bad).unwrap_err().msg.contains("magic"));
    // per-channel: 10 tokens, window 2 -> 8 before it -> 2 groups of 4, nothing left over
    assert_eq!(h.layout().nq, 8);
    let h2 = Header::new(cfg(4, true, 1, 3, 2), DType::F16, sh).unwrap();
    assert_eq!(h2.layout().nq, 6); // 2 tail tokens join the exact window
}

#[test]
fn header_bytes_and_padding_describe_every_data_independent_byte() {
    // What the device codec writes from the layout alone: the header and the padding. Junk
    // in the output buffer before quantizing shows that every such byte is written.
    for c in all_configs() {
        for sh in [Shape { tokens: 16, heads: 2, head_dim: 24 }, Shape { tokens: 9, heads: 1, head_dim: 40 }] {
            if c.validate(&sh).is_err() {
                continue;
            }
            let h = Header::new(c, DType::BF16, sh).unwrap();
            let x: Vec<bf16> = rand_vals(7, sh.numel().unwrap()).into_iter().map(bf16::from_f32).collect();
            let mut blob = vec![0xA5u8; h.total];
            quantize_into(&x, &sh, &c, &mut blob).unwrap();
            assert_eq!(blob[..HEADER_NBYTES], h.to_bytes(), "{c:?} {sh:?}");
            let lay = h.layout();
            let mut covered = lay.codes_off + lay.codes_len;
            for r in h.padding() {
                assert!(r.start < r.end && r.end % 8 == 0, "{c:?} {sh:?} {r:?}");
                assert!(blob[r.clone()].iter().all(|&b| b == 0), "{c:?} {sh:?} {r:?}");
                covered += r.len();
            }
            // header + codes + metadata + padding + residual = the whole blob
            let meta = if c.asym { 2 * lay.meta_len } else { lay.meta_len };
            assert_eq!(covered + meta + lay.residual_len, h.total, "{c:?} {sh:?}");
        }
    }
}

#[test]
fn config_errors_name_the_argument() {
    let sh = Shape { tokens: 4, heads: 1, head_dim: 64 };
    let x = vec![0f32; 256];
    let e = quantize(&x, &sh, &cfg(3, true, 0, 32, 0)).unwrap_err();
    assert!(e.msg.contains("bits must be 2, 4 or 8"), "{}", e.msg);
    let e = quantize(&x, &sh, &cfg(4, true, 0, 48, 0)).unwrap_err();
    assert!(e.msg.contains("group_size must divide head_dim (64)"), "{}", e.msg);
    let e = quantize(&x, &sh, &cfg(4, true, 2, 32, 0)).unwrap_err();
    assert!(e.msg.contains("axis"), "{}", e.msg);
    let e = quantize(&x, &sh, &cfg(4, true, 0, 0, 0)).unwrap_err();
    assert!(e.msg.contains("group_size"), "{}", e.msg);
}

/// Caller integers (Python passes int64) are range-checked by the core, and a struct-built config
/// with the same value gets the same message: the checks live in one place.
#[test]
fn caller_parameters_are_checked_by_the_core() {
    let msg = |r: Result<Config>| r.unwrap_err().msg;
    assert_eq!(msg(Config::new(3, true, 0, 32, 0)), "bits must be 2, 4 or 8, got 3");
    assert_eq!(msg(Config::new(4, true, -1, 32, 0)), "axis must be 0 (per-token) or 1 (per-channel), got -1");
    assert_eq!(msg(Config::new(4, true, 0, 0, 0)), "group_size must be a positive integer, got 0");
    assert_eq!(msg(Config::new(4, true, 0, 1 << 32, 0)), "group_size must be at most 4294967295, got 4294967296");
    assert_eq!(msg(Config::new(4, true, 0, 32, -1)), "residual_length must be >= 0, got -1");
    assert_eq!(msg(Config::new(4, true, 0, 32, 1 << 32)), "residual_length must be at most 4294967295, got 4294967296");
    assert_eq!(Config::new(4, false, 1, 32, 7).unwrap(), cfg(4, false, 1, 32, 7));
    let sh = Shape { tokens: 4, heads: 1, head_dim: 64 };
    assert_eq!(cfg(4, true, 0, 0, 0).validate(&sh).unwrap_err().msg, "group_size must be a positive integer, got 0");
    assert_eq!(Shape::new(-1, 1, 64).unwrap_err().msg, "tokens must be >= 0, got -1");
    assert_eq!(Shape::new(1, 1, -64).unwrap_err().msg, "head_dim must be >= 0, got -64");
    assert_eq!(Shape::new(4, 1, 64).unwrap(), sh);
    assert_eq!(set_num_threads(-1).unwrap_err().msg, "n must be >= 1, got -1");
    assert_eq!(set_num_threads(5000).unwrap_err().msg, "n must be at most 4096, got 5000");
}

#[test]
fn pages_equal_single_blobs_and_strided_rows() {
    let (p, n, heads, hd) = (16usize, 5usize, 2usize, 64usize);
    let c = cfg(4, true, 1, 8, 3);
    let v = rand_vals(7, n * p * heads * hd);
    let x: Vec<f16> = v.iter().map(|&f| f16::from_f32(f)).collect();
    let ps = Shape { tokens: p, heads, head_dim: hd };
    let total = packed_nbytes(&c, DType::F16, &ps).unwrap();
    let (rows, stride, row_bytes) = (9usize, total + 40, total + 8);
    let mut buf = vec![0xAAu8; rows * stride];
    let ids = [4i64, 0, 8, 2, 6];
    let pr = unsafe { PageRows::new(buf.as_mut_ptr(), rows, stride, row_bytes).unwrap() };
    let sh = Shape { tokens: n * p, heads, head_dim: hd };
    quantize_pages(&x, &sh, &c, &pr, &ids).unwrap();
    let pel = p * heads * hd;
    for (i, &id) in ids.iter().enumerate() {
        let one = quantize(&x[i * pel..(i + 1) * pel], &ps, &c).unwrap();
        let at = id as usize * stride;
        assert_eq!(&buf[at..at + total], &one[..], "page {i}");
        assert!(buf[at + total..at + stride].iter().all(|&b| b == 0xAA), "bytes past the blob untouched");
    }
    let mut y = vec![f16::ZERO; x.len()];
    let pr = unsafe { PageRows::new(buf.as_mut_ptr(), rows, stride, row_bytes).unwrap() };
    dequantize_pages(&pr, &ids, &c, &sh, &mut y).unwrap();
    for (i, _) in ids.iter().enumerate() {
        let one = quantize(&x[i * pel..(i + 1) * pel], &ps, &c).unwrap();
        let mut z = vec![f16::ZERO; pel];
        dequantize_into(&one, &mut z).unwrap();
        assert_eq!(&y[i * pel..(i + 1) * pel], &z[..]);
    }
    // wrong config, bad ids: errors name the page / argument, out untouched
    let before = y.clone();
    let e = dequantize_pages(&pr, &ids, &cfg(2, true, 1, 8, 3), &sh, &mut y).unwrap_err();
    assert!(e.msg.contains("page 0 (page id 4)") && e.msg.contains("bits"), "{}", e.msg);
    let e = dequantize_pages(&pr, &[4, 0, 8, 2, 7], &c, &sh, &mut y).unwrap_err();
    assert!(e.msg.contains("page 4 (page id 7)") && e.msg.contains("magic"), "{}", e.msg);
    assert_eq!(y, before);
    let e = quantize_pages(&x, &sh, &c, &pr, &[4, 0, 9, 2, 6]).unwrap_err();
    assert!(e.msg.contains("page_ids[2] = 9 is out of range"), "{}", e.msg);
    let e = quantize_pages(&x, &sh, &c, &pr, &[4, 0, 4, 2, 6]).unwrap_err();
    assert!(e.msg.contains("repeated"), "{}", e.msg);
}

#[test]
fn threads_knob() {
    set_num_threads(2).unwrap();
    assert_eq!(get_num_threads(), 2);
    assert!(set_num_threads(0).is_err());
}

fn arb_config() -> impl Strategy<Value = Config> {
    (prop_oneof![Just(2u8), Just(4), Just(8)], any::<bool>(), 0u8..2, 1usize..12, 0usize..20)
        .prop_map(|(b, a, ax, g, r)| cfg(b, a, ax, g, r))
}

fn arb_val() -> impl Strategy<Value = f32> {
    prop_oneof![
        8 => -1000.0f32..1000.0,
        1 => Just(f32::NAN),
        1 => Just(f32::INFINITY),
        1 => Just(0.0f32),
        1 => Just(-0.0f32),
        1 => any::<f32>(),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

    #[test]
    fn parse_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
        let _ = Header::parse(&bytes);
        let _ = Header::parse_prefix(&bytes);
        let mut y = vec![0f32; 64];
        let _ = dequantize_into(&bytes, &mut y);
    }

    #[test]
    fn mutated_headers_never_panic(pos in 0usize..64, val in any::<u8>(), pos2 in 0usize..64, val2 in any::<u8>()) {
        let sh = Shape { tokens: 6, heads: 1, head_dim: 8 };
        let mut blob = quantize(&[1.5f32; 48], &sh, &cfg(4, true, 0, 4, 1)).unwrap();
        blob[pos] = val;
        blob[pos2] = val2;
        let mut y = vec![0f32; 48];
        let _ = dequantize_into(&blob, &mut y);
        let _ = unpack(&blob);
    }

    #[test]
    fn random_tensors_match_reference(c in arb_config(), tokens in 0usize..40, heads in 1usize..4,
                                      hd_mult in 1usize..5, vals in proptest::collection::vec(arb_val(), 1..64)) {
        let hd = if c.axis == 0 { c.group_size * hd_mult } else { hd_mult * 3 };
        let n = tokens * heads * hd;
        let x: Vec<f32> = (0..n).map(|i| vals[i % vals.len()] * (1.0 + (i % 7) as f32)).collect();
        let sh = Shape { tokens, heads, head_dim: hd };
        check_against_reference(&x, &sh, &c);
        let xh: Vec<f16> = x.iter().map(|&f| f16::from_f32(f)).collect();
        check_against_reference(&xh, &sh, &c);
    }

    #[test]
    fn error_bound_holds(c in arb_config(), seed in any::<u64>()) {
        let hd = if c.axis == 0 { c.group_size * 4 } else { 32 };
        let sh = Shape { tokens: 33, heads: 2, head_dim: hd };
        let v = rand_vals(seed, 33 * 2 * hd);
        let x: Vec<f16> = v.iter().map(|&f| f16::from_f32(f)).collect();
        let blob = quantize(&x, &sh, &c).unwrap();
        let u = unpack(&blob).unwrap();
        let mut y = vec![f16::ZERO; x.len()];
        dequantize_into(&blob, &mut y).unwrap();
        let row = 2 * hd;
        let nq = u.header.layout().nq;
        for i in 0..nq * row {
            let gi = if c.axis == 0 { i / c.group_size } else { (i / row / c.group_size) * row + i % row };
            let s = f16::from_bits(u.scale_bits[gi] as u16).to_f32();
            let mag = v.iter().map(|f| f16::from_f32(*f).to_f32().abs()).fold(0f32, f32::max);
            let ulp = f16::from_bits(y[i].to_bits() | 1).to_f32().abs() - f16::from_bits(y[i].to_bits() & !1).to_f32().abs();
            let bound = s / 2.0 + 4.0 * f32::EPSILON * mag + ulp.abs();
            let err = (x[i].to_f32() - y[i].to_f32()).abs();
            prop_assert!(err <= bound, "i={} err={} bound={} s={}", i, err, bound, s);
        }
    }
}
